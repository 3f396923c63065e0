"""Fused kernels vs their eager twins. Compile tests are marked slow: each compile costs seconds on CPU."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from nanorlhf import kernels, rlhf
from nanorlhf.engine import KVCache
from nanorlhf.model import GPT, Block, GPTConfig, token_logprobs_and_entropy


def lm_head_case(N, C, V, dtype, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*(lead or (N,)), C, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, C, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, lead or (N,), generator=g)
    return hidden, weight, targets


def reference_logprobs(hidden, weight, targets, temperature):
    """Independent of model.token_logprobs_and_entropy (the eager twin): explicit indexing,
    log_softmax = z − logsumexp(z)."""
    z = torch.einsum("...c,vc->...v", hidden, weight) / temperature
    z_target = torch.take_along_dim(z, targets[..., None], dim=-1)[..., 0]
    return z_target - torch.logsumexp(z, dim=-1)


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_token_logprobs_chunked_matches_log_softmax_with_gradients(chunk_size):
    hidden, weight, targets = lm_head_case(N=None, C=8, V=19, dtype=torch.float64, lead=(3, 10))  # N = 30
    logp, entropy = kernels.token_logprobs_and_entropy(hidden, weight, targets, 0.7, chunk_size)
    expected = reference_logprobs(hidden, weight, targets, 0.7)
    assert logp.shape == entropy.shape == (3, 10)
    torch.testing.assert_close(logp, expected, atol=1e-6, rtol=0)
    eager_logp, eager_entropy = token_logprobs_and_entropy(hidden, weight, targets, 0.7)  # the eager twin
    torch.testing.assert_close(eager_logp, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(eager_entropy, entropy, atol=1e-6, rtol=0)
    # a weighted sum, so each row's incoming gradient differs
    grad_out = torch.randn(3, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad((logp * grad_out).sum(), (hidden, weight))
    want = torch.autograd.grad((expected * grad_out).sum(), (hidden, weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    log_p = F.log_softmax(hidden.detach() @ weight.detach().T / 0.7, dim=-1)
    torch.testing.assert_close(entropy, -(log_p.exp() * log_p).sum(-1), atol=1e-6, rtol=0)
    assert not entropy.requires_grad


def test_token_logprobs_gradcheck():
    hidden, weight, targets = lm_head_case(N=5, C=4, V=7, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w: kernels.token_logprobs_and_entropy(h, w, targets, temperature=0.7, chunk_size=2)[0],
        (hidden, weight),
    )


def test_token_logprobs_frozen_weight():
    hidden, weight, targets = lm_head_case(N=6, C=4, V=9, dtype=torch.float64)
    weight = weight.detach()  # a frozen LM head: only the hidden states get a gradient
    logp = kernels.token_logprobs_and_entropy(hidden, weight, targets, chunk_size=4)[0]
    (got,) = torch.autograd.grad(logp.sum(), hidden)
    (want,) = torch.autograd.grad(reference_logprobs(hidden, weight, targets, 1.0).sum(), hidden)
    torch.testing.assert_close(got, want)


def saved_numels(fn):
    """Sizes of every tensor autograd saves for backward while fn runs."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


def test_token_logprobs_saves_no_logits_at_gpt2_vocab():
    N, C, V = 64, 16, 50257  # GPT-2 vocabulary
    hidden, weight, targets = lm_head_case(N, C, V, dtype=torch.float32)
    chunked = saved_numels(lambda: kernels.token_logprobs_and_entropy(hidden, weight, targets, chunk_size=16)[0])
    assert sorted(chunked) == sorted([N * C, V * C, N, N, 1])  # hidden, weight, targets, logsumexp, 1/T
    eager = saved_numels(lambda: token_logprobs_and_entropy(hidden, weight, targets)[0])
    assert max(eager) >= N * V  # the eager twin keeps the (N, V) logits: the check can tell them apart


