"""The GPT: GPT-2 architecture (Radford et al. 2019) with an LM head or a scalar head.

Learned positions, pre-LayerNorm blocks, GELU (tanh approximation), tied input/output embeddings and biases
everywhere, so Hugging Face GPT-2 weights load unchanged (`GPT.from_pretrained`). The scalar head
(`head="scalar"`) is the reward model / value function of InstructGPT (Ouyang et al. 2022, sec. 3.5).

Masks: `attention_mask` (B, T) is 1/True for real tokens. It works for left-padded prompt batches (generation)
and right-padded training batches; position ids default to cumsum(mask) - 1 so padding never shifts positions.

KV cache (see nanorlhf/engine.py `KVCache`): a cached forward call
  1. `key_mask = kv_cache.write_mask(attention_mask)` marks the T new slots, returns the (B, Tmax) key validity,
  2. layer i calls `k, v = kv_cache.update(i, k, v)`, which writes the new keys/values at slots pos..pos+T-1 and
     returns the whole static cache (B, nh, Tmax, hs),
  3. `kv_cache.advance(T)` moves the write position `kv_cache.pos` (a 0-dim long tensor) forward.
Every shape in a one-token decode step is fixed (Tmax key slots, positions as tensors): each step is like the last.
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 128  # maximum sequence length (number of learned positions)
    vocab_size: int = 1024
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0  # embedding, attention and residual dropout (nanoGPT); off in eval()
    layer_norm_eps: float = 1e-5


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v projections in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.use_sdpa = True  # False: the plain masked-softmax twin below, the same function

    def forward(self, x, mask=None, kv_cache=None, layer_idx=0, start=0):
        """x (B, Tk, C); mask None (plain causal) or additive (B, 1, Tk, keys): 0 = may attend, −inf = may not.
        start: only the queries start..Tk−1 (keys and values from all Tk); returns (B, T = Tk − start, C)."""
        B, Tk, C = x.size()
        T = Tk - start  # queries
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, Tk, C)
        q = q[:, start:].view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, Tk, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, Tk, hs)
        v = v.view(B, Tk, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, Tk, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)  # (B, nh, Tmax, hs)
        mask = mask if mask is None else mask[:, :, start:].to(q.dtype)  # bf16 under autocast
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=mask is None
            )  # (B, nh, T, hs)
        else:
            # softmax(q k^T / sqrt(hs) + mask) v: masked entries are −inf before the softmax
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, Tk)
            if mask is None:
                mask = torch.full((T, T), float("-inf"), dtype=att.dtype, device=x.device).triu(1)  # (T, T) causal
            att = self.attn_dropout(F.softmax(att + mask, dim=-1))
            y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(gelu(self.c_fc(x))))


def gelu(x):
    """GPT-2's GELU ("gelu_new"), the tanh approximation: ½·x·(1 + tanh(u)), u = √(2/π)·(x + 0.044715·x³)."""
    return F.gelu(x, approximate="tanh")


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, kv_cache=None, layer_idx=0, start=0):
        x = x[:, start:] + self.attn(self.ln_1(x), mask, kv_cache, layer_idx, start)  # pre-LayerNorm residual blocks
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, head: str = "lm"):
        super().__init__()
        if head not in ("lm", "scalar"):
            raise ValueError(f"head must be 'lm' or 'scalar', got {head!r}")
        self.config = config
        self.head = head
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied (Press & Wolf 2017), as in GPT-2
        if head == "scalar":
            self.score = nn.Linear(config.n_embd, 1)  # reward / value head
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                # GPT-2 paper sec. 2.3: scale residual-path weights by 1/sqrt(N), N = 2 residual adds per layer
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def use_sdpa(self):
        return self.transformer.h[0].attn.use_sdpa

    @use_sdpa.setter
    def use_sdpa(self, value: bool):
        for block in self.transformer.h:
            block.attn.use_sdpa = value

    def hidden_states(self, idx, attention_mask=None, position_ids=None, kv_cache=None, start=0):
        """idx (B, T) token ids -> (B, T − start, C) activations after the final LayerNorm at positions start..T−1.

        start > 0 (PPO reads only the response positions): the last block computes those positions alone; the
        others' outputs there would feed nothing (their keys and values, from its input, still do)."""
        B, T = idx.size()
        if kv_cache is not None and start:
            raise ValueError("start > 0 is for full forwards, not KV-cached ones")
        device = idx.device
        if kv_cache is not None:
            new_mask = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask
            key_mask = kv_cache.write_mask(new_mask.bool())  # (B, Tmax), the new slots included
            slots = kv_cache.pos + torch.arange(T, device=device)  # (T,) absolute slot of each query
            key_slots = torch.arange(key_mask.size(1), device=device)  # (Tmax,)
            causal = key_slots[None, :] <= slots[:, None]  # (T, Tmax)
            itself = key_slots[None, :] == slots[:, None]  # (T, Tmax): a padded query still sees itself
            mask = ((causal[None] & key_mask[:, None, :]) | itself[None])[:, None]  # (B, 1, T, Tmax)
            if position_ids is None:
                # position = number of real tokens before this one, counted over the whole cache
                positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, Tmax)
                position_ids = positions.gather(1, slots[None].expand(B, T))  # (B, T)
        elif attention_mask is not None:
            key_mask = attention_mask.bool()  # (B, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
            itself = torch.eye(T, dtype=torch.bool, device=device)  # (T, T)
            mask = ((causal[None] & key_mask[:, None, :]) | itself[None])[:, None]  # (B, 1, T, T)
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        else:
            # plain causal attention; with start > 0 spelled out (SDPA's is_causal aligns short queries to the left)
            mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None] if start else None
            if position_ids is None:
                position_ids = torch.arange(T, device=device)[None]  # (1, T)
        if mask is not None:
            mask = torch.where(mask, 0.0, float("-inf"))  # (B, 1, T, Tk) additive, built once for every layer
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(position_ids))  # (B, T, C)
        return self.blocks(x, mask, kv_cache, start)  # (B, T − start, C)

    def blocks(self, x, mask=None, kv_cache=None, start=0):
        """The transformer blocks and the final LayerNorm: x (B, T, C) embeddings -> (B, T − start, C) activations;
        mask as CausalSelfAttention takes it. kernels.compile_model puts this method, compiled, on a model instance."""
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, kv_cache, i, start if i == len(self.transformer.h) - 1 else 0)
        if kv_cache is not None:
            kv_cache.advance(x.size(1))
        return self.transformer.ln_f(x)  # (B, T − start, C)

    def forward(self, idx, attention_mask=None, position_ids=None, kv_cache=None, start=0):
        """Logits (B, T, vocab) for head="lm" (logits[:, t] predict token t+1); scalars (B, T) for head="scalar".
        start: only positions start..T−1 (see hidden_states)."""
        h = self.hidden_states(idx, attention_mask, position_ids, kv_cache, start)  # (B, T − start, C)
        if self.head == "scalar":
            return self.score(h).squeeze(-1)  # (B, T)
        return self.lm_head(h)  # (B, T, vocab)

    def logprobs_and_entropy(self, hidden, targets, temperature=1.0):
        """(log p(targets), entropy) of hidden states through this model's LM head at temperature T
        (token_logprobs_and_entropy below). kernels.compile_model swaps in its fused twin, which never builds the
        whole logits tensor."""
        return token_logprobs_and_entropy(hidden, self.lm_head.weight, targets, temperature)

    def num_params(self):
        """Number of parameters; the tied lm_head/wte matrix is counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward_flops(self, n_tokens: int, n_lm: int, T: int, n_out: int | None = None):
        """Matmul FLOPs of a forward over n_tokens tokens at sequence length T, with the LM head at n_lm of them.

        PaLM (Chowdhery et al. 2022) appendix B, as in nanoGPT's estimate_mfu: 2 per weight per token in the blocks
        (the scalar head counted with them), 4·L·C·T per token for the attention scores and weighted sum
        (q k^T and att v: 2·T·C multiply-adds each per layer), and 2·V·C per position through the LM head.
        The position table and, for the scalar head, wte are lookups, not matmuls. Training = 3 × forward.
        n_out: tokens that leave the last block (hidden_states' start; default all); the others go through the
        blocks before it and the last block's ln_1 and c_attn only (their keys and values).
        """
        wte, wpe = self.transformer.wte.weight.numel(), self.transformer.wpe.weight.numel()
        L, C = self.config.n_layer, self.config.n_embd
        last = self.transformer.h[-1]
        kv_only = [*self.transformer.h[:-1], last.ln_1, last.attn.c_attn]
        per_out = 2 * (self.num_params() - wte - wpe) + 4 * L * C * T
        per_kv_only = 2 * sum(p.numel() for m in kv_only for p in m.parameters()) + 4 * (L - 1) * C * T
        n_out = n_tokens if n_out is None else n_out
        return n_out * per_out + (n_tokens - n_out) * per_kv_only + n_lm * 2 * wte

    def flops_per_token(self, T: int):
        """Training FLOPs (forward + backward) per token at sequence length T, the LM head (if any) at every token:
        6N + 12·L·C·T."""
        return 3 * self.forward_flops(1, int(self.head == "lm"), T)

    @torch.no_grad()
    def resize_token_embeddings(self, new_vocab_size: int):
        """Grow the vocabulary (new special tokens); new rows are the mean of the old ones, old ids unchanged."""
        old = self.transformer.wte.weight
        if new_vocab_size < old.size(0):
            raise ValueError(f"cannot shrink vocabulary from {old.size(0)} to {new_vocab_size}")
        wte = nn.Embedding(new_vocab_size, old.size(1), device=old.device, dtype=old.dtype)
        wte.weight[: old.size(0)] = old
        wte.weight[old.size(0):] = old.mean(dim=0)
        self.transformer.wte = wte
        self.lm_head = nn.Linear(old.size(1), new_vocab_size, bias=False, device=old.device, dtype=old.dtype)
        self.lm_head.weight = wte.weight  # keep the tie
        self.config.vocab_size = new_vocab_size

    @classmethod
    def from_pretrained(cls, folder: str, head: str = "lm"):
        """Load a Hugging Face GPT-2 folder (config.json + model.safetensors or pytorch_model.bin), offline.

        For head="scalar" the trunk is loaded and the `score` head keeps its fresh initialization, unless the folder
        holds one (GPT2ForSequenceClassification, e.g. written by nanorlhf.export, whose bias it restores).
        """
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no config.json in GPT-2 folder {folder!r}")
        with open(config_path) as f:
            hf = json.load(f)
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=0.0,
                           layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5))
        safetensors_path = os.path.join(folder, "model.safetensors")
        bin_path = os.path.join(folder, "pytorch_model.bin")
        if os.path.isfile(safetensors_path):
            hf_state = read_safetensors(safetensors_path)
        elif os.path.isfile(bin_path):
            hf_state = torch.load(bin_path, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in GPT-2 folder {folder!r}")

        model = cls(config, head=head)
        state = {}
        for key, tensor in hf_state.items():
            if key == "score.weight":  # a sequence-classification head
                if head == "scalar":
                    state["score.weight"] = tensor
                continue
            key = key.removeprefix("transformer.")
            if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
                continue  # causal-mask buffers; lm_head is tied to wte
            if key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                tensor = tensor.t()  # HF Conv1D stores (in, out); nn.Linear wants (out, in)
            state["transformer." + key] = tensor
        expected = {k for k in model.state_dict() if k.startswith("transformer.") or k in state}
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            raise ValueError(f"weights in {folder!r} do not match GPT-2: missing {missing}, unexpected {unexpected}")
        fold = hf.get("nanorlhf")  # nanorlhf.export folded the score's bias into one entry of ln_f's bias
        if head == "scalar" and fold and "score.weight" in state:
            state["score.bias"] = torch.tensor([fold["score_bias"]])
            state["transformer.ln_f.bias"] = state["transformer.ln_f.bias"].clone()
            state["transformer.ln_f.bias"][fold["ln_f_bias_index"]] = fold["ln_f_bias"]
        model.load_state_dict(state, strict=False)
        return model


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def token_logprobs_and_entropy(hidden, weight, targets, temperature=1.0):
    """(log p(targets), entropy) under p = softmax(z), z = hidden @ weight.T / T, each shaped like targets: hidden
    (..., C), weight (V, C), targets (...) token ids. log_softmax(z) gathered at the targets, written as
    z_target − logsumexp(z); the softmax math in at least float32 (also under bf16 autocast). The entropy is for
    logging: no gradient."""
    z = hidden @ weight.T  # (..., V)
    z = z.to(torch.promote_types(z.dtype, torch.float32)) / temperature
    lse = torch.logsumexp(z, dim=-1)  # (...) log Σ_v exp z_v
    logp = z.gather(-1, targets[..., None]).squeeze(-1) - lse  # (...)
    with torch.no_grad():
        entropy = lse - (torch.exp(z - lse[..., None]) * z).sum(-1)  # H = logsumexp(z) − E_p[z]
    return logp, entropy


def read_safetensors(path: str) -> dict:
    """Minimal safetensors reader: 8-byte little-endian header length, a JSON header, then raw tensor bytes.

    Each header entry is {"dtype", "shape", "data_offsets": [start, end]}, offsets relative to the byte buffer.
    """
    with open(path, "rb") as f:
        data = bytearray(f.read())
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + header_len])
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        numel = math.prod(info["shape"])
        if numel == 0:
            tensors[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        assert end - start == numel * dtype.itemsize, f"corrupt safetensors entry {name!r} in {path!r}"
        tensors[name] = torch.frombuffer(data, dtype=dtype, count=numel, offset=base + start).view(info["shape"])
    return tensors
