"""Benchmark of the RLHF hot path: PPO workloads W1 and W2 (one PPO batch, eager vs compiled, and the peer in the
same run), log-prob peak memory, and on CUDA decode tokens/s and GPT-2 124M training MFU.

W1, the CPU PPO workload: a GPT-2-style model of 4 layers, d_model 128, 4 heads, vocab 2048, context 64, randomly
initialized as policy, frozen reference, reward model and value model. One PPO batch = 64 prompts of 32 tokens →
32 new tokens each (temperature 1, full softmax, no early stop: the EOS id is one that is never sampled) → score
(reference and old log-probs, RM score, values) → 4 PPO epochs × 4 minibatches of 16, updating policy and value.
fp32 on every device.
W2, the GPU PPO workload: the same batch on GPT-2 124M-shaped models (12 layers, d_model 768, 12 heads, vocab
50257, context 1024): 64 prompts of 128 tokens → 128 new tokens; 4 PPO epochs × 4 minibatches of 16. bf16
autocast on CUDA (train_ppo's default there), fp32 on CPU.

Both run the functions train_ppo runs (generate → the rollout's log-probs and values → ppo_rewards → GAE, whitened
→ train_ppo.ppo_update), so they measure the real code. Time = wall seconds per batch after one warm-up batch
(which also pays for compiling), split into generation / scoring / update; the eager and the compiled run (and
with --peer the peer) take turns batch by batch. Compiled = train_ppo --compile (kernels.enable): the compiled transformer
(kernels.compile_model), decode step, log-probs, PPO loss and GAE, and fused Adam. The peer is TRL 0.24.0's
PPOTrainer on the same workload (baselines/bench_peer.py, an optional dependency: requirements-peer.txt), in fp32
unless the workload is bf16; bench.py prints the peer's package versions (requirements-peer.txt pins them) and each
mode's speed ratio to the peer: the median over the batches of peer seconds ÷ nanorlhf seconds, with their range,
and the goals: W1 on CPU, compiled ≥ 2× (eager: the readable reference, no goal); W2 on CUDA, compiled ≥ 2×.

    python bench.py                         # CPU: W1 eager vs compiled + log-prob peak memory at vocab 50257
    python bench.py --peer                  # the same, and the peer's W1 batch by batch beside them: the ratios
    python bench.py --device cuda --peer    # decode, training MFU (--train_batch 16 32), W1 and W2 with the peer
    python bench.py --check --device cuda   # every GPU figure in one go, the preset too, into one file: docs/gpu.md
"""
import argparse
import contextlib
import copy
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, replace

import torch

import train_ppo
from nanorlhf import dist, kernels, rlhf
from nanorlhf.common import get_device, lm_loss, peak_flops
from nanorlhf.config import PPOConfig
from nanorlhf.engine import generate
from nanorlhf.model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Workload:
    """One PPO batch on four GPT-2-style models of one shape (policy, frozen reference, reward model, value model,
    random init): `prompts` prompts of `prompt_len` random tokens → `new_tokens` sampled tokens each (temperature 1,
    full softmax, no early stop) → scoring → `ppo_epochs` epochs of minibatches of `minibatch` prompts."""
    name: str
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    block_size: int
    prompt_len: int
    new_tokens: int
    prompts: int = 64
    minibatch: int = 16
    ppo_epochs: int = 4
    dtype: str = "float32"  # autocast dtype: float32, or auto (bf16 on CUDA, as train_ppo runs there)
    goals: tuple = ()  # ((mode, device type, least peer seconds / nanorlhf seconds), ...)


W1 = Workload("W1", 4, 4, 128, 2048, 64, prompt_len=32, new_tokens=32,
              goals=(("compiled", "cpu", 2.0),))
W2 = Workload("W2", 12, 12, 768, 50257, 1024, prompt_len=128, new_tokens=128, dtype="auto",  # GPT-2 124M
              goals=(("compiled", "cuda", 2.0),))
WORKLOADS = {"w1": W1, "w2": W2}


def tiny(w):
    """The workload's code path at a size that runs in seconds on a CPU (tests): same structure, smaller numbers."""
    return replace(w, name=w.name + "-tiny", n_layer=2, n_head=2, n_embd=32, vocab_size=256, block_size=16,
                   prompt_len=8, new_tokens=8, prompts=8, minibatch=4, ppo_epochs=2)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------
