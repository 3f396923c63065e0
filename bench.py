"""Benchmark of the RLHF hot path: workload W1 (one PPO batch, eager vs compiled) and log-prob peak memory.

W1, the CPU PPO workload: a GPT-2-style model of 4 layers, d_model 128, 4 heads, vocab 2048, context 64, randomly
initialized as policy, frozen reference, reward model and value model. One PPO batch = 64 prompts of 32 tokens →
32 new tokens each (temperature 1, full softmax, no early stop: the EOS id is one that is never sampled) → score
(reference and old log-probs, RM score, values) → 4 PPO epochs × 4 minibatches of 16, updating policy and value.
It runs the functions train_ppo runs (generate → ppo.score → rlhf.ppo_rewards / ppo.gae_advantages → ppo.update),
so it measures the real code. Time = wall seconds per batch after one warm-up batch (which also pays for compiling);
the eager and the compiled run take turns batch by batch. Compiled = train_ppo --compile (kernels.enable): the
compiled transformer (kernels.compile_model), decode step, log-probs, PPO loss and GAE, and fused Adam.

    python bench.py                  # CPU: W1 eager vs compiled + log-prob peak memory at vocab 50257
    python bench.py --device cuda    # the same, plus decode tokens/s and GPT-2 124M training MFU (bf16 autocast)
"""
import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch

from nanorlhf import kernels, ppo, rlhf
from nanorlhf.common import get_device, lm_loss, peak_flops
from nanorlhf.engine import generate
from nanorlhf.model import GPT, GPTConfig

PEER_SECONDS = 3.4  # TRL 0.24 PPOTrainer on W1, this kind of 2-core machine (measured by an earlier session)
GOAL_SECONDS = 1.9


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------
# W1: one PPO batch

