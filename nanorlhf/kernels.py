"""Compilation as one layer over the eager code, and the fused hot-path kernels beside their eager twins.

One switch, `enable(on)` (the scripts' --compile: on for CUDA, off for CPU by default), read as `kernels.enabled`.
Off, nothing here runs: the recipe is the plain eager PyTorch of model.py, engine.py and rlhf.py. On, the hot path
runs through torch.compile and computes the same functions:
- compile_model(model): on a model instance, the model's own transformer blocks and final LayerNorm (GPT.blocks,
  torch.compile'd as model.py writes them, GELU lowered as x·σ(2u)), forward and backward, and the log-probs
  (GPT.logprobs_and_entropy) through the fused kernel below
- compile_decode(step): engine's one-token decode step, static shapes, CUDA graphs on CUDA (gpt-fast's recipe)
- token_logprobs_and_entropy: log-probs (and entropy) straight from hidden states, chunk by chunk (LM-head matmul +
  logsumexp + gather), so the (N, V) logits tensor never exists for all rows at once: peak memory is ~chunk_size × V
  (by default 2^23 logits on CPU, 2^25 on a GPU, whatever V), and the backward recomputes each chunk's logits instead
  of saving them (all rows in one chunk: that chunk's softmax is kept for the backward, no more memory and one
  matmul fewer). Its eager twin: model.token_logprobs_and_entropy (log_softmax, then gather).
- compiled(fn): any of rlhf.py's loss functions as one compiled graph (rlhf.ppo_losses, rlhf.ranking_loss)
- gae: rlhf.gae's reverse scan as one matmul with a discount matrix, compiled
Compiling happens lazily on first use. Python scalars go in as tensors and sizes that vary (chunk rows, batch,
response length) are marked dynamic, so none of them recompiles.
"""

import contextlib
import functools
import math

import torch
import torch.nn.functional as F

enabled = False  # the switch: read by the eager code where it hands the hot path to this module


def use_compile(device):
    """The default of --compile: compile on CUDA, run eager on CPU."""
    return torch.device(device).type == "cuda"


def enable(on, device="cpu"):
    """The switch: compile the hot path from here on (on None: use_compile(device)). Returns the resolved choice."""
    global enabled
    enabled = use_compile(device) if on is None else bool(on)
    return enabled


@contextlib.contextmanager
def compiling(on=True):
    """enable(on) within a block, the previous choice restored after it (bench and tests run both paths)."""
    before = enabled
    enable(on)
    try:
        yield
    finally:
        enable(before)


@functools.cache
def _compiled(fn, **options):
    return torch.compile(fn, **options)


def compile_model(model, blocks=True):
    """With the switch on, take model.logprobs_and_entropy from token_logprobs_and_entropy (fused, compiled), and
    route `model.blocks` (every block and the final LayerNorm) through torch.compile of the model's own GPT.blocks
    (gpt-fast's torch.compile(model): Block.forward, MLP.forward and model.gelu as model.py writes them), forward and
    backward: LayerNorm, the attention's scale, mask and softmax, GELU and the residual adds are fused between the
    matmuls, GELU lowered as x·σ(2u) (_inductor_gelu_as_sigmoid). Sizes are dynamic, so a new batch or sequence
    length reuses the graph, and every model of the same shape shares it (weights are graph inputs). The mask,
    positions and embeddings stay eager: handed in as a tensor, the mask is read by the softmax kernels instead of
    rebuilt (causal, padding, diagonal) in each of them, and on CPU aten's embedding backward is faster than
    inductor's (atomic adds). On CPU the model takes its plain attention (use_sdpa False: a masked softmax between
    two batched matmuls, which inductor fuses; SDPA's CPU kernel is slower at small heads), the same function. Not
    for checkpointed blocks (dist.checkpoint_blocks): dynamo cannot trace them, so blocks=False leaves them eager and
    fuses the log-probs only."""
    if not enabled:
        return model
    model.logprobs_and_entropy = functools.partial(_model_logprobs_and_entropy, model)
    if not blocks:
        return model
    if next(model.parameters()).device.type == "cpu":
        model.use_sdpa = False
    compiled = _compiled(type(model).blocks, dynamic=True, backend=_inductor_gelu_as_sigmoid)
    model.blocks = functools.partial(_compiled_unless_cached, model.blocks, compiled, model)
    return model


