"""rlhf math vs independent computations: python loops, closed forms and hand-worked cases."""

import math
import statistics

import pytest
import torch

from nanorlhf import rlhf


def ragged_mask(lengths, T):
    """Right-padded (B, T) bool mask with the given real lengths."""
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def real_values(x, mask):
    return [float(v) for v, m in zip(x.flatten(), mask.flatten()) if m]


# ----------------------------------------------------------------------------------------------------------------
# masked statistics

def test_masked_mean_var_ignore_padding():
    g = torch.Generator().manual_seed(0)
    mask = ragged_mask([5, 2, 7, 1], 7)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64)
    mean, var = rlhf.masked_mean(x, mask), rlhf.masked_var(x, mask)
    assert mean.item() == pytest.approx(statistics.fmean(real_values(x, mask)), abs=1e-12)
    assert var.item() == pytest.approx(statistics.variance(real_values(x, mask)), abs=1e-12)
    assert rlhf.masked_var(x, mask, unbiased=False).item() == pytest.approx(
        statistics.pvariance(real_values(x, mask)), abs=1e-12
    )
    row_means = rlhf.masked_mean(x, mask, dim=1)
    for b in range(4):
        assert row_means[b].item() == pytest.approx(statistics.fmean(real_values(x[b], mask[b])), abs=1e-12)
    y = torch.where(mask, x, torch.tensor([float("nan"), float("inf"), 1e30, -3.0]).repeat(7, 1).T)
    assert torch.equal(rlhf.masked_mean(y, mask), mean)
    assert torch.equal(rlhf.masked_var(y, mask), var)


def test_masked_whiten():
    g = torch.Generator().manual_seed(1)
    mask = ragged_mask([6, 3, 1], 6)
    x = 5 + 3 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    w = rlhf.masked_whiten(x, mask)
    assert torch.all(w[~mask] == 0)
    assert statistics.fmean(real_values(w, mask)) == pytest.approx(0, abs=1e-7)
    assert statistics.variance(real_values(w, mask)) == pytest.approx(1, abs=1e-7)
    x_padded_garbage = torch.where(mask, x, 1e6)
    assert torch.equal(rlhf.masked_whiten(x_padded_garbage, mask), w)


def test_explained_variance():
    g = torch.Generator().manual_seed(2)
    mask = ragged_mask([4, 2, 3], 4)
    returns = torch.randn(3, 4, generator=g, dtype=torch.float64)
    values = torch.randn(3, 4, generator=g, dtype=torch.float64)
    resid = [r - v for r, v in zip(real_values(returns, mask), real_values(values, mask))]
    expected = 1 - statistics.variance(resid) / statistics.variance(real_values(returns, mask))
    assert rlhf.explained_variance(values, returns, mask).item() == pytest.approx(expected, abs=1e-12)
    assert rlhf.explained_variance(returns, returns, mask).item() == 1


# ----------------------------------------------------------------------------------------------------------------
# KL

def test_kl_estimate():
    g = torch.Generator().manual_seed(3)
    logp = torch.randn(3, 5, generator=g, dtype=torch.float64)
    ref = torch.randn(3, 5, generator=g, dtype=torch.float64)
    assert torch.equal(rlhf.kl_estimate(logp, ref, "k1"), logp - ref)
    k3 = rlhf.kl_estimate(logp, ref, "k3")
    k2 = rlhf.kl_estimate(logp, ref, "k2")
    for a, b, got3, got2 in zip(logp.flatten(), ref.flatten(), k3.flatten(), k2.flatten()):
        r = math.exp(b - a)
        assert got3.item() == pytest.approx((r - 1) - math.log(r), rel=1e-12)
        assert got2.item() == pytest.approx(0.5 * (a - b).item() ** 2, rel=1e-12)
    assert torch.all(k3 > 0)
    assert torch.all(rlhf.kl_estimate(logp, logp, "k3") == 0)
    with pytest.raises(ValueError):
        rlhf.kl_estimate(logp, ref, "k4")


# ----------------------------------------------------------------------------------------------------------------
# GAE

