"""Byte-level BPE tokenizer on tiktoken, plus a small BPE trainer for the tiny world.

Token template (InstructGPT-style single turn):
    <|prompt|> instruction <|response|> response <|endoftext|>
A chat repeats it, one prompt per user turn and one response per assistant turn (`format_chat`):
    <|prompt|> system \n\n user <|response|> assistant <|endoftext|> <|prompt|> user <|response|> ...

`Tokenizer.load(spec)` rebuilds a tokenizer from its `name`, the spec string stored in checkpoints:
    "tiny"        the project's BPE, nanorlhf/assets/tiny_bpe.tiktoken (train with `python -m nanorlhf.tokenizer --train`)
    "gpt2"        tiktoken's GPT-2 encoding (downloaded by tiktoken, needs network or its cache)
    <folder>      a GPT-2 style folder with vocab.json + merges.txt, loaded offline
"""

import argparse
import base64
import collections
import json
import os

import regex
import tiktoken

# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, punctuation runs, whitespace; a leading space
# sticks to the word that follows it (Radford et al. 2019, released encoder.py).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOS, PROMPT, RESPONSE = "<|endoftext|>", "<|prompt|>", "<|response|>"
TINY_PATH = os.path.join(os.path.dirname(__file__), "assets", "tiny_bpe.tiktoken")
TRAIN_COMMAND = "python -m nanorlhf.tokenizer --train --out nanorlhf/assets/tiny_bpe.tiktoken --vocab_size 1024"


class Tokenizer:
    def __init__(self, name, mergeable_ranks, special_tokens, pat_str=GPT2_PATTERN):
        self.name = name  # spec string: Tokenizer.load(self.name) rebuilds this tokenizer
        self.mergeable_ranks = mergeable_ranks  # token bytes -> id (export writes them as a Hugging Face BPE)
        self.enc = tiktoken.Encoding(
            f"nanorlhf:{name}", pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens
        )
        self.eos_id = special_tokens[EOS]
        self.prompt_id = special_tokens[PROMPT]
        self.response_id = special_tokens[RESPONSE]
        self.pad_id = self.eos_id  # padding is never trusted: masks say which tokens are real
        self.special_ids = {self.eos_id, self.prompt_id, self.response_id}
        self.vocab_size = self.enc.max_token_value + 1

    def encode(self, text):
        """Encode `text` as plain text: a string that spells a special token ("<|endoftext|>") becomes
        ordinary BPE tokens, never the special id, so user text cannot forge the template."""
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        """All tokens, special tokens rendered by name."""
        return self.enc.decode(list(ids))

    def decode_response(self, ids):
        """The text of a generated response: stop at the first EOS, drop special tokens and ids past the
        vocabulary (a model's embedding table may be padded beyond it, and sampling can pick those rows)."""
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.enc.decode([i for i in ids if i not in self.special_ids and i < self.vocab_size])

    def format_prompt(self, instruction):
        """<|prompt|> instruction <|response|>; a chat's messages up to its next reply (ending with a user turn)
        are rendered by format_chat, every turn before included."""
        if isinstance(instruction, list):
            return self.format_chat(instruction)[0]
        return [self.prompt_id] + self.encode(instruction) + [self.response_id]

    def format_example(self, instruction, response, finished=True):
        """(ids, loss_mask) of a prompt-response pair; loss_mask is 1 on the response tokens and the closing EOS,
        which is there if the response ended (finished=True, always for demonstrations)."""
        prompt = self.format_prompt(instruction)
        completion = self.encode(response) + ([self.eos_id] if finished else [])
        return prompt + completion, [0] * len(prompt) + [1] * len(completion)

    def format_chat(self, messages):
        """(ids, loss_mask) of a chat, a list of {"role", "content"} (data.py checks its shape: an optional system
        turn, then user and assistant turns alternating). Each user turn is a prompt, each assistant turn a response
        and its EOS; the system text opens the first prompt, followed by a blank line. loss_mask is 1 on every
        assistant turn and its EOS. One user and one assistant turn give exactly format_example(user, assistant)."""
        ids, loss_mask, system = [], [], ""
        for m in messages:
            if m["role"] == "system":
                system = m["content"] + "\n\n"
            elif m["role"] == "user":
                turn = self.format_prompt(system + m["content"])
                ids, loss_mask, system = ids + turn, loss_mask + [0] * len(turn), ""
            else:
                turn = self.encode(m["content"]) + [self.eos_id]
                ids, loss_mask = ids + turn, loss_mask + [1] * len(turn)
        return ids, loss_mask

    @classmethod
    def load(cls, spec):
        if spec == "tiny":
            if not os.path.exists(TINY_PATH):
                raise FileNotFoundError(f"tiny BPE asset {TINY_PATH} is missing; regenerate it with: {TRAIN_COMMAND}")
            ranks = load_bpe(TINY_PATH)
            n = len(ranks)
            return cls("tiny", ranks, {EOS: n, PROMPT: n + 1, RESPONSE: n + 2})
        if spec == "gpt2":
            try:
                gpt2 = tiktoken.get_encoding("gpt2")
            except Exception as e:
                raise RuntimeError(
                    f"tiktoken could not fetch the gpt2 encoding ({type(e).__name__}); without network, "
                    "pass a local folder with GPT-2's vocab.json and merges.txt instead"
                ) from e
            return cls("gpt2", gpt2._mergeable_ranks, {EOS: 50256, PROMPT: 50257, RESPONSE: 50258}, gpt2._pat_str)
        if os.path.isdir(spec):
            ranks, eos_id = load_gpt2_folder(spec)
            return cls(spec, ranks, {EOS: eos_id, PROMPT: eos_id + 1, RESPONSE: eos_id + 2})
        raise ValueError(f"unknown tokenizer {spec!r}: expected 'tiny', 'gpt2' or a folder with vocab.json + merges.txt")


