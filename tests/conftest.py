"""Shared end-to-end fixtures: one `run.py --quick` per test session, which the pipeline tests read and the
baselines tests extend (on a copy), as a user extends a run with --baselines."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_py(*args, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "run.py", "--quick", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """`run.py --quick`: base → SFT → RM → PPO → PPO-ptx → over-optimization study → report card."""
    out = tmp_path_factory.mktemp("quick") / "run"
    run_py("--out", str(out))
    return out


@pytest.fixture(scope="session")
def beyond_run(quick_run, tmp_path_factory):
    """The quick run, copied, extended by `--baselines --seeds 1 --rounds 2` (its stages are skipped; the seeds'
    stages are tested in test_beyond without training them)."""
    out = tmp_path_factory.mktemp("beyond") / "run"
    shutil.copytree(quick_run, out)
    run_py("--baselines", "--seeds", "1", "--rounds", "2", "--out", str(out))
    return out
