"""Real launches of the scripts under torchrun (`python -m torch.distributed.run --standalone --nproc_per_node 2`,
gloo on CPU, tiny sizes): the same weights as one process with the same global batch (SFT, RM, PPO); a two-process
run killed mid-way and resumed ends where an uninterrupted one does; a non-finite loss on one rank stops the run.

Tolerance of the comparisons with one process: the runs differ only in the order of float32 sums (each rank's
gradient, then their all-reduce, vs one batch), and Adam turns any gradient into a step of about lr, so rounding
noise on a near-zero gradient could move a weight by up to lr per step. Measured: 2.3e-6 (SFT, 20 steps, largest
update 1.2e-2), 7e-9 and 8e-8 (PPO policy and value, updates 4e-3). A sharding error (a rank's shard dropped, or
weighted by its own tokens) changes the update itself, so the largest difference must stay under 1% of the largest
update.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_ppo
import train_rm
import train_sft
from nanorlhf.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from nanorlhf.model import GPT, GPTConfig
from nanorlhf.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 180  # seconds for one launch; a run left waiting on a collective would hit it
WORDS = "the cat dog is red green blue one two three big small fast slow".split()
# 18 lines: 17 train + 1 held out, so at batch size 4 an epoch ends with a batch of 1 and one rank gets none
SFT = ["--batch_size", "4", "--epochs", "4", "--dropout", "0", "--warmup", "2", "--save_every", "2"]
RM = ["--batch_size", "4", "--epochs", "2", "--warmup", "2"]
# a policy that always answers EOS (below) samples the same rollouts on any number of ranks whatever their seeds;
# ptx text of one repeated token gives every rank the same windows, so the policy still gets a real gradient
PPO = ["--ptx_coef", "1", "--ptx_block_size", "8", "--batch_size", "4", "--minibatch_size", "4", "--ppo_epochs", "2",
       "--batches", "2", "--max_new_tokens", "4", "--lr", "1e-3", "--value_lr", "1e-3", "--warmup", "1", "--no-compile"]


def sentence(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny checkpoints (1 layer, d 32, tiny BPE) and data files with ragged lengths."""
    folder = tmp_path_factory.mktemp("torchrun")
    tok = Tokenizer.load("tiny")
    torch.manual_seed(0)
    mconf = GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32)
    paths = {name: str(folder / f"{name}.pt") for name in ("lm", "scalar", "eos_lm")}
    models = {"lm": GPT(mconf), "scalar": GPT(mconf, head="scalar")}
    models["eos_lm"] = GPT(mconf)
    with torch.no_grad():  # the final LayerNorm's entry 0 is a constant 10, EOS's embedding 5 there: logit +50
        models["eos_lm"].load_state_dict(models["lm"].state_dict())
        models["eos_lm"].transformer.ln_f.weight[0], models["eos_lm"].transformer.ln_f.bias[0] = 0.0, 10.0
        models["eos_lm"].transformer.wte.weight[tok.eos_id, 0] = 5.0
    for name, model in models.items():
        save_checkpoint(paths[name], make_checkpoint(model, mconf, model.head, tok, {}, 0))
    rng = random.Random(0)
    rows = {"sft": [{"prompt": sentence(rng, 2, 6), "response": sentence(rng, 1, 10)} for _ in range(18)],
            "rm": [{"prompt": sentence(rng, 2, 6), "responses": [sentence(rng, 1, 8) for _ in range(k)],
                    "ranking": rng.sample(range(k), k)} for k in [rng.randint(2, 4) for _ in range(18)]]}
    for name, lines in rows.items():
        paths[name] = str(folder / f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in lines)
    paths["ptx"] = str(folder / "ptx.txt")
    with open(paths["ptx"], "w") as f:
        f.write(" ".join(["a"] * 600) + "\n")
    return paths


def torchrun(script, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
           "--device", "cpu", "--log_every", "1", *args]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=TIMEOUT)
    return r


def assert_same_weights(one, two, start, shift_only=()):
    """max |two − one| under 1% of the largest update max |one − start| (see the top), over every weight but
    `shift_only`: those whose gradient is rounding noise by construction (see the RM test)."""
    diff = max((one[k] - two[k]).abs().max().item() for k in one if k not in shift_only)
    update = max((one[k] - start[k]).abs().max().item() for k in start)
    assert update > 1e-4 and diff < 0.01 * update, (diff, update)


