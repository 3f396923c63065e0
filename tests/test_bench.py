"""bench.py's code paths at tiny sizes on CPU: the PPO workloads eager and compiled, the training-MFU step, the
peer (baselines/bench_peer.py, skipped without trl): the workload it runs and the lockstep protocol bench.py drives,
and `bench.py --check` (the GPU figures in one command): its CPU mode end to end, its report's format, the goals it
reads from a finished run, and the peer's absence or failed offline install as one line each."""
import importlib.metadata
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


@pytest.mark.slow
def test_check_cpu_mode_runs_every_section_tiny_stops_the_preset_at_its_cap_and_writes_one_report(tmp_path,
                                                                                                  monkeypatch, capsys):
    out = tmp_path / "check"
    monkeypatch.setattr(bench, "peer_available", lambda wheels: False)  # the peer's part: the tests above
    with pytest.raises(SystemExit) as e:
        bench.main(["--check", "--batches", "1", "--preset_minutes", "0.1", "--out", str(out)])
    assert e.value.code == 0
    report = json.load(open(out / "check.json"))
    s = report["sections"]
    assert list(s) == ["preset", "w2", "train_mfu", "decode", "logprob_memory"]
    assert not any("failed" in f for f in s.values())
    preset = s["preset"]  # 6 s is too little for the quick run: stopped, every stage it reached timed
    assert not preset["finished"] and preset["stopped_by_cap"] and "report_card" not in preset
    assert sum(st["seconds"] for st in preset["stages"].values()) <= 6 + 5
    assert report["section_minutes"]["preset"] * 60 < 6 + 30  # the stages' processes went with run.py
    assert "--preset gpu --device cpu --no-study" in preset["command"] and "--quick" in preset["command"]
    w2 = s["w2"]  # tiny W2 eager and compiled, with the split and MFU
    assert set(w2["modes"]) == {"eager", "compiled"} and w2["workload"] == "W2-tiny" and w2["dtype"] == "float32"
    for m in w2["modes"].values():
        assert set(m["split"]) == {"generation", "scoring", "update"} and m["mfu_pct"] > 0
    printed = capsys.readouterr().out
    assert "8 prompts × 8 tokens → 8 new; 2 epochs × 2 minibatches of 4; float32" in printed  # no bf16 on CPU
    for mode in ("eager", "compiled"):
        line = next(line for line in printed.splitlines() if line.startswith(f"W2-tiny {mode}:"))
        assert "tokens/s" in line and "MFU" in line
    for r in s["train_mfu"]["rows"]:  # tokens/s and ms/step are one measurement
        assert r["mode"] == "compiled"
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq"] / r["ms_per_step"] * 1e3)
    assert [r["batch"] for r in s["train_mfu"]["rows"]] == [2, 4]
    decode = s["decode"]
    assert decode["ratio"] == pytest.approx(decode["compiled_tokens_per_s"] / decode["eager_tokens_per_s"])
    assert s["logprob_memory"]["vocab"] == 50257
    md = open(out / "check.md").read()
    assert md == bench.check_markdown(report) and "CPU: tiny sizes" in md
    assert "Peer stack: not installed: no peer rows" in md


def sample_report():
    """A report as check() writes it, by hand: every kind of row check.md draws."""
    machine = {"gpu": "NVIDIA H100 80GB HBM3", "cpu": "x86_64", "host": "h", "torch": "2.13.0", "date": "d"}
    w2 = {"workload": "W2", "dtype": "bfloat16", "batches": 3, "modes": {
        "eager": {"seconds": 2.0, "tokens_per_s": 8192.0, "mfu_pct": 10.0,
                  "split": {"generation": 1.0, "scoring": 0.25, "update": 0.75}},
        "compiled": {"seconds": 1.0, "tokens_per_s": 16384.0, "mfu_pct": 20.0,
                     "split": {"generation": 0.5, "scoring": 0.125, "update": 0.375}},
        "peer": {"seconds": 2.5, "tokens_per_s": 6553.6}},
        "peer_stack": {"trl": "0.24.0", "transformers": "4.57.6"},
        "vs_peer": {"eager": {"median": 1.25, "range": [1.1, 1.3], "goal": None},
                    "compiled": {"median": 2.5, "range": [2.25, 2.75], "goal": 2.0}}}
    train = {"peak_tflops": 790.0, "rows": [
        {"batch": 8, "seq": 1024, "mode": "compiled", "dtype": "bfloat16", "ms_per_step": 50.0,
         "tokens_per_s": 163840.0, "mfu_pct": 41.5, "adamw_pct": 3.0, "peak_memory_gib": 20.5, "memory_gib": 80.0},
        {"batch": 16, "seq": 1024, "mode": "compiled", "oom": True}]}
    preset = {"command": "python run.py --preset gpu", "cap_minutes": 4.0, "finished": False, "stopped_by_cap": True,
              "exit_code": -9,
              "stages": {"base": {"seconds": 100.0, "finished": True}, "sft": {"seconds": 140.0, "finished": False}}}
    return {"command": "python bench.py --check --device cuda", "machine": machine, "minutes": 7.5,
            "section_minutes": {"preset": 4.0, "w2": 3.5},
            "sections": {"preset": preset, "w2": w2, "train_mfu": train,
                         "decode": {"failed": "RuntimeError: boom"}}}


