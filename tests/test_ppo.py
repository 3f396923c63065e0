"""train_ppo.py wiring: alignment of log-probs / values / rewards, the EOS reward, KL, whitening, the ptx gradient,
lr-0 ratios, and subprocess runs (smoke, resume, determinism). The rlhf math itself is tested in test_rlhf.py."""
import copy
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import train_ppo
from nanorlhf import kernels, rlhf
from nanorlhf.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from nanorlhf.common import epoch_batch, token_stream
from nanorlhf.reward import score_texts
from nanorlhf.engine import generate
from nanorlhf.config import PPOConfig
from nanorlhf.model import GPT, GPTConfig
from nanorlhf.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["what color is the fox?", "name two fruits.", "what is 3 plus 4?", "reverse the words: cow lime hat",
           "why is the banana blue?", "is the lemon sweet or sour?", "what is the capital of peru?", "hi"]


def tiny_checkpoints(folder, dropout=0.0):
    """A 1-layer LM (stand-in SFT) and a 1-layer scalar model (stand-in RM) with the tiny tokenizer, as files."""
    tok = Tokenizer.load("tiny")
    torch.manual_seed(0)
    mconf = GPTConfig(block_size=64, vocab_size=1024, n_layer=1, n_head=2, n_embd=32, dropout=dropout)
    paths = {}
    for head in ("lm", "scalar"):
        model = GPT(mconf, head=head)
        paths[head] = os.path.join(folder, f"{head}.pt")
        save_checkpoint(paths[head], make_checkpoint(model, mconf, head, tok, {}, 0))
    return paths


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return tiny_checkpoints(str(tmp_path_factory.mktemp("ckpts")))


def make_cfg(paths, **kw):
    kw = {"max_new_tokens": 12, "batch_size": 8, "minibatch_size": 4, "ppo_epochs": 2, **kw}
    return PPOConfig(init=paths["lm"], reward_model=paths["scalar"], **kw)


def rollout_batch(cfg, seed=0):
    """(models, rollout b, P, advantages, returns) of one batch of PROMPTS, as train_ppo.main computes them."""
    torch.manual_seed(seed)
    models = train_ppo.load_models(cfg, "cpu")
    b, P, _ = train_ppo.rollout(*models, PROMPTS, cfg)
    return (models, b, P, *advantages_of(b, cfg))


def advantages_of(b, cfg):
    """Steps 2 and 3 of train_ppo.main: eq. (2)'s per-token rewards (β in them if the estimator's KL is in the
    reward), then the estimator's advantages, whitened if its row says so, and the returns R = A + V (None without a
    value model)."""
    estimator, m = train_ppo.ESTIMATORS[cfg.estimator], b["response_mask"]
    rewards, _, _ = rlhf.ppo_rewards(b["scores"], b["finished"], b["logprobs"], b["ref_logprobs"], m,
                                     cfg.kl_coef if estimator.kl == "reward" else 0.0)
    advantages = estimator.advantages(rewards, b["values"], m, cfg)
    returns = advantages + b["values"] if estimator.value_model else None
    return (rlhf.masked_whiten(advantages, m) if estimator.whiten else advantages), returns


def training_batch(b, advantages, returns):
    """The rollout's tensors that the update reads, with the advantages and returns (as train_ppo.ppo_update)."""
    return {**{k: v for k, v in b.items() if torch.is_tensor(v) and k != "gold"}, "advantages": advantages,
            **({"returns": returns} if returns is not None else {})}


# ----------------------------------------------------------------------------------------------------------------
# alignment and rewards

def test_lr0_first_minibatch_ratio_one_even_with_dropout_in_config(tmp_path):
    paths = tiny_checkpoints(str(tmp_path), dropout=0.5)  # the update must not run with dropout on
    cfg = make_cfg(paths, lr=0.0, value_lr=0.0)
    (policy, _, _, value_model, _), b, P, advantages, returns = rollout_batch(cfg)
    opts = [torch.optim.Adam(m.parameters(), lr=0.0) for m in (policy, value_model)]
    torch.manual_seed(1)
    perm = torch.randperm(len(b["tokens"]))
    idx = perm[:cfg.minibatch_size]  # the first minibatch train_ppo.ppo_update will draw under the same seed
    mb = {k: v[idx] for k, v in training_batch(b, advantages, returns).items()}
    _, _, stats = train_ppo.minibatch_loss(policy, value_model, mb, P, None, cfg)
    assert stats["ratio"].item() == 1.0 and stats["approx_kl"].item() == 0.0 and stats["clipfrac"].item() == 0.0
    logprobs, _ = rlhf.response_logprobs_and_entropy(policy, mb["tokens"], mb["mask"], P, cfg.temperature)
    assert torch.equal(logprobs, b["logprobs"][idx])  # token by token, bitwise
    torch.manual_seed(1)
    stats = train_ppo.ppo_update(policy, value_model, opts, b, advantages, returns, P, cfg, step=0)
    assert stats["ratio"] == 1.0 and stats["approx_kl"] == 0.0 and stats["clipfrac"] == 0.0


def reference_checkpoint(paths, folder):
    """An LM like paths["lm"] with other weights: a reference π_SFT that differs from the initial policy, so that
    old (rollout) and reference log-probs are different numbers and cannot be swapped unseen."""
    ckpt = load_checkpoint(paths["lm"])
    torch.manual_seed(1)
    other = GPT(GPTConfig(**ckpt["model_config"]))
    path = os.path.join(folder, "reference.pt")
    save_checkpoint(path, make_checkpoint(other, other.config, "lm", Tokenizer.load("tiny"), {}, 0))
    return path