@pytest.fixture(scope="module")
def sft_runs(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    args = ["--init", files["lm"], "--data", files["sft"], *SFT]
    r = torchrun("train_sft.py", *args, "--out", str(out / "two"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    train_sft.main([*args, "--out", str(out / "one")])
    return out


@pytest.mark.slow
def test_sft_two_processes_match_one(files, sft_runs):
    one, two = (load_checkpoint(str(sft_runs / run / "ckpt.pt")) for run in ("one", "two"))
    assert one["step"] == two["step"] == 20
    assert_same_weights(one["model"], two["model"], load_checkpoint(files["lm"])["model"])
    assert [e["val_loss"] for e in two["extra"]["epochs"]] == pytest.approx([e["val_loss"] for e in
                                                                              one["extra"]["epochs"]], rel=1e-5)


@pytest.mark.slow
def test_rm_two_processes_match_one(files, tmp_path):
    args = ["--init", files["lm"], "--data", files["rm"], *RM]
    r = torchrun("train_rm.py", *args, "--out", str(tmp_path / "two"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    train_rm.main([*args, "--out", str(tmp_path / "one")])
    one, two = (load_checkpoint(str(tmp_path / run / "ckpt.pt")) for run in ("one", "two"))
    assert one["step"] == two["step"] == 10
    # the ranking loss sees only differences of scores, so a weight that shifts every score equally gets a gradient
    # of rounding noise, which Adam turns into lr-sized steps that differ between the runs: the head's bias and the
    # final LayerNorm's bias (r = w·(g ⊙ x̂ + β) + b: w·β is the same for every response)
    assert_same_weights(one["model"], two["model"], load_checkpoint(files["lm"])["model"],
                        shift_only=("score.bias", "transformer.ln_f.bias"))


@pytest.mark.slow
def test_ppo_two_processes_match_one(files, tmp_path):
    args = ["--init", files["eos_lm"], "--reward_model", files["scalar"], "--data", os.path.join(ROOT, "examples",
            "ppo.jsonl"), "--ptx_data", files["ptx"], *PPO]
    r = torchrun("train_ppo.py", *args, "--out", str(tmp_path / "two"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    train_ppo.main([*args, "--out", str(tmp_path / "one")])
    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("one", "two")]
    for a, b in zip(*logs):  # the same rollouts: every response is one EOS, scored alike
        assert a["response_len"] == b["response_len"] == 1.0
        assert b["reward"] == pytest.approx(a["reward"], abs=1e-6)
        assert b["ptx_loss"] == pytest.approx(a["ptx_loss"], rel=1e-6)
    one, two = (load_checkpoint(str(tmp_path / run / "state.pt")) for run in ("one", "two"))
    assert_same_weights(one["model"], two["model"], load_checkpoint(files["eos_lm"])["model"])
    assert_same_weights(one["extra"]["value_model"], two["extra"]["value_model"],
                        load_checkpoint(files["scalar"])["model"])


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_same_result(files, sft_runs, tmp_path):
    """SIGKILL the whole torchrun (agent and both ranks) once the first state.pt is written, then --resume."""
    out = tmp_path / "sft"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_sft.py",
           "--device", "cpu", "--init", files["lm"], "--data", files["sft"], *SFT, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + TIMEOUT
    while not (out / "state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "ckpt.pt").exists(), "the run ended before it could be killed"
    assert 2 <= load_checkpoint(str(out / "state.pt"))["step"] < 20
    r = torchrun("train_sft.py", "--init", files["lm"], "--data", files["sft"], *SFT, "--out", str(out), "--resume")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    resumed, straight = (load_checkpoint(str(p / "ckpt.pt")) for p in (out, sft_runs / "two"))
    assert resumed["step"] == straight["step"]
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert resumed["extra"]["epochs"] == straight["extra"]["epochs"]


@pytest.mark.slow
def test_non_finite_loss_on_one_rank_stops_every_rank(files, tmp_path):
    """A checkpoint whose position embeddings from 40 on are NaN, and one demonstration longer than 40 tokens: in
    the first step (all demonstrations in one batch) only the rank holding it computes a NaN loss."""
    ckpt = load_checkpoint(files["lm"])
    ckpt["model"]["transformer.wpe.weight"][40:] = float("nan")
    save_checkpoint(str(tmp_path / "nan.pt"), ckpt)
    rows = [{"prompt": "hi", "response": "hello"}, {"prompt": "count", "response": " ".join(WORDS * 3)}]
    rows += [{"prompt": w, "response": w} for w in WORDS[:5]]
    with open(tmp_path / "d.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    t0 = time.time()
    r = torchrun("train_sft.py", "--init", str(tmp_path / "nan.pt"), "--data", str(tmp_path / "d.jsonl"),
                 "--batch_size", "8", "--out", str(tmp_path / "out"))
    assert r.returncode != 0 and time.time() - t0 < TIMEOUT
    assert "step 1: non-finite SFT loss nan" in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    assert not (tmp_path / "out" / "state.pt").exists()