def test_default_chunk_holds_a_fixed_number_of_logits_larger_on_a_gpu():
    for device, logits in (("cpu", 2**23), ("cuda", 2**25)):
        for V in (50, 1024, 50257):
            rows = kernels.default_chunk_size(V, torch.device(device))
            assert rows * V <= logits < (rows + 1) * V, (device, V)
    assert kernels.default_chunk_size(2**26, torch.device("cpu")) == 1  # a vocabulary above the budget: one row


def test_token_logprobs_one_chunk_keeps_its_softmax_for_the_backward():
    N, C, V = 12, 4, 50
    hidden, weight, targets = lm_head_case(N, C, V, dtype=torch.float64)
    one_chunk = saved_numels(lambda: kernels.token_logprobs_and_entropy(hidden, weight, targets, chunk_size=N)[0])
    assert sorted(one_chunk) == sorted([N * C, V * C, N, N, 1, N * V])  # ... and the (N, V) softmax
    with torch.no_grad():  # no backward to come: nothing kept
        kept = saved_numels(lambda: kernels.token_logprobs_and_entropy(hidden, weight, targets, chunk_size=N)[0])
        assert kept == []
    two_chunks = kernels.token_logprobs_and_entropy(hidden, weight, targets, chunk_size=N - 1)[0]
    kept = kernels.token_logprobs_and_entropy(hidden, weight, targets, chunk_size=N)[0]
    grad_out = torch.randn(N, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((kept * grad_out).sum(), (hidden, weight)),
                    torch.autograd.grad((two_chunks * grad_out).sum(), (hidden, weight))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_gae_scan_math_matches_gae():
    g = torch.Generator().manual_seed(2)
    mask = torch.arange(9)[None, :] < torch.tensor([9, 4, 1, 0, 6])[:, None]
    rewards = torch.randn(5, 9, generator=g, dtype=torch.float64)
    values = torch.randn(5, 9, generator=g, dtype=torch.float64)
    for discount, lam in [(1.0, 0.95), (0.9, 0.5), (1.0, 0.0)]:
        got = kernels._gae_scan(rewards, values, mask, torch.tensor(discount, dtype=torch.float64),
                                torch.tensor(lam, dtype=torch.float64))
        for a, b in zip(got, rlhf.gae(rewards, values, mask, discount, lam)):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_gelu_decompositions_are_the_tanh_gelu():
    """The decompositions the compiled blocks lower GELU with: GPT-2's tanh GELU, value and gradient, against the
    formula ½·x·(1 + tanh u) written out and its autograd gradient (float64); any other GELU handed to inductor's."""
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64, requires_grad=True)
    by_hand = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    grad_out = torch.randn(2001, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = torch.autograd.grad(by_hand, x, grad_out)[0]
    inductors = lambda *args, approximate: ("inductor's", approximate)  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(kernels._gelu(inductors, x, approximate="tanh"), by_hand, atol=1e-12, rtol=0)
        torch.testing.assert_close(kernels._gelu_backward(inductors, grad_out, x, approximate="tanh"), want,
                                   atol=1e-12, rtol=0)
        assert kernels._gelu(inductors, x) == ("inductor's", "none")
        assert kernels._gelu_backward(inductors, grad_out, x) == ("inductor's", "none")


def test_compiled_blocks_are_the_models_own(monkeypatch):
    """compile_model hands the model's own GPT.blocks to torch.compile (here an identity that records what it is
    given), with the GELU hook as its backend: an edit to model.py's Block.forward reaches the compiled path."""
    given = []
    monkeypatch.setattr(kernels, "_compiled", lambda fn, **options: given.append((fn, options)) or fn)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16)).double()
    eager = copy.deepcopy(model)
    with kernels.compiling():
        kernels.compile_model(model)
    assert given == [(GPT.blocks, {"dynamic": True, "backend": kernels._inductor_gelu_as_sigmoid})]
    idx = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model.hidden_states(idx, start=4), eager.hidden_states(idx, start=4),
                               atol=1e-12, rtol=0)  # the plain attention (use_sdpa off on CPU) vs SDPA
    forward = Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, x, *args: 2 * forward(self, x, *args))  # a fork's edit
    edited = model.hidden_states(idx, start=4)
    torch.testing.assert_close(edited, eager.hidden_states(idx, start=4), atol=1e-12, rtol=0)
    monkeypatch.undo()
    assert not torch.allclose(edited, eager.hidden_states(idx, start=4))  # the edit changed what both compute