def test_check_markdown_draws_every_figure_with_the_gpu_and_lists_what_was_not_measured():
    md = bench.check_markdown(sample_report())
    lines = md.splitlines()
    assert lines[0] == "# nanorlhf GPU check: NVIDIA H100 80GB HBM3"
    assert "7.5 min in all: preset 4.0, w2 3.5" in md
    assert "| base | 100 | yes |" in lines and "| sft | 140 | no: stopped at the cap |" in lines
    assert "| eager | 2.000 | 8,192 | 10.0% | 1.000 | 0.250 | 0.750 | 1.25× (1.10–1.30) |" in lines
    compiled = "| compiled | 1.000 | 16,384 | 20.0% | 0.500 | 0.125 | 0.375 | 2.50× (2.25–2.75), goal ≥ 2.0× |"
    assert compiled in lines
    assert "| peer | 2.500 | 6,554 | – | – | – | – | – |" in lines
    assert "Peer stack: trl 0.24.0, transformers 4.57.6" in md
    assert "against 790 TFLOP/s" in md
    assert "| compiled bfloat16 | 8 × 1024 | 50 | 163,840 | 41.5% | 20.5 of 80 | 3% |" in lines
    assert "| compiled | 16 × 1024 | out of memory | | | | |" in lines
    assert lines[-1] == "- decode: RuntimeError: boom" and "## Not measured" in lines
    assert "Log-prob" not in md  # a section that did not run draws nothing
    report = sample_report()
    report["sections"]["preset"].update(stopped_by_cap=False, exit_code=1)  # a stage failed before the cap
    assert "| sft | 140 | no: failed (exit 1) |" in bench.check_markdown(report).splitlines()


def test_check_markdown_embeds_a_finished_presets_card_and_goals():
    report = sample_report()
    card = "# nanorlhf report card\n\n## Reward model\n- x"
    report["sections"]["preset"].update(finished=True, stopped_by_cap=False, exit_code=0, report_card=card,
                                        evidence={"RM correctness-pair accuracy ≥ 80%": ["83.0%", True],
                                                  "PPO-ptx helpful ≥ SFT + 0.10": ["+0.050", False]})
    lines = bench.check_markdown(report).splitlines()
    assert "- RM correctness-pair accuracy ≥ 80%: 83.0%, met" in lines
    assert "- PPO-ptx helpful ≥ SFT + 0.10: +0.050, NOT met" in lines
    assert "## nanorlhf report card" in lines and "### Reward model" in lines  # one level below the check's own


def test_evidence_goals_by_hand():
    results = {"gold_components": {"sft": {"helpful": 0.30}, "ppo_ptx": {"helpful": 0.45}},
               "win_rate_vs_sft": {"ppo_ptx": 0.82}, "win_rate_ci": {"ppo_ptx": [0.74, 0.90]},
               "rm_by_kind": {"correctness": {"rm_accuracy": 0.81}}}
    got = bench.evidence(results)
    assert got["RM correctness-pair accuracy ≥ 80%"] == ("81.0%", True)
    assert got["PPO-ptx helpful ≥ SFT + 0.10"] == ("+0.150", True)
    assert got["PPO-ptx win rate vs SFT ≥ 80%, 95% CI low end ≥ 75%"] == ("82.0% (74.0%–90.0%)", False)  # low end


def test_evidence_reads_what_eval_writes(quick_run):
    results = json.load(open(quick_run / "results.json"))
    got = bench.evidence(results)
    correctness = results["rm_by_kind"]["correctness"]["rm_accuracy"]
    assert got["RM correctness-pair accuracy ≥ 80%"] == (f"{correctness:.1%}", correctness >= 0.8)
    assert len(got) == 3


def test_missing_peer_is_one_line_and_a_failed_offline_install_one_more(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert not bench.peer_available(str(tmp_path / "absent"))
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "the peer's rows are skipped" in out[0]
    (tmp_path / "empty").mkdir()  # wheels that do not hold the peer: pip fails, in one line
    assert not bench.peer_available(str(tmp_path / "empty"))
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].startswith("peer: installing requirements-peer.txt from")
    assert lines[1].startswith("peer: pip failed")
    assert len(lines) == 3 and "Traceback" not in out.out + out.err


def test_peer_stack_reads_every_pin_and_what_is_installed(monkeypatch):
    installed = {"trl": "0.24.0", "transformers": "5.24.0"}

    def version(name):
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]
    monkeypatch.setattr(importlib.metadata, "version", version)
    pins = [line.strip().split("==") for line in open(os.path.join(ROOT, "requirements-peer.txt"))
            if "==" in line and not line.startswith("#")]  # a comment names torch==…: not a pin
    stack = bench.peer_stack()
    assert list(stack) == [name for name, _ in pins] and len(stack) >= 3
    assert stack["trl"] == ("0.24.0", "0.24.0") and stack["transformers"] == ("5.24.0", "4.57.6")
    assert stack["datasets"] == (None, "4.2.0")
