"""PPO's config and model-facing steps (InstructGPT §3.5), shared by train_ppo.py, bench.py and eval.py: scoring a
rollout's tokens, GAE advantages, the minibatch loss and the K-epoch update. The math itself is rlhf.py's.

Tokens (B, P+N) are left-padded prompts followed by right-padded responses; every per-token tensor is (B, N), the
response positions only.
"""
import os
from dataclasses import dataclass

import torch

from nanorlhf import dist, kernels, rlhf
from nanorlhf.common import check_finite, get_batch, lm_loss
from nanorlhf.config import TrainConfig, arg


@dataclass
class PPOConfig(TrainConfig):
    init: str = arg("runs/default/sft/ckpt.pt", "SFT checkpoint: the initial policy and the frozen reference")
    reward_model: str = arg("runs/default/rm/ckpt.pt", "reward model checkpoint (normalized); also inits the value model")
    reference: str = arg("", "the frozen reference π_SFT of the KL penalty; empty = --init (iterated RLHF: round k "
                             "starts from round k-1's policy, the reference stays SFT)")
    out: str = arg("runs/default/ppo", "output directory (ckpt.pt, state.pt, log.jsonl, metrics.json)")
    ptx_data: str = arg("", "pretraining text for ptx (documents separated by blank lines); empty = the tiny world's")
    batches: int = arg(40, "PPO batches (rollout + update); episodes = batches × batch_size", low=1)
    batch_size: int = arg(64, "prompts (episodes) per rollout", low=1)
    minibatch_size: int = arg(16, "episodes per gradient step (paper: 64 of 512)", low=1)
    ppo_epochs: int = arg(4, "passes over each rollout (paper: 1; 4 here: ~2.5k episodes in all, so reuse them)", low=1)
    lr: float = arg(3e-5, "policy learning rate (Adam), constant after warm-up", low=0)
    value_lr: float = arg(1e-4, "value model learning rate (Adam)", low=0)
    warmup: int = arg(10, "linear learning-rate warm-up over this many batches (paper: 10 iterations)", low=1)
    max_grad_norm: float = arg(1.0, "clip the policy's and the value model's gradient norms to this", positive=True)
    temperature: float = arg(1.0, "sampling temperature of the rollouts (the log-probs use the same T)", positive=True)
    max_new_tokens: int = arg(48, "longest response; one that does not end by then pays --missing_eos_penalty", low=1)
    kl_coef: float = arg(0.1, "β, the per-token KL penalty to SFT (paper: 0.02; at 0.02 our RM is over-optimized)",
                         low=0)
    kl_kind: str = arg("k1", "per-token KL estimator in the reward: k1 = log π/π_SFT (paper) | k3 (≥ 0)")
    adaptive_kl: bool = arg(False, "adapt β toward --target_kl (Ziegler et al. 2019) instead of keeping it fixed")
    target_kl: float = arg(2.0, "target KL per response (nats, k1 summed over tokens) for --adaptive_kl", positive=True)
    kl_horizon: int = arg(1000, "episodes over which --adaptive_kl moves β by at most 20%", low=1)
    gamma: float = arg(1.0, "GAE discount (paper: 1, no discount)", low=0, high=1)
    lam: float = arg(0.95, "GAE λ (paper: 0.95)", low=0, high=1)
    clip_eps: float = arg(0.2, "PPO ratio clip ε (paper: 0.2)", positive=True)
    value_clip: float = arg(0.2, "value clip around the rollout's values", positive=True)
    missing_eos_penalty: float = arg(1.0, "subtracted from the RM score of a response that never emitted EOS (so not "
                                          "finishing never pays: the RM score is kept, then lowered)", low=0)
    ptx_coef: float = arg(0.0, "γ, weight of the pretraining loss (PPO-ptx); 0 = plain PPO (paper: 27.8)", low=0)
    ptx_per_episode: float = arg(0.5, "pretraining sequences per RL episode in each minibatch (paper: 8)", low=0)
    ptx_block_size: int = arg(64, "tokens per pretraining sequence", low=1)
    ema: float = arg(0.0, "decay of an EMA of the policy weights, saved as ckpt.pt (paper: 0.992); 0 = off",
                     low=0, high=0.9999)
    log_every: int = arg(5, "progress line every N batches", low=1)
    save_every: int = arg(10, "write state.pt every N batches", low=1)
    estimator: str = arg("gae", "advantages: gae (PPO: learned critic, KL per token in the reward) | rloo (leave-one-"
                                "out baseline, KL in the sequence reward) | grpo (group-normalized, KL as a k3 term "
                                "in the loss) | reinforce_pp (return-to-go, KL per token in the reward, normalized over "
                                "the batch); the last three train no value model")
    group_size: int = arg(1, "responses sampled per prompt in a batch (rloo and grpo need ≥ 2; --batch_size counts "
                             "responses and must be a multiple)", low=1)
    reward: str = arg("rm", "rm | gold: the reward model, or the tiny world's gold judge × --gold_scale (the oracle)")
    gold_scale: float = arg(10.0, "--reward gold: the gold score (in [0, 1]) times this, near the RM's spread",
                            positive=True)


