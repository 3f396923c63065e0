import dataclasses
import os
import pathlib
import subprocess
import sys
from typing import Optional

import pytest
import torch

from nanorlhf.config import CommonConfig, arg, parse_config, print_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@dataclasses.dataclass
class ToyConfig(CommonConfig):
    """Toy script: trains nothing."""

    lr: float = arg(3e-4, "peak learning rate")
    batch_size: int = arg(8, "sequences per step")
    kl_coef: Optional[float] = arg(None, "KL penalty; none = adaptive")
    compile: bool = arg(True, "torch.compile the model")
    stages: list[str] = arg(["sft", "rm"], "stages to run; 100% of them")
    derived: int = dataclasses.field(default=0, init=False)


def test_defaults():
    cfg = parse_config(ToyConfig, [])
    assert cfg == ToyConfig()
    assert (cfg.data, cfg.init, cfg.max_steps, cfg.seed, cfg.device, cfg.resume) == ("", "", -1, 1337, "cpu", False)
    assert ToyConfig().stages is not ToyConfig().stages  # mutable default copied per instance


def test_types_and_bools():
    cfg = parse_config(ToyConfig, ["--lr", "1e-3", "--batch_size", "4", "--out", "runs/t", "--kl_coef", "0.1",
                                   "--no-compile", "--resume", "--stages", "ppo", "--max_steps", "10"])
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)
    assert cfg.batch_size == 4 and isinstance(cfg.batch_size, int)
    assert (cfg.out, cfg.kl_coef, cfg.compile, cfg.resume, cfg.stages, cfg.max_steps) == (
        "runs/t", 0.1, False, True, ["ppo"], 10)
    cfg = parse_config(ToyConfig, ["--compile", "--no-resume", "--kl_coef", "none"])
    assert (cfg.compile, cfg.resume, cfg.kl_coef) == (True, False, None)