# W1 and W2: one PPO batch, nanorlhf eager and compiled, and the peer (baselines/bench_peer.py) in the same run

def ppo_models(w, device, seed=0):
    """(policy, ref_policy, reward_model, value_model), set up as train_ppo.load_models does for PPO, random init."""
    torch.manual_seed(seed)
    config = GPTConfig(block_size=w.block_size, vocab_size=w.vocab_size, n_layer=w.n_layer, n_head=w.n_head,
                       n_embd=w.n_embd, dropout=0.0)
    policy = GPT(config).to(device)
    ref_policy = copy.deepcopy(policy).requires_grad_(False)
    reward_model = GPT(config, head="scalar").to(device).requires_grad_(False)
    value_model = copy.deepcopy(reward_model).requires_grad_(True)
    for m in (policy, ref_policy, reward_model, value_model):
        m.eval()
    return policy, ref_policy, reward_model, value_model


def ppo_batch(w, models, optimizers, prompts, cfg, step, device):
    """One PPO batch through the library functions train_ppo runs; returns seconds of (generation, scoring, update)."""
    policy, ref_policy, reward_model, value_model = models
    never = -1  # an EOS id no sampled token can equal: every response has exactly max_new_tokens tokens
    sync(device)
    t0 = time.perf_counter()
    with dist.autocast(device, cfg.dtype):
        gen = generate(policy, prompts, cfg.max_new_tokens, never, 0, temperature=cfg.temperature)
        sync(device)
        t1 = time.perf_counter()
        tokens, mask, P = gen.tokens, gen.attention_mask, gen.prompt_len
        with torch.no_grad():  # train_ppo.rollout's tensors; no tokenizer (random ids), so the RM reads the sampled
            # ids, and no response ends (every row is P + N real tokens)
            b = {"tokens": tokens, "mask": mask, "response_mask": mask[:, P:],
                 "logprobs": rlhf.response_logprobs_and_entropy(policy, tokens, mask, P, cfg.temperature)[0],
                 "ref_logprobs": rlhf.response_logprobs_and_entropy(ref_policy, tokens, mask, P, cfg.temperature)[0],
                 "values": rlhf.response_values(value_model, tokens, mask, P),
                 "scores": reward_model(tokens).float()[:, -1], "finished": torch.zeros_like(tokens[:, 0], dtype=bool)}
    sync(device)
    t2 = time.perf_counter()
    m = b["response_mask"]
    rewards, _, _ = rlhf.ppo_rewards(b["scores"], b["finished"], b["logprobs"], b["ref_logprobs"], m, cfg.kl_coef,
                                     cfg.kl_kind, cfg.missing_eos_penalty)
    advantages = train_ppo.ESTIMATORS["gae"].advantages(rewards, b["values"], m, cfg)
    returns = advantages + b["values"]
    advantages = rlhf.masked_whiten(advantages, m, dist.all_reduce_sum)
    train_ppo.ppo_update(policy, value_model, optimizers, b, advantages, returns, P, cfg, step, dtype=cfg.dtype)
    sync(device)
    t3 = time.perf_counter()
    assert gen.response_mask.all() and gen.tokens.shape == (w.prompts, w.prompt_len + w.new_tokens), "early stop"
    return t1 - t0, t2 - t1, t3 - t2


def ppo_setup(w, device, compiled):
    """A step function of one nanorlhf run (eager or compiled) of workload w, set up as train_ppo sets it up."""
    models = ppo_models(w, device)
    cfg = PPOConfig(batch_size=w.prompts, minibatch_size=w.minibatch, ppo_epochs=w.ppo_epochs,
                    max_new_tokens=w.new_tokens, temperature=1.0, device=device.type, compile=compiled,
                    dtype=dist.resolve_dtype(w.dtype, device))
    with kernels.compiling(compiled):
        for m in models:
            kernels.compile_model(m)
    optimizers = train_ppo.make_optimizers(models[0], models[3], cfg)
    g = torch.Generator().manual_seed(1)

    def step(i):
        prompts = torch.randint(0, w.vocab_size, (w.prompts, w.prompt_len), generator=g).tolist()
        with kernels.compiling(compiled):
            return ppo_batch(w, models, optimizers, prompts, cfg, i, device)
    return step


