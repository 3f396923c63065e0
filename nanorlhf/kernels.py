"""Fused hot-path kernels, each beside its eager twin.

compile_model runs the transformer blocks and the final LayerNorm through torch.compile (its eager twin: the model
as written); on CPU the traced model takes the plain attention and GELU as x·σ(2u) (model.py), the forms inductor
fuses best.
token_logprobs goes from hidden states to log p(target) chunk by chunk over rows (LM-head matmul + logsumexp +
gather), so the (N, V) logits tensor never exists for all rows at once: peak memory is ~chunk_size × V (by
default 2^23 logits on CPU, 2^25 on a GPU, whatever V), and the backward recomputes each chunk's logits instead of
saving them (all rows in one chunk: that chunk's softmax is kept for the backward, no more memory and one matmul
fewer). The per-chunk math, the PPO losses, the ranking loss and GAE can run through torch.compile; compile is on
by default on CUDA, off on CPU (see use_compile), and happens lazily on first use. Python scalars go in as tensors
and sizes that vary (chunk rows, batch, response length) are marked dynamic, so none of them recompiles.
"""

import functools

import torch
import torch.nn.functional as F

from nanorlhf import rlhf


def use_compile(device):
    """The default for every `compiled` flag here: compile on CUDA, run eager on CPU."""
    return torch.device(device).type == "cuda"


@functools.cache
def _compiled(fn):
    return torch.compile(fn)


def compile_model(model):
    """torch.compile `model.blocks` (every block and the final LayerNorm) in place, forward and backward: LayerNorm,
    the attention's scale, mask and softmax, GELU and the residual adds are fused between the matmuls. Sizes are
    dynamic, so a new batch or sequence length reuses the graph, and every model of the same shape shares it
    (weights are graph inputs). The mask, positions and embeddings stay eager: handed in as a tensor, the mask is
    read by the softmax kernels instead of rebuilt (causal, padding, diagonal) in each of them, and on CPU the
    embeddings' backward in aten is ~20× faster than inductor's (atomic adds): W1 −5% for both. Not for
    checkpointed blocks (dist.checkpoint_blocks): dynamo cannot trace them, so the scripts leave such a model eager."""
    eager = model.blocks
    model.blocks = functools.partial(_compiled_unless_cached, eager, torch.compile(eager, dynamic=True))
    return model


def _compiled_unless_cached(eager, compiled, x, mask=None, kv_cache=None, start=0):
    """Training and scoring run compiled; a KV-cached prefill stays eager (compiled, its in-place cache writes would
    specialize on each layer). The compiled decode step traces this eager path into its own graph."""
    if kv_cache is None:
        return compiled(x, mask, start=start)
    return eager(x, mask, kv_cache, start)


# ----------------------------------------------------------------------------------------------------------------
# log-probs (and entropy) from hidden states

def token_logprobs_eager(hidden, weight, targets, temperature=1.0):
    """Reference: log_softmax(hidden @ weight.T / T).gather(targets); builds the full (..., V) logits."""
    logits = (hidden @ weight.T) / temperature  # (..., V)
    return F.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def _chunk_logits(h, weight, inv_temp):
    z = h @ weight.T  # (n, V)
    return z.to(torch.promote_types(z.dtype, torch.float32)) * inv_temp  # softmax math in ≥ fp32


def _chunk_forward_keep(h, y, weight, inv_temp):
    """One chunk: log p(y) = z_y − logsumexp(z), logsumexp(z), the entropy of softmax(z) and softmax(z) (n, V)."""
    z = _chunk_logits(h, weight, inv_temp)  # (n, V)
    lse = torch.logsumexp(z, dim=-1)  # (n,)
    logp = z.gather(1, y[:, None]).squeeze(1) - lse  # (n,)
    probs = torch.exp(z - lse[:, None])  # (n, V)
    entropy = lse - (probs * z).sum(-1)  # (n,) H = logsumexp(z) − E_p[z]
    return logp, lse, entropy, probs


def _chunk_forward(h, y, weight, inv_temp):
    """_chunk_forward_keep without the softmax, for chunks whose backward recomputes it (compiled, never stored)."""
    return _chunk_forward_keep(h, y, weight, inv_temp)[:3]


