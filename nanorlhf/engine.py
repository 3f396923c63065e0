"""Sampling engine: a static KV cache and `generate`, kept apart from the model's math.

`generate` prefills a left-padded prompt batch once, then calls `decode_step` (one token) until every row has
emitted EOS or `max_new_tokens` is reached. Finished rows are dropped from the decode batch (they cost nothing from
then on), unless kernels' compilation is on: a compiled decode step wants fixed shapes, so the batch and the cache
keep theirs (finished rows decode pads that are masked out). Either way only the unfinished rows draw a token, so
a seed gives the same tokens. It also returns the sampler's log-prob of each drawn token; PPO does not read them:
it rescores the rollout with full forwards for its π_old, the function its update computes (tests check that the
two agree).
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanorlhf import kernels


class KVCache:
    """Preallocated keys/values, one (B, nh, Tmax, hs) tensor per layer, the key validity mask and the write position.
    One tensor per layer, not one (n_layer, ...) tensor: a compiled in-place write to a view of a larger input
    becomes a copy of the whole input."""

    def __init__(self, n_layer, batch_size, n_head, max_len, head_dim, device=None, dtype=torch.float32):
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, Tmax)
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # next slot to write, a tensor

    def _slots(self, T):
        return self.pos + torch.arange(T, device=self.pos.device)  # (T,)

    def write_mask(self, mask):
        """mask (B, T) bool for the T new tokens; returns the key validity (B, Tmax) including them."""
        self.key_mask.index_copy_(1, self._slots(mask.size(1)), mask)
        return self.key_mask

    def update(self, layer, k, v):
        """k, v (B, nh, T, hs) for the new tokens; returns the whole cache of this layer (B, nh, Tmax, hs)."""
        slots = self._slots(k.size(2))
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        return self.k[layer], self.v[layer]

    def advance(self, T):
        self.pos.add_(T)

    def reset(self):
        """Empty the cache for a new batch; stale keys/values stay behind masked-out slots."""
        self.key_mask.zero_()
        self.pos.zero_()

    def keep_rows(self, keep):
        """Drop finished rows: keep (B,) bool selects the rows that go on decoding."""
        self.k, self.v = [k[keep] for k in self.k], [v[keep] for v in self.v]
        self.key_mask = self.key_mask[keep]


@functools.lru_cache(maxsize=4)
def static_kv_cache(n_layer, batch_size, n_head, max_len, head_dim, device, dtype):
    """Fixed shapes reuse one cache per shape, its tensors at fixed addresses: every call of the decode step then
    sees the same inputs (kernels.mark_static: a compiled step does not recompile, a CUDA graph replays)."""
    cache = KVCache(n_layer, batch_size, n_head, max_len, head_dim, device=device, dtype=dtype)
    kernels.mark_static([*cache.k, *cache.v, cache.key_mask, cache.pos])
    return cache


@dataclass
class Generation:
    tokens: torch.Tensor  # (B, P+N) long: left-padded prompts, then responses (pad_id after EOS)
    attention_mask: torch.Tensor  # (B, P+N) bool: real prompt tokens and response tokens up to the first EOS
    response_mask: torch.Tensor  # (B, N) bool: response tokens up to and including the first EOS
    logprobs: torch.Tensor  # (B, N) float: the sampler's log-prob of each drawn token under softmax(logits / T), 0 if
    # masked; PPO does not read it (train_ppo.rollout rescores with full forwards), tests check the two agree
    prompt_len: int  # P


def decode_step(model, token, kv_cache):
    """One token per row: token (B,) -> next-token logits (B, vocab). All shapes fixed across steps."""
    return model(token[:, None], kv_cache=kv_cache)[:, -1]  # (B, vocab)


def cache_length(P, max_new_tokens, block_size, fixed_shapes):
    """Key slots of the cache. Fixed shapes: rounded up to a power of two (≤ block_size), so every prompt length in
    a bucket reuses one compiled decode step (and one CUDA graph) instead of recompiling."""
    n = P + max_new_tokens
    return min(block_size, 1 << (n - 1).bit_length()) if fixed_shapes else n


def sample(logits, temperature=1.0, top_k=None, top_p=None, greedy=False, generator=None):
    """logits (B, V) -> (token (B,), logprob (B,)).

    The log-prob is from the full softmax of logits / temperature (temperature 1 when greedy), before any
    top-k / top-p truncation, which only shapes the distribution we draw from (for evaluation).
    """
    logits = logits.float()
    if greedy:
        token = logits.argmax(dim=-1)  # (B,)
        logprobs = F.log_softmax(logits, dim=-1)  # (B, V)
    else:
        if temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling; use greedy=True")
        logits = logits / temperature
        logprobs = F.log_softmax(logits, dim=-1)  # (B, V)
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None:
            # nucleus sampling (Holtzman et al. 2020): keep the smallest prefix of sorted tokens with mass >= top_p
            sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
            probs = sorted_logits.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # (B, V) probability mass strictly before each token
            sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))  # first always kept
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = logits.softmax(dim=-1)  # (B, V)
        # the exponential race: argmax of p / E with E ~ Exp(1) i.i.d. (the law of torch.multinomial, faster on CPU;
        # a token of probability 0 never wins). E = −log(1 − U) with U uniform in float64: on CPU the very numbers,
        # and generator state, of exponential_ (tests/test_engine), without its serial loop (3× faster at 64 × 2048)
        u = torch.rand(probs.shape, dtype=torch.float64, device=probs.device, generator=generator)  # (B, V)
        token = (probs / (-torch.log1p(-u)).float()).argmax(dim=-1)  # (B,)
    return token, logprobs.gather(-1, token[:, None]).squeeze(-1)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, eos_id, pad_id, temperature=1.0, top_k=None, top_p=None,
             greedy=False, generator=None) -> Generation:
    """Sample a response for each prompt (lists of token ids). N <= max_new_tokens: the loop stops early once
    every row has emitted EOS. The model runs in eval() mode (no dropout); its previous mode is restored."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
    config = model.config
    B, P = len(prompts), max(len(p) for p in prompts)
    if P + max_new_tokens > config.block_size:
        raise ValueError(f"prompt length {P} + max_new_tokens {max_new_tokens} exceeds block_size {config.block_size}")
    device = model.transformer.wte.weight.device
    fixed_shapes = kernels.enabled  # --compile: a compiled decode step, one graph per shape
    prompt = torch.full((B, P), pad_id, dtype=torch.long, device=device)  # (B, P) left-padded
    prompt_mask = torch.zeros(B, P, dtype=torch.bool, device=device)  # (B, P)
    for i, p in enumerate(prompts):
        prompt[i, P - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        prompt_mask[i, P - len(p):] = True

    was_training = model.training
    model.eval()
    try:
        shape = (config.n_layer, B, config.n_head, cache_length(P, max_new_tokens, config.block_size, fixed_shapes),
                 config.n_embd // config.n_head)
        # the dtype keys and values come in: the autocast dtype inside autocast (bf16 rollouts), else the weights'
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else model.transformer.wte.weight.dtype
        if fixed_shapes:
            kv_cache = static_kv_cache(*shape, device, dtype)
            kv_cache.reset()
        else:
            kv_cache = KVCache(*shape, device=device, dtype=dtype)
        step = kernels.compile_decode(decode_step, device) if fixed_shapes else decode_step
        h = model.hidden_states(prompt, attention_mask=prompt_mask, kv_cache=kv_cache)[:, -1]  # (B, C) prefill
        logits = model.lm_head(h)  # (B, vocab): only the last position samples
        response = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)  # (B, N)
        response_mask = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)  # (B, N)
        logprobs = torch.zeros(B, max_new_tokens, device=device)  # (B, N)
        rows = torch.arange(B, device=device)  # (b,) the rows in the decode batch (finished ones leave it)
        done = torch.zeros(B, dtype=torch.bool, device=device)  # (b,) rows past their EOS (fixed shapes only)
        N = 0
        for t in range(max_new_tokens):
            # only the unfinished rows draw, so a seed gives the same tokens with fixed shapes or without
            going = ~done  # (b,)
            drawn, drawn_logprob = sample(logits[going], temperature, top_k, top_p, greedy, generator)
            token = torch.full_like(rows, pad_id).masked_scatter(going, drawn)  # (b,) pad after EOS
            logprob = torch.zeros(len(rows), device=device).masked_scatter(going, drawn_logprob)  # (b,)
            response[rows, t], logprobs[rows, t], response_mask[rows, t] = token, logprob, going
            N = t + 1
            done = done | (token == eos_id)  # (b,)
            if done.all():
                break
            if not fixed_shapes and done.any():  # shrink the batch: finished rows cost nothing from here on
                going = ~done
                rows, token, done = rows[going], token[going], done[going]
                kv_cache.keep_rows(going)
            logits = step(model, token, kv_cache)  # (b, vocab)
    finally:
        model.train(was_training)

    response, response_mask, logprobs = response[:, :N], response_mask[:, :N], logprobs[:, :N]
    return Generation(
        tokens=torch.cat([prompt, response], dim=1),  # (B, P+N)
        attention_mask=torch.cat([prompt_mask, response_mask], dim=1),  # (B, P+N)
        response_mask=response_mask,
        logprobs=logprobs,
        prompt_len=P,
    )