def response_logprobs(model, tokens, mask, P, temperature):
    """log π(y_t | x, y_<t) and the entropy of π(· | x, y_<t) for the response tokens tokens[:, P:], each (B, N).

    Hidden state t predicts token t+1, so only hidden states P−1 .. P+N−2 go through the LM head (chunked, no
    logits tensor). The rollout scores and the update recompute with this one function: at lr 0, ratio == 1.
    """
    h = model.hidden_states(tokens[:, :-1], attention_mask=mask[:, :-1], start=P - 1)  # (B, N, C)
    return kernels.token_logprobs_and_entropy(h, model.lm_head.weight, tokens[:, P:], temperature)


def response_values(value_model, tokens, mask, P):
    """V(x, y_<t) for each response token t, (B, N): read where token t is predicted, as its log-prob is.
    float32 also under bf16 autocast: returns, advantages and the value loss are computed in float32."""
    return value_model(tokens[:, :-1], attention_mask=mask[:, :-1], start=P - 1).float()  # (B, N)


@torch.no_grad()
def score(policy, ref_policy, value_model, tokens, mask, P, eos_id, temperature):
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
    """GAE advantages (rlhf.gae), whitened over the real tokens of the whole batch (all ranks), and the returns
    R = A + V (from the advantages before whitening)."""
    advantages, returns = kernels.gae(rewards, values, response_mask, gamma, lam)
    return rlhf.masked_whiten(advantages, response_mask, dist.all_reduce_sum), returns


def make_optimizers(policy, value_model, cfg):
    """Adam for the policy and for the value model; --compile takes the fused Adam (one kernel per step)."""
    fused = cfg.compile or None  # None: torch's default (foreach); fused=False would mean the slower per-tensor loop
    return (torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5, fused=fused),
            torch.optim.Adam(value_model.parameters(), lr=cfg.value_lr, eps=1e-5, fused=fused))


def minibatch_loss(policy, value_model, mb, P, ptx_ids, cfg, kl_coef=0.0):
    """One minibatch's loss, for one backward: clipped policy loss + clipped value loss + γ·ptx loss, the PPO-ptx
    objective of eq. (2) as a loss (rlhf.ppo_rewards). Returns (loss, terms, stats).
    Policy and value are separate models, so the value loss needs no coefficient (Adam is scale-invariant).
    Critic-free estimators: no value loss; GRPO adds β·k3 KL(π_θ || π_ref) per real token (its KL is in the loss)."""
    m = mb["response_mask"]
    logprobs, entropy = response_logprobs(policy, mb["tokens"], mb["mask"], P, cfg.temperature)  # (b, N) each
    if cfg.estimator == "gae":
        values = response_values(value_model, mb["tokens"], mb["mask"], P)  # (b, N)
        pg_loss, v_loss, stats = kernels.ppo_loss(logprobs, mb["logprobs"], mb["advantages"], values, mb["values"],
                                                  mb["returns"], m, cfg.clip_eps, cfg.value_clip)
        terms = {"policy": pg_loss, "value": v_loss}
    else:
        pg_loss, stats = rlhf.policy_loss(logprobs, mb["logprobs"], mb["advantages"], m, cfg.clip_eps)
        terms = {"policy": pg_loss}
        if cfg.estimator == "grpo":
            terms["kl"] = kl_coef * rlhf.masked_mean(rlhf.kl_penalty(logprobs, mb["ref_logprobs"], "k3"), m)
    loss = sum(terms.values())
    if ptx_ids is not None:
        terms["ptx"] = lm_loss(policy, ptx_ids, torch.ones_like(ptx_ids, dtype=torch.bool))  # −E log π(x), x ~ D_pretrain
        loss = loss + cfg.ptx_coef * terms["ptx"]
    stats["entropy"] = rlhf.masked_mean(entropy, m)  # per real token
    return loss, terms, stats


