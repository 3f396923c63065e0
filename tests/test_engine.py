import pytest
import torch
import torch.nn.functional as F

from nanorlhf import kernels
from nanorlhf.engine import KVCache, cache_length, decode_step, generate, sample
from nanorlhf.model import GPT, GPTConfig

EOS = 0
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11]]


def tiny(eos_bias=2.0, dropout=0.0):
    """A small random model with sharp logits; eos_bias is added to the EOS logit (test-only weight edit) so the
    EOS paths are exercised: ln_f's bias b = eos_bias * w_eos / |w_eos|^2 adds b . w_eos = eos_bias to it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=dropout))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" not in name and "ln_f" not in name:
                p.mul_(5)
        w = model.transformer.wte.weight[EOS]
        model.transformer.ln_f.bias.copy_(eos_bias * w / w.pow(2).sum())
    return model.eval()


def left_pad(prompts, pad_id=EOS):
    P = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts])
    return idx, mask


@pytest.mark.parametrize("sdpa", [True, False])
def test_kv_cache_matches_full_forward(sdpa):
    model = tiny()
    model.use_sdpa = sdpa
    idx, mask = left_pad(PROMPTS)
    B, P = idx.shape
    C = model.config
    cache = KVCache(C.n_layer, B, C.n_head, P + 6, C.n_embd // C.n_head)
    logits = model(idx, attention_mask=mask, kv_cache=cache)  # prefill
    torch.testing.assert_close(logits, model(idx, attention_mask=mask), atol=1e-5, rtol=1e-5)
    torch.manual_seed(1)
    for _ in range(6):
        token = torch.randint(1, 64, (B,))
        step = decode_step(model, token, cache)  # (B, vocab)
        idx = torch.cat([idx, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool)], dim=1)
        full = model(idx, attention_mask=mask)[:, -1]  # no cache, positions from the mask
        torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
    assert int(cache.pos) == P + 6


def response_of(gen, row):
    """The real response tokens of one row."""
    return gen.tokens[row, gen.prompt_len:][gen.response_mask[row]].tolist()


@pytest.mark.parametrize("eos_bias", [0.0, 2.0])
def test_batched_greedy_matches_each_prompt_alone(eos_bias):
    model = tiny(eos_bias)
    batch = generate(model, PROMPTS, 12, eos_id=EOS, pad_id=EOS, greedy=True)
    for i, p in enumerate(PROMPTS):
        alone = generate(model, [p], 12, eos_id=EOS, pad_id=EOS, greedy=True)
        assert response_of(batch, i) == response_of(alone, 0)
        n = len(response_of(alone, 0))
        torch.testing.assert_close(batch.logprobs[i, :n], alone.logprobs[0, :n], atol=1e-5, rtol=1e-5)
    if eos_bias:  # the biased model must really exercise EOS, both early and late
        lengths = batch.response_mask.sum(1)
        assert (lengths < 12).all() and lengths.max() > 1


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = tiny(eos_bias=0.0)
    greedy = generate(model, PROMPTS, 10, eos_id=EOS, pad_id=EOS, greedy=True)
    for kwargs in (dict(top_k=1), dict(top_p=1e-6)):
        sampled = generate(model, PROMPTS, 10, eos_id=EOS, pad_id=EOS, generator=torch.Generator().manual_seed(0),
                           **kwargs)
        assert torch.equal(sampled.tokens, greedy.tokens)
        torch.testing.assert_close(sampled.logprobs, greedy.logprobs)  # full softmax at T=1, before truncation


def test_seeded_sampling_is_reproducible():
    model = tiny()
    runs = [generate(model, PROMPTS, 20, eos_id=EOS, pad_id=EOS, generator=torch.Generator().manual_seed(s))
            for s in (0, 0, 1)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert torch.equal(runs[0].logprobs, runs[1].logprobs)
    assert runs[0].tokens.shape != runs[2].tokens.shape or not torch.equal(runs[0].tokens, runs[2].tokens)


def test_logprobs_match_full_forward():
    model = tiny()
    T = 0.7
    gen = generate(model, PROMPTS, 20, eos_id=EOS, pad_id=EOS, temperature=T,
                   generator=torch.Generator().manual_seed(0))
    P, N = gen.prompt_len, gen.response_mask.size(1)
    logits = model(gen.tokens, attention_mask=gen.attention_mask)  # (B, P+N, V); logits[:, t] predict t+1
    logp = F.log_softmax(logits[:, P - 1: P + N - 1] / T, dim=-1)  # (B, N, V) predicting the response tokens
    expected = logp.gather(-1, gen.tokens[:, P:, None]).squeeze(-1)  # (B, N)
    expected = torch.where(gen.response_mask, expected, 0.0)
    torch.testing.assert_close(gen.logprobs, expected, atol=1e-5, rtol=1e-5)
    assert (gen.logprobs[gen.response_mask] < 0).all()


@pytest.mark.parametrize("pad_id", [EOS, 63])
def test_masks_stop_after_first_eos(pad_id):
    model = tiny()
    gen = generate(model, PROMPTS, 20, eos_id=EOS, pad_id=pad_id, generator=torch.Generator().manual_seed(0))
    P, N = gen.prompt_len, gen.response_mask.size(1)
    assert N <= 20 and gen.tokens.shape == (len(PROMPTS), P + N)
    finished = 0
    for i, p in enumerate(PROMPTS):
        response = gen.tokens[i, P:].tolist()
        expected_mask = [True] * N
        if EOS in response:
            first = response.index(EOS)
            expected_mask = [t <= first for t in range(N)]
            assert all(tok == pad_id for tok in response[first + 1:])
            finished += 1
        assert gen.response_mask[i].tolist() == expected_mask
        assert gen.attention_mask[i].tolist() == [False] * (P - len(p)) + [True] * len(p) + expected_mask
        assert gen.tokens[i, :P].tolist() == [pad_id] * (P - len(p)) + p
        assert (gen.logprobs[i][~gen.response_mask[i]] == 0).all()
    assert 0 < finished < len(PROMPTS) or N < 20  # both an EOS and a row still running, or an early stop


def test_stops_early_when_every_row_is_done():
    gen = generate(tiny(eos_bias=6.0), PROMPTS, 30, eos_id=EOS, pad_id=EOS, generator=torch.Generator().manual_seed(0))
    N = gen.response_mask.size(1)
    assert N < 30
    last = gen.response_mask.sum(1) - 1  # (B,) index of each row's last real response token
    assert (gen.tokens[:, gen.prompt_len:].gather(1, last[:, None]) == EOS).all()
    assert gen.response_mask[:, -1].any()  # the last step was needed by some row


def test_dropout_model_generates_deterministically_in_eval_and_restores_train_mode():
    model = tiny(dropout=0.5).train()
    runs = [generate(model, PROMPTS, 15, eos_id=EOS, pad_id=EOS, generator=torch.Generator().manual_seed(3))
            for _ in range(2)]
    assert model.training
    reference = generate(tiny(dropout=0.0), PROMPTS, 15, eos_id=EOS, pad_id=EOS,
                         generator=torch.Generator().manual_seed(3))
    for run in runs:
        assert torch.equal(run.tokens, reference.tokens)
        torch.testing.assert_close(run.logprobs, reference.logprobs)


def test_length_overflow_raises():
    model = tiny()  # block_size 64
    with pytest.raises(ValueError, match="block_size"):
        generate(model, [[1] * 60], 5, eos_id=EOS, pad_id=EOS)
    generate(model, [[1] * 60], 4, eos_id=EOS, pad_id=EOS, greedy=True)  # exactly fits


def test_decode_step_traces_once_with_fixed_shapes():
    """The one-token decode step compiles to a single graph that does not recompile as the position moves."""
    import torch._dynamo

    model = tiny()
    idx, mask = left_pad(PROMPTS)
    B, P = idx.shape
    C = model.config
    cache = KVCache(C.n_layer, B, C.n_head, P + 4, C.n_embd // C.n_head)
    model(idx, attention_mask=mask, kv_cache=cache)
    torch._dynamo.reset()
    step = torch.compile(decode_step, backend="eager", fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for t in range(4):
            step(model, torch.full((B,), t + 1), cache)


def test_cache_length_buckets_only_with_fixed_shapes():
    assert cache_length(5, 12, 64, fixed_shapes=False) == 17
    assert [cache_length(P, 12, 64, fixed_shapes=True) for P in (4, 5, 20, 21, 52)] == [16, 32, 32, 64, 64]
    assert cache_length(60, 4, 64, fixed_shapes=True) == 64


@pytest.mark.slow
def test_compiled_generation_matches_eager_and_does_not_recompile():
    """Compiled: fixed batch (finished rows decode masked pads), static cache, compiled decode step. Greedy and
    seeded sampled tokens, masks and log-probs equal the eager path's, which drops finished rows instead."""
    check_compiled_generation(tiny(eos_bias=2.0))  # rows finish at different steps


