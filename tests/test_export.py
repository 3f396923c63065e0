"""Export to Hugging Face: transformers loads the folder offline and computes the same logits and reward/value scores
as nanorlhf on padded batches (tiny world and GPT-2-folder checkpoints); its tokenizer encodes as nanorlhf's; the
folder reads back into nanorlhf with identical weights."""
import json
import os
import subprocess
import sys

import pytest
import torch

from nanorlhf.checkpoint import make_checkpoint, save_checkpoint
from nanorlhf.common import load_model, pad
from nanorlhf.export import bpe_merges, export
from nanorlhf.model import GPT, GPTConfig
from nanorlhf.reward import rm_input, score
from nanorlhf.tokenizer import EOS, Tokenizer, bytes_to_unicode

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATS = [("what color is the pear?", "the pear is green.", True), ("count to three", "one two", False),
         ("hi", "hello there, how are you today?", True), ("<|endoftext|> say it", "<|prompt|>", True)]


def gpt2_folder(folder):
    """A tiny random GPT-2 written by transformers itself (save_pretrained), with a GPT-2 vocab.json/merges.txt:
    the 256 byte tokens in GPT-2's order, 4 merges, <|endoftext|>."""
    chars = list(bytes_to_unicode().values())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a")]
    vocab = {c: i for i, c in enumerate(chars)} | {a + b: 256 + n for n, (a, b) in enumerate(merges)}
    vocab[EOS] = len(vocab)
    torch.manual_seed(1)
    config = transformers.GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=vocab[EOS], eos_token_id=vocab[EOS])
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return str(folder)


def make_ckpt(tmp_path, kind, head):
    """A nanorlhf checkpoint of `head` on the tiny BPE or on a GPT-2 folder; a scalar head gets random weights and
    a bias (a normalization shift) so the exported head has something to get wrong."""
    if kind == "tiny":
        tok = Tokenizer.load("tiny")
        torch.manual_seed(0)
        mconf = GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32)
        model = GPT(mconf, head=head)
    else:
        model, tok, _ = load_model(gpt2_folder(tmp_path / "gpt2"), head)
    if head == "scalar":
        with torch.no_grad():
            model.score.weight.normal_()
            model.score.bias.fill_(-1.7)
    path = str(tmp_path / f"{kind}_{head}.pt")
    save_checkpoint(path, make_checkpoint(model, model.config, head, tok, {}, 0))
    return path, model.eval(), tok


def rm_batch(tok, block_size):
    """Right-padded RM inputs (prompt template + response + EOS if finished), as train_rm builds them."""
    return [rm_input(tok, p, y, f, block_size) for p, y, f in CHATS]


