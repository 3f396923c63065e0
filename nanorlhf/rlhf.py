"""The math of InstructGPT (Ouyang et al. 2022, arXiv 2203.02155) as small pure functions, and PPO's steps on the
models that use them (the last section): a response's log-probs and values, minibatches, the optimizer step.

Token tensors are (B, T) with a mask of the same shape (1 = real token, 0 = padding). Every mean over tokens
is a masked mean: padded positions never change a result, whatever values they hold. In PPO's steps, tokens
(B, P+N) are left-padded prompts followed by right-padded responses; every per-token tensor is (B, N), the
response positions only.
"""

import math

import torch
import torch.nn.functional as F

from nanorlhf import dist
from nanorlhf.common import check_finite


# ----------------------------------------------------------------------------------------------------------------
# masked statistics

def masked_mean(x, mask, dim=None):
    """Mean of x over the positions where mask is 1 (normalized by the number of real tokens)."""
    mask = mask.bool()
    x = torch.where(mask, x, 0.0)  # where, not x * mask: inf/nan on padding must not leak in
    if dim is None:
        return x.sum() / mask.sum()
    return x.sum(dim) / mask.sum(dim)


def masked_var(x, mask, unbiased=True):
    """Variance of x over the real tokens (Bessel-corrected by n / (n - 1) if unbiased)."""
    mask = mask.bool()
    x = torch.where(mask, x, 0.0)
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1)
    return var


def masked_whiten(x, mask, total=lambda t: t):
    """(x - mean) / std over the real tokens only, unbiased variance; padded positions come out 0 (PPO advantage
    whitening). total sums a tensor over processes (dist.all_reduce_sum: the global batch's statistics, not each
    rank's shard's); the default, one process."""
    mask = mask.bool()
    x = torch.where(mask, x, 0.0)
    n = total(mask.sum())  # real tokens
    mean = total(x.sum()) / n
    var = total(torch.where(mask, (x - mean) ** 2, 0.0).sum()) / n * n / (n - 1)  # as masked_var, to the last bit
    return torch.where(mask, (x - mean) * torch.rsqrt(var + 1e-8), 0.0)


def explained_variance(values, returns, mask):
    """1 - Var[R - V] / Var[R] over real tokens: 1 = perfect value function, 0 = no better than a constant."""
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask)


# ----------------------------------------------------------------------------------------------------------------
# reward model (InstructGPT §3.5 "Reward modeling (RM)", eq. (1))

def ranked_pairs(ranking):
    """The comparisons a ranking implies (0 = best): (better, worse) index pairs of responses ranked apart; tied
    responses form no pair. C(K,2) pairs for K responses without ties: the labels an RM (eq. (1)) or DPO trains on."""
    return [(i, j) for i in range(len(ranking)) for j in range(len(ranking)) if ranking[i] < ranking[j]]


def ranking_loss(rewards, ranks, mask):
    """Pairwise ranking loss over all C(K,2) comparisons of a prompt, as one batch element (eq. (1)).

    rewards: (B, K) float scores r_θ(x, y_k); ranks: (B, K) int, 0 = best, ties allowed; mask: (B, K), 1 = a real
    completion (K is ragged across prompts). Each prompt contributes the mean of −log σ(r_w − r_l) over its ordered
    pairs (w ranked strictly better than l; ties give no pair); the loss is the mean over prompts with ≥ 1 pair.
    """
    mask = mask.bool()
    rewards = torch.where(mask, rewards, 0.0)  # masked-out scores may be anything, even nan
    better = (ranks[:, :, None] < ranks[:, None, :]) & mask[:, :, None] & mask[:, None, :]  # (B, K, K): w=i, l=j
    margin = rewards[:, :, None] - rewards[:, None, :]  # (B, K, K) r_i − r_j
    pair_loss = torch.where(better, -F.logsigmoid(margin), 0.0)  # (B, K, K)
    n_pairs = better.sum((1, 2))  # (B,) = C(K,2) without ties
    prompt_loss = pair_loss.sum((1, 2)) / n_pairs.clamp(min=1)  # (B,) mean over this prompt's pairs
    has_pairs = n_pairs > 0
    return (prompt_loss * has_pairs).sum() / has_pairs.sum().clamp(min=1)  # mean over prompts with a pair