def test_one_switch():
    """use_compile is the default (CUDA on, CPU off); enable sets the switch, compiling sets it for a block; off,
    compile_model leaves a model as it was."""
    assert not kernels.use_compile("cpu") and kernels.use_compile("cuda:0")
    assert kernels.enable(None, "cpu") is False and not kernels.enabled
    with kernels.compiling():
        assert kernels.enabled
        with kernels.compiling(False):
            assert not kernels.enabled
        assert kernels.enabled
    assert not kernels.enabled
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    assert kernels.compile_model(model).blocks.__func__ is GPT.blocks and model.use_sdpa
    assert model.logprobs_and_entropy.__func__ is GPT.logprobs_and_entropy


# ----------------------------------------------------------------------------------------------------------------
# compiled == eager

@pytest.mark.slow
# N = 18 = 8 + 8 + 2 rows (each chunk's logits recomputed in the backward), or one chunk whose softmax is kept: each
# path's graphs compiled once, in one dtype (float32 is also covered by test_ppo's compiled run, one chunk)
@pytest.mark.parametrize("dtype,atol,chunk_size", [(torch.float32, 1e-4, 8), (torch.float64, 1e-10, 64)])
def test_token_logprobs_compiled_matches_eager(dtype, atol, chunk_size):
    graphs = []
    for temperature, lead in [(0.7, (2, 9)), (1.3, (2, 9)), (1.0, (3, 5))]:
        hidden, weight, targets = lm_head_case(N=None, C=16, V=37, dtype=dtype, lead=lead)
        with kernels.compiling():
            got = kernels.token_logprobs_and_entropy(hidden, weight, targets, temperature, chunk_size)
        want = kernels.token_logprobs_and_entropy(hidden, weight, targets, temperature, chunk_size)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=atol, rtol=0)
        grads_got = torch.autograd.grad(got[0].sum(), (hidden, weight))
        grads_want = torch.autograd.grad(want[0].sum(), (hidden, weight))
        for a, b in zip(grads_got, grads_want):
            torch.testing.assert_close(a, b, atol=atol, rtol=0)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[2] == graphs[1] == graphs[0]  # new temperatures, row counts and ragged chunks reuse the graphs