def _compiled_unless_cached(eager, compiled, model, x, mask=None, kv_cache=None, start=0):
    """Training and scoring run compiled; a KV-cached prefill stays eager (compiled, its in-place cache writes would
    specialize on each layer). The compiled decode step traces this eager path into its own graph."""
    if kv_cache is None:
        return compiled(model, x, mask, None, start)
    return eager(x, mask, kv_cache, start)


def _gelu_tanh_inner(x):
    return math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)  # u of GPT-2's GELU (model.gelu)


def _gelu(inductors, x, approximate="none"):
    """aten.gelu, decomposed for inductor: the tanh GELU ½·x·(1 + tanh u) as x·σ(2u), the same function
    (½·(1 + tanh u) = σ(2u)), whose sigmoid inductor computes several times faster on CPU than its tanh; any other
    GELU by inductor's own decomposition."""
    if approximate != "tanh":
        return inductors(x, approximate=approximate)
    return x * torch.sigmoid(2 * _gelu_tanh_inner(x))


def _gelu_backward(inductors, grad, x, approximate="none"):
    """aten.gelu_backward likewise: d/dx x·σ(2u) = s + x·s·(1 − s)·2u' with s = σ(2u),
    u' = √(2/π)·(1 + 3·0.044715·x²)."""
    if approximate != "tanh":
        return inductors(grad, x, approximate=approximate)
    s = torch.sigmoid(2 * _gelu_tanh_inner(x))
    du = math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x * x)
    return grad * (s + x * s * (1 - s) * 2 * du)


def _inductor_gelu_as_sigmoid(graph, example_inputs):
    """torch.compile's backend for the model's blocks: inductor, with one hook into how it lowers the model's code:
    GELU, forward and backward, decomposed by _gelu and _gelu_backward instead of inductor's tanh formulas (the
    blocks' forward + backward 6% faster on CPU, docs/performance.md). Inductor's compile caches key on the graph,
    not on this table: a graph compiled by plain inductor too (the same function) may come back with its tanh."""
    from torch._inductor.compile_fx import compile_fx  # imported on the first compile: inductor takes seconds to
    from torch._inductor.decomposition import select_decomp_table  # import, and eager runs never need it
    gelu, gelu_backward = torch.ops.aten.gelu.default, torch.ops.aten.gelu_backward.default
    inductors = select_decomp_table()
    decompositions = {**inductors, gelu: functools.partial(_gelu, inductors[gelu]),
                      gelu_backward: functools.partial(_gelu_backward, inductors[gelu_backward])}
    return compile_fx(graph, example_inputs, decompositions=decompositions)


def compile_decode(step, device):
    """engine's decode step, compiled with static shapes when the switch is on (one graph per cache length); on
    CUDA as CUDA graphs (mode="reduce-overhead"), each call first marking the previous step's outputs consumed."""
    if not enabled:
        return step
    device = torch.device(device)
    compiled = _compiled(step, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)
    if device.type != "cuda":
        return compiled

    def replay(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args)
    return replay


def mark_static(tensors):
    """Tensors that every call of a compiled decode step reads and writes in place (the KV cache): at fixed
    addresses, nothing recompiles and, on CUDA, the recorded graph is replayed."""
    for t in tensors:
        torch._dynamo.mark_static_address(t)


