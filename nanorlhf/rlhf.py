"""The math of InstructGPT (Ouyang et al. 2022, arXiv 2203.02155) as small pure functions, and PPO's steps on the
models that use them (the last section): scoring a rollout, the minibatch loss and the K-epoch update.

Token tensors are (B, T) with a mask of the same shape (1 = real token, 0 = padding). Every mean over tokens
is a masked mean: padded positions never change a result, whatever values they hold. In PPO's steps, tokens
(B, P+N) are left-padded prompts followed by right-padded responses; every per-token tensor is (B, N), the
response positions only.
"""

import math
import os

import torch
import torch.nn.functional as F

from nanorlhf import dist, kernels
from nanorlhf.common import check_finite, get_batch, lm_loss


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
    """Per-token estimate of KL(π_RL || π_SFT) from tokens sampled from π_RL; (B, T) in, (B, T) out. With
    r = π_SFT/π_RL (Schulman 2020, "Approximating KL divergence"):
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
    raise ValueError(f"unknown KL estimator {kind!r}")


def ppo_rewards(scores, finished, logprobs, ref_logprobs, response_mask, kl_coef, kl_kind="k1",
                missing_eos_penalty=1.0):
    """Per-token rewards of InstructGPT's objective, eq. (2) (§3.5):

        objective(φ) = E_(x,y)~π_φ^RL [ r_θ(x, y) − β·log(π_φ^RL(y|x) / π^SFT(y|x)) ] + γ·E_x~D_pretrain [ log π_φ^RL(x) ]

    The first expectation is the RL episode's return: log(π^RL(y|x) / π^SFT(y|x)) = Σ_t log(π^RL(y_t) / π^SFT(y_t)),
    so each response token t gets −β·KL_t (kl_estimate's estimator, k1 in the paper) and the last real token (the
    EOS) also gets the RM score r_θ(x, y), lowered by missing_eos_penalty for a response that never emitted EOS (at
    any RM score, not finishing earns less than finishing). PPO maximizes it with GAE advantages and the clipped
    policy_loss; the γ term, PPO-ptx, is a next-token loss on pretraining text added to the same update
    (minibatch_loss). scores, finished: (B,); the rest (B, N). Returns (rewards, kl, final): (B, N) rewards, (B, N) KL_t
    (0 on padding), and the (B,) reward added at the last token."""
    kl = torch.where(response_mask, kl_estimate(logprobs, ref_logprobs, kl_kind), 0.0)  # (B, N)
    rewards = -kl_coef * kl
    last = response_mask.sum(1) - 1  # (B,) position of the last real response token
    final = scores - missing_eos_penalty * (~finished).float()  # (B,)
    rewards[torch.arange(len(rewards), device=rewards.device), last] += final
    return rewards, kl, final


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalized Advantage Estimation (Schulman et al. 2016); rewards, values, mask: (B, T), right-padded.

    δ_t = r_t + γ·V_{t+1} − V_t and A_t = δ_t + γλ·A_{t+1}; the bandit episode ends at the last real token, so
    V and A after it are 0. Returns (advantages, returns), both (B, T), returns = A + V, 0 on padding.
    InstructGPT used γ = 1, λ = 0.95 (Appendix C.4).
    """
    mask = mask.bool()
    rewards = torch.where(mask, rewards, 0.0)
    values = torch.where(mask, values, 0.0)  # V after the last real token is 0
    next_value = torch.zeros_like(values[:, 0])  # (B,) V_{t+1}
    next_advantage = torch.zeros_like(values[:, 0])  # (B,) A_{t+1}
    advantages = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = torch.where(mask[:, t], delta + gamma * lam * next_advantage, 0.0)
        next_value = values[:, t]
        advantages.append(next_advantage)
    advantages = torch.stack(advantages[::-1], dim=1)  # (B, T)
    return advantages, advantages + values


# ----------------------------------------------------------------------------------------------------------------
# critic-free advantages (train_ppo.py --estimator): the same rollout, scoring and clipped update as PPO, without
# the value model. Each returns (B, T) advantages, 0 on padding; where each puts the KL penalty is in its docstring.

def rloo_advantages(sequence_rewards, mask, k):
    """RLOO (Ahmadian et al. 2024, "Back to Basics"): k samples per prompt, consecutive in the batch. The
    advantage of sample i is its sequence reward minus the mean of the other k − 1 samples' (leave-one-out
    baseline), on every token of the response. KL: in the reward, sequence_rewards = RM − β·Σ_t KL_t."""
    r = sequence_rewards.view(-1, k)  # (B/k, k)
    baseline = (r.sum(1, keepdim=True) - r) / (k - 1)  # mean of the others
    return torch.where(mask.bool(), (r - baseline).view(-1, 1), 0.0)