@contextlib.contextmanager
def peer_run(w, device, batches, threads):
    """The peer (baselines/bench_peer.py) on workload w in its own process, kept in lockstep: it waits for a line on
    its stdin before each batch and prints the batch's seconds after it. Yields a step function that runs one batch and
    returns (seconds,)."""
    flags = {"n_layer": w.n_layer, "n_head": w.n_head, "n_embd": w.n_embd, "vocab": w.vocab_size,
             "block_size": w.block_size, "prompts": w.prompts, "prompt_len": w.prompt_len,
             "new_tokens": w.new_tokens, "ppo_epochs": w.ppo_epochs, "minibatches": w.prompts // w.minibatch,
             "batches": batches, "threads": threads, "device": device.type}
    argv = [sys.executable, os.path.join(ROOT, "baselines", "bench_peer.py"), "--lockstep"]
    argv += [f"--{k}={v}" for k, v in flags.items()]
    if dist.resolve_dtype(w.dtype, device) == "bfloat16":
        argv.append("--bf16")
    stderr = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT)

    def step(i):
        proc.stdin.write("go\n")
        proc.stdin.flush()
        for line in proc.stdout:  # PPOTrainer prints its metrics on stdout too
            if line.startswith("peer batch seconds:"):
                return (float(line.split(":")[1]),)
        stderr.seek(0)
        raise RuntimeError("the peer (baselines/bench_peer.py) stopped:\n" + stderr.read()[-3000:])
    try:
        yield step
    except BaseException:
        proc.kill()
        raise
    finally:
        proc.stdin.close()  # EOF: the peer ends its run
        proc.wait()
        proc.stdout.close()
        stderr.close()


def bench_ppo(w, device, batches, peer=False, threads=2):
    """{"eager": [...], "compiled": [...], "peer": [...]}: per-batch seconds, split (generation, scoring, update)
    for nanorlhf's. The runs take turns batch by batch, so a machine whose speed drifts (this one does) slows all
    alike; batch 0 of each is the warm-up (and compiles)."""
    runs = {"eager": ppo_setup(w, device, False), "compiled": ppo_setup(w, device, True)}
    times = {name: [] for name in runs}
    with contextlib.ExitStack() as stack:
        if peer:
            runs["peer"], times["peer"] = stack.enter_context(peer_run(w, device, batches, threads)), []
        for i in range(batches + 1):
            for name, step in runs.items():
                t = step(i)
                if i > 0:
                    times[name].append(t)
    return times


def peer_stack():
    """{package: (installed version or None, version requirements-peer.txt pins)}: the peer's speed depends on its
    stack (transformers 5.x runs PPOTrainer at a different speed than the 4.57 it was released against)."""
    stack = {}
    for line in open(os.path.join(ROOT, "requirements-peer.txt")):
        if "==" in line and not line.startswith("#"):
            name, pin = line.split("#")[0].strip().split("==")
            try:
                stack[name] = (importlib.metadata.version(name), pin)
            except importlib.metadata.PackageNotFoundError:
                stack[name] = (None, pin)
    return stack