def _grad_logits(probs, y, grad_logp, inv_temp, dtype):
    """d loss / d (h @ weight.T) of one chunk: grad · (onehot(y) − softmax(z)) / T."""
    grad = (grad_logp * inv_temp)[:, None]  # (n, 1) scaled before the (n, V) product: one pass over the chunk
    return (-probs * grad).scatter_add(1, y[:, None], grad).to(dtype)


def _chunk_grad_logits(h, y, weight, lse, grad_logp, inv_temp):
    """_grad_logits for one chunk, recomputing its logits z."""
    z = _chunk_logits(h, weight, inv_temp)  # (n, V)
    return _grad_logits(torch.exp(z - lse[:, None]), y, grad_logp, inv_temp, h.dtype)


def _row_chunks(chunk_size, compiled, *tensors):
    """Yield the row chunks of tensors. Compiled, the row count is marked dynamic: a shorter last chunk or a new N
    reuses the graph instead of recompiling."""
    for s in range(0, tensors[0].shape[0], chunk_size):
        chunk = [x[s : s + chunk_size] for x in tensors]
        if compiled:
            for x in chunk:
                torch._dynamo.maybe_mark_dynamic(x, 0)
        yield chunk


class _TokenLogprobs(torch.autograd.Function):
    """Chunked log-probs. Several chunks: the backward recomputes each chunk's logits (saved are hidden, weight,
    targets and lse). One chunk (keep_probs): its softmax is saved instead, one matmul fewer in the backward for no
    more memory than the chunk itself."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temp, chunk_size, compiled, keep_probs):
        # detached: autograd is this Function's job, and one graph then serves frozen and trained weights alike
        chunks = _row_chunks(chunk_size, compiled, hidden.detach(), targets)
        probs = None
        if keep_probs:
            forward_fn = _compiled(_chunk_forward_keep) if compiled else _chunk_forward_keep
            logp, lse, entropy, probs = forward_fn(*next(chunks), weight.detach(), inv_temp)
        else:
            forward_fn = _compiled(_chunk_forward) if compiled else _chunk_forward
            outs = [forward_fn(h, y, weight.detach(), inv_temp) for h, y in chunks]
            logp, lse, entropy = (torch.cat(x) for x in zip(*outs))  # (N,) each
        ctx.save_for_backward(hidden, weight, targets, lse, inv_temp, probs)
        ctx.chunk_size, ctx.compiled = chunk_size, compiled
        ctx.mark_non_differentiable(entropy)  # entropy is for logging only
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, inv_temp, probs = (x if x is None else x.detach() for x in ctx.saved_tensors)
        if probs is not None:
            grad_fn = _compiled(_grad_logits) if ctx.compiled else _grad_logits
            one_chunk = _row_chunks(len(probs), ctx.compiled, probs, targets, grad_logp)  # rows marked dynamic
            grads = [(hidden, grad_fn(p, y, grad, inv_temp, hidden.dtype)) for p, y, grad in one_chunk]
        else:
            grad_fn = _compiled(_chunk_grad_logits) if ctx.compiled else _chunk_grad_logits
            chunks = _row_chunks(ctx.chunk_size, ctx.compiled, hidden, targets, lse, grad_logp)
            grads = ((h, grad_fn(h, y, weight, lse_, grad, inv_temp)) for h, y, lse_, grad in chunks)
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden, grad_weight = [], torch.zeros_like(weight)
        for h, g in grads:  # g (n, V): d loss / d logits of a chunk
            if need_hidden:
                grad_hidden.append(g @ weight)  # (n, C)
            if need_weight:
                grad_weight += g.T @ h  # (V, C)
        grad_hidden = torch.cat(grad_hidden) if need_hidden else None
        grad_weight = grad_weight if need_weight else None
        return grad_hidden, grad_weight, None, None, None, None, None


def default_chunk_size(vocab_size, device):
    """Rows per log-prob chunk: a fixed number of logits whatever the vocabulary, 2^23 (32 MiB in fp32) on CPU and
    2^25 (128 MiB) on a GPU, where fewer, larger matmuls fill the device (GPT-2 124M training step 98 → 75 ms on
    an H100, log-prob peak memory still 0.19× the naive path's at vocab 50257: README, Performance)."""
    return max(1, (2**25 if device.type == "cuda" else 2**23) // vocab_size)


def token_logprobs_and_entropy(hidden, weight, targets, temperature=1.0, chunk_size=None, compiled=None):
    """log p(targets) and entropy under softmax(hidden @ weight.T / temperature), without the full logits.

    hidden: (..., C), weight: (V, C) (the tied LM head), targets: (...) int. Returns (logprobs, entropy), each
    shaped like targets; logprobs carry gradients to hidden and weight, entropy carries none. chunk_size: rows
    per chunk (default: default_chunk_size, so a chunk's transient logits have a fixed size).
    """
    compiled = use_compile(hidden.device) if compiled is None else compiled
    chunk_size = chunk_size or default_chunk_size(weight.shape[0], hidden.device)
    lead = targets.shape
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    inv_temp = torch.tensor(1.0 / temperature, dtype=dtype, device=hidden.device)  # a tensor: no recompile per value
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, C)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    keep_probs = needs_grad and len(hidden) <= chunk_size  # one chunk: keep its softmax for the backward
    logp, entropy = _TokenLogprobs.apply(hidden, weight, targets.reshape(-1), inv_temp, chunk_size, compiled, keep_probs)
    return logp.reshape(lead), entropy.reshape(lead)


def token_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=None, compiled=None):
    """log p(targets), shaped like targets; see token_logprobs_and_entropy."""
    return token_logprobs_and_entropy(hidden, weight, targets, temperature, chunk_size, compiled)[0]