def micro_batches(b, idx, grad_accum):
    """This rank's share `idx` of a minibatch, as grad_accum micro-batches, each with its share of the global
    minibatch's response tokens. Each micro-batch's loss is a mean over its own tokens: weighted by that share (and
    multiplied by the number of ranks, which dist.average_gradients divides by), any split into micro-batches and
    ranks gives the same gradient (the ptx term, a mean over sequences, gets the same weights: still a weighted mean)."""
    n_tokens = dist.all_reduce_sum(b["response_mask"][idx].sum())  # real tokens in the global minibatch
    for micro in idx.chunk(grad_accum):
        mb = {k: v[micro] for k, v in b.items()}
        yield mb, mb["response_mask"].sum() / n_tokens


def update(policy, value_model, optimizers, b, P, cfg, step, ptx_stream=None, ema=None, dtype="float32",
           kl_coef=0.0):
    """cfg.ppo_epochs passes over the rollout batch b in shuffled minibatches of cfg.minibatch_size episodes (over
    all ranks), one optimizer step of the policy and the value model each; returns the stats averaged over all
    micro-batches. ema: the policy's weight average, updated after every step."""
    B, device, world = len(b["tokens"]), b["tokens"].device, dist.world_size()
    mb_size = cfg.minibatch_size // world  # this rank's share of a minibatch
    trained = {"policy": policy, "value": value_model} if cfg.estimator == "gae" else {"policy": policy}
    state_path = os.path.join(cfg.out, "state.pt")
    sums, n = {}, 0
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(B).to(device)
        for start in range(0, B, mb_size):
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            for mb, share in micro_batches(b, perm[start:start + mb_size], cfg.grad_accum):
                ptx_ids = None
                if cfg.ptx_coef > 0:  # pretraining sequences in proportion to the micro-batch's episodes
                    n_ptx = max(1, round(cfg.ptx_per_episode * len(mb["tokens"])))
                    ptx_ids = get_batch(ptx_stream, n_ptx, cfg.ptx_block_size, device)  # (n_ptx, block + 1)
                with dist.autocast(device, dtype):
                    loss, terms, stats = minibatch_loss(policy, value_model, mb, P, ptx_ids, cfg, kl_coef)
                for name, term in terms.items():
                    check_finite(term, step + 1, f"{name} loss", state_path)
                (loss * share * world).backward()  # a mean over the global minibatch's tokens (micro_batches)
                for k, v in {**{f"{k}_loss": t for k, t in terms.items()}, **stats}.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
                n += 1
            for name, model in trained.items():
                dist.average_gradients(model)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                check_finite(norm, step + 1, f"{name} gradient norm", state_path)
            for opt in optimizers:
                opt.step()
            if ema is not None:
                with torch.no_grad():
                    for p_ema, p in zip(ema.parameters(), policy.parameters()):
                        p_ema.lerp_(p, 1 - cfg.ema)  # ema ← decay·ema + (1 − decay)·θ
    return {k: (dist.all_reduce_sum(v / n) / world).item() for k, v in sums.items()}


def batch_flops(policy, value_model, B, T, P, ppo_epochs):
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
