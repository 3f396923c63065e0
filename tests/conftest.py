"""Shared end-to-end fixtures: one `run.py --quick` per test session, which the pipeline tests read and the
baselines tests extend (on a copy), as a user extends a run with --baselines.

pytest.ini runs the suite on one pytest-xdist worker per core (most of its time is torch.compile's code generation
and process start-up, one core each), each worker and the processes its tests start with one torch thread."""
import os
import shutil
import subprocess
import sys

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported; inherited by the processes tests start

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(items):
    """--dist loadgroup (pytest.ini): each test file runs on one worker, so its module fixtures are built once; the
    files that share the quick run go to one worker too, so it is built once."""
    for item in items:
        quick = {"quick_run", "beyond_run"} & set(item.fixturenames)
        item.add_marker(pytest.mark.xdist_group("quick_run" if quick else item.module.__name__))


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