def gae_by_recursion(rewards, values, length, discount, lam):
    """One row: δ_t = r_t + discount·V_{t+1} − V_t, A_t = δ_t + discount·λ·A_{t+1}, with V and A past the end = 0."""
    adv = [0.0] * (length + 1)
    for t in range(length - 1, -1, -1):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + discount * next_value - values[t]
        adv[t] = delta + discount * lam * adv[t + 1]
    return adv[:length]


@pytest.mark.parametrize("discount,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0)])
def test_gae_matches_recursion(discount, lam):
    g = torch.Generator().manual_seed(4)
    lengths, T = [7, 1, 4, 6, 0], 7
    mask = ragged_mask(lengths, T)
    rewards = torch.randn(5, T, generator=g, dtype=torch.float64)  # padding holds garbage, must be ignored
    values = torch.randn(5, T, generator=g, dtype=torch.float64)
    adv, ret = rlhf.gae(rewards, values, mask, discount, lam)
    assert adv.shape == ret.shape == (5, T)
    for b, length in enumerate(lengths):
        expected = gae_by_recursion(rewards[b].tolist(), values[b].tolist(), length, discount, lam)
        assert adv[b, :length].tolist() == pytest.approx(expected, abs=1e-12)
        assert ret[b, :length].tolist() == pytest.approx([a + v for a, v in zip(expected, values[b].tolist())])
        assert torch.all(adv[b, length:] == 0) and torch.all(ret[b, length:] == 0)


def test_gae_lambda_one_is_reward_to_go():
    g = torch.Generator().manual_seed(5)
    mask = ragged_mask([6, 2, 4], 6)
    rewards = torch.randn(3, 6, generator=g, dtype=torch.float64)
    values = torch.randn(3, 6, generator=g, dtype=torch.float64)
    adv, ret = rlhf.gae(rewards, values, mask, discount=1.0, lam=1.0)
    reward_to_go = (rewards * mask).flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(adv, (reward_to_go - values) * mask)
    torch.testing.assert_close(ret, reward_to_go * mask)


# ----------------------------------------------------------------------------------------------------------------
# PPO losses

def test_policy_loss_at_old_equals_new():
    g = torch.Generator().manual_seed(6)
    mask = ragged_mask([5, 3], 5)
    logp = torch.randn(2, 5, generator=g, dtype=torch.float64)
    adv = torch.randn(2, 5, generator=g, dtype=torch.float64)
    loss, stats = rlhf.policy_loss(logp, logp.clone(), adv, mask)
    assert loss.item() == pytest.approx(-statistics.fmean(real_values(adv, mask)), abs=1e-15)
    assert stats["ratio"].item() == 1
    assert stats["approx_kl"].item() == 0 and stats["approx_kl_k1"].item() == 0
    assert stats["clipfrac"].item() == 0


def test_policy_loss_clipping_blocks_gradient_exactly():
    eps = 0.2
    #             A>0,r>1+ε  A>0,r<1−ε  A<0,r<1−ε  A<0,r>1+ε  A>0 in range  A<0 in range  padding
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0, -0.5, 3.0]], dtype=torch.float64)
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.1, 0.9, 3.0]], dtype=torch.float64)
    blocked = [True, False, True, False, False, False, True]
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    old = torch.zeros(1, 7, dtype=torch.float64)
    logp = ratio.log().requires_grad_()
    loss, stats = rlhf.policy_loss(logp, old, adv, mask, clip_eps=eps)
    (grad,) = torch.autograd.grad(loss, logp)
    for t in range(7):
        # d/dlogp of −A·ratio / n_real is −A·ratio / 6 where the unclipped term is active
        expected = 0.0 if blocked[t] else -adv[0, t].item() * ratio[0, t].item() / 6
        assert grad[0, t].item() == pytest.approx(expected, abs=1e-15)
    assert stats["clipfrac"].item() == pytest.approx(2 / 6)  # the two blocked real tokens
    expected_loss = [1.2 * -1, -0.5, 0.8, 1.5, -2.2, 0.45]  # max(−A·r, −A·clip(r)) by hand
    assert loss.item() == pytest.approx(statistics.fmean(expected_loss))