# ----------------------------------------------------------------------------------------------------------------
# log-probs (and entropy) from hidden states

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
    """_chunk_forward_keep without the softmax, for chunks whose backward recomputes it (compiled: never built)."""
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
    2^25 (128 MiB) on a GPU, where fewer, larger matmuls fill the device (measured: docs/performance.md, On a GPU)."""
    return max(1, (2**25 if device.type == "cuda" else 2**23) // vocab_size)


def token_logprobs_and_entropy(hidden, weight, targets, temperature=1.0, chunk_size=None):
    """log p(targets) and entropy under softmax(hidden @ weight.T / temperature), without the full logits.

    hidden: (..., C), weight: (V, C) (the tied LM head), targets: (...) int. Returns (logprobs, entropy), each
    shaped like targets; logprobs carry gradients to hidden and weight, entropy carries none. chunk_size: rows
    per chunk (default: default_chunk_size, so a chunk's transient logits have a fixed size).
    """
    chunk_size = chunk_size or default_chunk_size(weight.shape[0], hidden.device)
    lead = targets.shape
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    inv_temp = torch.tensor(1.0 / temperature, dtype=dtype, device=hidden.device)  # a tensor: no recompile per value
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, C)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    keep_probs = needs_grad and len(hidden) <= chunk_size  # one chunk: keep its softmax for the backward
    logp, entropy = _TokenLogprobs.apply(hidden, weight, targets.reshape(-1), inv_temp, chunk_size, enabled,
                                         keep_probs)
    return logp.reshape(lead), entropy.reshape(lead)


def _model_logprobs_and_entropy(model, hidden, targets, temperature=1.0):
    """GPT.logprobs_and_entropy through the fused kernel (compile_model puts it on a model instance)."""
    return token_logprobs_and_entropy(hidden, model.lm_head.weight, targets, temperature)


# ----------------------------------------------------------------------------------------------------------------
# rlhf's math, compiled

def _dynamic(*tensors):
    """Mark every dimension dynamic: a new batch or response length reuses the compiled graph."""
    for x in tensors:
        for dim in range(x.dim()):
            torch._dynamo.maybe_mark_dynamic(x, dim)
    return tensors


def _graph_inputs(args):
    """Tensors with every dimension dynamic, Python floats as 0-dim tensors of the first floating tensor's dtype (a
    graph input each, so a new value does not recompile)."""
    like = next(a for a in args if torch.is_tensor(a) and a.is_floating_point())
    return [_dynamic(a)[0] if torch.is_tensor(a) else torch.tensor(a, dtype=like.dtype, device=like.device)
            for a in args]


def compiled(fn):
    """fn (one of rlhf.py's loss functions, positional arguments) as one compiled graph: its masked means, clips and
    statistics fused. The same function; only the order of float sums may differ."""
    return lambda *args: _compiled(fn)(*_graph_inputs(args))


def _gae_scan(rewards, values, mask, discount, lam):
    mask = mask.bool()
    rewards = torch.where(mask, rewards, 0.0)
    values = torch.where(mask, values, 0.0)  # V after the last real token is 0
    next_values = F.pad(values[:, 1:], (0, 1))  # (B, T) V_{t+1}
    delta = rewards + discount * next_values - values  # (B, T), 0 on padding
    # A_t = Σ_{k≥t} (discount·λ)^(k−t) δ_k: the reverse scan as one matmul with an upper-triangular matrix.
    T = rewards.shape[1]
    t = torch.arange(T, device=rewards.device)
    lag = (t[None, :] - t[:, None]).to(values.dtype)  # (T, T) k − t
    weights = torch.where(lag >= 0, (discount * lam) ** lag.clamp(min=0), 0.0)  # (T, T)
    advantages = delta @ weights.T  # (B, T)
    return advantages, advantages + values


def gae(rewards, values, mask, discount=1.0, lam=0.95):
    """rlhf.gae's twin for right-padded rows: (advantages, returns), each (B, T), compiled, the reverse scan as one
    matmul with a discount matrix (the same sums, in another order)."""
    return compiled(_gae_scan)(rewards, values, mask, discount, lam)
