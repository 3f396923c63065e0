import contextlib
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


@pytest.mark.parametrize("script", ["train_base.py", "train_sft.py", "train_rm.py", "train_ppo.py", "eval.py",
                                    "run.py"])
def test_out_naming_an_existing_file_is_one_line_and_exit_2(script, tmp_path):
    """--out is a folder: a file there (a typo, a log) stops the script before anything is read or written."""
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    r = run_script(script, "--out", str(target))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [f"{script}: error: --out {target}: an existing file; --out names a "
                                             f"folder (created if missing)"]
    assert target.read_text() == "mine" and os.listdir(tmp_path) == ["notes.txt"]


def test_ppo_minibatch_larger_than_the_batch_is_one_line_and_exit_2(tmp_path):
    """--batch_size 4 --minibatch_size 8 would train on minibatches of 4, not the 8 asked for."""
    from test_ppo import tiny_checkpoints

    paths = tiny_checkpoints(str(tmp_path))
    for batch, minibatch in ((4, 8), (12, 8)):
        r = run_script("train_ppo.py", "--init", paths["lm"], "--reward_model", paths["scalar"], "--world_scale",
                       "0.01", "--out", str(tmp_path / "o"), "--batch_size", str(batch), "--minibatch_size",
                       str(minibatch))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1] == (f"train_ppo.py: error: --minibatch_size {minibatch}: must divide "
                                                     f"--batch_size {batch} (each optimizer step takes a full "
                                                     f"minibatch of episodes)")
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


def test_progress_reads_the_peak_again_when_a_line_beats_it(monkeypatch, capsys):
    """A peak read in a slow moment (the machine busy at the start) would print MFU above 100%: a line faster than
    the peak reads the peak again and keeps the higher reading."""
    from nanorlhf import common

    clock = iter([0.0, 1.0, 2.0])
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    readings = []
    monkeypatch.setattr(common, "peak_flops", lambda device, again=False: readings.append(again) or (4e9 if again else 1e9))
    progress = common.Progress(total=2, every=1, flops_per_token=None, device="cpu")
    progress.step(0, 10, flops=2e9)  # 2e9 FLOP/s against a peak of 1e9: read again, 4e9 → 50%
    progress.step(1, 10, flops=1e9)  # under the new peak: no reading
    lines = capsys.readouterr().out.splitlines()
    assert "MFU 50.0%" in lines[0] and "MFU 25.0%" in lines[1], lines
    assert readings == [False, True]


@contextlib.contextmanager
def other_processes_busy(n):
    """n processes of another program, each keeping a core busy, for the duration of the block."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def test_a_stage_prints_mfu_at_most_100_percent_after_a_peak_read_while_busy(capsys):
    """On this machine, real training steps of a matmul-bound model, with the peak first read while another process
    held every core (as when a run starts beside other work): the printed MFU stays ≤ 100%."""
    import re

    from nanorlhf import common
    from nanorlhf.model import GPT, GPTConfig

    with other_processes_busy(2 * os.cpu_count()):
        common._PEAK.clear()
        common.peak_flops("cpu")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=512, n_layer=2, n_head=4, n_embd=256, dropout=0.0))
    ids = torch.randint(0, 512, (16, 129))
    progress = common.Progress(total=8, every=2, flops_per_token=model.flops_per_token(128), device="cpu")
    for step in range(8):
        common.lm_loss(model, ids, torch.ones_like(ids, dtype=torch.bool)).backward()
        progress.step(step, 16 * 128)
    mfu = [float(m) for m in re.findall(r"MFU ([\d.]+)%", capsys.readouterr().out)]
    assert len(mfu) == 4 and max(mfu) <= 100, mfu


def test_auto_threads_leave_out_the_cores_other_processes_keep_busy():
    """--threads 0 (auto) with every core but one held by another process: one thread, not torch's one per core
    (which spin waiting for each other on the busy cores). With OMP_NUM_THREADS set, that count, unmeasured."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    code = "from nanorlhf.common import set_threads; print(set_threads(0))"
    with other_processes_busy(os.cpu_count() - 1):
        auto, pinned = (subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, cwd=ROOT)
                        for e in (env, {**env, "OMP_NUM_THREADS": "2"}))
    assert auto.stdout.split() == ["1"], auto.stderr[-2000:]
    assert pinned.stdout.split() == ["2"], pinned.stderr[-2000:]


def test_a_resumed_run_keeps_the_thread_count_of_the_run_it_resumes(tmp_path):
    """The thread count moves float rounding: a resumed run takes the saved count, whatever auto would pick now."""
    from nanorlhf import common
    from nanorlhf.checkpoint import make_checkpoint, save_checkpoint
    from nanorlhf.model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    opt = torch.optim.AdamW(model.parameters())
    cfg = dataclasses.make_dataclass("C", [("out", str), ("resume", bool), ("threads", int)])(str(tmp_path), True, 2)
    save_checkpoint(str(tmp_path / "state.pt"), make_checkpoint(model, model.config, "lm", "tiny", {"threads": 1}, 3, opt))
    before = torch.get_num_threads()
    try:
        assert common.resume(cfg, model, opt)["step"] == 3
        assert cfg.threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