def test_policy_loss_stats_by_loop():
    g = torch.Generator().manual_seed(7)
    mask = ragged_mask([8, 3, 6], 8)
    old = torch.randn(3, 8, generator=g, dtype=torch.float64)
    logp = old + 0.4 * torch.randn(3, 8, generator=g, dtype=torch.float64)
    adv = torch.randn(3, 8, generator=g, dtype=torch.float64)
    loss, stats = rlhf.policy_loss(logp, old, adv, mask, clip_eps=0.2)
    losses, clipped, k3, k1, ratios = [], [], [], [], []
    for lp, o, a, m in zip(logp.flatten().tolist(), old.flatten().tolist(), adv.flatten().tolist(), mask.flatten()):
        if not m:
            continue
        r = math.exp(lp - o)
        unclipped, clipped_term = -a * r, -a * min(max(r, 0.8), 1.2)
        losses.append(max(unclipped, clipped_term))
        clipped.append(clipped_term > unclipped)
        k3.append((r - 1) - math.log(r))
        k1.append(o - lp)
        ratios.append(r)
    assert loss.item() == pytest.approx(statistics.fmean(losses), abs=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(sum(clipped) / len(clipped))
    assert 0 < sum(clipped) < len(clipped)
    assert stats["approx_kl"].item() == pytest.approx(statistics.fmean(k3), abs=1e-12)
    assert stats["approx_kl_k1"].item() == pytest.approx(statistics.fmean(k1), abs=1e-12)
    assert stats["ratio"].item() == pytest.approx(statistics.fmean(ratios), abs=1e-12)
    assert all(not v.requires_grad for v in stats.values())


def test_value_loss_by_loop():
    g = torch.Generator().manual_seed(8)
    mask = ragged_mask([5, 2, 4], 5)
    values = torch.randn(3, 5, generator=g, dtype=torch.float64)
    old = values + 0.5 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    returns = torch.randn(3, 5, generator=g, dtype=torch.float64)
    expected = []
    for v, o, r, m in zip(values.flatten().tolist(), old.flatten().tolist(), returns.flatten().tolist(),
                          mask.flatten()):
        if m:
            v_clipped = min(max(v, o - 0.2), o + 0.2)
            expected.append(0.5 * max((v - r) ** 2, (v_clipped - r) ** 2))
    loss = rlhf.value_loss(values, old, returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(statistics.fmean(expected), abs=1e-12)


def test_value_loss_clipped_gradient():
    # token 0: V moved far from V_old but the unclipped error is larger -> gradient (V − R)/n flows
    # token 1: V moved far, the clipped error is larger -> the clipped V is constant, gradient 0
    # token 2: inside the clip range -> (V − R)/n
    values = torch.tensor([[2.0, 2.0, 0.1]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[0.0, 3.0, 1.0]], dtype=torch.float64)
    loss = rlhf.value_loss(values, old, returns, torch.ones(1, 3), clip=0.2)
    (grad,) = torch.autograd.grad(loss, values)
    assert grad[0].tolist() == pytest.approx([2.0 / 3, 0.0, -0.9 / 3], abs=1e-15)
    assert loss.item() == pytest.approx(0.5 * (4.0 + 2.8**2 + 0.81) / 3)


# ----------------------------------------------------------------------------------------------------------------
# reward model ranking loss

def ranking_loss_by_loop(rewards, ranks, mask):
    prompt_losses = []
    for b in range(rewards.shape[0]):
        pair_losses = []
        for i in range(rewards.shape[1]):
            for j in range(rewards.shape[1]):
                if mask[b, i] and mask[b, j] and ranks[b, i] < ranks[b, j]:
                    pair_losses.append(torch.log1p(torch.exp(-(rewards[b, i] - rewards[b, j]))))
        if pair_losses:
            prompt_losses.append(sum(pair_losses) / len(pair_losses))
    return sum(prompt_losses) / len(prompt_losses)


def test_ranking_loss_matches_double_loop_values_and_gradients():
    g = torch.Generator().manual_seed(9)
    B, K = 6, 5
    rewards = torch.randn(B, K, generator=g, dtype=torch.float64, requires_grad=True)
    ranks = torch.randint(0, 3, (B, K), generator=g)  # 3 rank levels over K = 5: ties are certain
    mask = ragged_mask([5, 4, 2, 3, 1, 5], K)
    ranks[3] = 0  # a prompt whose completions all tie: no pairs, not counted
    loss = rlhf.ranking_loss(rewards, ranks, mask)
    expected = ranking_loss_by_loop(rewards, ranks, mask)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    (grad,) = torch.autograd.grad(loss, rewards)
    (expected_grad,) = torch.autograd.grad(expected, rewards)
    torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=0)
    assert torch.all(grad[~mask] == 0) and torch.all(grad[3] == 0)


def test_ranking_loss_k2_is_pairwise_logsigmoid():
    rewards = torch.tensor([[1.5, -0.3], [0.2, 0.9], [4.0, 1.0]])
    ranks = torch.tensor([[0, 1], [1, 0], [0, 1]])  # row 1: the second completion is preferred
    chosen, rejected = torch.tensor([1.5, 0.9, 4.0]), torch.tensor([-0.3, 0.2, 1.0])
    expected = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    assert rlhf.ranking_loss(rewards, ranks, torch.ones(3, 2, dtype=torch.bool)).item() == pytest.approx(
        expected.item(), abs=1e-7
    )


def test_ranking_loss_masked_entries_never_matter():
    g = torch.Generator().manual_seed(10)
    rewards = torch.randn(3, 4, generator=g)
    ranks = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 0, 2]])
    mask = ragged_mask([4, 2, 3], 4)
    loss = rlhf.ranking_loss(rewards, ranks, mask)
    garbage = torch.where(mask, rewards, torch.tensor(float("nan")))
    garbage[1, 3] = 1e9
    garbage = garbage.requires_grad_()
    other_ranks = torch.where(mask, ranks, -5)  # a masked-out "best" rank must not form pairs
    loss2 = rlhf.ranking_loss(garbage, other_ranks, mask)
    assert torch.equal(loss, loss2.detach())
    (grad,) = torch.autograd.grad(loss2, garbage)
    assert torch.all(grad[~mask] == 0) and torch.isfinite(grad).all()