def w1_models(device, seed=0):
    """(policy, ref_policy, reward_model, value_model), set up as train_ppo.load_models does, random init."""
    torch.manual_seed(seed)
    config = GPTConfig(block_size=64, vocab_size=2048, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
    policy = GPT(config).to(device)
    ref_policy = copy.deepcopy(policy).requires_grad_(False)
    reward_model = GPT(config, head="scalar").to(device).requires_grad_(False)
    value_model = copy.deepcopy(reward_model).requires_grad_(True)
    for m in (policy, ref_policy, reward_model, value_model):
        m.eval()
    return policy, ref_policy, reward_model, value_model


def w1_batch(models, optimizers, prompts, cfg, step, device):
    """One PPO batch through the library functions train_ppo runs; returns seconds of (generation, scoring, update)."""
    policy, ref_policy, reward_model, value_model = models
    never = -1  # an EOS id no sampled token can equal: every response has exactly max_new_tokens tokens
    sync(device)
    t0 = time.perf_counter()
    gen = generate(policy, prompts, cfg.max_new_tokens, never, 0, temperature=cfg.temperature)
    sync(device)
    t1 = time.perf_counter()
    P = gen.prompt_len
    b = ppo.score(policy, ref_policy, value_model, gen.tokens, gen.attention_mask, P, never, cfg.temperature)
    # W1 has no tokenizer (random ids), so the RM reads the sampled ids; every row is 64 real tokens
    b["scores"] = reward_model(gen.tokens).float()[:, -1]  # (B,)
    sync(device)
    t2 = time.perf_counter()
    rewards, _, _ = rlhf.ppo_rewards(b["scores"], b["finished"], b["logprobs"], b["ref_logprobs"],
                                     b["response_mask"], cfg.kl_coef, cfg.kl_kind, cfg.missing_eos_penalty)
    b["advantages"], b["returns"] = ppo.gae_advantages(rewards, b["values"], b["response_mask"], cfg.gamma, cfg.lam)
    ppo.update(policy, value_model, optimizers, b, P, cfg, step)
    sync(device)
    t3 = time.perf_counter()
    assert gen.response_mask.all() and gen.tokens.shape == (len(prompts), 64), "W1 needs 32 + 32 tokens, no stop"
    return t1 - t0, t2 - t1, t3 - t2


def w1_setup(device, compiled):
    """Models, optimizers, config and prompt generator of one W1 run (eager or compiled), as train_ppo sets them up."""
    models = w1_models(device)
    cfg = ppo.PPOConfig(batch_size=64, minibatch_size=16, ppo_epochs=4, max_new_tokens=32, temperature=1.0,
                              device=device.type, compile=compiled)
    with kernels.compiling(compiled):
        for m in models:
            kernels.compile_model(m)
    return models, ppo.make_optimizers(models[0], models[3], cfg), cfg, torch.Generator().manual_seed(1)


def bench_w1(device, batches):
    """{"eager": [...], "compiled": [...]}: per-batch (generation, scoring, update) seconds. The two runs take turns
    batch by batch, so a machine whose speed drifts (this one does) slows both alike; batch 0 of each is the
    warm-up (and compiles)."""
    runs = {"eager": w1_setup(device, False), "compiled": w1_setup(device, True)}
    times = {name: [] for name in runs}
    for step in range(batches + 1):
        for name, (models, optimizers, cfg, g) in runs.items():
            prompts = torch.randint(0, 2048, (64, 32), generator=g).tolist()
            with kernels.compiling(cfg.compile):
                t = w1_batch(models, optimizers, prompts, cfg, step, device)
            if step > 0:
                times[name].append(t)
    return times


def report_w1(device, batches):
    peak = peak_flops(device)
    print("W1 FLOPs per batch:" + ppo.batch_flops.__doc__.split(":", 1)[1].rstrip("."))
    print(f"matmul peak (measured now, {'fp32' if device.type == 'cpu' else 'bf16'}): {peak / 1e9:,.0f} GFLOP/s")
    models = w1_models(device)
    flops = ppo.batch_flops(models[0], models[3], 64, 64, 32, 4)  # B, T = P + N, P, ppo_epochs
    total = sum(flops.values())
    results = {}
    for name, times in bench_w1(device, batches).items():
        per_batch = [sum(t) for t in times]
        sec = statistics.median(per_batch)
        parts = [statistics.median(t[i] for t in times) for i in range(3)]
        results[name] = sec
        print(f"W1 {name:8s}: {sec:.3f} s/batch (median of {batches}: " + ", ".join(f"{t:.3f}" for t in per_batch)
              + f") | {64 * 64 / sec:,.0f} tokens/s | {total / 1e9:.0f} GFLOP | MFU {100 * total / sec / peak:.1f}%")
        for (stage, f), t in zip(flops.items(), parts):
            print(f"    {stage:10s} {t:.3f} s  {f / 1e9:6.1f} GFLOP  {f / t / 1e9:6.1f} GFLOP/s  "
                  f"MFU {100 * f / t / peak:.1f}%")
    for name, sec in results.items():
        print(f"W1 {name}: {PEER_SECONDS / sec:.2f}× the peer (TRL PPOTrainer ≈{PEER_SECONDS} s/batch); "
              f"goal ≤ {GOAL_SECONDS} s: {'met' if sec <= GOAL_SECONDS else 'NOT met'}")


# ----------------------------------------------------------------------------------------------------------------
# peak memory of the log-prob path (forward + backward) vs the naive log_softmax at the GPT-2 vocabulary

def logprob_inputs(rows, d, vocab, device):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(rows, d, device=device, generator=g, requires_grad=True)
    weight = (0.02 * torch.randn(vocab, d, device=device, generator=g)).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), device=device, generator=g)
    return hidden, weight, targets


def logprob_step(kind, hidden, weight, targets, compiled=False):
    if kind == "naive":
        logp = kernels.token_logprobs_eager(hidden, weight, targets)  # (N, V) log_softmax, then gather
    else:
        with kernels.compiling(compiled):
            logp = kernels.token_logprobs(hidden, weight, targets)  # chunked from hidden states
    logp.sum().backward()


def memory_status(field):
    """A line of /proc/self/status in bytes: VmRSS (resident now) or VmHWM (its high-water mark)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def memory_child(kind, rows, d, vocab):
    """Run in a fresh process: peak resident memory of one forward + backward beyond the inputs. The OS counts
    every page, so it sees torch's allocations; the parent sets MALLOC_MMAP_THRESHOLD_ so freed tensors go back
    to the OS at once (glibc would otherwise keep them in its heap and RSS would not fall)."""
    torch.set_num_threads(2)
    logprob_step(kind, *logprob_inputs(64, d, vocab, "cpu"))  # page in the code paths at a small size
    inputs = logprob_inputs(rows, d, vocab, "cpu")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS (Linux ≥ 4.0)
    before = memory_status("VmRSS")
    assert memory_status("VmHWM") <= before + 2**20, "could not reset the high-water mark"
    logprob_step(kind, *inputs)
    print(memory_status("VmHWM") - before)


def report_memory(device, rows=4096, d=768, vocab=50257):
    """Peak memory beyond the inputs (hidden, weight, targets and their gradients' first buffers excluded)."""
    peaks = {}
    for kind in ("naive", "chunked"):
        if device.type == "cuda":
            inputs = logprob_inputs(rows, d, vocab, device)
            logprob_step(kind, *inputs, compiled=True)  # warm-up (and compile)
            for x in inputs[:2]:
                x.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            logprob_step(kind, *inputs, compiled=True)
            torch.cuda.synchronize()
            peaks[kind] = torch.cuda.max_memory_allocated() - before
            del inputs
        else:
            code = f"import bench; bench.memory_child({kind!r}, {rows}, {d}, {vocab})"
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # every tensor ≥ 128 KiB is its own mapping
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 cwd=os.path.dirname(os.path.abspath(__file__)), env=env)
            peaks[kind] = int(out.stdout.split()[-1])
    how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM − VmRSS of a fresh process"
    print(f"log-probs of {rows} rows, d {d}, vocab {vocab}, forward + backward, extra peak memory ({how}):")
    print(f"    naive log_softmax(h @ W.T).gather: {peaks['naive'] / 2**20:,.0f} MiB | chunked from hidden states: "
          f"{peaks['chunked'] / 2**20:,.0f} MiB | ratio {peaks['chunked'] / peaks['naive']:.3f} (goal ≤ 0.25; "
          f"the (N, V) logits alone are {rows * vocab * 4 / 2**20:,.0f} MiB in fp32)")


