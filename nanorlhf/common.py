"""Plumbing shared by the training scripts: setup, loading models, padding, LR schedule, LM loss, progress/MFU."""
import json
import math
import os
import time

import torch

from nanorlhf import dist, kernels
from nanorlhf.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, seed_everything, set_rng_state
from nanorlhf.config import print_config
from nanorlhf.model import GPT, GPTConfig
from nanorlhf.tokenizer import Tokenizer


def setup(cfg):
    """Resolve --threads, print the config and seed, seed every RNG, set kernels' switch to the device's default
    (compiled on CUDA; a script's --compile sets it after), and return the torch device (clear error if
    unavailable)."""
    cfg.threads = set_threads(cfg.threads)
    print_config(cfg)
    device = get_device(cfg.device)
    seed_everything(cfg.seed)
    kernels.enable(None, device)
    return device


def busy_cores(seconds=0.2):
    """Cores' worth of CPU time that other processes used over the next `seconds`, while this one sleeps (Linux's
    /proc/stat: every CPU's time not idle; steal counts as busy, a hypervisor's other guests held the core). None
    where /proc/stat does not exist."""
    def times():
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        return user + nice + system + irq + softirq + steal, idle + iowait
    try:
        busy0, idle0 = times()
        time.sleep(seconds)
        busy1, idle1 = times()
    except OSError:
        return None
    total = (busy1 - busy0) + (idle1 - idle0)
    return os.cpu_count() * (busy1 - busy0) / total if total else 0.0


def set_threads(threads):
    """torch's CPU threads: `threads`, or with 0 (auto) one per core that other processes leave free at the start,
    at least 1: with the cores free, torch's default (one a core); with one of 2 cores busy, one thread, which runs
    a PPO batch ~2.5× faster than two that spin waiting for each other (docs/performance.md). OMP_NUM_THREADS, if
    set, is the count (auto reads it). The count moves the float rounding of matmuls and sums: a run's numbers
    repeat at the same thread count, which the config prints (and a resumed run keeps)."""
    if threads == 0:
        threads = torch.get_num_threads()
        busy = None if "OMP_NUM_THREADS" in os.environ else busy_cores()
        if busy is not None:
            threads = max(1, min(threads, round(os.cpu_count() - busy)))
    torch.set_num_threads(threads)
    return threads