def test_ranking_loss_large_margin_is_stable():
    rewards = torch.tensor([[-100.0, 100.0]], requires_grad=True)  # the preferred one scored far lower
    loss = rlhf.ranking_loss(rewards, torch.tensor([[0, 1]]), torch.ones(1, 2))
    assert loss.item() == pytest.approx(200.0)  # log(sigmoid(−200)) would be −inf in float32
    loss.backward()
    assert rewards.grad.tolist() == [[-1.0, 1.0]]


# ----------------------------------------------------------------------------------------------------------------
# DPO, best-of-n, adaptive KL

def test_dpo_loss_by_hand():
    pc, pr = torch.tensor([-3.0, -5.0, -2.0]), torch.tensor([-4.0, -4.5, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0, -1.0]), torch.tensor([-3.0, -5.0, -3.0])
    beta = 0.1
    margins = [beta * ((a - b) - (c - d)) for a, b, c, d in zip(pc.tolist(), rc.tolist(), pr.tolist(), rr.tolist())]
    expected = statistics.fmean(math.log(1 + math.exp(-m)) for m in margins)
    loss, stats = rlhf.dpo_loss(pc, pr, rc, rr, beta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["reward_accuracy"].item() == pytest.approx(sum(m > 0 for m in margins) / 3)
    assert stats["reward_margin"].item() == pytest.approx(statistics.fmean(margins), rel=1e-6)


def best_of_n_exact_kl(p, n):
    """KL(p_bon || p) for outcomes sorted by distinct reward: p_bon(i) = F(i)^n − F(i−1)^n."""
    kl, cdf_prev = 0.0, 0.0
    for p_i in p:
        cdf = cdf_prev + p_i
        p_bon = cdf**n - cdf_prev**n
        if p_bon > 0:
            kl += p_bon * math.log(p_bon / p_i)
        cdf_prev = cdf
    return kl


def test_best_of_n_kl():
    assert rlhf.best_of_n_kl(1) == 0
    assert rlhf.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert rlhf.best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    g = torch.Generator().manual_seed(11)
    for n in [2, 4, 16]:
        formula = rlhf.best_of_n_kl(n)
        gaps = []
        for m in [3, 30, 3000]:  # ever finer discrete distributions with distinct rewards
            p = torch.rand(m, generator=g, dtype=torch.float64) + 0.5
            p = (p / p.sum()).tolist()
            kl = best_of_n_exact_kl(p, n)
            assert kl <= formula + 1e-12
            gaps.append(formula - kl)
        assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-2 * formula


def test_adaptive_kl_controller():
    ctl = rlhf.AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=6.6, n_steps=512)  # 10% above target: β rises
    assert ctl.kl_coef == pytest.approx(0.1 * (1 + 0.1 * 512 / 10000))
    ctl.update(current_kl=100.0, n_steps=100)  # error clipped to +0.2
    assert ctl.kl_coef == pytest.approx(0.1 * (1 + 0.1 * 512 / 10000) * (1 + 0.2 * 100 / 10000))
    before = ctl.kl_coef
    ctl.update(current_kl=torch.tensor(3.0), n_steps=512)  # below target: β falls
    assert ctl.kl_coef < before
    resumed = rlhf.AdaptiveKLController(kl_coef=1.0, target=1.0, horizon=1)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.update(7.0, 64) == ctl.update(7.0, 64)


