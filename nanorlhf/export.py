"""Export a checkpoint to a Hugging Face GPT-2 folder that `transformers` loads offline.

    python -m nanorlhf.export runs/default/ppo_ptx/ckpt.pt hf/policy          # GPT2LMHeadModel
    python -m nanorlhf.export runs/default/rm/ckpt.pt hf/rm                   # GPT2ForSequenceClassification
    python -m nanorlhf.export runs/default/ppo/state.pt hf/value --value      # PPO's value model (from state.pt)

Writes config.json, model.safetensors (float32) and the tokenizer: vocab.json + merges.txt (GPT-2's format; for
the tiny world's BPE, its merges recovered from the ranks), tokenizer.json (every token, the template's
<|prompt|> and <|response|> as added special tokens) and tokenizer_config.json with a chat template that renders
chats as nanorlhf does. `GPT.from_pretrained(folder)` and `load_model(folder)` read the folder back unchanged.

Reward and value models: transformers' GPT2ForSequenceClassification reads the score at the rightmost token that is
not `pad_token_id`, and nanorlhf pads with EOS, which is also the real last token of a finished response, so the
exported pad id is <|prompt|> (a token that only ever opens a turn). Its score layer has no bias, so the head's
bias (the RM's normalization shift) is folded into one entry j of the final LayerNorm's bias, which feeds the score
alone: b_j += shift / w_j, j = argmax |w|. config.json records the shift and the original b_j ("nanorlhf"), from
which nanorlhf restores the exact weights.
"""
import argparse
import json
import os

from nanorlhf.checkpoint import CheckpointError, load_checkpoint
from nanorlhf.model import GPT, GPTConfig
from nanorlhf.tokenizer import EOS, PROMPT, RESPONSE, Tokenizer, bytes_to_unicode

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# the chat template of tokenizer.format_chat, in Jinja for transformers' apply_chat_template: the system text opens
# the first prompt, each user turn is a prompt, each assistant turn a response ended by EOS
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '<|prompt|>' + m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'system' %}{{ '<|prompt|>' }}{% endif %}"
    "{{ m['content'] + '<|response|>' }}"
    "{% else %}{{ m['content'] + '<|endoftext|>' }}{% endif %}"
    "{% endfor %}"
)


def hf_state(model):
    """The model's weights under GPT-2's names in transformers: Conv1D matrices stored (in, out); the tied LM head
    is not stored (tie_word_embeddings); a scalar head's weight as score.weight, its bias folded (see the top)."""
    state, weights = {}, model.state_dict()
    for name, t in weights.items():
        if name == "lm_head.weight" or name.startswith("score."):
            continue
        state[name] = (t.t() if name.endswith(CONV1D) else t).float().contiguous()
    fold = None
    if model.head == "scalar":
        w, shift = weights["score.weight"][0].double(), weights["score.bias"].item()
        j = w.abs().argmax().item()
        if w[j] == 0 and shift != 0:
            raise ValueError("the score head's weights are all zero: its bias cannot be folded into the LayerNorm")
        b = state["transformer.ln_f.bias"] = state["transformer.ln_f.bias"].clone()
        fold = {"score_bias": shift, "ln_f_bias_index": j, "ln_f_bias": b[j].item()}
        if shift:
            b[j] = b[j].double() + shift / w[j]  # w·(h + δ e_j) = w·h + shift
        state["score.weight"] = weights["score.weight"].float().contiguous()  # (1, C)
    return state, fold


def hf_config(mconf, head, tok, fold):
    """config.json of GPT2LMHeadModel or, for a scalar head, GPT2ForSequenceClassification with one label."""
    config = {"model_type": "gpt2", "vocab_size": mconf.vocab_size, "n_positions": mconf.block_size,
              "n_embd": mconf.n_embd, "n_layer": mconf.n_layer, "n_head": mconf.n_head, "n_inner": None,
              "activation_function": "gelu_new", "resid_pdrop": mconf.dropout, "embd_pdrop": mconf.dropout,
              "attn_pdrop": mconf.dropout, "layer_norm_epsilon": mconf.layer_norm_eps, "scale_attn_weights": True,
              "tie_word_embeddings": True, "bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id,
              "pad_token_id": tok.eos_id, "architectures": ["GPT2LMHeadModel"]}
    if head == "scalar":
        config.update(architectures=["GPT2ForSequenceClassification"], num_labels=1, pad_token_id=tok.prompt_id,
                      nanorlhf=fold)
    return config