def dpo_loss(policy_chosen_logprobs, policy_rejected_logprobs, ref_chosen_logprobs, ref_rejected_logprobs, beta,
             weights=None):
    """Direct Preference Optimization (Rafailov et al. 2023, eq. (7)); inputs are (B,) log π(y|x) of whole responses
    (common.response_logprob_sums).

    The implicit reward of a response is β·log(π/π_ref); the loss is −log σ(reward_chosen − reward_rejected),
    averaged over the pairs, or summed with `weights` (B,) that add up to 1 (train_dpo: each prompt counts once).
    """
    chosen_rewards = beta * (policy_chosen_logprobs - ref_chosen_logprobs)  # (B,)
    rejected_rewards = beta * (policy_rejected_logprobs - ref_rejected_logprobs)  # (B,)
    margins = chosen_rewards - rejected_rewards
    losses = -F.logsigmoid(margins)  # (B,)
    loss = losses.mean() if weights is None else (losses * weights).sum()
    stats = {
        "reward_chosen": chosen_rewards.detach().mean(),
        "reward_rejected": rejected_rewards.detach().mean(),
        "reward_accuracy": (margins.detach() > 0).float().mean(),
        "reward_margin": margins.detach().mean(),
    }
    return loss, stats


def best_of_n_kl(n):
    """KL(best-of-n || base policy) = log n − (n − 1)/n (exact for a continuous reward without ties)."""
    return math.log(n) - (n - 1) / n


# ----------------------------------------------------------------------------------------------------------------
# PPO (InstructGPT §3.5 "Reinforcement learning (RL)", eq. (2); Schulman et al. 2017)