def report_ppo(w, device, batches, peer=False, threads=2):
    """Print and return workload w's figures: per mode the median seconds per batch, tokens/s, MFU and the
    generation / scoring / update split; with the peer, its stack and each mode's speed ratio to it, the median of
    the per-batch ratios with their range (the runs take turns, so batch i of each ran under the same load)."""
    peak = peak_flops(device)
    T = w.prompt_len + w.new_tokens
    dtype = dist.resolve_dtype(w.dtype, device)
    print(f"{w.name}: {w.n_layer} layers, d {w.n_embd}, {w.n_head} heads, vocab {w.vocab_size}; {w.prompts} prompts "
          f"× {w.prompt_len} tokens → {w.new_tokens} new; {w.ppo_epochs} epochs × {w.prompts // w.minibatch} "
          f"minibatches of {w.minibatch}; {dtype}")
    print(f"{w.name} FLOPs per batch:" + rlhf.ppo_batch_flops.__doc__.split(":", 1)[1].rstrip("."))
    print(f"matmul peak (measured now, {'fp32' if device.type == 'cpu' else 'bf16'}): {peak / 1e9:,.0f} GFLOP/s")
    models = ppo_models(w, device)
    flops = rlhf.ppo_batch_flops(models[0], models[3], w.prompts, T, w.prompt_len, w.ppo_epochs)
    total = sum(flops.values())
    del models
    figures = {"workload": w.name, "dtype": dtype, "batches": batches, "peak_tflops": peak / 1e12,
               "gflop_per_batch": total / 1e9, "modes": {}}
    if peer:
        stack = peer_stack()
        figures["peer_stack"] = {name: v for name, (v, _) in stack.items()}
        print("peer stack: " + ", ".join(f"{name} {v}" + ("" if v == pin else f" (requirements-peer.txt pins {pin})")
                                          for name, (v, pin) in stack.items()) + f", torch {torch.__version__}")
    per_batch = {}
    for name, times in bench_ppo(w, device, batches, peer, threads).items():
        per_batch[name] = [sum(t) for t in times]
        sec = statistics.median(per_batch[name])
        run = figures["modes"][name] = {"seconds": sec, "per_batch": per_batch[name],
                                        "tokens_per_s": w.prompts * T / sec}
        line = (f"{w.name} {name}: {sec:.3f} s/batch (median of {batches}: "
                + ", ".join(f"{t:.3f}" for t in per_batch[name]) + f") | {w.prompts * T / sec:,.0f} tokens/s")
        if name == "peer":  # it runs more FLOPs than nanorlhf's count (logits at every position): no MFU
            print(line + " | TRL 0.24.0 PPOTrainer (baselines/bench_peer.py)")
            continue
        run["mfu_pct"] = 100 * total / sec / peak
        run["split"] = {}
        print(line + f" | {total / 1e9:,.0f} GFLOP | MFU {run['mfu_pct']:.1f}%")
        for i, (stage, f) in enumerate(flops.items()):
            t = run["split"][stage] = statistics.median(t[i] for t in times)
            print(f"    {stage:10s} {t:.3f} s  {f / 1e9:6.1f} GFLOP  {f / t / 1e9:6.1f} GFLOP/s  "
                  f"MFU {100 * f / t / peak:.1f}%")
    if peer:
        goals = {mode: x for mode, dev, x in w.goals if dev == device.type}
        figures["vs_peer"] = {}
        for mode in ("eager", "compiled"):
            ratios = [p / t for p, t in zip(per_batch["peer"], per_batch[mode])]
            ratio = statistics.median(ratios)
            figures["vs_peer"][mode] = {"median": ratio, "range": [min(ratios), max(ratios)], "per_batch": ratios,
                                        "goal": goals.get(mode)}
            met = mode in goals and ratio >= goals[mode]
            goal = f"; goal ≥ {goals[mode]}×: {'met' if met else 'NOT met'}" if mode in goals else ""
            print(f"{w.name} {mode}: {ratio:.2f}× the peer's speed (median over {batches} batches of peer s ÷ "
                  f"nanorlhf s, range {min(ratios):.2f}–{max(ratios):.2f}; batch by batch: "
                  + ", ".join(f"{r:.2f}" for r in ratios) + f"){goal}")
    return figures


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
        logp = torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, targets[:, None])  # the (N, V) logits kept
    else:
        with kernels.compiling(compiled):
            logp = kernels.token_logprobs_and_entropy(hidden, weight, targets)[0]  # chunked from hidden states
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
    return {"rows": rows, "d": d, "vocab": vocab, "naive_mib": peaks["naive"] / 2**20,
            "chunked_mib": peaks["chunked"] / 2**20, "ratio": peaks["chunked"] / peaks["naive"]}


# ----------------------------------------------------------------------------------------------------------------
# CUDA by default: decode tokens/s and GPT-2 124M training MFU

def gpt2_small():
    return GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768, dropout=0.0)


def report_decode(device, B=32, P=32, N=224, repeats=3, config=None):
    """Decode throughput of engine.generate, eager (row dropping, no graphs) vs compiled (static cache, CUDA
    graphs), GPT-2 124M (or `config`) in bf16, no early stop."""
    torch.manual_seed(0)
    model = GPT(config or gpt2_small()).to(device, torch.bfloat16).eval()
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
    print(f"decode {model.config.n_layer}L d{model.config.n_embd} bf16, {B} × ({P} + {N}) tokens: eager "
          f"{rates[False]:,.0f} tokens/s | compiled {rates[True]:,.0f} tokens/s | {rates[True] / rates[False]:.2f}× "
          f"(goal ≥ 3×)")
    return {"eager_tokens_per_s": rates[False], "compiled_tokens_per_s": rates[True],
            "ratio": rates[True] / rates[False]}