def bpe_merges(ranks):
    """The merges of a byte-level BPE given only its ranks (tiktoken's format keeps no merges): the merge that made
    token t is the last step of BPE on t's bytes with the tokens ranked below t, so it splits t into two tokens."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            r, i = min(pairs)
            if r >= rank:
                raise ValueError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append(tuple(parts))
    return merges


def tokenizer_vocab(tok):
    """(vocab {token string: id}, merges ["a b", ...]) in GPT-2's byte-to-unicode spelling, EOS included: the
    folder's own vocab.json and merges.txt for a GPT-2 folder, else derived from the tokenizer's ranks."""
    if os.path.isdir(tok.name):
        with open(os.path.join(tok.name, "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        with open(os.path.join(tok.name, "merges.txt"), encoding="utf-8") as f:
            merges = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#version")]
        return vocab, merges
    spell = bytes_to_unicode()
    text = {token: "".join(spell[b] for b in token) for token in tok.mergeable_ranks}
    vocab = {text[token]: i for token, i in tok.mergeable_ranks.items()}
    vocab[EOS] = tok.eos_id
    return vocab, [f"{text[a]} {text[b]}" for a, b in bpe_merges(tok.mergeable_ranks)]


def write_tokenizer(tok, out, pad_token, model_max_length):
    vocab, merges = tokenizer_vocab(tok)
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    specials = {EOS: tok.eos_id, PROMPT: tok.prompt_id, RESPONSE: tok.response_id}
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for s, i in specials.items()]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
                 "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
                 "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                           "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                           "ignore_merges": False, "vocab": vocab, "merges": merges}}
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer, f, ensure_ascii=False)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "bos_token": EOS, "eos_token": EOS, "unk_token": None, "pad_token": pad_token,
              "additional_special_tokens": [PROMPT, RESPONSE], "add_prefix_space": False,
              "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
              "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added}}
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=1)


def write_safetensors(path, tensors):
    """safetensors' layout: 8-byte little-endian header length, a JSON header {name: dtype, shape, data_offsets},
    then the raw bytes; the header is padded with spaces to a multiple of 8 so every tensor stays aligned."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + 4 * t.numel()]}
        offset += 4 * t.numel()
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for t in tensors.values():
            f.write(t.numpy().astype("<f4").tobytes())


def load_for_export(path, value=False):
    """(model, tokenizer) from a checkpoint; value=True: the PPO value model kept in a state.pt's extra."""
    ckpt = load_checkpoint(path)
    head, weights = ckpt["head"], ckpt["model"]
    if value:
        if not (ckpt.get("extra") or {}).get("value_model"):
            raise ValueError(f"{path}: holds no value model (--value reads the state.pt of a PPO run)")
        head, weights = "scalar", ckpt["extra"]["value_model"]
    model = GPT(GPTConfig(**ckpt["model_config"]), head=head)
    model.load_state_dict(weights)
    return model.eval(), Tokenizer.load(ckpt["tokenizer"])


def export(path, out, value=False):
    """Write the Hugging Face folder `out` for checkpoint `path`; returns the config written."""
    model, tok = load_for_export(path, value)
    state, fold = hf_state(model)
    config = hf_config(model.config, model.head, tok, fold)
    os.makedirs(out, exist_ok=True)
    write_safetensors(os.path.join(out, "model.safetensors"), state)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    write_tokenizer(tok, out, PROMPT if model.head == "scalar" else EOS, model.config.block_size)
    return config


def main():
    parser = argparse.ArgumentParser(description="Export a nanorlhf checkpoint to a Hugging Face GPT-2 folder.")
    parser.add_argument("ckpt", help="checkpoint file: any stage's ckpt.pt (or state.pt)")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--value", action="store_true", help="export the PPO value model from a PPO state.pt")
    args = parser.parse_args()
    try:
        config = export(args.ckpt, args.out, args.value)
    except (CheckpointError, OSError, RuntimeError, ValueError) as e:  # bad checkpoint, no value model, tokenizer
        raise SystemExit(f"export: {e}") from None
    print(f"wrote {args.out}: {config['architectures'][0]}, vocabulary {config['vocab_size']}")


if __name__ == "__main__":
    main()