# ----------------------------------------------------------------------------------------------------------------
# critic-free advantage estimators: hand-worked cases

def test_rloo_leave_one_out_baseline_by_hand():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    r = torch.tensor([1.0, 2.0, 6.0, 0.0, 3.0, 3.0])  # two prompts, k = 3
    a = rlhf.rloo_advantages(r, mask, 3)
    expected = [1 - (2 + 6) / 2, 2 - (1 + 6) / 2, 6 - (1 + 2) / 2, 0 - 3, 3 - 1.5, 3 - 1.5]
    for i, e in enumerate(expected):
        assert a[i][mask[i]].tolist() == [e] * int(mask[i].sum())  # the sequence's advantage on each real token
    assert torch.count_nonzero(a[~mask]) == 0


def test_grpo_group_normalization_by_hand_and_a_zero_variance_group():
    mask = torch.ones(6, 2, dtype=torch.bool)
    mask[1, 1] = False
    r = torch.tensor([1.0, 2.0, 3.0, 0.5, 0.5, 0.5])  # group 1: mean 2, unbiased std 1; group 2: all equal
    a = rlhf.grpo_advantages(r, mask, 3)
    std = 1.0 + 1e-6
    assert a[:3, 0].tolist() == pytest.approx([-1 / std, 0.0, 1 / std], abs=1e-7)
    assert a[1, 1].item() == 0 and torch.equal(a[3:], torch.zeros(3, 2))  # padding, and the zero-variance group


def test_reinforce_pp_return_to_go_over_real_tokens_only():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    rewards = torch.tensor([[-0.1, -0.2, 1.0, 9.0], [0.3, 2.0, 9.0, 9.0]])  # 9s on padding must not count
    a = rlhf.reward_to_go(rewards, mask)
    torch.testing.assert_close(a, torch.tensor([[0.7, 0.8, 1.0, 0.0], [2.3, 2.0, 0.0, 0.0]]))
    whitened = rlhf.masked_whiten(a, mask)  # its row of train_ppo.ESTIMATORS whitens over the batch's real tokens
    real = torch.tensor([0.7, 0.8, 1.0, 2.3, 2.0], dtype=torch.float64)
    torch.testing.assert_close(whitened[mask].double(), (real - real.mean()) / real.std(), atol=1e-5, rtol=1e-5)
