import os
import subprocess
import sys

import torch

from nanorlhf.checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "64", "--batch_size", "4",
        "--world_scale", "0.01"]


def run(args):
    return subprocess.run([sys.executable, "train_base.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_train_base_smoke_and_exact_resume(tmp_path):
    full = run(["--out", str(tmp_path / "full"), "--steps", "6", "--eval_every", "3", *TINY])
    assert full.returncode == 0, full.stderr
    assert "seed = 1337" in full.stdout and "fact accuracy" in full.stdout and "validation loss" in full.stdout
    ckpt = load_checkpoint(str(tmp_path / "full" / "ckpt.pt"))
    assert ckpt["head"] == "lm" and ckpt["step"] == 6 and 0.0 <= ckpt["extra"]["fact_accuracy"] <= 1.0
    # stop after 3 steps, resume to 6: the same weights as the uninterrupted run
    part = run(["--out", str(tmp_path / "part"), "--steps", "6", "--eval_every", "3", "--max_steps", "3", *TINY])
    assert part.returncode == 0, part.stderr
    resumed = run(["--out", str(tmp_path / "part"), "--steps", "6", "--eval_every", "3", "--resume", *TINY])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    again = load_checkpoint(str(tmp_path / "part" / "ckpt.pt"))
    for k, v in ckpt["model"].items():
        assert torch.equal(v, again["model"][k]), k