@pytest.mark.parametrize("estimator, k", [("gae", 1), ("grpo", 2)])
def test_lr0_ratio_is_against_the_rollout_not_the_reference(ckpts, tmp_path, estimator, k):
    """With a reference unlike the policy, an lr-0 update's importance ratio π_θ/π_old is exactly 1: the ratio is
    taken against the rollout's log-probs, never the reference's."""
    cfg = make_cfg(ckpts, lr=0.0, value_lr=0.0, reference=reference_checkpoint(ckpts, str(tmp_path)),
                   estimator=estimator, group_size=k)
    (policy, _, _, value_model, _), b, P, advantages, returns = rollout_batch(cfg)
    m = b["response_mask"]
    assert (b["logprobs"] - b["ref_logprobs"])[m].abs().min() > 1e-3  # every token: the two differ
    opts = [torch.optim.Adam(mod.parameters(), lr=0.0) for mod in (policy, value_model) if mod is not None]
    stats = train_ppo.ppo_update(policy, value_model, opts, b, advantages, returns, P, cfg, step=0, kl_coef=0.1)
    assert stats["ratio"] == 1.0 and stats["approx_kl"] == 0.0 and stats["clipfrac"] == 0.0


def test_grpo_kl_term_is_k3_against_the_reference(ckpts, tmp_path):
    """GRPO's loss term β·KL(π_θ || π_ref) is the k3 estimate against the reference's log-probs, by hand:
    r = π_ref/π_θ, k3 = r − 1 − log r, averaged over the real tokens (at lr 0, π_θ is the rollout's policy)."""
    cfg = make_cfg(ckpts, reference=reference_checkpoint(ckpts, str(tmp_path)), estimator="grpo", group_size=2)
    (policy, _, _, value_model, _), b, P, advantages, returns = rollout_batch(cfg)
    assert value_model is None and train_ppo.ESTIMATORS["grpo"].kl == "loss"
    _, terms, _ = train_ppo.minibatch_loss(policy, value_model, training_batch(b, advantages, returns), P, None, cfg,
                                           kl_coef=0.3)
    total, n = 0.0, 0
    for i in range(len(b["tokens"])):
        for t in range(b["response_mask"].shape[1]):
            if b["response_mask"][i, t]:
                log_r = b["ref_logprobs"][i, t].item() - b["logprobs"][i, t].item()
                total, n = total + (math.exp(log_r) - 1 - log_r), n + 1
    assert total / n > 1e-3
    assert terms["kl"].item() == pytest.approx(0.3 * total / n, rel=1e-5)


def test_rloo_takes_the_sequence_reward_with_its_kl(ckpts, tmp_path):
    """RLOO's advantage of a sample is its sequence reward of eq. (2), RM score − β·Σ_t log(π/π_SFT), minus the
    mean of the other samples' of its prompt: computed here by hand from the rollout's numbers."""
    cfg = make_cfg(ckpts, reference=reference_checkpoint(ckpts, str(tmp_path)), estimator="rloo", group_size=4)
    _, b, _, advantages, _ = rollout_batch(cfg)
    m = b["response_mask"]
    final = b["scores"] - cfg.missing_eos_penalty * (~b["finished"]).float()  # eq. (2)'s reward at the last token
    sequence = [final[i].item() - cfg.kl_coef * (b["logprobs"][i] - b["ref_logprobs"][i])[m[i]].sum().item()
                for i in range(len(m))]
    for i in range(len(m)):
        group = range(i - i % 4, i - i % 4 + 4)
        expected = sequence[i] - sum(sequence[j] for j in group if j != i) / 3
        assert advantages[i][m[i]].tolist() == pytest.approx([expected] * int(m[i].sum()), abs=1e-5)
        assert (advantages[i][~m[i]] == 0).all()


def test_eager_ppo_iteration_calls_nothing_in_kernels(ckpts, monkeypatch):
    """With compilation off (the CPU default), one whole PPO-ptx iteration (rollout, eq. (2) rewards, GAE,
    ppo_epochs passes of clipped updates with ptx) is plain PyTorch: every function of kernels.py, patched to raise,
    is never called."""
    cfg = make_cfg(ckpts, compile=False, ptx_coef=0.5)
    kernels.enable(cfg.compile)
    models = train_ppo.load_models(cfg, "cpu")
    policy, value_model, tok = models[0], models[3], models[4]
    for name, fn in vars(kernels).items():
        if callable(fn) and getattr(fn, "__module__", None) == kernels.__name__:
            monkeypatch.setattr(kernels, name, lambda *a, _name=name, **k: pytest.fail(f"kernels.{_name} called"))
    torch.manual_seed(0)
    b, P, _ = train_ppo.rollout(*models, PROMPTS, cfg)
    advantages, returns = advantages_of(b, cfg)
    stream = token_stream(tok, ["the fox is red. the lemon is sour."] * 20)
    stats = train_ppo.ppo_update(policy, value_model, train_ppo.make_optimizers(policy, value_model, cfg), b,
                                 advantages, returns, P, cfg, 0, ptx_stream=stream)
    assert stats["ptx_loss"] > 0 and stats["value_loss"] > 0


def test_kl_zero_when_policy_is_reference(ckpts):
    cfg = make_cfg(ckpts)
    _, b, *_ = rollout_batch(cfg)
    assert torch.equal(b["logprobs"], b["ref_logprobs"])
    for kind in ("k1", "k3"):
        rewards, kl, _ = rlhf.ppo_rewards(b["scores"], b["finished"], b["logprobs"], b["ref_logprobs"],
                                          b["response_mask"], 0.1, kind)
        assert torch.count_nonzero(kl) == 0
        assert torch.count_nonzero(rewards) <= len(rewards)  # only the final token of each response is rewarded