def bytes_to_unicode():
    """GPT-2's reversible map byte -> printable unicode char used in vocab.json/merges.txt: printable
    bytes map to themselves, the others (whitespace, control) to chr(256 + n) in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    others = [b for b in range(256) if b not in printable]
    return {b: chr(c) for b, c in zip(printable + others, printable + [256 + n for n in range(len(others))])}


def load_gpt2_folder(folder):
    """(mergeable_ranks, eos_id) from GPT-2's vocab.json + merges.txt: the rank of a token is its id."""
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    eos_id = vocab.pop(EOS)
    ranks = {bytes(byte_of[c] for c in token): i for token, i in vocab.items()}
    # tiktoken applies merges by the rank of the merged token, so the ids must follow merges.txt order
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        merges = [line.split() for line in f if line.strip() and not line.startswith("#version")]
    for n, (a, b) in enumerate(merges):
        if vocab.get(a + b) != 256 + n:
            raise ValueError(f"{folder}: merge {n} ({a} {b}) is not token {256 + n} in vocab.json")
    return ranks, eos_id


def train_bpe(texts, vocab_size):
    """Byte-level BPE (Sennrich et al. 2016 on bytes, as GPT-2): ranks of the 256 single bytes, then of each
    merge in order, until vocab_size tokens or no pair is left. Words never merge across GPT-2 pre-token
    boundaries. Ties between equally frequent pairs go to the pair of older tokens (smaller ids)."""
    word_counts = collections.Counter()
    for text in texts:
        word_counts.update(regex.findall(GPT2_PATTERN, text))
    words = [list(w.encode("utf-8")) for w in word_counts]  # each word as a list of token ids
    counts = list(word_counts.values())
    ranks = {bytes([b]): b for b in range(256)}  # bytes -> id
    vocab = list(ranks)  # id -> bytes

    pair_counts = collections.Counter()  # (id, id) -> occurrences over the corpus
    where = collections.defaultdict(set)  # (id, id) -> words that contain(ed) it; stale entries are harmless
    for w, (word, c) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += c
            where[pair].add(w)

    while len(vocab) < vocab_size and pair_counts:
        best = max(pair_counts, key=lambda p: (pair_counts[p], -p[0], -p[1]))
        token = vocab[best[0]] + vocab[best[1]]
        new_id = ranks[token] = len(vocab)
        vocab.append(token)
        for w in where.pop(best):
            word, c = words[w], counts[w]
            for pair in zip(word, word[1:]):
                pair_counts[pair] -= c
                if pair_counts[pair] == 0:
                    del pair_counts[pair]  # every occurrence of `best` ends here, so it leaves the table
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(new_id)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            for pair in zip(merged, merged[1:]):
                pair_counts[pair] += c
                where[pair].add(w)
            words[w] = merged
    return ranks


def save_bpe(ranks, path):
    """tiktoken's .tiktoken format: base64(token bytes) space rank, one line per token, by rank."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")


def load_bpe(path):
    # read directly: tiktoken's load_tiktoken_bpe caches files by path in a temp dir, so a retrained asset
    # could silently load stale ranks
    ranks = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def main():
    parser = argparse.ArgumentParser(description="Train the tiny world's byte-level BPE.")
    parser.add_argument("--train", action="store_true", help="train on the tiny world's text")
    parser.add_argument("--out", default=TINY_PATH, help="output .tiktoken file (default: %(default)s)")
    parser.add_argument(
        "--vocab_size", type=int, default=1024, help="total vocabulary incl. the 3 special tokens (default: %(default)s)"
    )
    args = parser.parse_args()
    if not args.train:
        parser.error("nothing to do: pass --train")
    from nanorlhf.world import make_world

    world = make_world(seed=0, scale=1.0)
    demos = world.sft_demos()
    texts = world.pretrain_docs("train") + [p for p, _ in demos] + [r for _, r in demos]
    ranks = train_bpe(texts, args.vocab_size - 3)
    save_bpe(ranks, args.out)
    tok = Tokenizer("tiny", ranks, {EOS: len(ranks), PROMPT: len(ranks) + 1, RESPONSE: len(ranks) + 2})
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(tok.encode(t)) for t in texts)
    print(f"wrote {args.out}: {len(ranks)} ranks + 3 specials, {n_bytes / n_tokens:.2f} bytes/token on {n_bytes:,} bytes")


if __name__ == "__main__":
    main()
