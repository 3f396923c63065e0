import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanorlhf.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from nanorlhf.common import lm_loss
from nanorlhf.model import GPT, GPTConfig
from nanorlhf.tokenizer import Tokenizer
from train_sft import make_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMOS = [("what color is the pear?", "the pear is green."), ("count to three", "one two three"),
         ("say hi", "hi"), ("name a fruit that is red and round", "the apple.")]


def tiny_model(tok, block_size=64):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32))


def test_prompt_positions_get_exactly_zero_gradient():
    tok = Tokenizer.load("tiny")
    model = tiny_model(tok)
    examples = [tok.format_example(p, y) for p, y in DEMOS]
    ids, loss_mask = make_batch(examples, range(len(examples)), tok.pad_id, "cpu")  # (B, T) right-padded
    hidden = {}

    def keep(module, inputs, output):  # the final hidden states h: h[:, t] scores token t+1
        output.retain_grad()
        hidden["h"] = output

    model.transformer.ln_f.register_forward_hook(keep)
    loss = lm_loss(model, ids, loss_mask)
    loss.backward()
    grad = hidden["h"].grad  # (B, T-1, C)

    # independently: full logits, cross-entropy summed over response + EOS targets only, by a loop
    logits = model(ids)  # (B, T, V)
    total, count = 0.0, 0
    for b, (p, y) in enumerate(DEMOS):
        P = len(tok.format_prompt(p))
        targets = tok.encode(y) + [tok.eos_id]
        for j, target in enumerate(targets):
            total = total + F.cross_entropy(logits[b, P - 1 + j], torch.tensor(target))
            count += 1
    torch.testing.assert_close(loss, total / count)

    for b, (p, y) in enumerate(DEMOS):
        P = len(tok.format_prompt(p))
        L = P + len(tok.encode(y)) + 1
        # positions 0..P-2 predict prompt tokens, positions >= L-1 predict padding: no gradient at all
        assert torch.equal(grad[b, :P - 1], torch.zeros_like(grad[b, :P - 1]))
        assert torch.equal(grad[b, L - 1:], torch.zeros_like(grad[b, L - 1:]))
        # positions P-1..L-2 predict the response tokens and the EOS
        assert (grad[b, P - 1:L - 1].abs().sum(-1) > 0).all()


def test_loss_mask_covers_response_and_eos_only():
    tok = Tokenizer.load("tiny")
    examples = [tok.format_example(p, y) for p, y in DEMOS]
    ids, loss_mask = make_batch(examples, [1, 2], tok.pad_id, "cpu")
    for row, (p, y) in enumerate([DEMOS[1], DEMOS[2]]):
        P, R = len(tok.format_prompt(p)), len(tok.encode(y))
        assert ids[row, :P].tolist() == tok.format_prompt(p)
        assert loss_mask[row].tolist() == [False] * P + [True] * (R + 1) + [False] * (ids.size(1) - P - R - 1)
        assert ids[row, P + R].item() == tok.eos_id


def test_tiny_batch_overfits():
    tok = Tokenizer.load("tiny")
    model = tiny_model(tok)
    examples = [tok.format_example(p, y) for p, y in DEMOS]
    ids, loss_mask = make_batch(examples, range(len(examples)), tok.pad_id, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = lm_loss(model, ids, loss_mask).item()
    for _ in range(60):
        loss = lm_loss(model, ids, loss_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 5.0 and loss.item() < 0.05


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    tok = Tokenizer.load("tiny")
    model = tiny_model(tok)
    path = str(tmp_path_factory.mktemp("base") / "ckpt.pt")
    save_checkpoint(path, make_checkpoint(model, model.config, "lm", tok, {}, 0))
    return path


def run_sft(base, out, *flags):
    argv = [sys.executable, os.path.join(ROOT, "train_sft.py"), "--init", base, "--out", str(out),
            "--world_scale", "0.01", "--batch_size", "16", "--max_new_tokens", "8", "--log_every", "1", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_smoke_run_writes_loadable_checkpoints(base_ckpt, tmp_path):
    r = run_sft(base_ckpt, tmp_path / "sft", "--epochs", "1", "--max_steps", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sft step 3/3" in r.stdout and "test gold" in r.stdout
    ckpt = load_checkpoint(str(tmp_path / "sft" / "ckpt.pt"))
    state = load_checkpoint(str(tmp_path / "sft" / "state.pt"))
    assert ckpt["head"] == "lm" and state["step"] == 3
    assert ckpt["model_config"]["dropout"] == 0.0  # SFT's dropout is a training setting, not the model's
    extra = ckpt["extra"]
    assert extra["chosen_by"] == "sampled gold score on validation prompts"
    assert set(extra["test"]) == {"sft", "base"} and 0.0 <= extra["test"]["sft"]["gold_sampled"] <= 1.0
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_bad_jsonl_exits_2_before_writing(base_ckpt, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a"},
                                              {"prompt": "c", "response": "d"}])
    r = run_sft(base_ckpt, tmp_path / "sft", "--data", data)
    assert r.returncode == 2
    assert f"{data}:2: response: missing" in r.stdout + r.stderr
    assert not os.path.exists(tmp_path / "sft")


def test_too_long_example_exits_2_naming_line(base_ckpt, tmp_path):
    rows = [{"prompt": "a", "response": "b"}] * 3 + [{"prompt": "a", "response": "word " * 100}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    r = run_sft(base_ckpt, tmp_path / "sft", "--data", data)
    assert r.returncode == 2
    assert f"{data}:4: example:" in r.stdout + r.stderr and "block_size 64" in r.stdout
    assert not os.path.exists(tmp_path / "sft")


def test_data_file_trains_and_chooses_by_validation_loss(base_ckpt, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "response": y} for p, y in DEMOS * 5])
    r = run_sft(base_ckpt, tmp_path / "sft", "--data", data, "--epochs", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    extra = load_checkpoint(str(tmp_path / "sft" / "ckpt.pt"))["extra"]
    assert extra["chosen_by"] == "validation loss" and len(extra["epochs"]) == 2
    assert extra["chosen"]["val_loss"] == min(m["val_loss"] for m in extra["epochs"])
    assert "test" not in extra


@pytest.mark.slow
def test_resume_is_bit_identical(base_ckpt, tmp_path):
    flags = ("--epochs", "2")
    assert run_sft(base_ckpt, tmp_path / "full", *flags).returncode == 0
    r = run_sft(base_ckpt, tmp_path / "cut", *flags, "--max_steps", "4")
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_sft(base_ckpt, tmp_path / "cut", *flags, "--resume")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout + r.stderr
    for name in ("state.pt", "ckpt.pt"):
        a, b = load_checkpoint(str(tmp_path / "full" / name)), load_checkpoint(str(tmp_path / "cut" / name))
        assert a["step"] == b["step"] == 18
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (name, k)
    a, b = load_checkpoint(str(tmp_path / "full" / "ckpt.pt")), load_checkpoint(str(tmp_path / "cut" / "ckpt.pt"))
    assert [m["val_loss"] for m in a["extra"]["epochs"]] == [m["val_loss"] for m in b["extra"]["epochs"]]
