"""Reliability of the stage scripts (SFT, RM, PPO): exact resume after SIGKILL, crash-safe checkpoints, one-line
errors for bad checkpoint files, the NaN guard, determinism, and hostile text. Tiny models (1 layer, width 32) and
world_scale 0.01; most runs are real subprocesses, started together where they are independent."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import chat
import train_ppo
import train_rm
import train_sft
from nanorlhf.checkpoint import load_checkpoint, save_checkpoint
from nanorlhf.model import GPT
from nanorlhf.tokenizer import Tokenizer
from test_ppo import tiny_checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
TIMING = ("seconds", "train_seconds", "data_seconds", "tokens_per_s")  # wall-clock fields, the only ones that vary


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return tiny_checkpoints(str(tmp_path_factory.mktemp("upstream")))


def argv(stage, paths, out, *flags):
    """The command line of a tiny run of `stage`, writing to `out`."""
    common = ["--out", str(out), "--world_scale", "0.01", "--log_every", "1"]
    if stage == "sft":
        args = ["train_sft.py", "--init", paths["lm"], "--batch_size", "4", "--max_new_tokens", "4"]
    elif stage == "rm":
        args = ["train_rm.py", "--init", paths["lm"], "--n_prompts", "12", "--k_min", "2", "--k_max", "3",
                "--max_new_tokens", "6", "--n_calibrate", "12", "--n_norm", "10", "--batch_size", "2"]
    else:
        args = ["train_ppo.py", "--init", paths["lm"], "--reward_model", paths["scalar"], "--batch_size", "8",
                "--minibatch_size", "4", "--ppo_epochs", "2", "--max_new_tokens", "8"]
    return [sys.executable, os.path.join(ROOT, args[0]), *args[1:], *common, *flags]


def start(cmd):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)


def run_all(cmds, timeout=180):
    """Run independent commands at the same time; [(returncode, stdout, stderr)] in order."""
    procs = [start(c) for c in cmds]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, *o) for p, o in zip(procs, outputs)]


def progress_metrics(stdout):
    """{step: "loss 6.9 | lr 5e-05"} from the progress lines, without tok/s, MFU and ETA."""
    found = re.findall(r"^(?:sft )?step (\d+)/\d+ \| (.*?) \| tok/s", stdout, flags=re.M)
    return {int(step): metrics for step, metrics in found}


def without_timing(stdout, out):
    """stdout with the output folder and every wall-clock number masked."""
    text = stdout.replace(str(out), "OUT")
    text = re.sub(r"tok/s [\d,.]+ \| MFU [\d.]+% \| ETA \d+s", "", text)
    text = re.sub(r"\b(data_seconds|seconds) [\d.]+", r"\1 T", text)
    return re.sub(r"\b\d+(\.\d+)?s\b", "Ts", text)


def assert_same(a, b, where=""):
    """Equal checkpoints, tensors bitwise; the run's config (its --out, --resume) and timings excepted."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            if k not in ("config",) + TIMING:
                assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def log_lines(out):
    lines = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return [{k: v for k, v in line.items() if k not in TIMING} for line in lines]


# ----------------------------------------------------------------------------------------------------------------
# exact resume after SIGKILL, and determinism