def test_rewards_hand_case():
    """RM score on the last real token (EOS), lowered by the missing-EOS penalty if it never ended, −β·k1 on every
    real token."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 7.0], [-0.2, 9.0, 9.0, 9.0], [-1.0, -1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5, -9.0], [-0.7, 3.0, 3.0, 3.0], [-2.0, -1.0, -1.0, -3.0]])
    scores, finished = torch.tensor([0.7, -0.3, 2.0]), torch.tensor([True, True, False])
    rewards, kl, final = rlhf.ppo_rewards(scores, finished, logprobs, ref_logprobs, mask, kl_coef=0.1,
                                          missing_eos_penalty=1.5)
    expected = torch.tensor([[-0.05, 0.1, 0.0 + 0.7, 0.0],
                             [-0.05 - 0.3, 0.0, 0.0, 0.0],
                             [-0.1, 0.0, 0.0, -0.2 + 2.0 - 1.5]])  # row 3 never ended: its RM score 2.0 minus 1.5
    torch.testing.assert_close(rewards, expected)
    torch.testing.assert_close(final, torch.tensor([0.7, -0.3, 0.5]))
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [0.5, 0, 0, 0], [1.0, 0.0, 0.0, 2.0]]))


@pytest.mark.parametrize("penalty", [0.0, 0.5, 3.0])
def test_not_finishing_never_pays(penalty):
    """At any RM score, a response without EOS earns no more than the same response with EOS; and the order of
    RM scores is kept among unfinished responses (the penalty shifts, it does not replace)."""
    scores = torch.linspace(-5.0, 5.0, 21)
    mask = torch.ones(21, 3, dtype=torch.bool)
    zeros = torch.zeros(21, 3)
    ended = rlhf.ppo_rewards(scores, torch.ones(21, dtype=torch.bool), zeros, zeros, mask, 0.1,
                             missing_eos_penalty=penalty)[0].sum(1)
    unended = rlhf.ppo_rewards(scores, torch.zeros(21, dtype=torch.bool), zeros, zeros, mask, 0.1,
                               missing_eos_penalty=penalty)[0].sum(1)
    assert (unended <= ended).all()
    torch.testing.assert_close(ended - unended, torch.full((21,), penalty))
    assert (unended.diff() > 0).all()  # a better RM score is still better without EOS


def test_rm_scores_the_text_as_it_was_trained_on_it(ckpts):
    """The RM score PPO uses for a sample is the score of its decoded text as train_rm builds RM inputs
    (prompt template + text + EOS if it ended), computed here by hand on the unpadded sequence; a sample whose ids
    are a non-canonical split of its text, or hold a template token, gets its canonical text's score."""
    cfg = make_cfg(ckpts, temperature=0.7)
    (policy, _, reward_model, _, tok), b, P, _, _ = rollout_batch(cfg)
    responses = [tok.decode_response(row) for row in b["tokens"][:, P:].tolist()]
    with torch.no_grad():
        for i, (p, y) in enumerate(zip(PROMPTS, responses)):
            ids = [tok.prompt_id] + tok.encode(p) + [tok.response_id] + tok.encode(y) + [tok.eos_id] * b["finished"][i]
            assert b["scores"][i].item() == pytest.approx(reward_model(torch.tensor([ids]))[0, -1].item(), abs=1e-5)
    # a hand-made policy output: "the fox" spelled one byte-token at a time, then a stray template token, then EOS
    text = "the fox is orange."
    odd = [tok.encode(ch)[0] for ch in text] + [tok.prompt_id, tok.eos_id]
    assert tok.decode_response(odd) == text and odd[:-1] != tok.encode(text)
    canonical = torch.tensor([tok.format_example(PROMPTS[0], text, True)[0]])
    with torch.no_grad():
        want = reward_model(canonical)[0, -1].item()
        raw = reward_model(torch.tensor([tok.format_prompt(PROMPTS[0]) + odd]))[0, -1].item()
        got = score_texts(reward_model, tok, [PROMPTS[0]], [tok.decode_response(odd)], [True], "cpu")
    assert got.item() == pytest.approx(want, abs=1e-6) and abs(raw - want) > 1e-4