def ragged_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T) right-padded


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64])  # float32: test_ppo's compiled run
def test_ppo_loss_compiled_matches_eager(dtype):
    g = torch.Generator().manual_seed(3)
    for B, T, lengths in [(4, 6, [6, 2, 5, 1]), (3, 9, [9, 0, 4])]:  # a new shape and an empty row
        mask = ragged_mask(lengths, T)
        old_logprobs, advantages, old_values, returns = torch.randn(4, B, T, generator=g, dtype=dtype)
        logprobs = (old_logprobs + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)).requires_grad_()
        values = (old_values + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)).requires_grad_()
        logprobs.data[~mask] = 30.0  # garbage on padding (ratio e^30): the masked means must not see it
        args = (logprobs, old_logprobs, advantages, values, old_values, returns, mask)
        with kernels.compiling():
            got = kernels.compiled(rlhf.ppo_losses)(*args, 0.2, 0.2)
        pg_loss, stats = rlhf.policy_loss(logprobs, old_logprobs, advantages, mask, 0.2)  # eager, from rlhf
        want = (pg_loss, rlhf.value_loss(values, old_values, returns, mask, 0.2), stats)
        assert got[0].dtype == dtype and torch.isfinite(got[0])
        for a, b in zip(got[:2], want[:2]):
            torch.testing.assert_close(a, b)
        for key in want[2]:
            torch.testing.assert_close(got[2][key], want[2][key])
        grads_got = torch.autograd.grad(got[0] + got[1], (logprobs, values))
        grads_want = torch.autograd.grad(want[0] + want[1], (logprobs, values))
        for a, b in zip(grads_got, grads_want):
            torch.testing.assert_close(a, b)
            assert (a[~mask] == 0).all()  # no gradient reaches padding


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32])  # compiled once; float64: test_gae_scan_math_matches_gae
def test_ranking_loss_and_gae_compiled_match_eager(dtype):
    g = torch.Generator().manual_seed(4)
    rewards = torch.randn(3, 4, generator=g, dtype=dtype, requires_grad=True)
    ranks = torch.tensor([[0, 1, 1, 2], [2, 0, 1, 3], [0, 0, 1, 1]])
    mask = ragged_mask([4, 3, 2], 4)
    with kernels.compiling():
        got = kernels.compiled(rlhf.ranking_loss)(rewards, ranks, mask)
    want = rlhf.ranking_loss(rewards, ranks, mask)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, rewards), torch.autograd.grad(want, rewards)):
        torch.testing.assert_close(a, b)
    for B, T, lengths in [(3, 7, [7, 3, 5]), (2, 11, [1, 11])]:  # a new shape reuses the dynamic graph
        token_mask = ragged_mask(lengths, T)
        token_rewards, values = torch.randn(2, B, T, generator=g, dtype=dtype)
        for discount, lam in [(1.0, 0.95), (0.9, 0.5)]:
            with kernels.compiling():
                got = kernels.gae(token_rewards, values, token_mask, discount, lam)
            for a, b in zip(got, rlhf.gae(token_rewards, values, token_mask, discount, lam)):
                torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_compiled_model_matches_eager_with_padding_and_does_not_recompile():
    """compile_model (on CPU: the plain attention, GELU lowered as x·σ(2u), fused) == the eager model with SDPA:
    hidden states and every parameter's gradient, for left- and right-padded batches and plain causal ones, from
    position 0 and from a later start (PPO's response positions); a new batch size, length and start and a KV-cached
    prefill (eager by design) reuse what was compiled. In float64 (tight tolerances; float32 is covered by test_ppo's
    compiled-vs-eager run, which costs the compile time anyway)."""
    dtype, atol = torch.float64, 1e-10
    torch.manual_seed(0)
    eager = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16)).to(dtype)
    with kernels.compiling():
        compiled = kernels.compile_model(copy.deepcopy(eager))
    g = torch.Generator().manual_seed(1)

    def check(B, T, pad_side, start=0):
        idx = torch.randint(0, 40, (B, T), generator=g)
        real = ragged_mask(torch.randint(1, T + 1, (B,), generator=g).tolist(), T)  # right-padded
        mask = {"left": real.flip(1), "right": real, None: None}[pad_side]
        weight = torch.ones(B, T, dtype=dtype) if mask is None else torch.where(mask, 1.0, 0.0).to(dtype)
        weight = weight[:, start:]
        outs = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            h = model.hidden_states(idx, attention_mask=mask, start=start)
            (h * weight[..., None]).square().sum().backward()  # real positions only
            outs.append((h[weight.bool()], [p.grad for p in model.parameters()]))
        (h_eager, g_eager), (h_compiled, g_compiled) = outs
        torch.testing.assert_close(h_compiled, h_eager, atol=atol, rtol=0)
        for a, b in zip(g_compiled, g_eager):
            torch.testing.assert_close(a, b, atol=atol, rtol=1e-8)

    check(4, 9, "right")
    check(2, 7, None)
    check(4, 9, "right", start=3)
    check(2, 7, None, start=2)
    with torch._dynamo.config.patch(error_on_recompile=True):
        check(3, 13, "left")
        check(5, 11, None)
        check(3, 13, "left", start=5)
        check(5, 11, None, start=4)
        with torch.no_grad():
            cache = KVCache(2, 3, 2, 16, 8, dtype=dtype)
            prompt = torch.randint(0, 40, (3, 5), generator=g)
            torch.testing.assert_close(compiled.hidden_states(prompt, kv_cache=cache), eager.hidden_states(prompt),
                                       atol=atol, rtol=0)