def grpo_advantages(scores, mask, k, eps=1e-6):
    """GRPO (Shao et al. 2024, DeepSeekMath §4.1.2, outcome supervision): k samples per prompt, consecutive in the
    batch; advantage = (r − mean) / (std + eps) over the prompt's group, on every token (a group whose rewards are
    all equal gives 0). KL: not in the reward; a k3 term β·KL(π_θ || π_ref) in the loss (minibatch_loss)."""
    r = scores.view(-1, k)  # (B/k, k)
    a = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)  # unbiased std, as the paper's code
    return torch.where(mask.bool(), a.view(-1, 1), 0.0)


def reinforce_pp_advantages(rewards, mask):
    """REINFORCE++ (Hu 2025): no critic; the advantage of token t is its return Σ_{s≥t} r_s (γ = 1) of the
    per-token rewards (−β·KL_t on every token, the RM score on the last: the KL in the reward, as PPO), then
    normalized over the batch's real tokens (train_ppo whitens it, as PPO's GAE advantages)."""
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

def response_logprobs(model, tokens, mask, P, temperature):
    """log π(y_t | x, y_<t) and the entropy of π(· | x, y_<t) for the response tokens tokens[:, P:], each (B, N).

    Hidden state t predicts token t+1, so only hidden states P−1 .. P+N−2 go through the LM head. The rollout
    scores and the update recompute with this one function: at lr 0, ratio == 1.
    """
    h = model.hidden_states(tokens[:, :-1], attention_mask=mask[:, :-1], start=P - 1)  # (B, N, C)
    return model.logprobs_and_entropy(h, tokens[:, P:], temperature)


def response_values(value_model, tokens, mask, P):
    """V(x, y_<t) for each response token t, (B, N): read where token t is predicted, as its log-prob is.
    float32 also under bf16 autocast: returns, advantages and the value loss are computed in float32."""
    return value_model(tokens[:, :-1], attention_mask=mask[:, :-1], start=P - 1).float()  # (B, N)


@torch.no_grad()
def score_rollout(policy, ref_policy, value_model, tokens, mask, P, eos_id, temperature):
    """Everything PPO stores about a rollout batch's token ids, as tensors with batch dimension first (the RM's
    scores come from the response text: train_ppo.rollout). value_model None (critic-free estimators): values 0."""
    response_mask = mask[:, P:]  # (B, N) real response tokens, EOS included
    last = P + response_mask.sum(1) - 1  # (B,) index of the last real token: the EOS if one was emitted
    rows = torch.arange(len(tokens), device=tokens.device)
    return {
        "tokens": tokens, "mask": mask, "response_mask": response_mask,
        "logprobs": response_logprobs(policy, tokens, mask, P, temperature)[0],  # (B, N) log π_old
        "ref_logprobs": response_logprobs(ref_policy, tokens, mask, P, temperature)[0],  # (B, N) log π_SFT
        "values": (response_values(value_model, tokens, mask, P) if value_model is not None
                   else torch.zeros_like(response_mask, dtype=torch.float32)),  # (B, N) V_old
        "finished": tokens[rows, last] == eos_id,  # (B,) the response ended with EOS
    }


def gae_advantages(rewards, values, response_mask, gamma, lam):
    """GAE advantages (gae; --compile: kernels.gae), whitened over the real tokens of the whole batch (all ranks),
    and the returns R = A + V (from the advantages before whitening)."""
    advantages, returns = (kernels.gae if kernels.enabled else gae)(rewards, values, response_mask, gamma, lam)
    return masked_whiten(advantages, response_mask, dist.all_reduce_sum), returns


def make_optimizers(policy, value_model, cfg):
    """Adam for the policy and for the value model; --compile takes the fused Adam (one kernel per step)."""
    fused = cfg.compile or None  # None: torch's default (foreach); fused=False would mean the slower per-tensor loop
    return (torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5, fused=fused),
            torch.optim.Adam(value_model.parameters(), lr=cfg.value_lr, eps=1e-5, fused=fused))