def test_rollout_marks_samples_whose_ids_are_not_the_rm_encoding(ckpts, monkeypatch):
    """b["retokenized"]: a sample is marked when its ids differ from the encoding of its decoded text (+ EOS)."""
    cfg = make_cfg(ckpts)
    policy, ref_policy, reward_model, value_model, tok = train_ppo.load_models(cfg, "cpu")
    canonical, odd = tok.encode("the fox.") + [tok.eos_id], [tok.encode(c)[0] for c in "the fox."] + [tok.eos_id]
    assert canonical != odd

    def fake_generate(model, prompts, *args, **kwargs):
        rows = [canonical, odd]
        P = max(map(len, prompts))
        tokens = torch.full((2, P + len(odd)), tok.pad_id)
        mask = torch.zeros(2, P + len(odd), dtype=torch.bool)
        for i, (x, y) in enumerate(zip(prompts, rows)):
            tokens[i, P - len(x):P], mask[i, P - len(x):P] = torch.tensor(x), True
            tokens[i, P:P + len(y)], mask[i, P:P + len(y)] = torch.tensor(y), True
        return type("Gen", (), {"tokens": tokens, "attention_mask": mask, "prompt_len": P})

    monkeypatch.setattr(train_ppo, "generate", fake_generate)
    b, P, responses = train_ppo.rollout(policy, ref_policy, reward_model, value_model, tok, PROMPTS[:1] * 2, cfg)
    assert responses == ["the fox.", "the fox."] and b["retokenized"].tolist() == [False, True]
    assert b["scores"][0].item() == pytest.approx(b["scores"][1].item(), abs=1e-6)  # same text → same RM score


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_score_aligns_logprobs_values(ckpts, temperature, monkeypatch):
    """A hand-built batch (the sampler's output): left-padded prompts, responses with and without EOS, pads (= EOS
    id) after the EOS. Each row of the rollout is compared with a forward over its real tokens alone."""
    cfg = make_cfg(ckpts, temperature=temperature)
    policy, ref_policy, reward_model, value_model, tok = train_ppo.load_models(cfg, "cpu")
    with torch.no_grad():  # a policy different from the reference, so the two log-prob rows differ
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    eos, P = tok.eos_id, 4
    rows = [([5, 6, 7], [20, 21, eos]), ([8, 9, 10, 11], [30, 31, 32, 33]), ([12], [eos])]
    N = 4
    tokens = torch.full((3, P + N), eos)
    mask = torch.zeros(3, P + N, dtype=torch.bool)
    for i, (x, y) in enumerate(rows):
        tokens[i, P - len(x):P], mask[i, P - len(x):P] = torch.tensor(x), True
        tokens[i, P:P + len(y)], mask[i, P:P + len(y)] = torch.tensor(y), True
    monkeypatch.setattr(train_ppo, "generate", lambda *a, **k: type("Gen", (), {
        "tokens": tokens, "attention_mask": mask, "prompt_len": P}))
    b, _, _ = train_ppo.rollout(policy, ref_policy, reward_model, value_model, tok, PROMPTS[:3], cfg)
    assert b["finished"].tolist() == [True, False, True]
    assert b["response_mask"].sum(1).tolist() == [3, 4, 1]
    with torch.no_grad():
        for i, (x, y) in enumerate(rows):
            ids = torch.tensor([x + y])  # (1, L) real tokens only, no padding
            for model, key in ((policy, "logprobs"), (ref_policy, "ref_logprobs")):
                logp = F.log_softmax(model(ids)[0] / temperature, dim=-1)  # (L, V) the sampling distribution
                for j, y_j in enumerate(y):
                    assert b[key][i, j].item() == pytest.approx(logp[len(x) + j - 1, y_j].item(), abs=1e-5)
            v = value_model(ids)[0]  # (L,)
            for j in range(len(y)):
                assert b["values"][i, j].item() == pytest.approx(v[len(x) + j - 1].item(), abs=1e-5)


@pytest.mark.slow
def test_bf16_rollout_scores_in_float32_and_compiled_gae_takes_them(ckpts):
    """On GPUs rollouts run under bf16 autocast: values and scores come back float32, so the compiled GAE (one
    matmul, which needs one dtype) and the eager loop give the same advantages."""
    cfg = make_cfg(ckpts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        models, b, P, _, _ = rollout_batch(cfg)
    assert b["values"].dtype == b["scores"].dtype == b["logprobs"].dtype == torch.float32
    eager = advantages_of(b, cfg)
    with kernels.compiling():
        fused = advantages_of(b, cfg)
    for a, c in zip(eager, fused):
        torch.testing.assert_close(a * b["response_mask"], c * b["response_mask"], atol=1e-5, rtol=1e-5)


def test_whitening_in_script_ignores_padding():
    """PPO's row of the table: GAE (discount 1, λ 0.95), whitened over the real tokens, returns R = A + V from the
    advantages before whitening, as train_ppo.main computes them; padding holds garbage that must not leak in."""
    g = torch.Generator().manual_seed(0)
    lengths = [5, 2, 7, 1]
    mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]
    rewards, values = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    garbage = torch.full((4, 7), 1e6)
    estimator = train_ppo.ESTIMATORS["gae"]
    assert estimator.value_model and estimator.whiten and estimator.kl == "reward"
    raw_adv = estimator.advantages(torch.where(mask, rewards, garbage), torch.where(mask, values, -garbage), mask,
                                   PPOConfig(discount=1.0, lam=0.95))
    adv, ret = rlhf.masked_whiten(raw_adv, mask), raw_adv + torch.where(mask, values, -garbage)
    raw = []  # GAE per row over its real tokens only (discount 1, λ = 0.95), V after the last token = 0
    for i, n in enumerate(lengths):
        a, row = 0.0, []
        for t in reversed(range(n)):
            next_v = values[i, t + 1].item() if t + 1 < n else 0.0
            a = rewards[i, t].item() + next_v - values[i, t].item() + 0.95 * a
            row.append(a)
        raw.append(row[::-1])
    flat = torch.tensor([a for row in raw for a in row], dtype=torch.float64)
    whitened = (flat - flat.mean()) / flat.std()
    torch.testing.assert_close(adv[mask].double(), whitened, atol=1e-4, rtol=1e-4)
    assert torch.count_nonzero(adv[~mask]) == 0
    raw_padded = torch.zeros(4, 7)
    for i, row in enumerate(raw):
        raw_padded[i, :len(row)] = torch.tensor(row)
    torch.testing.assert_close(ret[mask], (raw_padded + values)[mask])


def test_ptx_gradient_is_gamma_times_lm_gradient_added(ckpts):
    cfg = make_cfg(ckpts, ptx_coef=2.5)
    (policy, _, _, value_model, tok), b, P, advantages, returns = rollout_batch(cfg)
    mb = training_batch(b, torch.randn(advantages.shape), returns)  # random advantages: a nonzero policy gradient
    ptx_ids = torch.randint(0, 1000, (3, 17))

    def grads(loss):
        policy.zero_grad(set_to_none=True)
        value_model.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() for p in policy.parameters()]

    combined = grads(train_ppo.minibatch_loss(policy, value_model, mb, P, ptx_ids, cfg)[0])
    ppo_only = grads(train_ppo.minibatch_loss(policy, value_model, mb, P, None, cfg)[0])
    logp = F.log_softmax(policy(ptx_ids)[:, :-1], dim=-1).gather(-1, ptx_ids[:, 1:, None])  # independent LM loss
    lm = grads(-logp.mean())
    for c, p, l in zip(combined, ppo_only, lm):
        torch.testing.assert_close(c, p + 2.5 * l, atol=1e-6, rtol=1e-4)
    assert any(l.abs().max() > 1e-4 for l in lm)


