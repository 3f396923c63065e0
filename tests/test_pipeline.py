import json
import os
import subprocess
import sys

import pytest

from conftest import run_py
from nanorlhf.evaluation import win_rate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_win_rate_by_hand():
    rate, (lo, hi) = win_rate([1.0, 0.0, 0.5, 0.9], [0.0, 1.0, 0.5, 0.1])
    assert rate == pytest.approx((1 + 0 + 0.5 + 1) / 4)  # a tie counts 1/2
    assert 0.0 <= lo <= rate <= hi <= 1.0
    assert win_rate([0.3] * 5, [0.3] * 5) == (0.5, [0.5, 0.5])


@pytest.mark.slow
def test_quick_pipeline_end_to_end(quick_run):
    out = quick_run
    for stage in ("base", "sft", "rm", "ppo", "ppo_ptx", "study_kl0.01", "study_kl0.3"):  # the study is on by default
        assert (out / stage / "ckpt.pt").exists(), stage
    results = json.loads((out / "results.json").read_text())
    for key in ("win_rate_vs_sft", "gold_score", "rm_accuracy", "labeler_agreement", "pretrain_val_loss", "seconds"):
        assert key in results, key
    assert set(results["gold_score"]) == {"base", "sft", "ppo", "ppo_ptx"}
    assert results["win_rate_vs_sft"]["sft"] == 0.5  # SFT against itself: every prompt a tie
    assert set(results["seconds"]) >= {"base", "sft", "rm", "ppo", "ppo_ptx"}
    report = (out / "report.md").read_text()
    assert "win rate vs SFT" in report and "ppo_ptx" in report
    for png in ("win_rates.png", "overoptimization.png", "training.png"):
        assert (out / png).stat().st_size > 1000, png
    # a second run finds every checkpoint and skips all training stages
    assert run_py("--out", str(out), timeout=300).count("checkpoint exists, skipped") == 7


def test_eval_of_a_folder_without_checkpoints_exits_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--run", str(tmp_path)], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"--run {tmp_path}: no checkpoints to evaluate")
    assert os.listdir(tmp_path) == []  # nothing written