def minibatch_loss(policy, value_model, mb, P, ptx_ids, cfg, kl_coef=0.0):
    """One minibatch's loss, for one backward: clipped policy loss + clipped value loss + γ·ptx loss, the PPO-ptx
    objective of eq. (2) as a loss (ppo_rewards). Returns (loss, terms, stats).
    Policy and value are separate models, so the value loss needs no coefficient (Adam is scale-invariant).
    Critic-free estimators: no value loss; GRPO adds β·k3 KL(π_θ || π_ref) per real token (its KL is in the loss).
    Every term is a mean over the minibatch's real tokens, GRPO's included: DeepSeekMath's GRPO (Shao et al. 2024,
    eq. (19)) averages over each response's tokens first, then over responses; the token mean weighs long responses
    more (as Liu et al. 2025, "Dr. GRPO", and PPO here)."""
    m = mb["response_mask"]
    logprobs, entropy = response_logprobs(policy, mb["tokens"], mb["mask"], P, cfg.temperature)  # (b, N) each
    if cfg.estimator == "gae":
        values = response_values(value_model, mb["tokens"], mb["mask"], P)  # (b, N)
        losses = kernels.compiled(ppo_losses) if kernels.enabled else ppo_losses
        pg_loss, v_loss, stats = losses(logprobs, mb["logprobs"], mb["advantages"], values, mb["values"],
                                        mb["returns"], m, cfg.clip_eps, cfg.value_clip)
        terms = {"policy": pg_loss, "value": v_loss}
    else:
        pg_loss, stats = policy_loss(logprobs, mb["logprobs"], mb["advantages"], m, cfg.clip_eps)
        terms = {"policy": pg_loss}
        if cfg.estimator == "grpo":
            terms["kl"] = kl_coef * masked_mean(kl_estimate(logprobs, mb["ref_logprobs"], "k3"), m)
    loss = sum(terms.values())
    if ptx_ids is not None:
        all_tokens = torch.ones_like(ptx_ids, dtype=torch.bool)
        terms["ptx"] = lm_loss(policy, ptx_ids, all_tokens)  # −E log π(x), x ~ D_pretrain
        loss = loss + cfg.ptx_coef * terms["ptx"]
    stats["entropy"] = masked_mean(entropy, m)  # per real token
    return loss, terms, stats


def minibatches(b, minibatch_size, grad_accum):
    """One shuffled pass over the rollout batch b: for each minibatch of minibatch_size episodes (over all ranks),
    the list of this rank's micro-batches (grad_accum of them), each with its loss weight. Each micro-batch's loss
    is a mean over its own tokens; weighted by its share of the global minibatch's response tokens, times the
    number of ranks (dist.average_gradients divides by it), any split into micro-batches and ranks gives the same
    gradient (the ptx term, a mean over sequences, gets the same weights: still a weighted mean)."""
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


def ppo_update(policy, value_model, optimizers, b, P, cfg, step, ptx_stream=None, ema=None, dtype="float32",
               kl_coef=0.0):
    """cfg.ppo_epochs passes over the rollout batch b in shuffled minibatches of cfg.minibatch_size episodes, one
    optimizer step of the policy and the value model each; returns the stats averaged over all micro-batches and
    ranks. ema: the policy's weight average, updated after every step."""
    device = b["tokens"].device
    trained = {"policy": policy, "value": value_model} if cfg.estimator == "gae" else {"policy": policy}
    state_path = os.path.join(cfg.out, "state.pt")
    sums, n = {}, 0
    for _ in range(cfg.ppo_epochs):
        for micro_batches in minibatches(b, cfg.minibatch_size, cfg.grad_accum):
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            for mb, weight in micro_batches:
                ptx_ids = None
                if cfg.ptx_coef > 0:  # pretraining sequences in proportion to the micro-batch's episodes
                    n_ptx = max(1, round(cfg.ptx_per_episode * len(mb["tokens"])))
                    ptx_ids = get_batch(ptx_stream, n_ptx, cfg.ptx_block_size, device)  # (n_ptx, block + 1)
                with dist.autocast(device, dtype):
                    loss, terms, stats = minibatch_loss(policy, value_model, mb, P, ptx_ids, cfg, kl_coef)
                for name, term in terms.items():
                    check_finite(term, step + 1, f"{name} loss", state_path)
                (loss * weight).backward()
                for k, v in {**{f"{k}_loss": t for k, t in terms.items()}, **stats}.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
                n += 1
            optimizer_step(trained, optimizers, cfg.max_grad_norm, step, state_path)
            if ema is not None:
                with torch.no_grad():
                    for p_ema, p in zip(ema.parameters(), policy.parameters()):
                        p_ema.lerp_(p, 1 - cfg.ema)  # ema ← decay·ema + (1 − decay)·θ
    return {k: (dist.all_reduce_sum(v / n) / dist.world_size()).item() for k, v in sums.items()}


def ppo_batch_flops(policy, value_model, B, T, P, ppo_epochs):
    """Matmul FLOPs of one batch of B sequences of T tokens (P of them prompt), as the code runs them, padding
    included (GPT.forward_flops; training = 3 × forward); ptx's extra forwards are not counted:
      generation: policy over T − 1 tokens (prefill, then each sampled token but the last), LM head at N = T − P
      scoring:    policy and reference over T − 1 tokens, value over T − 1 tokens, the last block and the LM head
                  (value head) at the N response positions only; reward model (the value model's shape) over T
      update:     ppo_epochs × 3 × (policy and value forwards as in scoring)."""
    N = T - P
    lm, value = policy.forward_flops(T - 1, N, T, n_out=N), value_model.forward_flops(T - 1, 0, T, n_out=N)
    return {"generation": B * policy.forward_flops(T - 1, N, T),
            "scoring": B * (2 * lm + value + value_model.forward_flops(T, 0, T)),
            "update": ppo_epochs * 3 * B * (lm + value)}