def check_compiled_generation(model):
    """Compiled generation == eager, greedy and sampled with one seed (tokens, masks, log-probs), and a second prompt
    length in the same cache bucket runs without recompiling; returns the eager greedy generation."""
    import torch._dynamo

    def both(prompts, **kw):
        device = model.transformer.wte.weight.device
        out = []
        for on in (False, True):
            with kernels.compiling(on):
                out.append(generate(model, prompts, 20, eos_id=EOS, pad_id=EOS,
                                    generator=torch.Generator(device).manual_seed(0), **kw))
        return out

    for kw in ({"greedy": True}, {"temperature": 1.0}):  # one sampler: the same seed draws the same tokens
        eager, compiled = both(PROMPTS, **kw)
        assert torch.equal(compiled.tokens, eager.tokens), kw
        assert torch.equal(compiled.response_mask, eager.response_mask)
        torch.testing.assert_close(compiled.logprobs, eager.logprobs, atol=1e-5, rtol=1e-5)
        lengths = eager.response_mask.sum(1)
        assert lengths.min() < lengths.max() < 20  # the fixed batch really carried finished rows
    shorter = [p[:2] for p in PROMPTS]  # another prompt length in the same cache bucket: the same graph
    with torch._dynamo.config.patch(error_on_recompile=True):
        eager, again = both(shorter, greedy=True)
    assert torch.equal(again.tokens, eager.tokens)
    return both(PROMPTS, greedy=True)[0]