KILL = {  # stage: (flags, kill after the progress line of this step)
    # SFT: 33 steps per epoch; killed in epoch 2, after the epoch-1 evaluation chose a best model
    "sft": (["--epochs", "2", "--max_steps", "60", "--save_every", "1"], 36),
    "rm": (["--epochs", "4", "--save_every", "1"], 5),  # 6 steps per epoch, 24 in all; killed mid-epoch 1
    "ppo": (["--max_steps", "8", "--save_every", "1", "--ptx_coef", "1.0", "--ptx_per_episode", "0.5", "--ema", "0.9",
             "--adaptive_kl"], 3),
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_sigkill_then_resume_is_bit_identical_and_runs_are_deterministic(ckpts, tmp_path, stage):
    flags, kill_at = KILL[stage]
    full, again, cut = tmp_path / "full", tmp_path / "again", tmp_path / "cut"
    procs = [start(argv(stage, ckpts, d, *flags)) for d in (full, again)]
    killed = subprocess.Popen(argv(stage, ckpts, cut, *flags), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=ENV, cwd=ROOT)
    seen = ""
    for line in killed.stdout:  # SIGKILL right after step `kill_at` is logged: mid-step or mid-save, unannounced
        seen += line
        if re.match(rf"(sft )?step {kill_at}/", line):
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait(timeout=60)
    killed.stdout.close()
    assert killed.returncode == -signal.SIGKILL, seen[-3000:]
    outputs = [p.communicate(timeout=180) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stdout[-2000:] + stderr[-3000:]
    # determinism: the same command prints the same numbers (timings aside)
    assert without_timing(outputs[0][0], full) == without_timing(outputs[1][0], again)

    resumed = subprocess.run(argv(stage, ckpts, cut, *flags, "--resume"), capture_output=True, text=True, env=ENV,
                             cwd=ROOT, timeout=180)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    at = int(re.search(r"resumed from .* at step (\d+)", resumed.stdout).group(1))
    expected, got = progress_metrics(outputs[0][0]), progress_metrics(resumed.stdout)
    assert kill_at - 1 <= at < max(expected)  # a mid-run state (the kill may land after a few more steps)
    assert sorted(got) == [s for s in sorted(expected) if s > at] and got == {s: expected[s] for s in got}
    for name in ("state.pt", "ckpt.pt"):  # weights, optimizer moments, RNG, EMA, value model, KL state, results
        assert_same(load_checkpoint(str(full / name)), load_checkpoint(str(cut / name)), name)
    if stage == "ppo":
        assert log_lines(full) == log_lines(cut)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: crash-safe writes, one-line errors for bad files

def test_sigkill_during_saves_leaves_a_loadable_latest_file(tmp_path):
    """A child saves a ~8 MB checkpoint over and over and reports each finished save; it is killed at random
    moments, most of them inside a save. The file must always load and hold the last reported step or the next."""
    path = str(tmp_path / "state.pt")
    child = textwrap.dedent(f"""
        import sys, torch
        from nanorlhf.checkpoint import save_checkpoint
        w = torch.arange(2_000_000, dtype=torch.float32)
        for step in range(1, 10_000):
            save_checkpoint({path!r}, {{"step": step, "w": w + step}})
            print(step, flush=True)
    """)
    for n_kill, after in enumerate((2, 5, 9)):
        proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
        last = 0
        for line in proc.stdout:
            last = int(line)
            if last >= after:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=30)
        proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        ckpt = load_checkpoint(path)
        assert ckpt["step"] in (last, last + 1), (n_kill, last, ckpt["step"])
        assert torch.equal(ckpt["w"], torch.arange(2_000_000, dtype=torch.float32) + ckpt["step"])


def test_crash_before_the_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "state.pt")
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    before = open(path, "rb").read()

    def die(src, dst):
        raise KeyboardInterrupt  # the process stops after the new bytes are written, before they are published

    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert open(path, "rb").read() == before and load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["state.pt"]


def bad_files(folder):
    """A truncated checkpoint and a foreign file (a plain torch.save of a tensor)."""
    good = os.path.join(folder, "good.pt")
    save_checkpoint(good, {"step": 1, "w": torch.randn(1000)})
    truncated, foreign = os.path.join(folder, "truncated.pt"), os.path.join(folder, "foreign.pt")
    with open(truncated, "wb") as f:
        f.write(open(good, "rb").read()[:3000])
    torch.save(torch.ones(3), foreign)
    return truncated, foreign


def test_bad_checkpoint_files_give_a_one_line_error_naming_them(ckpts, tmp_path):
    truncated, foreign = bad_files(str(tmp_path))
    cases = {}
    for stage in ("sft", "rm", "ppo"):
        cases[f"{stage} --init truncated"] = (argv(stage, {**ckpts, "lm": truncated}, tmp_path / stage), truncated)
        out = tmp_path / f"{stage}_resume"
        os.makedirs(out)
        with open(out / "state.pt", "wb") as f:
            f.write(open(foreign, "rb").read())
        cases[f"{stage} foreign state.pt"] = (argv(stage, ckpts, out, "--resume"), str(out / "state.pt"))
    cases["ppo --reward_model foreign"] = (argv("ppo", {**ckpts, "scalar": foreign}, tmp_path / "ppo2"), foreign)
    results = run_all([cmd for cmd, _ in cases.values()])
    for (name, (_, named)), (rc, stdout, stderr) in zip(cases.items(), results):
        assert rc not in (0, None), name
        assert "Traceback" not in stderr, f"{name}:\n{stderr[-2000:]}"
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        assert named in last, f"{name}: {stderr[-1000:]}"