def train_mfu_row(device, config, B, T, steps, compiled, peak):
    """Time `steps` training steps of a fresh model at B × T tokens (after 3 warm-up steps), then AdamW alone."""
    dtype = dist.resolve_dtype("auto", device)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    with kernels.compiling(compiled):
        kernels.compile_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, config.vocab_size, (B, T + 1), device=device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 3):  # 3 warm-up steps
        if i == 3:
            sync(device)
            t0 = time.perf_counter()
        with dist.autocast(device, dtype), kernels.compiling(compiled):
            loss = lm_loss(model, ids, mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    sec = (time.perf_counter() - t0) / steps
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    sync(device)
    sec_opt = (time.perf_counter() - t0) / steps
    flops = model.flops_per_token(T) * B * T
    row = {"batch": B, "seq": T, "mode": "compiled" if compiled else "eager", "dtype": dtype,
           "ms_per_step": 1e3 * sec, "tokens_per_s": B * T / sec, "mfu_pct": 100 * flops / sec / peak,
           "adamw_pct": 100 * sec_opt / sec, "lm_head_flops_pct": 100 * 6 * config.n_embd * config.vocab_size
           / model.flops_per_token(T)}
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return row


def report_train_mfu(device, batch_sizes=(8,), T=1024, steps=10, config=None, modes=(False, True)):
    """Next-token training steps of GPT-2 124M (or `config`) at each batch size × T tokens: fused AdamW, bf16
    autocast on CUDA (fp32 on CPU), eager and/or compiled (kernels.compile_model and the fused log-prob kernel).
    FLOPs = model.flops_per_token(T) · B · T (6N + 12·L·C·T per token). What limits it: the step's peak memory,
    AdamW's share of the step (timed alone afterwards) and the LM head's share of the FLOPs. A batch size that
    runs out of memory ends the sweep of its mode (what fits is the sizes before it). Returns one row per run."""
    config = config or gpt2_small()
    peak = peak_flops(device)
    rows = []
    for compiled in modes:
        mode = "compiled" if compiled else "eager"
        for B in batch_sizes:
            name = f"train {config.n_layer}L d{config.n_embd} {mode:8s} {B} × {T} tokens"
            try:
                r = train_mfu_row(device, config, B, T, steps, compiled, peak)
            except torch.OutOfMemoryError:
                print(f"{name}: out of memory; the sweep stops at the batch size before")
                rows.append({"batch": B, "seq": T, "mode": mode, "oom": True})
                break
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(r)
            memory = (f" | peak memory {r['peak_memory_gib']:.1f} of {r['memory_gib']:.0f} GiB"
                      if "memory_gib" in r else "")
            print(f"{name}, {r['dtype']}: {r['ms_per_step']:.0f} ms/step | {r['tokens_per_s']:,.0f} tokens/s | MFU "
                  f"{r['mfu_pct']:.1f}% of {peak / 1e12:.3g} TFLOP/s{memory} | AdamW {r['adamw_pct']:.0f}% of the step "
                  f"| LM head {r['lm_head_flops_pct']:.0f}% of the FLOPs")
    return {"peak_tflops": peak / 1e12, "rows": rows}


# ----------------------------------------------------------------------------------------------------------------
# --check: every GPU figure in one command, written to one file (docs/gpu.md)

def peer_available(wheels):
    """Whether the peer can run: trl importable, or installed now from the wheel files in `wheels` (a machine
    without network; docs/gpu.md prepares them). Otherwise one line, and the peer's rows are skipped."""
    if importlib.util.find_spec("trl") is None and os.path.isdir(wheels):
        print(f"peer: installing requirements-peer.txt from {wheels}/ (pip --no-index)", flush=True)
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", wheels,
                            "-r", os.path.join(ROOT, "requirements-peer.txt")], capture_output=True, text=True)
        if r.returncode:
            print(f"peer: pip failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        importlib.invalidate_caches()
    if importlib.util.find_spec("trl") is None:
        print(f"peer: trl is not installed (pip install -r requirements-peer.txt, or offline from wheel files in "
              f"{wheels}/: docs/gpu.md); the peer's rows are skipped")
        return False
    return True


def evidence(results):
    """The goals for the evidence at GPU scale, from a finished run's results.json: {goal: (value, met)}."""
    comps, ci = results["gold_components"], results["win_rate_ci"]["ppo_ptx"]
    correctness = results["rm_by_kind"]["correctness"]["rm_accuracy"]
    helpful = comps["ppo_ptx"]["helpful"] - comps["sft"]["helpful"]
    win = results["win_rate_vs_sft"]["ppo_ptx"]
    return {"RM correctness-pair accuracy ≥ 80%": (f"{correctness:.1%}", correctness >= 0.8),
            "PPO-ptx helpful ≥ SFT + 0.10": (f"{helpful:+.3f}", helpful >= 0.10),
            "PPO-ptx win rate vs SFT ≥ 80%, 95% CI low end ≥ 75%": (f"{win:.1%} ({ci[0]:.1%}–{ci[1]:.1%})",
                                                                   win >= 0.8 and ci[0] >= 0.75)}


def report_preset(device, minutes, quick, run_dir):
    """run.py's gpu preset without the over-optimization study (on CPU shrunk by --quick), stopped after `minutes`:
    the wall seconds of each stage it reached (the last one unfinished if it was stopped) and, if it finished,
    the report card (eval.py's report.md) and the goals for the evidence at GPU scale."""
    argv = [sys.executable, "run.py", "--preset", "gpu", "--device", str(device), "--no-study", "--force",
            "--out", run_dir] + (["--quick"] if quick else [])
    print(f"preset: python {' '.join(argv[1:])} (stopped after {minutes:g} min)", flush=True)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True)  # its own process group: the cap stops its stages too

    def stop():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    timer = threading.Timer(60 * minutes, stop)
    timer.start()
    t0, starts = time.perf_counter(), {}
    for line in proc.stdout:
        print("    " + line, end="", flush=True)
        stage = re.match(r"=== \[\d+/\d+\] (\w+): python ", line)
        if stage:
            starts[stage[1]] = time.perf_counter() - t0
    code = proc.wait()
    capped = timer.finished.is_set()  # set once stop() has run (before cancel)
    timer.cancel()
    names, times = list(starts), list(starts.values()) + [time.perf_counter() - t0]
    figures = {"command": "python " + " ".join(argv[1:]), "cap_minutes": minutes, "finished": code == 0,
               "stopped_by_cap": capped, "exit_code": code,
               "stages": {name: {"seconds": times[i + 1] - times[i], "finished": code == 0 or i < len(names) - 1}
                          for i, name in enumerate(names)}}
    print("preset: " + ", ".join(f"{n} {s['seconds']:.0f} s" + ("" if s["finished"] else " (stopped)")
                                 for n, s in figures["stages"].items())
          + ("" if code == 0 else "; stopped at the cap" if capped else f"; failed (exit {code})"))
    if code == 0:
        results = json.load(open(os.path.join(run_dir, "results.json")))
        figures["report_card"] = open(os.path.join(run_dir, "report.md")).read()
        figures["evidence"] = evidence(results)
        for goal, (value, met) in figures["evidence"].items():
            print(f"preset: {goal}: {value}, {'met' if met else 'NOT met'}")
    return figures