@pytest.mark.parametrize("kind", ["tiny", "gpt2_folder"])
def test_policy_export_logits_match_and_round_trip(tmp_path, kind):
    path, model, tok = make_ckpt(tmp_path, kind, "lm")
    out = str(tmp_path / "hf")
    export(path, out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    seqs = rm_batch(tok, model.config.block_size)
    with torch.no_grad():
        ids, mask = pad(seqs, tok.pad_id)  # right-padded, nanorlhf's training layout
        ours = model(ids, attention_mask=mask)
        theirs = hf(input_ids=ids, attention_mask=mask.long()).logits
        err = (ours - theirs)[mask].abs().max().item()  # (N real tokens, V)
        # left-padded (generation's layout): transformers needs the positions nanorlhf derives from the mask
        ids_l, mask_l = pad(seqs, tok.pad_id, left=True)
        ours_l = model(ids_l, attention_mask=mask_l)
        positions = (mask_l.cumsum(1) - 1).clamp(min=0)
        theirs_l = hf(input_ids=ids_l, attention_mask=mask_l.long(), position_ids=positions).logits
        err_l = (ours_l - theirs_l)[mask_l].abs().max().item()
    print(f"{kind} policy: max |logit difference| {err:.2e} right-padded, {err_l:.2e} left-padded")
    assert err < 1e-4 and err_l < 1e-4
    # back into nanorlhf: the same weights and the same tokenizer
    back, back_tok, _ = load_model(out, "lm")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert (back_tok.eos_id, back_tok.prompt_id, back_tok.response_id) == (tok.eos_id, tok.prompt_id, tok.response_id)
    assert all(back_tok.format_example(p, y, f) == tok.format_example(p, y, f) for p, y, f in CHATS)


@pytest.mark.parametrize("kind", ["tiny", "gpt2_folder"])
def test_reward_model_export_scores_match_and_round_trip(tmp_path, kind):
    """The score read at the last real token, EOS included (the exported pad id is <|prompt|>, not EOS), with the
    normalization shift in the head."""
    path, model, tok = make_ckpt(tmp_path, kind, "scalar")
    out = str(tmp_path / "hf")
    config = export(path, out)
    assert config["pad_token_id"] == tok.prompt_id != tok.eos_id
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPT2ForSequenceClassification" and hf.score.bias is None
    seqs = rm_batch(tok, model.config.block_size)
    assert sum(s[-1] == tok.eos_id for s in seqs) == 3  # finished responses end with the EOS they are scored at
    with torch.no_grad():
        ids, mask = pad(seqs, tok.pad_id)
        ours = score(model, ids, mask)
        hf_ids, _ = pad(seqs, tok.prompt_id)  # padded with the exported pad id
        theirs = hf(input_ids=hf_ids, attention_mask=mask.long()).logits[:, 0]
    err = (ours - theirs).abs().max().item()
    print(f"{kind} reward model: scores {ours.tolist()}, max |difference| {err:.2e}")
    assert err < 1e-4
    back, _, _ = load_model(out, "scalar")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_value_model_export_from_ppo_state(tmp_path):
    _, policy, tok = make_ckpt(tmp_path, "tiny", "lm")
    _, value, _ = make_ckpt(tmp_path, "tiny", "scalar")
    state = str(tmp_path / "state.pt")
    save_checkpoint(state, make_checkpoint(policy, policy.config, "lm", tok, {}, 3,
                                           extra={"value_model": value.state_dict()}))
    r = subprocess.run([sys.executable, "-m", "nanorlhf.export", state, str(tmp_path / "hf"), "--value"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "GPT2ForSequenceClassification" in r.stdout, r.stdout + r.stderr
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        ids, mask = pad(rm_batch(tok, 64), tok.pad_id)
        torch.testing.assert_close(hf(input_ids=pad(rm_batch(tok, 64), tok.prompt_id)[0],
                                      attention_mask=mask.long()).logits[:, 0], score(value, ids, mask),
                                   rtol=0, atol=1e-4)
    # a file without a value model: one line naming it, no traceback
    r = subprocess.run([sys.executable, "-m", "nanorlhf.export", str(tmp_path / "tiny_lm.pt"), str(tmp_path / "x"),
                        "--value"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "holds no value model" in r.stderr and "Traceback" not in r.stderr


def test_exported_tokenizer_encodes_as_nanorlhf(tmp_path):
    """transformers' tokenizer from the folder == nanorlhf's encode on the tiny world's text, template tokens as
    their special ids, and the chat template renders chats as format_chat."""
    from nanorlhf.world import make_world

    path, _, tok = make_ckpt(tmp_path, "tiny", "lm")
    export(path, str(tmp_path / "hf"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    world = make_world(0, 0.01)
    texts = world.pretrain_docs("val")[:200] + [p for p, _ in world.sft_demos("val")[:50]]
    texts += ["Ünïcödé   spaces\n\n\ttabs 1234567 x", "it's don't we'll"]
    assert sum(len(t) for t in texts) > 10_000
    for t in texts:
        assert hf_tok(t)["input_ids"] == tok.encode(t), t
    assert hf_tok.decode(tok.encode(texts[0])) == texts[0]
    assert hf_tok("<|prompt|>hi<|response|>yo<|endoftext|>")["input_ids"] == tok.format_example("hi", "yo")[0]
    chat = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "name a fruit."},
            {"role": "assistant", "content": "a pear."}, {"role": "user", "content": "its color?"}]
    rendered = hf_tok.apply_chat_template(chat, tokenize=False)
    assert hf_tok(rendered)["input_ids"] == tok.format_prompt(chat)
    # the merges recovered from the tiny BPE's ranks rebuild exactly those ranks in nanorlhf's GPT-2-folder reader
    assert Tokenizer.load(str(tmp_path / "hf")).mergeable_ranks == tok.mergeable_ranks


def test_bpe_merges_hand_case():
    """Ranks a, b, c, ab, abc, bc: "abc" came from (ab, c) — the BPE of its bytes with lower ranks — not (a, bc)."""
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"abc": 4, b"bc": 5}
    assert bpe_merges(ranks) == [(b"a", b"b"), (b"ab", b"c"), (b"b", b"c")]
    with pytest.raises(ValueError, match="not a merge"):
        bpe_merges({b"a": 0, b"b": 1, b"c": 2, b"abc": 3})