# ----------------------------------------------------------------------------------------------------------------
# the NaN guard: an update that goes non-finite stops the run, naming the step and the term, and state.pt is kept

NAN = {  # stage: (flags of the good run, flags of the resumed run whose first update blows up, expected message)
    "sft": (["--epochs", "1", "--max_steps", "2", "--save_every", "1"], ["--max_steps", "4", "--lr", "inf"],
            r"step 3: non-finite (model|weights)"),
    "rm": (["--max_steps", "2", "--save_every", "1"], ["--max_steps", "4", "--lr", "inf"],
           r"step 3: non-finite (model|weights)"),
    "ppo": (["--max_steps", "2", "--save_every", "1"], ["--max_steps", "4", "--value_lr", "inf"],
            r"step 3: non-finite value"),
}


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_nan_guard_names_step_and_term_and_keeps_last_good_state(ckpts, tmp_path, stage):
    good, bad, message = NAN[stage]
    out = tmp_path / stage
    first = subprocess.run(argv(stage, ckpts, out, *good), capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    before = open(out / "state.pt", "rb").read()
    blown = subprocess.run(argv(stage, ckpts, out, *good, "--resume", *bad), capture_output=True, text=True, env=ENV,
                           cwd=ROOT)
    assert blown.returncode != 0 and "Traceback" not in blown.stderr, blown.stderr[-3000:]
    assert re.search(message, blown.stderr.strip().splitlines()[-1]), blown.stderr[-2000:]
    assert open(out / "state.pt", "rb").read() == before  # the last good state, untouched
    state = load_checkpoint(str(out / "state.pt"))
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_nan_in_the_init_weights_stops_sft_at_step_1_naming_the_loss(ckpts, tmp_path):
    ckpt = load_checkpoint(ckpts["lm"])
    ckpt["model"]["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    poisoned = str(tmp_path / "nan.pt")
    save_checkpoint(poisoned, ckpt)
    r = subprocess.run(argv("sft", {"lm": poisoned}, tmp_path / "sft"), capture_output=True, text=True, env=ENV,
                       cwd=ROOT)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "step 1: non-finite SFT loss" in r.stderr
    assert not os.path.exists(tmp_path / "sft" / "state.pt")


# ----------------------------------------------------------------------------------------------------------------
# hostile text: spellings of special tokens, control characters, unicode, CRLF and blank lines

HOSTILE = ["<|endoftext|>", "a<|prompt|>b<|response|>c", "\x00\x1b[31mred\x1b[0m\r\n", "héllo 世界 🙂\u2028",
           "lone \ud800 surrogate", "\t<|endoftext|> <|endoftext|>"]


def hostile_jsonl(path, rows):
    """JSONL with CRLF line ends and blank lines between records (read_jsonl skips blank lines)."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("\r\n\r\n".join(json.dumps(r) for r in rows) + "\r\n")
    return str(path)


def plain(text):
    """What survives encoding as plain text: lone surrogates become U+FFFD, the rest is exact."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def assert_template_only(rows, tok, texts):
    """Each row (token ids, left or right padding with EOS) is <|prompt|> x <|response|> y <|endoftext|>*: the
    special ids appear only where the template puts them, and x decodes to one of `texts` exactly."""
    S = {tok.prompt_id: "P", tok.response_id: "R", tok.eos_id: "E"}
    assert rows
    for row in rows:
        shape = "".join(S.get(i, "n") for i in row)
        assert re.fullmatch(r"E*Pn*Rn*E*", shape), shape
        p, r = shape.index("P"), shape.index("R")
        assert tok.decode(row[p + 1:r]) in {plain(t) for t in texts}


def record_inputs(monkeypatch):
    """Every token row that reaches a model (the trunk's hidden_states sees them all)."""
    rows, real = [], GPT.hidden_states

    def spy(self, idx, *args, **kwargs):
        if idx.size(1) > 1:  # decode steps of one token carry sampled tokens, not text
            rows.extend(idx.tolist())
        return real(self, idx, *args, **kwargs)

    monkeypatch.setattr(GPT, "hidden_states", spy)
    return rows


def test_hostile_text_sft_reaches_the_model_as_plain_text(ckpts, tmp_path, monkeypatch):
    tok = Tokenizer.load("tiny")
    data = hostile_jsonl(tmp_path / "d.jsonl", [{"prompt": h, "response": h[::-1] or "x"} for h in HOSTILE] * 4)
    rows = record_inputs(monkeypatch)
    train_sft.main(["--init", ckpts["lm"], "--data", data, "--out", str(tmp_path / "sft"), "--batch_size", "8",
                    "--max_steps", "2"])
    assert_template_only(rows, tok, HOSTILE)


def test_hostile_text_rm_reaches_the_model_as_plain_text(ckpts, tmp_path, monkeypatch):
    tok = Tokenizer.load("tiny")
    rows_in = [{"prompt": h, "responses": [h, "ok <|endoftext|>", "\x00"], "ranking": [1, 0, 2]} for h in HOSTILE]
    data = hostile_jsonl(tmp_path / "d.jsonl", rows_in * 3)
    rows = record_inputs(monkeypatch)
    train_rm.main(["--init", ckpts["lm"], "--data", data, "--out", str(tmp_path / "rm"), "--batch_size", "4",
                   "--max_steps", "2", "--n_norm", "4"])
    assert_template_only(rows, tok, HOSTILE)
    for row in rows:  # the responses too are plain text: the EOS and padding come after them
        r, end = row.index(tok.response_id), len(row)
        while row[end - 1] == tok.eos_id:
            end -= 1
        assert tok.decode(row[r + 1:end]) in {plain(h) for h in HOSTILE} | {
            "ok <|endoftext|>", "\x00"}


def test_hostile_text_ppo_prompts_reach_the_sampler_as_plain_text(ckpts, tmp_path, monkeypatch):
    tok = Tokenizer.load("tiny")
    data = hostile_jsonl(tmp_path / "d.jsonl", [{"prompt": h} for h in HOSTILE] * 2)
    prompts, real = [], train_ppo.generate

    def spy(model, ids, *args, **kwargs):
        prompts.extend(ids)
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(train_ppo, "generate", spy)
    train_ppo.main(["--init", ckpts["lm"], "--reward_model", ckpts["scalar"], "--data", data, "--out",
                    str(tmp_path / "ppo"), "--batch_size", "4", "--minibatch_size", "4", "--ppo_epochs", "1",
                    "--max_new_tokens", "4", "--max_steps", "2"])
    assert len(prompts) == 8
    assert_template_only(prompts, tok, HOSTILE)


def test_hostile_text_chat_prompt_reaches_the_model_as_plain_text(ckpts, monkeypatch, capsys):
    tok = Tokenizer.load("tiny")
    prompts, real = [], chat.generate

    def spy(model, ids, *args, **kwargs):
        prompts.extend(ids)
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(chat, "generate", spy)
    for h in HOSTILE:
        chat.main(["--ckpt", ckpts["lm"], "--prompt", h, "--max_new_tokens", "3"])
    assert len(prompts) == len(HOSTILE)
    assert_template_only(prompts, tok, HOSTILE)
    chat.main(["--ckpt", ckpts["lm"], "--prompt", "word " * 200])  # longer than the context: said, not crashed
    assert "prompt too long" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_overlong_and_bad_lines_are_clear_errors(ckpts, tmp_path, stage):
    """A line longer than the context, and a raw control character inside a JSON string: each an exit 2 naming
    its line, nothing written."""
    long = "word " * 200
    if stage == "sft":
        rows = [{"prompt": "a", "response": "b"}] * 3 + [{"prompt": long, "response": "b"}]
    elif stage == "rm":
        rows = [{"prompt": "a", "responses": ["b", "c"], "ranking": [0, 1]}] * 3 + [
            {"prompt": long, "responses": ["b", "c"], "ranking": [0, 1]}]
    else:
        rows = [{"prompt": "a"}] * 3 + [{"prompt": long}]
    too_long, control = tmp_path / "long.jsonl", tmp_path / "control.jsonl"
    too_long.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    control.write_text("\n".join(json.dumps(r) for r in rows[:3]) + '\n{"prompt": "raw \x01 control"}\n')
    outs = [tmp_path / "out_long", tmp_path / "out_control"]
    small = ["--batch_size", "2", "--minibatch_size", "2"] if stage == "ppo" else []
    results = run_all([argv(stage, ckpts, out, "--data", str(path), *small)
                       for out, path in zip(outs, (too_long, control))])
    for (rc, stdout, stderr), expected in zip(results, (f"{too_long}:4: ", f"{control}:4: line: invalid JSON")):
        assert rc == 2 and "Traceback" not in stderr, stdout[-2000:] + stderr[-2000:]
        assert expected in stdout, stdout[-2000:]
    assert not any(out.exists() for out in outs)