def check_markdown(report):
    """check.md: the report's figures as tables, the preset's report card and what was not measured."""
    m = report["machine"]
    lines = [f"# nanorlhf GPU check: {m['gpu'] or m['cpu'] + ' (CPU: tiny sizes, the command tried, no figures)'}",
             "", f"`{report['command']}` | {m['date']} | torch {m['torch']} | host {m['host']} | "
             f"{report['minutes']:.1f} min in all: " + ", ".join(f"{name} {minutes:.1f}" for name, minutes
                                                                 in report["section_minutes"].items()), ""]
    s, missing = report["sections"], []
    for name, fig in s.items():
        if "failed" in fig:
            missing.append(f"- {name}: {fig['failed']}")
    p = s.get("preset", {})
    if "stages" in p:
        lines += [f"## GPU preset, stopped after {p['cap_minutes']:g} min", "", f"`{p['command']}`", "",
                  "| stage | wall s | finished |", "|---|---|---|"]
        stopped = "no: stopped at the cap" if p["stopped_by_cap"] else f"no: failed (exit {p['exit_code']})"
        lines += [f"| {n} | {st['seconds']:.0f} | {'yes' if st['finished'] else stopped} |"
                  for n, st in p["stages"].items()]
        lines.append("")
        if "report_card" in p:  # the goals, then the card with its headings one level down
            lines += [f"- {goal}: {value}, {'met' if met else 'NOT met'}"
                      for goal, (value, met) in p["evidence"].items()]
            lines += ["", *("#" + line if line.startswith("#") else line for line in p["report_card"].splitlines()), ""]
    w = s.get("w2", {})
    if "modes" in w:
        lines += [f"## {w['workload']}: one PPO batch, {w['dtype']}, median of {w['batches']} batches", "",
                  "| run | s/batch | tokens/s | MFU | generation s | scoring s | update s | speed ÷ the peer's: "
                  "median (range) |", "|---|---|---|---|---|---|---|---|"]
        for name, mode in w["modes"].items():
            split = mode.get("split", {})
            ratio = w.get("vs_peer", {}).get(name)
            lines.append(f"| {name} | {mode['seconds']:.3f} | {mode['tokens_per_s']:,.0f} | "
                         + (f"{mode['mfu_pct']:.1f}%" if "mfu_pct" in mode else "–") + " | "
                         + " | ".join(f"{split[k]:.3f}" if k in split else "–"
                                      for k in ("generation", "scoring", "update")) + " | "
                         + (f"{ratio['median']:.2f}× ({ratio['range'][0]:.2f}–{ratio['range'][1]:.2f})"
                            + (f", goal ≥ {ratio['goal']}×" if ratio["goal"] else "") if ratio else "–") + " |")
        lines += ["", "Peer stack: " + (", ".join(f"{k} {v}" for k, v in w["peer_stack"].items())
                                        if "peer_stack" in w else "not installed: no peer rows"), ""]
    t = s.get("train_mfu", {})
    if "rows" in t:
        lines += [f"## Training MFU: next-token step, fused AdamW, against {t['peak_tflops']:.3g} TFLOP/s "
                  "(matmul peak measured in this run)", "",
                  "| mode | batch × seq | ms/step | tokens/s | MFU | peak memory GiB | AdamW share |",
                  "|---|---|---|---|---|---|---|"]
        for r in t["rows"]:
            if r.get("oom"):
                lines.append(f"| {r['mode']} | {r['batch']} × {r['seq']} | out of memory | | | | |")
            else:
                lines.append(f"| {r['mode']} {r['dtype']} | {r['batch']} × {r['seq']} | {r['ms_per_step']:.0f} | "
                             f"{r['tokens_per_s']:,.0f} | {r['mfu_pct']:.1f}% | "
                             + (f"{r['peak_memory_gib']:.1f} of {r['memory_gib']:.0f}" if "memory_gib" in r else "–")
                             + f" | {r['adamw_pct']:.0f}% |")
        lines.append("")
    d = s.get("decode", {})
    if "ratio" in d:
        lines += ["## Decode, bf16 (goal: compiled ≥ 3× eager)", "",
                  "| eager tokens/s | compiled tokens/s | ratio |", "|---|---|---|",
                  f"| {d['eager_tokens_per_s']:,.0f} | {d['compiled_tokens_per_s']:,.0f} | {d['ratio']:.2f}× |", ""]
    mem = s.get("logprob_memory", {})
    if "ratio" in mem:
        lines += [f"## Log-prob peak memory, {mem['rows']} rows, vocab {mem['vocab']} (goal: ≤ 0.25 of naive)", "",
                  "| naive MiB | chunked MiB | ratio |", "|---|---|---|",
                  f"| {mem['naive_mib']:,.0f} | {mem['chunked_mib']:,.0f} | {mem['ratio']:.3f} |", ""]
    if missing:
        lines += ["## Not measured", "", *missing, ""]
    return "\n".join(lines)