@pytest.mark.slow
def test_compiled_ppo_matches_eager_and_does_not_recompile(ckpts, monkeypatch):
    """--compile (compiled transformer and decode step, fused log-probs, PPO loss and GAE, fused Adam): the scores of a
    rollout, the gradient of a minibatch with ptx, and a whole update equal the eager ones; after one compiled batch,
    a second (new samples, the same prompt-length bucket) compiles nothing new."""
    eager_cfg, compiled_cfg = make_cfg(ckpts, compile=False, ptx_coef=0.5), make_cfg(ckpts, compile=True, ptx_coef=0.5)
    eager = train_ppo.load_models(eager_cfg, "cpu")
    tok = eager[4]
    with kernels.compiling():
        compiled = [kernels.compile_model(m) for m in copy.deepcopy(eager[:4])]
    gen = generate(eager[0], [tok.format_prompt(p) for p in PROMPTS], 12, tok.eos_id, tok.pad_id)
    batches = []
    with monkeypatch.context() as patch:
        patch.setattr(train_ppo, "generate", lambda *a, **k: gen)  # both score the same samples
        for models, cfg in ((eager, eager_cfg), (compiled, compiled_cfg)):
            with kernels.compiling(cfg.compile):
                b = train_ppo.rollout(*models[:4], tok, PROMPTS, cfg)[0]
                batches.append(training_batch(b, *advantages_of(b, cfg)))
    for key, value in batches[0].items():
        torch.testing.assert_close(batches[1][key], value, atol=1e-5, rtol=1e-5)

    ptx_ids = torch.randint(0, 1000, (2, 17))
    grads = []
    for models, cfg, b in ((eager, eager_cfg, batches[0]), (compiled, compiled_cfg, batches[1])):
        policy, value_model = models[0], models[3]
        with kernels.compiling(cfg.compile):
            loss = train_ppo.minibatch_loss(policy, value_model, b, gen.prompt_len, ptx_ids, cfg)[0]
        grads.append(torch.autograd.grad(loss, [*policy.parameters(), *value_model.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)

    stream = token_stream(tok, ["the fox is red. the lemon is sour."] * 20)  # ptx text
    optimizers = [train_ppo.make_optimizers(models[0], models[3], cfg)
                  for models, cfg in ((eager, eager_cfg), (compiled, compiled_cfg))]
    stats, params = [], []
    for models, cfg, b, opts in ((eager, eager_cfg, batches[0], optimizers[0]),
                                 (compiled, compiled_cfg, batches[1], optimizers[1])):
        torch.manual_seed(1)  # the minibatch order and the ptx batches
        with kernels.compiling(cfg.compile):
            stats.append(train_ppo.ppo_update(models[0], models[3], opts, b, b["advantages"], b["returns"],
                                              gen.prompt_len, cfg, 0, ptx_stream=stream))
        params.append([p.detach().clone() for m in (models[0], models[3]) for p in m.parameters()])
    for key, value in stats[0].items():
        assert stats[1][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0)

    for step in range(2):  # the first batch compiles the decode step, the second must reuse everything
        with torch._dynamo.config.patch(error_on_recompile=step == 1), kernels.compiling():
            b, P, _ = train_ppo.rollout(*compiled, tok, PROMPTS, compiled_cfg)
            train_ppo.ppo_update(compiled[0], compiled[3], optimizers[1], b, *advantages_of(b, compiled_cfg), P,
                                 compiled_cfg, step, ptx_stream=stream)


def test_nan_guard_names_step_and_term(ckpts):
    cfg = make_cfg(ckpts)
    (policy, _, _, value_model, _), b, P, advantages, returns = rollout_batch(cfg)
    advantages[0, 0] = float("nan")
    opts = [torch.optim.Adam(m.parameters()) for m in (policy, value_model)]
    with pytest.raises(SystemExit, match="step 8: non-finite policy loss"):
        train_ppo.ppo_update(policy, value_model, opts, b, advantages, returns, P, cfg, step=7)


def test_batch_flops_of_a_critic_free_run_leave_out_the_value_model():
    """MFU of a run without a value model counts no value forwards: one per sequence in the scoring, 3 per sequence
    and epoch in the update (the value model is the reward model's shape); generation is the same."""
    mconf = GPTConfig(block_size=64, vocab_size=1024, n_layer=2, n_head=2, n_embd=32)
    policy, reward_model = GPT(mconf), GPT(mconf, head="scalar")
    B, T, P, epochs = 4, 20, 8, 2
    ppo = rlhf.ppo_batch_flops(policy, reward_model, B, T, P, epochs)
    critic_free = rlhf.ppo_batch_flops(policy, reward_model, B, T, P, epochs, value_model=False)
    value = reward_model.forward_flops(T - 1, 0, T, n_out=T - P)  # V at the N = T − P response positions
    assert value > 0 and critic_free["generation"] == ppo["generation"]
    assert ppo["scoring"] - critic_free["scoring"] == B * value
    assert ppo["update"] - critic_free["update"] == epochs * 3 * B * value


def test_ppo_batches_cover_a_pass_then_reshuffle():
    prompts = [f"p{i}" for i in range(10)]  # train_ppo's batches: the tail shorter than a batch is skipped
    first = [p for s in range(3) for p in epoch_batch(prompts, s, 3, seed=1, drop_last=True)]  # 3 batches per pass
    assert len(set(first)) == 9
    assert epoch_batch(prompts, 3, 3, 1, drop_last=True) != epoch_batch(prompts, 0, 3, 1, drop_last=True)
    assert epoch_batch(prompts, 4, 3, 1, drop_last=True) == epoch_batch(prompts, 4, 3, 1, drop_last=True)


# ----------------------------------------------------------------------------------------------------------------
# subprocess runs

def run(paths, out, *args):
    argv = [sys.executable, os.path.join(ROOT, "train_ppo.py"), "--init", paths["lm"], "--reward_model",
            paths["scalar"], "--out", str(out), "--world_scale", "0.01", "--batch_size", "8", "--minibatch_size", "4",
            "--ppo_epochs", "2", "--max_new_tokens", "12", "--log_every", "1", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def log_lines(out):
    """log.jsonl without the wall-clock fields."""
    lines = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return [{k: v for k, v in line.items() if k not in ("seconds", "tokens_per_s")} for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize("ptx", [False, True])
def test_smoke_run(ckpts, tmp_path, ptx):
    out = tmp_path / "ppo"
    run(ckpts, out, "--max_steps", "2", *(["--ptx_coef", "1.0", "--ptx_per_episode", "0.5"] if ptx else []))
    lines = log_lines(out)
    assert [line["step"] for line in lines] == [1, 2]
    keys = {"reward", "gold", "kl", "kl_k3", "approx_kl", "clipfrac", "entropy", "value_loss", "explained_var",
            "response_len", "eos_fraction", "kl_coef"}
    assert keys <= lines[0].keys() and ("ptx_loss" in lines[0]) == ptx
    metrics = json.load(open(out / "metrics.json"))
    assert {"win_rate_1sample", "gold", "val_loss"} <= metrics.keys() and 0 <= metrics["win_rate_1sample"] <= 1
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["head"] == "lm" and ckpt["extra"]["win_rate_1sample"] == metrics["win_rate_1sample"]


@pytest.mark.slow
def test_resume_bit_identical_and_deterministic(ckpts, tmp_path):
    opts = ["--ptx_coef", "1.0", "--ptx_per_episode", "0.5", "--ema", "0.9", "--adaptive_kl", "--save_every", "1"]
    full, again, parts = tmp_path / "full", tmp_path / "again", tmp_path / "parts"
    printed = run(ckpts, full, "--max_steps", "3", *opts)
    printed_again = run(ckpts, again, "--max_steps", "3", *opts)
    run(ckpts, parts, "--max_steps", "2", *opts)
    run(ckpts, parts, "--max_steps", "3", "--resume", *opts)
    metrics = lambda text: [line.split("| tok/s")[0] for line in text.splitlines() if line.startswith("step ")]
    assert metrics(printed) == metrics(printed_again) and len(metrics(printed)) == 3
    assert log_lines(full) == log_lines(again) == log_lines(parts)
    a, b = load_checkpoint(str(full / "ckpt.pt")), load_checkpoint(str(parts / "ckpt.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = load_checkpoint(str(full / "state.pt")), load_checkpoint(str(parts / "state.pt"))
    assert all(torch.equal(sa["extra"]["value_model"][k], sb["extra"]["value_model"][k]) for k in sa["extra"]["value_model"])
    assert sa["extra"]["kl_ctl"] == sb["extra"]["kl_ctl"] and sa["extra"]["kl_ctl"]["kl_coef"] != 0.02


def test_bad_data_exits_2_and_writes_nothing(ckpts, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"text": "no prompt"}\n')
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_ppo.py"), "--init", ckpts["lm"], "--reward_model",
                           ckpts["scalar"], "--data", str(bad), "--out", str(out)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=60)
    assert proc.returncode == 2 and "bad.jsonl:2: prompt: missing" in proc.stdout and not out.exists()


def test_reference_is_a_separate_frozen_model(ckpts):
    """The KL penalty's π_SFT shares no tensor with the policy and an update leaves it unchanged (a reference that
    is the policy, or that trains, would make the KL penalty zero or meaningless)."""
    cfg = make_cfg(ckpts, lr=1e-2)
    (policy, ref_policy, _, value_model, tok), b, P, advantages, returns = rollout_batch(cfg)
    assert not {p.data_ptr() for p in policy.parameters()} & {p.data_ptr() for p in ref_policy.parameters()}
    assert not any(p.requires_grad for p in ref_policy.parameters())
    before = [p.clone() for p in ref_policy.parameters()]
    policy_before = [p.clone() for p in policy.parameters()]
    train_ppo.ppo_update(policy, value_model, train_ppo.make_optimizers(policy, value_model, cfg), b, advantages,
                         returns, P, cfg, step=0)
    assert all(torch.equal(a, p) for a, p in zip(before, ref_policy.parameters()))
    assert not all(torch.equal(a, p) for a, p in zip(policy_before, policy.parameters()))
    with torch.no_grad():
        after = [rlhf.response_logprobs_and_entropy(m, b["tokens"], b["mask"], P, 1.0)[0] for m in (policy, ref_policy)]
    assert torch.equal(after[1], b["ref_logprobs"]) and not torch.equal(after[0], b["logprobs"])


@pytest.mark.parametrize("target, direction", [(100.0, -1), (1e-3, +1)])
def test_adaptive_kl_moves_beta_toward_the_target(ckpts, tmp_path, target, direction):
    """--adaptive_kl is wired into the loop: with the measured KL far below the target β falls, far above it β
    rises, each batch by the proportional rule β ← β (1 + clip(KL/target − 1, ±0.2) · batch / horizon)."""
    torch.manual_seed(1)  # a reference that differs from the policy: KL > 0 from the first batch
    mconf = GPTConfig(block_size=64, vocab_size=1024, n_layer=1, n_head=2, n_embd=32)
    reference = str(tmp_path / "ref.pt")
    save_checkpoint(reference, make_checkpoint(GPT(mconf), mconf, "lm", Tokenizer.load("tiny"), {}, 0))
    out = tmp_path / "ppo"
    run(ckpts, out, "--max_steps", "3", "--reference", reference, "--adaptive_kl", "--target_kl", str(target),
        "--kl_horizon", "16")
    lines = log_lines(out)
    betas = [line["kl_coef"] for line in lines]  # β used by each batch
    assert betas[0] == 0.1
    for line, beta, nxt in zip(lines, betas, betas[1:]):
        error = min(max(line["kl"] / target - 1, -0.2), 0.2)
        assert nxt == pytest.approx(beta * (1 + error * 8 / 16), rel=1e-9)
        assert (nxt - beta) * direction > 0


@pytest.mark.parametrize("estimator, k", [("rloo", 4), ("grpo", 2), ("reinforce_pp", 1)])
def test_critic_free_estimators_run_end_to_end_on_groups_of_one_prompt(ckpts, tmp_path, monkeypatch, estimator, k):
    """--estimator rloo/grpo/reinforce_pp: each batch holds batch_size / k prompts, each sampled k times in a row
    (one group = k samples of the same prompt); no value model is built, trained or saved; the log has no value
    loss."""
    seen = []
    real_rollout = train_ppo.rollout

    def spy(policy, ref_policy, reward_model, value_model, tok, prompts, cfg, world):
        assert value_model is None
        seen.append(list(prompts))
        return real_rollout(policy, ref_policy, reward_model, value_model, tok, prompts, cfg, world)

    monkeypatch.setattr(train_ppo, "rollout", spy)
    out = tmp_path / estimator
    train_ppo.main(["--init", ckpts["lm"], "--reward_model", ckpts["scalar"], "--out", str(out), "--world_scale", "0.01",
                    "--batch_size", "8", "--minibatch_size", "4", "--ppo_epochs", "1", "--max_new_tokens", "8",
                    "--max_steps", "2", "--estimator", estimator, "--group_size", str(k)])
    assert len(seen) == 2
    for prompts in seen:
        groups = [prompts[i:i + k] for i in range(0, 8, k)]
        assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == 8 // k
    lines = log_lines(out)
    assert [line["step"] for line in lines] == [1, 2] and "value_loss" not in lines[0]
    assert ("kl_loss" in lines[0]) == (estimator == "grpo")
    state = torch.load(out / "state.pt", weights_only=True)["extra"]
    assert state["value_model"] is None and state["value_optimizer"] is None


def test_oracle_reward_is_the_gold_judge(ckpts, tmp_path, monkeypatch):
    """--reward gold: the reward added at the last token is gold_scale × the gold judge's score of the response."""
    captured = {}
    real = rlhf.ppo_rewards

    def spy(scores, finished, *args, **kwargs):
        captured["scores"], captured["finished"] = scores.clone(), finished.clone()
        return real(scores, finished, *args, **kwargs)

    monkeypatch.setattr(rlhf, "ppo_rewards", spy)
    real_rollout = train_ppo.rollout

    def keep(*args):
        captured["batch"] = real_rollout(*args)
        captured["prompts"] = args[5]
        return captured["batch"]

    monkeypatch.setattr(train_ppo, "rollout", keep)
    train_ppo.main(["--init", ckpts["lm"], "--reward_model", ckpts["scalar"], "--world_scale", "0.01", "--batch_size",
                    "4", "--minibatch_size", "4", "--ppo_epochs", "1", "--max_new_tokens", "8", "--max_steps", "1",
                    "--reward", "gold", "--gold_scale", "3", "--out", str(tmp_path / "oracle")])
    from nanorlhf.world import make_world
    world = make_world(0, 0.01)
    _, _, responses = captured["batch"]
    want = [3 * world.gold_score(p, y, f) for p, y, f in zip(captured["prompts"], responses,
                                                              captured["finished"].tolist())]
    assert captured["scores"].tolist() == pytest.approx(want, abs=1e-6)


def test_ema_of_the_policy_weights_by_hand(ckpts, tmp_path):
    """--ema d (InstructGPT: 0.992): after each optimizer step, ema ← d·ema + (1 − d)·θ, starting from the SFT
    weights; ckpt.pt is the EMA. One batch of one minibatch and one epoch is one step: ckpt.pt must be
    d·θ_SFT + (1 − d)·θ_1, with θ_1 the policy that state.pt saved after it."""
    out = tmp_path / "ema"
    train_ppo.main(["--init", ckpts["lm"], "--reward_model", ckpts["scalar"], "--world_scale", "0.01", "--batch_size",
                    "4", "--minibatch_size", "4", "--ppo_epochs", "1", "--max_new_tokens", "8", "--max_steps", "1",
                    "--lr", "1e-2", "--warmup", "1", "--ema", "0.9", "--save_every", "1", "--out", str(out)])
    sft = torch.load(ckpts["lm"], weights_only=True)["model"]
    theta_1 = torch.load(out / "state.pt", weights_only=True)["model"]
    ema = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    moved = 0
    for name, w in sft.items():
        if not w.is_floating_point():
            continue
        assert torch.allclose(ema[name], 0.9 * w + 0.1 * theta_1[name], atol=1e-6), name
        moved += not torch.equal(w, theta_1[name])
    assert moved > 0  # the step moved the policy, so the EMA's two weights are told apart


# ----------------------------------------------------------------------------------------------------------------
# what a learner reads

def files_whose_functions_run(fn):
    """The repository files (tests/ left out) whose functions run while fn() runs, traced with sys.setprofile."""
    ran = set()

    def profile(frame, event, arg):
        path = frame.f_code.co_filename
        if event == "call" and path.startswith(ROOT + os.sep) and frame.f_code.co_name != "<module>":
            ran.add(os.path.relpath(path, ROOT))
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return {path for path in ran if not path.startswith("tests" + os.sep)}


def test_readme_reading_list_is_what_one_iteration_runs(ckpts, tmp_path):
    """The README's "How to read the code" names the files one default PPO iteration (train_ppo.main for one batch,
    compilation off, the CPU default) calls functions in: exactly those a tracer sees."""
    argv = ["--init", ckpts["lm"], "--reward_model", ckpts["scalar"], "--out", str(tmp_path / "ppo"), "--world_scale",
            "0.01", "--batch_size", "8", "--minibatch_size", "4", "--ppo_epochs", "1", "--max_new_tokens", "8",
            "--batches", "1"]
    ran = files_whose_functions_run(lambda: train_ppo.main(argv))
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    sentence = re.search(r"calls functions in exactly these files: (.*?)\.\s", readme, re.S)
    assert sentence, "the README's reading list is gone"
    listed = re.findall(r"`([\w/]+\.py)`", sentence.group(1))
    assert len(listed) == len(set(listed)) and set(listed) == ran, (sorted(ran), listed)
    assert {"train_ppo.py", "nanorlhf/rlhf.py", "nanorlhf/model.py", "nanorlhf/engine.py"} <= ran


def page_blocks(path):
    """(verb, name, file, code) for each python block of a docs page, introduced by "From `file`:" (the repository's
    own text) or "Add to `file`:" / "Add to `name` in `file`:" (code the page adds)."""
    text = open(os.path.join(ROOT, path), encoding="utf-8").read()
    return re.findall(r"(From|Add to) (?:`(\w+)` in )?`([^`]+)`:\n\n```python\n(.*?)\n```", text, re.S)


def test_extending_adds_an_estimator_that_trains(ckpts, tmp_path, monkeypatch):
    """docs/extending.md, run: its "From" blocks are the repository's own text; the function it adds passes the
    test it adds; with its row in ESTIMATORS, train_ppo.main trains a batch with its methods-table flags, on the
    function's advantages of the outcome rewards (β's KL in the loss, not the reward), with no value model."""
    blocks = page_blocks("docs/extending.md")
    for verb, _, path, code in blocks:
        assert verb == "Add to" or code in open(os.path.join(ROOT, path), encoding="utf-8").read(), (path, code[:60])
    added = {(name, path): code for verb, name, path, code in blocks if verb == "Add to"}
    assert set(added) == {("", "nanorlhf/rlhf.py"), ("", "tests/test_rlhf.py"), ("ESTIMATORS", "train_ppo.py"),
                          ("METHOD_FLAGS", "run.py"), ("METHOD_LABELS", "eval.py")}

    function = {"torch": torch}
    exec(added["", "nanorlhf/rlhf.py"], function)
    calls = []

    def dr_grpo_advantages(scores, mask, k):
        calls.append((scores.clone(), function["dr_grpo_advantages"](scores, mask, k)))
        return calls[-1][1]
    monkeypatch.setattr(rlhf, "dr_grpo_advantages", function["dr_grpo_advantages"], raising=False)
    tests = {"torch": torch, "pytest": pytest, "rlhf": rlhf}
    exec(added["", "tests/test_rlhf.py"], tests)
    [page_test] = [f for name, f in tests.items() if name.startswith("test_")]
    page_test()

    monkeypatch.setattr(rlhf, "dr_grpo_advantages", dr_grpo_advantages, raising=False)
    row = eval("{" + added["ESTIMATORS", "train_ppo.py"] + "}", vars(train_ppo))
    monkeypatch.setattr(train_ppo, "ESTIMATORS", {**train_ppo.ESTIMATORS, **row})
    [flags] = eval("{" + added["METHOD_FLAGS", "run.py"] + "}").values()
    [label] = eval("{" + added["METHOD_LABELS", "eval.py"] + "}").values()
    assert isinstance(label, str)
    rollouts = []
    real_rollout = train_ppo.rollout

    def spy(*args):
        rollouts.append(real_rollout(*args))
        assert args[3] is None  # no value model
        return rollouts[-1]
    monkeypatch.setattr(train_ppo, "rollout", spy)
    out = tmp_path / "dr_grpo"
    train_ppo.main(["--init", ckpts["lm"], "--reward_model", ckpts["scalar"], "--out", str(out), "--world_scale",
                    "0.01", "--batch_size", "8", "--minibatch_size", "4", "--ppo_epochs", "1", "--max_new_tokens", "8",
                    "--batches", "1", "--reference", reference_checkpoint(ckpts, str(tmp_path)), *flags])
    [(b, _, _)] = rollouts
    assert (b["logprobs"] - b["ref_logprobs"])[b["response_mask"]].abs().min() > 1e-3  # a KL in the reward would show
    [(scores, advantages)] = calls
    outcome = b["scores"] - PPOConfig().missing_eos_penalty * (~b["finished"]).float()  # no −β·KL in it
    assert torch.equal(scores, outcome) and (advantages != 0).any()
    [line] = log_lines(out)
    assert "kl_loss" in line and "value_loss" not in line
    assert torch.load(out / "state.pt", weights_only=True)["extra"]["value_model"] is None