# ----------------------------------------------------------------------------------------------------------------
# CUDA only: decode tokens/s and GPT-2 124M training MFU

def gpt2_small():
    return GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768, dropout=0.0)


def report_decode(device, B=32, P=32, N=224, repeats=3):
    """Decode throughput of engine.generate, eager (row dropping, no graphs) vs compiled (static cache, CUDA
    graphs), GPT-2 124M in bf16, no early stop."""
    torch.manual_seed(0)
    model = GPT(gpt2_small()).to(device, torch.bfloat16).eval()
    prompts = torch.randint(0, model.config.vocab_size, (B, P)).tolist()
    rates = {}
    for compiled in (False, True):
        with kernels.compiling(compiled):
            generate(model, prompts, N, -1, 0)  # warm-up (compiles)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(repeats):
                generate(model, prompts, N, -1, 0)
        sync(device)
        rates[compiled] = repeats * B * N / (time.perf_counter() - t0)
    print(f"decode GPT-2 124M bf16, {B} × ({P} + {N}) tokens: eager {rates[False]:,.0f} tokens/s | compiled "
          f"{rates[True]:,.0f} tokens/s | {rates[True] / rates[False]:.2f}× (goal ≥ 3×)")


def report_train_mfu(device, B=8, T=1024, steps=10):
    """GPT-2 124M next-token training steps (AdamW, bf16 autocast), eager vs compiled (kernels.compile_model and the
    fused log-prob kernel). FLOPs = model.flops_per_token(T) · B · T (6N + 12·L·C·T per token)."""
    peak = peak_flops(device)
    for compiled in (False, True):
        torch.manual_seed(0)
        model = GPT(gpt2_small()).to(device)
        with kernels.compiling(compiled):
            kernels.compile_model(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        ids = torch.randint(0, model.config.vocab_size, (B, T + 1), device=device)
        mask = torch.ones_like(ids, dtype=torch.bool)
        for i in range(steps + 3):  # 3 warm-up steps
            if i == 3:
                sync(device)
                t0 = time.perf_counter()
            with torch.autocast("cuda", torch.bfloat16), kernels.compiling(compiled):
                loss = lm_loss(model, ids, mask)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        sec = (time.perf_counter() - t0) / steps
        flops = model.flops_per_token(T) * B * T
        print(f"train GPT-2 124M {'compiled' if compiled else 'eager':8s}: {sec * 1e3:.0f} ms/step | "
              f"{B * T / sec:,.0f} tokens/s | MFU {100 * flops / sec / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s bf16")
        del model, opt


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (W1 is defined at 2)")
    parser.add_argument("--batches", type=int, default=3, help="timed PPO batches per mode, after one warm-up")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.threads < 1:
        parser.error("--batches and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    device = get_device(args.device)
    print(f"{platform.node()} | {platform.processor() or platform.machine()} | torch {torch.__version__} | "
          f"{torch.get_num_threads()} threads | load average {os.getloadavg()[0]:.2f} (other work on the machine)")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    sections = [lambda: report_w1(device, args.batches), lambda: report_memory(device)]
    if device.type == "cuda":  # the GPU-only figures first
        sections = [lambda: report_decode(device), lambda: report_train_mfu(device)] + sections
    failed = 0
    for section in sections:
        try:
            section()
        except Exception as e:  # one broken section must not hide the others' figures
            failed += 1
            traceback.print_exc()
            print(f"FAILED: {type(e).__name__}: {e}", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