# ----------------------------------------------------------------------------------------------------------------
# compiled twins of the rlhf math

def ppo_loss(logprobs, old_logprobs, advantages, values, old_values, returns, mask, clip_eps, value_clip):
    """Eager twin of ppo_loss_fused: (policy loss, value loss, policy stats) from rlhf."""
    pg_loss, stats = rlhf.policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps)
    v_loss = rlhf.value_loss(values, old_values, returns, mask, value_clip)
    return pg_loss, v_loss, stats


def _dynamic(*tensors):
    """Mark every dimension dynamic: a new batch or response length reuses the compiled graph."""
    for x in tensors:
        for dim in range(x.dim()):
            torch._dynamo.maybe_mark_dynamic(x, dim)
    return tensors


def ppo_loss_fused(logprobs, old_logprobs, advantages, values, old_values, returns, mask, clip_eps=0.2,
                   value_clip=0.2):
    """Policy loss + value loss + masked means + stats in one compiled graph; all inputs (B, T)."""
    clip_eps = torch.tensor(clip_eps, dtype=logprobs.dtype, device=logprobs.device)  # tensors: no recompile per value
    value_clip = torch.tensor(value_clip, dtype=logprobs.dtype, device=logprobs.device)
    tensors = _dynamic(logprobs, old_logprobs, advantages, values, old_values, returns, mask)
    return _compiled(ppo_loss)(*tensors, clip_eps, value_clip)


def ranking_loss_compiled(rewards, ranks, mask):
    """torch.compile of rlhf.ranking_loss."""
    return _compiled(rlhf.ranking_loss)(*_dynamic(rewards, ranks, mask))


def _gae_scan(rewards, values, mask, gamma, lam):
    mask = mask.bool()
    rewards = torch.where(mask, rewards, 0.0)
    values = torch.where(mask, values, 0.0)  # V after the last real token is 0
    next_values = F.pad(values[:, 1:], (0, 1))  # (B, T) V_{t+1}
    delta = rewards + gamma * next_values - values  # (B, T), 0 on padding
    # A_t = Σ_{k≥t} (γλ)^(k−t) δ_k: the reverse scan as one matmul with an upper-triangular discount matrix.
    T = rewards.shape[1]
    t = torch.arange(T, device=rewards.device)
    lag = (t[None, :] - t[:, None]).to(values.dtype)  # (T, T) k − t
    discount = torch.where(lag >= 0, (gamma * lam) ** lag.clamp(min=0), 0.0)  # (T, T)
    advantages = delta @ discount.T  # (B, T)
    return advantages, advantages + values


def gae_scan(rewards, values, mask, gamma=1.0, lam=0.95):
    """Compiled GAE for right-padded rows (eager twin: rlhf.gae); returns (advantages, returns), each (B, T)."""
    gamma = torch.tensor(gamma, dtype=values.dtype, device=values.device)
    lam = torch.tensor(lam, dtype=values.dtype, device=values.device)
    return _compiled(_gae_scan)(*_dynamic(rewards, values, mask), gamma, lam)