def kl_estimate(logprobs, ref_logprobs, kind="k1"):
    """Per-token estimate of KL(π_RL || π_SFT) from tokens sampled from π_RL, by the approximation `kind`; (B, T) in,
    (B, T) out. With r = π_SFT/π_RL (Schulman 2020, "Approximating KL divergence"):
      k1 = −log r: unbiased, can be negative; InstructGPT eq. (2) puts −β·k1 on each token.
      k2 = ½·(log r)²: biased, ≥ 0, low variance.
      k3 = (r − 1) − log r: unbiased and ≥ 0.
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # (r − 1) − log r with log r = −log_ratio
    raise ValueError(f"unknown KL approximation {kind!r}: expected k1, k2 or k3")


def ppo_rewards(scores, finished, logprobs, ref_logprobs, response_mask, kl_coef, kl_kind="k1",
                missing_eos_penalty=1.0):
    """Per-token rewards of InstructGPT's objective, eq. (2) (§3.5):

        objective(φ) = E_(x,y)~π_φ^RL [ r_θ(x, y) − β·log(π_φ^RL(y|x) / π^SFT(y|x)) ] + γ·E_x~D_pretrain [ log π_φ^RL(x) ]

    The first expectation is the RL episode's return: log(π^RL(y|x) / π^SFT(y|x)) = Σ_t log(π^RL(y_t) / π^SFT(y_t)),
    so each response token t gets −β·KL_t (kl_estimate's approximation kl_kind, k1 in the paper) and the last real
    token (the EOS) also gets the RM score r_θ(x, y), lowered by missing_eos_penalty for a response that never
    emitted EOS (at any RM score, not finishing earns less than finishing). PPO maximizes it with GAE advantages and
    the clipped policy_loss; the γ term, PPO-ptx, is a next-token loss on pretraining text added to the same update
    (train_ppo.minibatch_loss). scores, finished: (B,); the rest (B, N). Returns (rewards, kl, final): (B, N)
    rewards, (B, N) KL_t (0 on padding), and the (B,) reward added at the last token."""
    kl = torch.where(response_mask, kl_estimate(logprobs, ref_logprobs, kl_kind), 0.0)  # (B, N)
    rewards = -kl_coef * kl
    last = response_mask.sum(1) - 1  # (B,) position of the last real response token
    final = scores - missing_eos_penalty * (~finished).float()  # (B,)
    rewards[torch.arange(len(rewards), device=rewards.device), last] += final
    return rewards, kl, final


def gae(rewards, values, mask, discount=1.0, lam=0.95):
    """Generalized Advantage Estimation (Schulman et al. 2016, who write the discount γ); rewards, values, mask:
    (B, T), right-padded.

    δ_t = r_t + discount·V_{t+1} − V_t and A_t = δ_t + discount·λ·A_{t+1}; the bandit episode ends at the last real
    token, so V and A after it are 0. Returns (advantages, returns), both (B, T), returns = A + V, 0 on padding.
    InstructGPT used discount 1, λ = 0.95 (Appendix C.4).
    """
    mask = mask.bool()
    rewards = torch.where(mask, rewards, 0.0)
    values = torch.where(mask, values, 0.0)  # V after the last real token is 0
    next_value = torch.zeros_like(values[:, 0])  # (B,) V_{t+1}
    next_advantage = torch.zeros_like(values[:, 0])  # (B,) A_{t+1}
    advantages = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + discount * next_value - values[:, t]
        next_advantage = torch.where(mask[:, t], delta + discount * lam * next_advantage, 0.0)
        next_value = values[:, t]
        advantages.append(next_advantage)
    advantages = torch.stack(advantages[::-1], dim=1)  # (B, T)
    return advantages, advantages + values


# ----------------------------------------------------------------------------------------------------------------
# critic-free advantage estimators (train_ppo.py's ESTIMATORS, --estimator): the same rollout and clipped update as
# PPO, without the value model. Each returns (B, T), 0 on padding; the table says where β's KL goes and whether the
# advantages are whitened.

def rloo_advantages(sequence_rewards, mask, k):
    """RLOO (Ahmadian et al. 2024, "Back to Basics"): k samples per prompt, consecutive in the batch. The
    advantage of sample i is its sequence reward minus the mean of the other k − 1 samples' (leave-one-out
    baseline), on every token of the response. sequence_rewards: (B,) eq. (2)'s per-token rewards summed, RM score
    − β·Σ_t KL_t (the KL in the reward)."""
    r = sequence_rewards.view(-1, k)  # (B/k, k)
    baseline = (r.sum(1, keepdim=True) - r) / (k - 1)  # mean of the others
    return torch.where(mask.bool(), (r - baseline).view(-1, 1), 0.0)


def grpo_advantages(scores, mask, k, eps=1e-6):
    """GRPO (Shao et al. 2024, DeepSeekMath §4.1.2, outcome supervision): k samples per prompt, consecutive in the
    batch; advantage = (r − mean) / (std + eps) over the prompt's group, on every token (a group whose rewards are
    all equal gives 0). scores: (B,) the outcome rewards, without KL: GRPO puts β·k3 KL(π_θ || π_ref) in the loss."""
    r = scores.view(-1, k)  # (B/k, k)
    # the sample std (n − 1), torch's default: the paper does not say which
    a = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    return torch.where(mask.bool(), a.view(-1, 1), 0.0)


def reward_to_go(rewards, mask):
    """The return Σ_{s≥t} r_s (no discount) of each token t of the per-token rewards (B, T): REINFORCE++'s
    advantage (Hu 2025) before it is whitened over the batch, with eq. (2)'s rewards (−β·KL_t on every token, the RM
    score on the last: the KL in the reward, as PPO)."""
    rewards = torch.where(mask.bool(), rewards, 0.0)
    returns = rewards.flip(1).cumsum(1).flip(1)  # (B, T) reverse cumulative sum
    return torch.where(mask.bool(), returns, 0.0)


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2):
    """PPO clipped surrogate; all inputs (B, T). Returns (loss, stats), loss a masked mean over real tokens.

    ratio = π_θ/π_old; loss = −min(ratio·A, clip(ratio, 1 − ε, 1 + ε)·A), written as the max of the negatives.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(pg_loss1, pg_loss2), mask)
    with torch.no_grad():
        stats = {
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),  # k3 of KL(π_old || π_θ)
            "approx_kl_k1": masked_mean(-log_ratio, mask),
            "clipfrac": masked_mean((pg_loss2 > pg_loss1).to(ratio.dtype), mask),  # tokens whose gradient is cut
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(values, old_values, returns, mask, clip=0.2):
    """Clipped value loss ½·max((V − R)², (clip(V, V_old − c, V_old + c) − R)²), masked mean over real tokens."""
    values_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    loss = torch.maximum((values - returns) ** 2, (values_clipped - returns) ** 2)
    return 0.5 * masked_mean(loss, mask)


def ppo_losses(logprobs, old_logprobs, advantages, values, old_values, returns, mask, clip_eps, value_clip):
    """(policy loss, value loss, policy stats) of one minibatch: policy_loss and value_loss together, the unit that
    --compile runs as one graph (kernels.compiled)."""
    pg_loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps)
    return pg_loss, value_loss(values, old_values, returns, mask, value_clip), stats