def test_generation_under_bf16_autocast_matches_its_own_full_forward():
    """PPO rollouts run inside bf16 autocast on GPUs: the cache then holds bf16 keys/values. Greedy tokens from the
    cached decode equal greedy decoding by full forwards under the same autocast, one token at a time."""
    model = tiny(eos_bias=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gen = generate(model, PROMPTS[:1], 6, eos_id=EOS, pad_id=EOS, greedy=True)
        idx = torch.tensor(PROMPTS[:1])
        for _ in range(6):
            idx = torch.cat([idx, model(idx)[:, -1].float().argmax(-1, keepdim=True)], dim=1)
    assert gen.tokens[0].tolist() == idx[0].tolist()


def test_sampler_draws_the_tokens_of_an_exponential_race_with_exponential_():
    """engine.sample's noise, −log(1 − U) with U uniform in float64, is what exponential_ draws on CPU from the same
    generator: the same tokens as the race written with exponential_, and the same generator state after."""
    g_ref, g = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for B, V, temperature in [(64, 2048, 1.0), (3, 7, 0.7), (2, 50257, 1.3)]:
        logits = torch.randn(B, V, generator=torch.Generator().manual_seed(B)) * 3
        probs = F.softmax(logits / temperature, dim=-1)
        want = (probs / torch.empty_like(probs).exponential_(generator=g_ref)).argmax(dim=-1)
        assert torch.equal(sample(logits, temperature, generator=g)[0], want)
    assert torch.equal(g.get_state(), g_ref.get_state())


def test_sampler_draws_from_the_tempered_softmax():
    """The sampler draws from softmax(logits / T), and with top_k the renormalized top k: 200,000 seeded draws,
    every frequency within 4.5 standard errors of its probability (a truncated token, probability 0, never drawn)."""
    logits = torch.tensor([2.0, 0.5, -1.0, 1.5, 0.0, -3.0])
    n = 200_000
    for temperature, top_k in [(0.7, None), (1.3, 3)]:
        p = F.softmax(logits / temperature, dim=-1)
        if top_k is not None:
            p = torch.where(p >= p.topk(top_k).values[-1], p, 0.0)
            p = p / p.sum()
        g = torch.Generator().manual_seed(0)
        token, logprob = sample(logits.expand(n, -1), temperature, top_k=top_k, generator=g)
        freq = torch.bincount(token, minlength=len(logits)).double() / n
        stderr = (p * (1 - p) / n).sqrt().double()
        assert ((freq - p.double()).abs() <= 4.5 * stderr + 1e-12).all(), (freq, p)
        torch.testing.assert_close(logprob, F.log_softmax(logits / temperature, dim=-1)[token])  # before truncation
