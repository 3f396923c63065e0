import math

import pytest
import torch

from nanorlhf.model import GPT, GPTConfig, gelu, read_safetensors

CONFIG = dict(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=32)


def tiny(head="lm", **overrides):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**CONFIG, **overrides}), head=head)
    with torch.no_grad():  # larger weights than GPT-2 init so masking mistakes show up clearly in the outputs
        for name, p in model.named_parameters():
            if ".ln_" not in name and "ln_f" not in name:
                p.mul_(5)
    return model.eval()


def padded(seqs, side, pad=7):
    """Batch (B, T) of token lists padded on `side` with a junk (non-zero) token, and its mask."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        idx[i, cols] = torch.tensor(s)
        mask[i, cols] = True
    return idx, mask


SEQS = [[3, 14, 15, 9, 2, 6], [5, 3], [8, 9, 7, 9, 3, 2, 3, 8, 4], [1]]


@pytest.mark.parametrize("side", ["left", "right", None])
def test_sdpa_matches_plain_attention(side):
    model = tiny()
    if side is None:
        idx, mask = torch.randint(0, 50, (3, 12)), None
    else:
        idx, mask = padded(SEQS, side)
    model.use_sdpa = True
    fast = model(idx, attention_mask=mask)
    model.use_sdpa = False
    slow = model(idx, attention_mask=mask)
    assert torch.isfinite(slow).all() and torch.isfinite(fast).all()
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("sdpa", [True, False])
def test_padded_batch_matches_each_sequence_alone(side, sdpa):
    model = tiny()
    model.use_sdpa = sdpa
    idx, mask = padded(SEQS, side)
    h = model.hidden_states(idx, attention_mask=mask)  # (B, T, C)
    assert torch.isfinite(h).all()  # padded queries attend to themselves: no NaN rows
    for i, s in enumerate(SEQS):
        alone = model.hidden_states(torch.tensor([s]))[0]  # (len, C), no mask, positions 0..len-1
        torch.testing.assert_close(h[i][mask[i]], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right", None])
@pytest.mark.parametrize("sdpa", [True, False])
@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_forward_from_start_equals_the_full_forward_sliced(side, sdpa, head):
    """start > 0 runs the last block on the positions start.. only: the same outputs and every parameter's
    gradient as the whole forward, sliced (float64). A wrong query/key alignment or mask row would differ."""
    model = tiny(head).double()
    model.use_sdpa = sdpa
    idx, mask = (torch.randint(0, 50, (3, 12)), None) if side is None else padded(SEQS, side)
    start = 4
    outs = []
    for s in (0, start):
        model.zero_grad(set_to_none=True)
        y = model(idx, attention_mask=mask, start=s)  # (B, T − s, ...)
        y = y[:, start - s:]
        w = torch.ones(y.shape[:2], dtype=y.dtype) if mask is None else mask[:, start:].to(y.dtype)
        (y.square() * (w if head == "scalar" else w[..., None])).sum().backward()  # real positions only
        outs.append((y[w.bool()], [p.grad.clone() for p in model.parameters()]))
    (y_full, g_full), (y_start, g_start) = outs
    assert y_start.shape == y_full.shape
    torch.testing.assert_close(y_start, y_full, atol=1e-10, rtol=0)
    for a, b in zip(g_start, g_full):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    with pytest.raises(ValueError, match="start"):
        model.hidden_states(idx[:, :2], kv_cache=object(), start=1)


def test_scalar_head_shape_and_right_padding_invariance():
    model = tiny(head="scalar")
    idx, mask = padded(SEQS, "right")
    scores = model(idx, attention_mask=mask)
    assert scores.shape == idx.shape
    for i, s in enumerate(SEQS):
        alone = model(torch.tensor([s]))[0]  # (len,)
        torch.testing.assert_close(scores[i, : len(s)], alone, atol=1e-5, rtol=1e-5)
    # whatever comes after the last real token (junk, masked or not) never changes earlier scores
    junk = idx.clone()
    junk[~mask] = torch.randint(0, 50, (int((~mask).sum()),))
    for m in (mask, torch.ones_like(mask)):
        torch.testing.assert_close(model(junk, attention_mask=m)[mask], scores[mask], atol=1e-5, rtol=1e-5)
    # scalar and LM models share the trunk; the scalar head adds only score's C + 1 parameters
    assert model.num_params() == tiny().num_params() + CONFIG["n_embd"] + 1
    assert model.lm_head.weight is model.transformer.wte.weight


def test_num_params_and_flops_closed_form():
    model = tiny()
    V, Tb, L, C = CONFIG["vocab_size"], CONFIG["block_size"], CONFIG["n_layer"], CONFIG["n_embd"]
    # per layer: 2 LayerNorms 4C, c_attn 3C^2+3C, attn c_proj C^2+C, c_fc 4C^2+4C, mlp c_proj 4C^2+C
    n = V * C + Tb * C + L * (12 * C * C + 13 * C) + 2 * C
    assert model.num_params() == n
    assert model.flops_per_token(16) == 6 * (n - Tb * C) + 12 * L * C * 16


def test_dropout_only_in_train_mode():
    model = tiny(dropout=0.5)
    reference = tiny()
    idx = torch.randint(0, 50, (2, 10))
    torch.testing.assert_close(model(idx), reference(idx))
    model.train()
    assert not torch.allclose(model(idx), reference(idx))


def test_resize_token_embeddings_keeps_old_logits():
    model = tiny()
    idx, mask = padded(SEQS, "left")
    before = model(idx, attention_mask=mask)
    old_wte = model.transformer.wte.weight.detach().clone()
    model.resize_token_embeddings(53)
    after = model(idx, attention_mask=mask)
    assert after.shape[-1] == 53 and model.config.vocab_size == 53
    torch.testing.assert_close(after[..., :50], before)
    torch.testing.assert_close(model.transformer.wte.weight[50:], old_wte.mean(0).expand(3, -1))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.isfinite(model(torch.tensor([[50, 51, 52]]))).all()


def _hf_model(tmp_path, cls_name):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100)
    hf = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():  # random biases and LayerNorms too, so a missed transpose or key shows up
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


def _save(hf, folder, fmt):
    """save_pretrained writes model.safetensors; for "bin" replace it with an old-style pytorch_model.bin,
    which also held the causal-mask buffers attn.bias / attn.masked_bias."""
    hf.save_pretrained(folder)
    if fmt == "bin":
        state = hf.state_dict()
        prefix = "transformer." if any(k.startswith("transformer.") for k in state) else ""
        state[prefix + "h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
        state[prefix + "h.0.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(state, folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_gpt2_parity_lm_head(tmp_path, fmt):
    hf = _hf_model(tmp_path, "GPT2LMHeadModel")  # keys carry the "transformer." prefix
    _save(hf, tmp_path, fmt)
    model = GPT.from_pretrained(str(tmp_path)).eval()
    assert model.config.block_size == 64 and model.config.vocab_size == 100
    idx = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        expected = hf(idx).logits
    torch.testing.assert_close(model(idx), expected, atol=1e-4, rtol=1e-4)


def test_gpt2_parity_trunk_without_prefix_and_scalar_head(tmp_path):
    hf = _hf_model(tmp_path, "GPT2Model")  # keys without the "transformer." prefix
    _save(hf, tmp_path, "bin")
    idx = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        expected = hf(idx).last_hidden_state
    for head in ("lm", "scalar"):
        model = GPT.from_pretrained(str(tmp_path), head=head).eval()
        torch.testing.assert_close(model.hidden_states(idx), expected, atol=1e-4, rtol=1e-4)
    assert model(idx).shape == (2, 20)


def test_builtin_safetensors_reader_matches_package(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(4).half(),
               "d": torch.randn(2, 2).bfloat16(), "e": torch.zeros(0, 3)}
    safetensors_torch.save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    loaded = read_safetensors(str(tmp_path / "x.safetensors"))
    assert loaded.keys() == tensors.keys()
    for k in tensors:
        assert loaded[k].dtype == tensors[k].dtype
        torch.testing.assert_close(loaded[k], tensors[k])


def test_from_pretrained_missing_files_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(
        '{"n_layer": 1, "n_head": 1, "n_embd": 8, "n_positions": 8, "vocab_size": 10}')
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin") as err:
        GPT.from_pretrained(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_forward_flops_matches_torch_flop_counter():
    """Independent count: torch's FlopCounterMode over the plain attention path (its matmuls are counted; the
    flash kernel's are not), plus the 2 FLOPs per token that the PaLM count also charges each bias and LayerNorm
    weight (the parameters that are not matrices)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=300, n_layer=2, n_head=4, n_embd=64)).eval()
    model.use_sdpa = False
    idx = torch.randint(0, 300, (2, 16))
    vectors = sum(p.numel() for p in model.parameters() if p.dim() < 2)
    for n_lm, run in ((32, lambda: model(idx)), (16, lambda: model.lm_head(model.hidden_states(idx)[:, 8:]))):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            run()
        assert model.forward_flops(32, n_lm, 16) == counter.get_total_flops() + 2 * vectors * 32
    # from position 12: 4 of 16 tokens per row leave the last block; the other 12 pass its ln_1 and c_attn only
    last = model.transformer.h[-1]
    skipped = [last.ln_2, last.attn.c_proj, last.mlp, model.transformer.ln_f]  # run for the 8 output tokens only
    skipped_vectors = sum(p.numel() for m in skipped for p in m.parameters() if p.dim() < 2)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.lm_head(model.hidden_states(idx, start=12))
    want = counter.get_total_flops() + 2 * vectors * 8 + 2 * (vectors - skipped_vectors) * 24
    assert model.forward_flops(32, 8, 16, n_out=8) == want


def test_gelu_is_the_tanh_gelu():
    """gelu is GPT-2's tanh GELU, checked against the formula written out (float64), value and gradient."""
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64, requires_grad=True)
    by_hand = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    y = gelu(x)
    torch.testing.assert_close(y, by_hand, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(by_hand.sum(), x)[0],
                               atol=1e-12, rtol=0)