class AdaptiveKLController:
    """Adapt β so the measured KL tracks a target (Ziegler et al. 2019, §2.2); InstructGPT kept β fixed."""

    def __init__(self, kl_coef, target, horizon):
        self.kl_coef, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl, n_steps):
        error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)  # proportional error, clipped to ±0.2
        self.kl_coef *= 1 + error * n_steps / self.horizon
        return self.kl_coef

    def state_dict(self):
        return {"kl_coef": self.kl_coef, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state):
        self.kl_coef, self.target, self.horizon = state["kl_coef"], state["target"], state["horizon"]


# ----------------------------------------------------------------------------------------------------------------
# PPO's steps on the models (train_ppo.py runs them; bench.py times them)

def response_logprobs_and_entropy(model, tokens, mask, P, temperature):
    """(log π(y_t | x, y_<t), entropy of π(· | x, y_<t)) for the response tokens tokens[:, P:], each (B, N); the
    entropy is for logging (no gradient).

    Hidden state t predicts token t+1, so only hidden states P−1 .. P+N−2 go through the LM head. The rollout
    and the update compute log-probs with this one function: at lr 0, ratio == 1.
    """
    h = model.hidden_states(tokens[:, :-1], attention_mask=mask[:, :-1], start=P - 1)  # (B, N, C)
    return model.logprobs_and_entropy(h, tokens[:, P:], temperature)


def response_values(value_model, tokens, mask, P):
    """V(x, y_<t) for each response token t, (B, N): read where token t is predicted, as its log-prob is.
    float32 also under bf16 autocast: returns, advantages and the value loss are computed in float32."""
    return value_model(tokens[:, :-1], attention_mask=mask[:, :-1], start=P - 1).float()  # (B, N)


def minibatches(b, minibatch_size, grad_accum):
    """One shuffled pass over the rollout batch b: for each minibatch of minibatch_size episodes (over all ranks),
    the list of this rank's micro-batches (grad_accum of them), each with its loss weight. Each micro-batch's loss
    is a mean over its own tokens; weighted by its share of the global minibatch's response tokens, times the
    number of ranks (dist.average_gradients divides by it), any split into micro-batches and ranks gives the same
    gradient (the ptx term, a mean over its own pretraining tokens, gets the same weights: still a weighted mean)."""
    B, world_size = len(b["tokens"]), dist.world_size()
    mb_size = minibatch_size // world_size  # this rank's share of a minibatch
    perm = torch.randperm(B).to(b["tokens"].device)
    for start in range(0, B, mb_size):
        idx = perm[start:start + mb_size]
        n_tokens = dist.all_reduce_sum(b["response_mask"][idx].sum())  # real tokens in the global minibatch
        micro = [{k: v[i] for k, v in b.items()} for i in idx.chunk(grad_accum)]
        yield [(mb, mb["response_mask"].sum() / n_tokens * world_size) for mb in micro]


def optimizer_step(models, optimizers, max_grad_norm, step, state_path):
    """Average each trained model's gradients over the ranks, clip their norm, and step every optimizer."""
    for name, model in models.items():
        dist.average_gradients(model)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        check_finite(norm, step + 1, f"{name} gradient norm", state_path)
    for opt in optimizers:
        opt.step()


def ppo_batch_flops(policy, reward_model, B, T, P, ppo_epochs, value_model=True):
    """Matmul FLOPs of one batch of B sequences of T tokens (P of them prompt), as the code runs them, padding
    included (GPT.forward_flops; training = 3 × forward); the value model's (the reward model's shape: it starts as
    its copy) only if value_model; ptx's extra forwards are not counted:
      generation: policy over T − 1 tokens (prefill, then each sampled token but the last), LM head at N = T − P
      scoring:    policy and reference over T − 1 tokens, value over T − 1 tokens, the last block and the LM head
                  (value head) at the N response positions only; reward model over T
      update:     ppo_epochs × 3 × (policy and value forwards as in scoring)."""
    N = T - P
    lm = policy.forward_flops(T - 1, N, T, n_out=N)
    value = reward_model.forward_flops(T - 1, 0, T, n_out=N) if value_model else 0
    return {"generation": B * policy.forward_flops(T - 1, N, T),
            "scoring": B * (2 * lm + value + reward_model.forward_flops(T, 0, T)),
            "update": ppo_epochs * 3 * B * (lm + value)}