def get_device(name):
    """torch.device(name), or a one-line exit when this machine cannot run on it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name}: not a device name (cpu, cuda, cuda:1, mps)") from None
    usable = {"cpu": lambda: True, "cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if not usable.get(device.type, lambda: False)():
        raise SystemExit(f"--device {name}: not available on this machine (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def read_checkpoint(path, map_location="cpu"):
    """load_checkpoint for the scripts: a missing, truncated or foreign file (--init, --reward_model, state.pt)
    ends the run with a one-line error naming it, not a traceback."""
    try:
        return load_checkpoint(path, map_location)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None


def first_nonfinite(x, name=""):
    """The key path of the first floating-point tensor in a nested dict/list with a NaN or inf, or None."""
    if isinstance(x, torch.Tensor):
        return name if x.is_floating_point() and not torch.isfinite(x).all() else None
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, (list, tuple)) else ()
    for k, v in items:
        bad = first_nonfinite(v, f"{name}/{k}" if name else str(k))
        if bad:
            return bad
    return None


def check_finite(value, step, what, state_path):
    """The NaN guard: a non-finite loss, gradient norm or reward (any element of a tensor) stops the run, naming
    the step (from 1), the quantity and its value, with the last good state.pt left as it was."""
    if not torch.isfinite(value).all():
        shown = f" {value.item()}" if value.numel() == 1 else ""
        raise SystemExit(f"step {step}: non-finite {what}{shown}; last good state in {state_path}")


def resume(cfg, model, optimizer, map_location="cpu"):
    """--resume: restore model, optimizer and every RNG from cfg.out/state.pt, so the run continues the same
    random streams; returns the state (its "step" and "extra" are the script's), or None for a fresh start."""
    path = os.path.join(cfg.out, "state.pt")
    if not (cfg.resume and os.path.exists(path)):
        return None
    state = read_checkpoint(path, map_location)
    cfg.threads = set_threads(state["config"].get("threads", cfg.threads))  # the same rounding as the run resumed
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    print(f"resumed from {path} at step {state['step']}")
    return state


def write_state(path, ckpt):
    """The NaN guard's last line before state.pt: an update can leave weights or optimizer moments non-finite
    even when its loss and gradient were finite (an overflow in the step itself). Such a state is not written:
    the run stops naming the step and the tensor, and the last good state.pt stays as it was."""
    bad = first_nonfinite({k: ckpt[k] for k in ("model", "optimizer", "extra")})
    if bad:
        raise SystemExit(f"step {ckpt['step']}: non-finite {bad} after the update; last good state in {path}")
    save_checkpoint(path, ckpt)


def write_results(out, ckpt, results):
    """A stage's final outputs: `out`/ckpt.pt (the checkpoint, results in its extra) and `out`/metrics.json."""
    save_checkpoint(os.path.join(out, "ckpt.pt"), ckpt)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(results, f, indent=1)


def load_model(path, head="lm", device="cpu"):
    """(model, tokenizer, checkpoint or None) from a nanorlhf checkpoint file or a Hugging Face GPT-2 folder.
    An LM checkpoint loaded with head="scalar" keeps its trunk and gets a fresh scalar head (RM from SFT)."""
    if os.path.isdir(path):
        model, tok, ckpt = GPT.from_pretrained(path, head=head), Tokenizer.load(path), None
        if tok.vocab_size > model.config.vocab_size:
            model.resize_token_embeddings(tok.vocab_size)  # the template's special tokens, after GPT-2's ids
    else:
        ckpt = read_checkpoint(path)
        if ckpt["head"] == "scalar" and head == "lm":
            raise SystemExit(f"{path}: holds a scalar-head (reward/value) model, not a language model")
        model = GPT(GPTConfig(**ckpt["model_config"]), head=head)
        model.load_state_dict(ckpt["model"], strict=ckpt["head"] == head)
        tok = Tokenizer.load(ckpt["tokenizer"])
    return model.to(device), tok, ckpt


def checkpoint_or_compile(model, activation_checkpointing):
    """A trained model's --activation_checkpointing (dist.checkpoint_blocks) and kernels.compile_model (a no-op
    without --compile): dynamo cannot trace checkpointed blocks, so with both only the log-probs are compiled."""
    if activation_checkpointing:
        dist.checkpoint_blocks(model)
    return kernels.compile_model(model, blocks=not activation_checkpointing)


def pad(seqs, pad_id, left=False, device="cpu"):
    """List of token lists -> (ids (B, T) long, mask (B, T) bool), right-padded (left-padded if left=True)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = True
    return ids.to(device), mask.to(device)


def adamw(model, lr, weight_decay, fused=False):
    """AdamW with weight decay on the matrices only (not on biases, LayerNorm gains), betas as GPT-3/nanoGPT.
    fused: one kernel for the whole step (--compile's choice; same math, last bits differ)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95),
                             fused=fused or None)  # None: torch's default (foreach), not the per-tensor loop


def cosine_lr(step, total, lr, warmup, final_ratio=0.1):
    """Linear warm-up for `warmup` steps, then cosine decay to final_ratio·lr at `total` steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def next_token_logprobs(model, ids, mask=None, temperature=1.0):
    """The log-prob of each next token, log p(ids[:, t+1] | ids[:, :t+1]) for every t: (B, T-1). logits[:, t]
    predict token t+1, so hidden state t scores token t+1 (GPT.logprobs_and_entropy)."""
    h = model.hidden_states(ids[:, :-1], attention_mask=None if mask is None else mask[:, :-1])  # (B, T-1, C)
    return model.logprobs_and_entropy(h, ids[:, 1:], temperature)[0]  # (B, T-1)


def check_room(tok, prompts, max_new_tokens, block_size):
    """Exit with one line when the longest prompt (as formatted for the model) and max_new_tokens do not fit the
    context, before any sampling (generate would otherwise fail deep inside a run)."""
    longest = max(len(tok.format_prompt(p)) for p in prompts)
    if longest + max_new_tokens > block_size:
        raise SystemExit(f"--max_new_tokens {max_new_tokens}: the longest prompt has {longest} tokens and the "
                         f"model's context is {block_size}, so at most {block_size - longest} new tokens fit")


def lm_loss(model, ids, loss_mask):
    """Next-token cross-entropy, averaged over the tokens where loss_mask (B, T) is 1 (targets, not inputs).
    Right padding only: a real token never attends to a pad after it."""
    logp = next_token_logprobs(model, ids)  # (B, T-1)
    target_mask = loss_mask[:, 1:].to(logp.dtype)  # (B, T-1)
    return -(logp * target_mask).sum() / target_mask.sum().clamp(min=1)


def response_logprob_sums(model, examples, pad_id, device):
    """log π(y|x) of each example (tok.format_example's (ids, response mask)), (N,): the sum of the response tokens'
    log-probs, its EOS included if it ended (right-padded batch)."""
    ids, _ = pad([e[0] for e in examples], pad_id, device=device)  # (N, T)
    response_mask, _ = pad([e[1] for e in examples], 0, device=device)  # (N, T) 1 on response tokens
    logp = next_token_logprobs(model, ids)  # (N, T-1) log p(ids[:, t+1])
    return (logp * response_mask[:, 1:]).sum(1)  # targets 1..T-1: prompt and padding contribute 0


def token_stream(tok, docs):
    """All documents as one stream of ids, each document followed by EOS."""
    ids = []
    for d in docs:
        ids += tok.encode(d) + [tok.eos_id]
    return torch.tensor(ids, dtype=torch.long)


def epoch_batch(items, step, batch_size, seed, drop_last=False):
    """The items of step `step`, in epochs of ceil(len(items) / batch_size) steps (drop_last: floor, a tail shorter
    than a batch is skipped). Each epoch's order comes from a generator seeded with seed + epoch, so the batches are
    a function of (seed, step): a resumed run sees the same ones."""
    epoch, i = divmod(step, len(items) // batch_size if drop_last else -(-len(items) // batch_size))
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [items[j] for j in order[i * batch_size:(i + 1) * batch_size]]


def get_batch(stream, batch_size, block_size, device):
    """Random windows of block_size + 1 tokens: inputs and their next tokens in one tensor (B, block_size + 1)."""
    starts = torch.randint(len(stream) - block_size - 1, (batch_size,))
    return torch.stack([stream[s:s + block_size + 1] for s in starts]).to(device)


@torch.no_grad()
def val_loss(model, stream, block_size, device, max_windows=200):
    """Mean next-token loss over fixed, non-overlapping windows of held-out text."""
    was_training = model.training
    model.eval()
    n = min(max_windows, (len(stream) - 1) // (block_size + 1))
    windows = stream[:n * (block_size + 1)].view(n, block_size + 1).to(device)
    losses = [lm_loss(model, w, torch.ones_like(w, dtype=torch.bool)).item() for w in windows.split(32)]
    model.train(was_training)
    return sum(losses) / len(losses)


_PEAK = {}


def peak_flops(device, again=False):
    """The machine's dense matmul FLOP/s (fp32 on CPU, bf16 on CUDA): the MFU denominator, measured once per process
    (again=True: measured anew, the higher reading kept). A quarter second of products first, so that cores that
    were idle reach their clock; then the best of 5 timings at each size (CPU: 512 and 1024, whichever the
    machine runs faster): the fastest rate it showed, so that no moment of a run reads above it."""
    device = torch.device(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    if device.type not in _PEAK or again:
        sizes, dtype = ((512, 1024), torch.float32) if device.type == "cpu" else ((8192,), torch.bfloat16)
        g = torch.Generator(device=device).manual_seed(0)  # its own RNG: measuring must not move the seeded streams
        best, t_warm = 0.0, time.perf_counter()
        for n in sizes:
            a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
            b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
            while time.perf_counter() - t_warm < 0.25:  # the warm-up, on the first size
                a @ b
                sync()
            reps = max(1, 2 ** 31 // n ** 3)  # about 2 GFLOP a timing
            for _ in range(5):
                sync()
                t0 = time.perf_counter()
                for _ in range(reps):
                    a @ b
                sync()
                best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
        _PEAK[device.type] = max(best, _PEAK.get(device.type, 0.0))
    return _PEAK[device.type]


class Progress:
    """A log line every `every` steps: step, metrics, lr, tokens/s, MFU, ETA."""

    def __init__(self, total, every, flops_per_token, device, start=0, name=""):
        self.total, self.every, self.fpt, self.name, self.device = total, every, flops_per_token, name, device
        self.peak = peak_flops(device)
        self.t0 = self.t_last = time.perf_counter()
        self.tokens, self.flops, self.start = 0, 0, start

    def step(self, step, tokens, flops=None, **metrics):
        """Call after optimizer step `step` (0-based) that processed `tokens` tokens (and `flops` FLOPs, if not
        tokens × flops_per_token); prints every `every`."""
        self.tokens += tokens
        self.flops += tokens * self.fpt if flops is None else flops
        if (step + 1) % self.every and step + 1 != self.total:
            return
        now = time.perf_counter()
        seconds = max(now - self.t_last, 1e-9)
        done = step + 1 - self.start
        eta = (now - self.t0) / max(done, 1) * (self.total - step - 1)
        parts = [f"{self.name}step {step + 1}/{self.total}"] + [f"{k} {v:.4g}" for k, v in metrics.items()]
        for _ in range(3):  # faster than the peak: the peak was read in a slow moment (a busy machine): read again
            if self.flops / seconds <= self.peak:
                break
            self.peak = peak_flops(self.device, again=True)
        parts += [f"tok/s {self.tokens / seconds:,.0f}", f"MFU {100 * self.flops / seconds / self.peak:.1f}%",
                  f"ETA {eta:.0f}s"]
        print(" | ".join(parts), flush=True)
        self.t_last, self.tokens, self.flops = now, 0, 0
