"""bench.py's code paths at tiny sizes on CPU: the PPO workloads eager and compiled, the training-MFU step, and
the peer (baselines/bench_peer.py, skipped without trl): the workload it runs and the lockstep protocol bench.py drives."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="the optional peer (trl) is not installed")


@pytest.mark.slow
def test_tiny_w2_runs_eager_and_compiled_with_the_split_and_mfu(capsys):
    w = bench.tiny(bench.W2)
    modes = bench.report_ppo(w, CPU, batches=1)["modes"]
    assert set(modes) == {"eager", "compiled"} and all(m["seconds"] > 0 for m in modes.values())
    out = capsys.readouterr().out
    assert "8 prompts × 8 tokens → 8 new; 2 epochs × 2 minibatches of 4; float32" in out  # no bf16 on CPU
    for mode in ("eager", "compiled"):
        line = next(line for line in out.splitlines() if line.startswith(f"W2-tiny {mode}:"))
        assert "tokens/s" in line and "MFU" in line
    assert out.count("    generation ") == out.count("    update ") == 2


def test_the_workloads_are_what_the_docstring_says():
    assert (bench.W2.n_layer, bench.W2.n_head, bench.W2.n_embd, bench.W2.vocab_size) == (12, 12, 768, 50257)
    assert sum(p.numel() for p in bench.GPT(bench.gpt2_small()).parameters()) == 124_439_808  # GPT-2 124M
    for w, (P, N) in ((bench.W1, (32, 32)), (bench.W2, (128, 128))):
        assert (w.prompts, w.prompt_len, w.new_tokens, w.ppo_epochs, w.prompts // w.minibatch) == (64, P, N, 4, 4)
        assert P + N <= w.block_size


@pytest.mark.slow
def test_training_mfu_step_runs_tiny_on_cpu(capsys):
    config = bench.GPTConfig(block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    bench.report_train_mfu(CPU, (2,), 16, steps=1, config=config)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train ")]
    assert len(lines) == 2  # eager and compiled
    assert all("tokens/s" in line and "MFU" in line and "AdamW" in line for line in lines)


PEER_SHAPES = """
import collections, json, sys, tempfile, torch
from baselines import bench_peer
a = bench_peer.parse_args(sys.argv[1:])
models = bench_peer.peer_models(a)
calls = collections.Counter()
for name, m in zip(("policy", "ref", "reward", "value"), models):
    m.base_model.register_forward_pre_hook(lambda mod, args, kw, name=name: calls.update(
        [f"{name} {tuple((kw.get('input_ids') if kw.get('input_ids') is not None else args[0]).shape)} "
         f"{'grad' if torch.is_grad_enabled() else 'no_grad'}"]), with_kwargs=True)
with tempfile.TemporaryDirectory() as d:
    seconds = bench_peer.run(a, models, d)
print(json.dumps({"calls": calls, "batches": len(seconds)}))
"""


@needs_trl
def test_peer_runs_the_workload_bench_defines():
    """A tiny W1 through TRL's PPOTrainer: every forward of each model, by input shape, is what the workload says —
    P + N tokens per row, N new tokens (prefill, then one token at a time), no early stop, minibatches of 4."""
    w = bench.tiny(bench.W1)
    B, P, N, mb, epochs = w.prompts, w.prompt_len, w.new_tokens, w.minibatch, w.ppo_epochs
    argv = [f"--n_layer={w.n_layer}", f"--n_head={w.n_head}", f"--n_embd={w.n_embd}", f"--vocab={w.vocab_size}",
            f"--block_size={w.block_size}", f"--prompts={B}", f"--prompt_len={P}", f"--new_tokens={N}",
            f"--ppo_epochs={epochs}", f"--minibatches={B // mb}", "--batches=1"]
    r = subprocess.run([sys.executable, "-c", PEER_SHAPES, *argv], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["batches"] == 2  # the warm-up and one timed batch
    per_batch = {f"policy ({B}, {P}) no_grad": 1, f"policy ({B}, 1) no_grad": N - 1,  # generation
                 f"ref ({B}, {P + N}) no_grad": 1, f"reward ({B}, {P + N}) no_grad": 1,  # scoring
                 f"value ({B}, {P + N}) no_grad": 1,
                 f"policy ({mb}, {P + N}) grad": epochs * B // mb, f"value ({mb}, {P + N}) grad": epochs * B // mb}
    assert got["calls"] == {k: 2 * v for k, v in per_batch.items()}


@needs_trl
def test_peer_in_lockstep_returns_one_time_per_batch_and_ends():
    w = bench.tiny(bench.W1)
    with bench.peer_run(w, CPU, batches=1, threads=1) as step:
        times = [step(0), step(1)]
    assert all(len(t) == 1 and t[0] > 0 for t in times)


@needs_trl
@pytest.mark.slow
def test_report_with_the_peer_gives_the_median_of_per_batch_ratios_its_range_and_the_peer_stack(capsys):
    figures = bench.report_ppo(bench.tiny(bench.W1), CPU, batches=3, peer=True, threads=1)
    assert set(figures["modes"]) == {"eager", "compiled", "peer"}
    peer = figures["modes"]["peer"]["per_batch"]
    for mode in ("eager", "compiled"):  # batch i of the peer ÷ batch i of the mode, then the median: by hand
        ratios = sorted(p / t for p, t in zip(peer, figures["modes"][mode]["per_batch"]))
        got = figures["vs_peer"][mode]
        assert got["median"] == pytest.approx(ratios[1]) and got["range"] == pytest.approx([ratios[0], ratios[2]])
    assert figures["vs_peer"]["compiled"]["goal"] == 2.0 and figures["vs_peer"]["eager"]["goal"] is None
    assert figures["peer_stack"]["trl"] == "0.24.0"
    out = capsys.readouterr().out
    assert "peer stack: trl 0.24.0, transformers " in out
    assert "W1-tiny eager: " in out and "× the peer's speed (median over 3 batches" in out
    assert out.count("goal ≥") == 1 and "goal ≥ 2.0×" in out  # W1's goal is the compiled one's, on the CPU


def test_peer_flag_without_trl_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit):
        bench.main(["--peer"])
    assert "pip install -r requirements-peer.txt" in capsys.readouterr().err
