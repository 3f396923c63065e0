"""Real use: the example data files through each script, validation before anything is written, a tiny GPT-2
folder through SFT -> RM -> PPO, gradient accumulation and activation checkpointing (same gradients)."""
import codecs
import json
import os
import subprocess
import sys

import pytest
import torch

import train_ppo
import train_rm
import train_sft
from nanorlhf import dist, rlhf
from nanorlhf.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from nanorlhf.common import lm_loss, load_model
from nanorlhf.config import PPOConfig
from nanorlhf.model import GPT, GPTConfig
from nanorlhf.reward import score_groups
from nanorlhf.rlhf import ranking_loss
from nanorlhf.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EX = os.path.join(ROOT, "examples")

# GPT-2's byte -> char map written out independently (printable latin-1 bytes are themselves, the others become
# chr(256 + n) in byte order); ids 0..255 follow this order in GPT-2's vocab.json.
PRINTABLE = [*range(33, 127), *range(161, 173), *range(174, 256)]
OTHERS = [*range(0, 33), *range(127, 161), 173]
BYTE_OF = {**{chr(b): b for b in PRINTABLE}, **{chr(256 + n): b for n, b in enumerate(OTHERS)}}
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "s"), ("Ġ", "a")]


def write_gpt2_folder(folder, n_embd=32, n_positions=256):
    """A tiny random GPT-2 in Hugging Face's layout: vocab.json + merges.txt (256 bytes, 5 merges, <|endoftext|>),
    config.json and model.safetensors (Conv1D weights stored (in, out), as GPT-2 does)."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    chars = [chr(b) for b in PRINTABLE] + [chr(256 + n) for n in range(len(OTHERS))]
    vocab = {c: i for i, c in enumerate(chars)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    V = len(vocab)
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8")
    config = {"model_type": "gpt2", "vocab_size": V, "n_positions": n_positions, "n_embd": n_embd, "n_layer": 1,
              "n_head": 2, "layer_norm_epsilon": 1e-5}
    (folder / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    C = n_embd
    shapes = {"wte.weight": (V, C), "wpe.weight": (n_positions, C), "ln_f.weight": (C,), "ln_f.bias": (C,),
              "h.0.ln_1.weight": (C,), "h.0.ln_1.bias": (C,), "h.0.ln_2.weight": (C,), "h.0.ln_2.bias": (C,),
              "h.0.attn.c_attn.weight": (C, 3 * C), "h.0.attn.c_attn.bias": (3 * C,),
              "h.0.attn.c_proj.weight": (C, C), "h.0.attn.c_proj.bias": (C,),
              "h.0.mlp.c_fc.weight": (C, 4 * C), "h.0.mlp.c_fc.bias": (4 * C,),
              "h.0.mlp.c_proj.weight": (4 * C, C), "h.0.mlp.c_proj.bias": (C,)}
    state = {k: 0.02 * torch.randn(s, generator=g) for k, s in shapes.items()}
    safetensors_torch.save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return vocab, state


def run(script, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, script, "--device", "cpu", "--log_every", "1", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_gpt2_folder_sft_rm_ppo_with_example_files(tmp_path):
    folder = tmp_path / "gpt2"
    vocab, state = write_gpt2_folder(folder)
    V = len(vocab)

    # the template's special tokens come after GPT-2's ids; original rows and ids untouched
    model, tok, _ = load_model(str(folder), "lm")
    assert (tok.eos_id, tok.prompt_id, tok.response_id) == (V - 1, V, V + 1)
    assert model.config.vocab_size == V + 2
    torch.testing.assert_close(model.transformer.wte.weight[:V], state["wte.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.transformer.wte.weight[V:], state["wte.weight"].mean(0).expand(2, -1))
    byte_tokens = {i: bytes(BYTE_OF[c] for c in token) for token, i in vocab.items() if token != "<|endoftext|>"}

    out = tmp_path / "runs"
    run("train_sft.py", "--init", str(folder), "--data", f"{EX}/sft.jsonl", "--out", f"{out}/sft",
        "--max_steps", "2", "--batch_size", "2", "--epochs", "1", "--grad_accum", "2")
    run("train_rm.py", "--init", f"{out}/sft/ckpt.pt", "--data", f"{EX}/rm_rankings.jsonl", "--out", f"{out}/rm",
        "--max_steps", "2", "--batch_size", "2")
    run("train_ppo.py", "--init", f"{out}/sft/ckpt.pt", "--reward_model", f"{out}/rm/ckpt.pt",
        "--data", f"{EX}/ppo.jsonl", "--ptx_data", f"{EX}/ptx.txt", "--ptx_coef", "0.5", "--out", f"{out}/ppo",
        "--max_steps", "2", "--batch_size", "4", "--minibatch_size", "2", "--ppo_epochs", "1",
        "--max_new_tokens", "8", "--no-compile")
    for stage in ("sft", "rm", "ppo"):
        ckpt = load_checkpoint(f"{out}/{stage}/ckpt.pt")
        assert ckpt["tokenizer"] == str(folder) and ckpt["model_config"]["vocab_size"] == V + 2
        t = Tokenizer.load(ckpt["tokenizer"])
        for i, b in byte_tokens.items():  # every original id decodes to the bytes vocab.json gives it
            assert t.enc.decode_single_token_bytes(i) == b
        assert t.encode(" the cat is") == tok.encode(" the cat is") == [vocab["Ġthe"], vocab["Ġ"], 66, 64, 83,
                                                                          vocab["Ġ"], vocab["is"]]
    assert len(open(f"{out}/ppo/log.jsonl").readlines()) == 2


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    """1-layer LM and scalar models with the tiny tokenizer, as checkpoint files: "lm" and "scalar" with a short
    context (32 tokens), "lm_128" with room for the example files."""
    folder = tmp_path_factory.mktemp("ckpts")
    tok = Tokenizer.load("tiny")
    torch.manual_seed(0)
    paths = {}
    for name, head, T in (("lm", "lm", 32), ("scalar", "scalar", 32), ("lm_128", "lm", 128)):
        mconf = GPTConfig(block_size=T, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32)
        paths[name] = str(folder / f"{name}.pt")
        save_checkpoint(paths[name], make_checkpoint(GPT(mconf, head=head), mconf, head, tok, {}, 0))
    return paths


@pytest.mark.parametrize("name", ["rm_rankings", "rm_pairs", "rm_hh"])
def test_rm_example_files_train(tmp_path, tiny_ckpts, name):
    out = tmp_path / "rm"
    train_rm.main(["--data", f"{EX}/{name}.jsonl", "--init", tiny_ckpts["lm_128"], "--out", str(out),
                   "--max_steps", "1", "--batch_size", "2", "--log_every", "1"])
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 1 and ckpt["extra"]["train_prompts"] == 3  # 4 records, 1 held out


BAD = {  # line 1 is good (after a byte-order mark); every other line is wrong in one way (line 5 is not UTF-8)
    "sft": ['{"prompt": "hi", "response": "hello"}', '{"prompt": "hi"}', '{"prompt": 3, "response": "x"}',
            '{"prompt": "hi", "response": "  "}', b'{"prompt": "caf\xe9", "response": "x"}', '{"prompt": "hi",'],
    "rm": ['{"prompt": "p", "chosen": "a", "rejected": "b"}', '{"prompt": "p", "responses": ["a"], "ranking": [0]}',
           '{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 2, 2]}',
           '{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}', b'{"prompt": "\xff"}', '[1, 2]',
           '{"prompt": "p", "chosen": "a", "rejected": "a"}',
           '{"prompt": "p", "responses": ["a", "a"], "ranking": [0, 1]}'],
    "ppo": ['{"prompt": "hi"}', '{"text": "hi"}', '{"prompt": ["hi"]}', '{"prompt": ""}', b'{"prompt": "\xc3"}',
            'not json'],
}
PROBLEMS = {"sft": ["2: response: missing", "3: prompt: expected a string", "4: response: empty string",
                    "5: line: not valid UTF-8", "6: line: invalid JSON"],
            "rm": ["2: responses: K = 1 < 2", "3: ranking: [0, 2, 2] is not a ranking", "4: ranking: all responses tied",
                   "5: line: not valid UTF-8", "6: line: expected a JSON object",
                   "7: chosen/rejected: the same text", "8: responses: all 2 are the same text"],
            "ppo": ["2: prompt: missing", "3: prompt: expected a string", "4: prompt: empty string",
                    "5: line: not valid UTF-8", "6: line: invalid JSON"]}
MAIN = {"sft": train_sft.main, "rm": train_rm.main, "ppo": train_ppo.main}


def args_for(kind, paths, data, out):
    args = ["--data", str(data), "--init", paths["lm"], "--out", str(out), "--max_steps", "1"]
    ppo = ["--reward_model", paths["scalar"], "--batch_size", "1", "--minibatch_size", "1"]
    return args + (ppo if kind == "ppo" else [])


@pytest.mark.parametrize("kind", ["sft", "rm", "ppo"])
def test_bad_lines_reported_before_anything_is_written(tmp_path, tiny_ckpts, capsys, kind):
    data = tmp_path / "bad.jsonl"
    lines = [x if isinstance(x, bytes) else x.encode() for x in BAD[kind]]
    data.write_bytes(codecs.BOM_UTF8 + b"\n".join(lines) + b"\n")
    with pytest.raises(SystemExit) as e:
        MAIN[kind](args_for(kind, tiny_ckpts, data, tmp_path / "out"))
    out = capsys.readouterr().out
    assert e.value.code == 2 and not (tmp_path / "out").exists()
    for problem in PROBLEMS[kind]:
        assert f"{data}:{problem}" in out
    assert f"{data}:1:" not in out


@pytest.mark.parametrize("kind", ["sft", "rm", "ppo"])
def test_too_long_examples_are_errors_naming_the_line(tmp_path, tiny_ckpts, capsys, kind):
    """Context 32; PPO also needs room for max_new_tokens (48 by default, so here: 8)."""
    long = "word " * 40
    rows = {"sft": [{"prompt": "hi", "response": "hello"}, {"prompt": "a", "response": "b"},
                    {"prompt": long, "response": "x"}],
            "rm": [{"prompt": "hi", "chosen": "a", "rejected": "b"}, {"prompt": "hi", "chosen": long, "rejected": "b"}],
            "ppo": [{"prompt": "hi"}, {"prompt": "a fairly long prompt with many words in it, more than ten"}]}[kind]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = args_for(kind, tiny_ckpts, data, tmp_path / "out") + (["--max_new_tokens", "24"] if kind == "ppo" else [])
    with pytest.raises(SystemExit) as e:
        MAIN[kind](args)
    out = capsys.readouterr().out
    assert e.value.code == 2 and not (tmp_path / "out").exists()
    line = len(rows)
    assert f"{data}:{line}:" in out and "tokens > block_size" in out and f"{data}:1:" not in out


# ----------------------------------------------------------------------------------------------------------------
# gradient accumulation and activation checkpointing: the same gradients

def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_sft_grad_accum_equals_one_full_batch():
    tok = Tokenizer.load("tiny")
    demos = [("hi", "hello there"), ("what is two plus two?", "four"), ("name a color", "the color is red."),
             ("count", "one two three four five six")]  # ragged: micro-batches have different token counts
    examples = [tok.format_example(p, y) for p, y in demos]
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32))
    ids, loss_mask = train_sft.make_batch(examples, range(4), tok.pad_id, "cpu")
    full = lm_loss(model, ids, loss_mask)  # the definition: mean over all target tokens of the batch
    full.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    loss, _ = train_sft.accumulate_lm_gradients(model, examples, [0, 1, 2, 3], tok.pad_id, 2, "float32", "cpu")
    torch.testing.assert_close(loss, full.detach())
    for g, e in zip(grads(model), expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_rm_grad_accum_equals_one_full_batch():
    tok = Tokenizer.load("tiny")
    batch = [{"prompt": "p", "responses": ["a", "bb", "c c"], "finished": [True] * 3, "ranking": [0, 1, 1]},
             {"prompt": "q r", "responses": ["x", "y"], "finished": [True] * 2, "ranking": [1, 0]},
             {"prompt": "s", "responses": ["u", "v", "w", "z"], "finished": [True] * 4, "ranking": [2, 0, 1, 3]}]
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32), head="scalar")
    rewards, valid = score_groups(model, tok, batch, "cpu")
    ranks = torch.tensor([r["ranking"] + [0] * (4 - len(r["ranking"])) for r in batch])
    full = ranking_loss(rewards, ranks, valid)
    full.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    loss, _, _ = train_rm.accumulate_ranking_gradients(model, tok, batch, 2, "float32", "cpu")
    torch.testing.assert_close(loss, full.detach())
    for g, e in zip(grads(model), expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def ppo_batch(cfg):
    """A rollout batch of 8 prompts from the tiny checkpoints, with advantages. The random policy rarely ends a
    response, so half the responses are cut short by hand: micro-batches then hold different token counts."""
    torch.manual_seed(0)
    models = train_ppo.load_models(cfg, "cpu")
    prompts = ["hi", "what is two plus two?", "name a color", "count to three", "why?", "say yes", "a b c", "ok"]
    b, P, _ = train_ppo.rollout(*models, prompts, cfg)
    for i in range(4):
        b["response_mask"][i, 2 + i:] = False
    rewards, _, _ = rlhf.ppo_rewards(b["scores"], b["finished"], b["logprobs"], b["ref_logprobs"],
                                     b["response_mask"], cfg.kl_coef)
    advantages, returns = rlhf.gae(rewards, b["values"], b["response_mask"], 1.0, 0.95)  # as train_ppo.main
    return models, b, P, rlhf.masked_whiten(advantages, b["response_mask"]), returns


def test_ppo_grad_accum_gives_the_same_update(tiny_ckpts):
    cfg = PPOConfig(init=tiny_ckpts["lm"], reward_model=tiny_ckpts["scalar"], max_new_tokens=8,
                        batch_size=8, minibatch_size=8, ppo_epochs=1, lr=1e-3, value_lr=1e-3, compile=False,
                        ptx_coef=0.0)
    weights = []
    for n in (1, 2):
        (policy, _, _, value_model, _), b, P, advantages, returns = ppo_batch(cfg)
        cfg.grad_accum = n
        opts = [torch.optim.Adam(m.parameters(), lr=1e-3, eps=1e-5) for m in (policy, value_model)]
        train_ppo.ppo_update(policy, value_model, opts, b, advantages, returns, P, cfg, step=0)
        weights.append([p.detach().clone() for m in (policy, value_model) for p in m.parameters()])
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_activation_checkpointing_same_loss_and_grads():
    tok = Tokenizer.load("tiny")
    examples = [tok.format_example("what is two plus two?", "four"), tok.format_example("hi", "hello there")]
    ids, loss_mask = train_sft.make_batch(examples, range(2), tok.pad_id, "cpu")
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32,
                              dropout=0.3))  # dropout on: the recomputation must replay the same masks
        if checkpointed:
            dist.checkpoint_blocks(model)
        torch.manual_seed(1)
        loss = lm_loss(model, ids, loss_mask)
        loss.backward()
        results.append((loss.detach(), grads(model), list(model.state_dict())))
    (l0, g0, k0), (l1, g1, k1) = results
    assert torch.equal(l0, l1) and k0 == k1  # same parameter names: checkpoints unchanged
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