@pytest.mark.parametrize("argv", [["--nope", "1"], ["--batch_size", "2.5"], ["--lr", "fast"], ["--resume", "yes"]])
def test_bad_flags_exit(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(ToyConfig, argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_required_field():
    @dataclasses.dataclass
    class Req:
        path: str = arg(help="input file")
        n: int = arg(1, "count")

    assert parse_config(Req, ["--path", "x"]) == Req("x", 1)
    with pytest.raises(SystemExit):
        parse_config(Req, [])


def test_unsupported_type():
    @dataclasses.dataclass
    class Bad:
        d: dict = arg({}, "a dict")

    with pytest.raises(TypeError, match="Bad.d"):
        parse_config(Bad, [])


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(ToyConfig, ["--help"], description="Toy script: trains nothing.")
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "Toy script: trains nothing." in out
    for f in dataclasses.fields(ToyConfig):
        if f.init:
            assert f"--{f.name}" in out
            assert f"{f.metadata['help']} (default: {getattr(ToyConfig(), f.name)!r}" in out
    assert "--derived" not in out
    assert "--no-compile" in out and "--no-resume" in out
    assert "peak learning rate (default: 0.0003)" in out  # spelled out once, independent of the loop
    assert "stages to run; 100% of them (default: ['sft', 'rm'])" in out
    assert "stop after this many steps; -1 = the full schedule (default: -1; ≥ -1)" in out  # bounds listed too


def test_script_help_uses_module_docstring(tmp_path):
    script = tmp_path / "toy.py"
    script.write_text('"""Train a toy: the docstring is the description."""\n'
                      "from nanorlhf.config import CommonConfig, parse_config\n"
                      "parse_config(CommonConfig)\n")
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=True, env=env)
    out = " ".join(out.stdout.split())
    assert "Train a toy: the docstring is the description." in out
    assert "--seed" in out and "(default: 1337)" in out


def test_print_config(capsys):
    print_config(ToyConfig(seed=7))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "ToyConfig:"
    assert "  seed = 7" in lines and "  lr = 0.0003" in lines and "  out = 'runs/run'" in lines
    assert len(lines) == 1 + len(dataclasses.fields(ToyConfig))


@pytest.mark.parametrize("name, message", [("gpu0", "not a device name"), ("xpu:7", "not available"),
                                           ("cpu", None)])
def test_get_device_names_a_bad_or_missing_device(name, message):
    from nanorlhf.common import get_device

    if message is None:
        assert get_device(name) == torch.device("cpu")
        return
    with pytest.raises(SystemExit, match=f"--device {name}: {message}"):
        get_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("script, args", [("bench.py", []), ("run.py", ["--out", "/nonexistent/run"]),
                                          ("chat.py", ["--ckpt", "missing.pt"]),
                                          ("train_sft.py", ["--out", "/nonexistent/sft"])])
def test_scripts_exit_with_one_line_when_cuda_is_missing(script, args):
    r = run_script(script, "--device", "cuda", *args)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == "--device cuda: not available on this machine (use --device cpu)"


@dataclasses.dataclass
class Bounded:
    steps: int = arg(10, "steps", low=1)
    gamma: float = arg(1.0, "discount", low=0, high=1)
    temperature: float = arg(1.0, "sampling temperature", positive=True)
    beta: Optional[float] = arg(None, "optional, bounded when given", low=0)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps 0: must be ≥ 1"), (["--gamma", "1.5"], "--gamma 1.5: must be ≤ 1"),
    (["--gamma", "-0.1"], "--gamma -0.1: must be ≥ 0"), (["--temperature", "0"], "--temperature 0.0: must be > 0"),
    (["--temperature", "nan"], "--temperature nan: must be > 0"), (["--gamma", "nan"], "--gamma nan: must be ≥ 0"),
    (["--beta", "-1"], "--beta -1.0: must be ≥ 0"),
])
def test_out_of_range_flags_exit_naming_the_flag_and_the_bound(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Bounded, argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


def test_bounds_are_inclusive_and_none_passes():
    cfg = parse_config(Bounded, ["--steps", "1", "--gamma", "0", "--temperature", "1e-9", "--beta", "none"])
    assert (cfg.steps, cfg.gamma, cfg.temperature, cfg.beta) == (1, 0.0, 1e-9, None)
    assert parse_config(Bounded, ["--gamma", "1"]).gamma == 1.0


@pytest.mark.parametrize("script, flag, value", [("train_ppo.py", "--minibatch_size", "0"),
                                                 ("train_ppo.py", "--temperature", "0"),
                                                 ("train_ppo.py", "--max_new_tokens", "0"),
                                                 ("train_rm.py", "--k_min", "1"), ("eval.py", "--samples", "0")])
def test_scripts_refuse_out_of_range_flags_before_doing_anything(script, flag, value, tmp_path):
    r = run_script(script, flag, value, "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{flag} {value}" in r.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "o")


def test_check_room_counts_the_formatted_prompt():
    from nanorlhf.common import check_room
    from nanorlhf.tokenizer import Tokenizer

    tok = Tokenizer.load("tiny")
    prompts = ["hi", "what is the capital of peru?"]
    n = max(len(tok.format_prompt(p)) for p in prompts)  # the template's special tokens included
    check_room(tok, prompts, 64 - n, 64)  # exactly fits
    with pytest.raises(SystemExit, match=f"--max_new_tokens {65 - n}: the longest prompt has {n} tokens and the "
                                         f"model's context is 64, so at most {64 - n} new tokens fit"):
        check_room(tok, prompts, 65 - n, 64)


@pytest.mark.parametrize("script, args, message", [
    ("train_ppo.py", ["--max_new_tokens", "64"], "--max_new_tokens 64: the longest prompt has"),
    ("train_rm.py", ["--k_min", "5", "--k_max", "3"], "--k_min 5 is larger than --k_max 3"),
])
def test_scripts_refuse_flags_that_cannot_work_together(script, args, message, tmp_path):
    from test_ppo import tiny_checkpoints

    paths = tiny_checkpoints(str(tmp_path))  # block_size 64
    r = run_script(script, "--init", paths["lm"], "--out", str(tmp_path / "o"), "--world_scale", "0.01",
                   *(["--reward_model", paths["scalar"]] if script == "train_ppo.py" else []), *args)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(message)
    assert not os.path.exists(tmp_path / "o")


def test_progress_mfu_from_tokens_or_from_counted_flops(monkeypatch, capsys):
    """MFU = FLOPs done since the last line / seconds / peak: tokens × flops_per_token, or the FLOPs a script counted
    itself (PPO: batch_flops), summed over the steps between two lines."""
    from nanorlhf import common

    clock = iter([0.0, 2.0, 6.0])  # start, then the two printing steps
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(common, "peak_flops", lambda device: 1e9)
    progress = common.Progress(total=4, every=2, flops_per_token=1e6, device="cpu")
    progress.step(0, 300)
    progress.step(1, 100)  # 400 tokens × 1e6 FLOPs in 2 s of a 1e9 FLOP/s machine: 20%
    progress.step(2, 100, flops=1e9)
    progress.step(3, 100, flops=3e9)  # 4e9 FLOPs in 4 s: 100%
    lines = capsys.readouterr().out.splitlines()
    assert "tok/s 200 | MFU 20.0%" in lines[0] and "tok/s 50 | MFU 100.0%" in lines[1], lines