def check(device, args):
    """Every GPU figure in one go: the preset end to end under a wall-clock cap, W2 eager / compiled / the peer,
    the training-MFU batch sweep, decode and log-prob memory. <out>/check.json and check.md are rewritten after each
    section, so a run stopped early keeps what it measured. On CPU every size is tiny: it tries the command."""
    quick = device.type == "cpu"
    os.makedirs(args.out, exist_ok=True)
    report = {"command": "python bench.py " + " ".join(args.argv), "machine": {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(), "host": platform.node(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        "sections": {}, "section_minutes": {}, "minutes": 0.0}
    peer = peer_available(args.wheels)
    if quick:  # each section's code path in seconds
        small = GPTConfig(block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
        w2, memory = tiny(W2), dict(rows=64, d=32)
        train = dict(batch_sizes=(2, 4), T=16, steps=1, config=small)
        decode = dict(B=2, P=4, N=4, repeats=1, config=small)
    else:
        w2, train, decode, memory = W2, dict(batch_sizes=(8, 16, 32, 64, 128)), {}, {}
    sections = {
        "preset": lambda: report_preset(device, args.preset_minutes, quick, os.path.join(args.out, "preset")),
        "w2": lambda: report_ppo(w2, device, args.batches, peer, args.threads),
        "train_mfu": lambda: report_train_mfu(device, modes=(True,), **train),
        "decode": lambda: report_decode(device, **decode),
        "logprob_memory": lambda: report_memory(device, **memory)}
    t0 = time.perf_counter()
    for name, figures in run_sections(sections):
        report["sections"][name] = figures
        report["section_minutes"][name] = (time.perf_counter() - t0) / 60 - report["minutes"]
        report["minutes"] = (time.perf_counter() - t0) / 60
        json.dump(report, open(os.path.join(args.out, "check.json"), "w"), indent=1)
        open(os.path.join(args.out, "check.md"), "w").write(check_markdown(report))
    print(f"check: {report['minutes']:.1f} min; wrote {args.out}/check.json and check.md")
    return report


def run_sections(sections):
    """Yield (name, figures) of each section in turn; a section that fails yields {"failed": its error}, so one
    broken section does not hide the others' figures."""
    for name, section in sections.items():
        try:
            yield name, section()
        except Exception as e:
            traceback.print_exc()
            print(f"FAILED: {type(e).__name__}: {e}", flush=True)
            yield name, {"failed": f"{type(e).__name__}: {e}"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (W1 is defined at 2)")
    parser.add_argument("--batches", type=int, default=8, help="timed PPO batches per mode, after one warm-up")
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), help="PPO workloads (default: w1 on "
                        "CPU; w1 and w2 on CUDA)")
    parser.add_argument("--peer", action="store_true", help="also run each PPO workload through the peer "
                        "(baselines/bench_peer.py: TRL 0.24.0 PPOTrainer; pip install -r requirements-peer.txt), "
                        "batch by batch with nanorlhf's runs, and print peer ÷ nanorlhf seconds per batch")
    parser.add_argument("--train_batch", type=int, nargs="+", default=[16], help="CUDA training MFU: batch sizes "
                        "to measure (several: a sweep)")
    parser.add_argument("--train_seq", type=int, default=1024, help="CUDA training MFU: tokens per sequence")
    parser.add_argument("--check", action="store_true", help="every GPU figure in one command (docs/gpu.md): the "
                        "gpu preset under a wall-clock cap, W2 with the peer, the training-MFU batch sweep, decode and "
                        "log-prob memory, written to <out>/check.json and check.md; on CPU at tiny sizes")
    parser.add_argument("--out", default="runs/gpu_check", help="--check: folder of check.json, check.md and the "
                        "preset's run")
    parser.add_argument("--preset_minutes", type=float, default=4.0, help="--check: the preset's wall-clock cap")
    parser.add_argument("--wheels", default="wheels", help="--check: where the peer's wheel files are, installed "
                           "from (pip --no-index) when trl is missing")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.batches < 1 or args.threads < 1:
        parser.error("--batches and --threads must be at least 1")
    if args.peer and importlib.util.find_spec("trl") is None:
        parser.error("--peer needs the optional peer package: pip install -r requirements-peer.txt")
    torch.set_num_threads(args.threads)
    device = get_device(args.device)
    print(f"{platform.node()} | {platform.processor() or platform.machine()} | torch {torch.__version__} | "
          f"{torch.get_num_threads()} threads | load average {os.getloadavg()[0]:.2f} (other work on the machine)")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    if args.check:
        report = check(device, args)
        sys.exit(1 if any("failed" in f for f in report["sections"].values()) else 0)
    workloads = args.workloads or (["w1", "w2"] if device.type == "cuda" else ["w1"])
    sections = {w: lambda w=w: report_ppo(WORKLOADS[w], device, args.batches, args.peer, args.threads)
                for w in workloads}
    sections["logprob_memory"] = lambda: report_memory(device)
    if device.type == "cuda":  # the GPU-only figures first
        sections = {"decode": lambda: report_decode(device),
                    "train_mfu": lambda: report_train_mfu(device, args.train_batch, args.train_seq), **sections}
    failed = sum("failed" in figures for _, figures in run_sections(sections))
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
