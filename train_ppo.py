"""Stage 3: PPO and PPO-ptx against the reward model, with a per-token KL penalty to SFT (InstructGPT §3.5, eq. (2)).

Each PPO batch: sample one response per prompt from the policy (KV-cached, full softmax at temperature T) → score
it with full forwards (policy and reference log-probs, values, RM score) → per-token rewards −β·KL plus the RM
score on the EOS → GAE → `ppo_epochs` passes of clipped policy and value updates in minibatches, with γ·ptx
(next-token loss on pretraining text) added to the same loss for PPO-ptx.

--estimator swaps GAE and the value model for a critic-free advantage of rlhf.py, on the same rollout, scoring and
clipped policy update: rloo and grpo sample --group_size responses per prompt (the batch keeps --batch_size
episodes), reinforce_pp one. --reward gold trains against the tiny world's gold judge instead of the RM (the
oracle: what a perfect reward model would give).

    python train_ppo.py --out runs/default/ppo
    python train_ppo.py --out runs/default/ppo_ptx --ptx_coef 0.5
    python train_ppo.py --out runs/default/grpo --estimator grpo --group_size 4
"""
import copy
import json
import os
import time
from dataclasses import asdict, dataclass

import torch

from nanorlhf import dist, kernels, rlhf
from nanorlhf.checkpoint import make_checkpoint, set_rng_state
from nanorlhf.common import (Progress, check_room, checkpoint_or_compile, get_batch, lm_loss, load_model,
                             read_checkpoint, setup, token_stream, val_loss, write_results, write_state)
from nanorlhf.config import CommonConfig, arg, parse_config
from nanorlhf.data import DataError, check_lengths, line_numbers, read_jsonl, read_text
from nanorlhf.engine import generate
from nanorlhf.evaluation import gold_report, sample_responses, win_rate
from nanorlhf.kernels import token_logprobs_and_entropy
from nanorlhf.reward import score_texts
from nanorlhf.world import make_world


@dataclass
class PPOConfig(CommonConfig):
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
    dtype: str = arg("auto", "auto | bfloat16 | float32: autocast dtype of rollouts and updates (auto: bf16 on CUDA)")
    grad_accum: int = arg(1, "micro-batches per minibatch (per rank); the minibatch is split, the update is the same",
                          low=1)
    activation_checkpointing: bool = arg(False, "recompute each block's activations in the backward (less memory)")
    compile: bool | None = arg(None, "torch.compile the hot path (the transformer, decode step, log-probs, losses, "
                                     "GAE; fused Adam); None = on for CUDA, off for CPU")
    estimator: str = arg("gae", "advantages: gae (PPO: learned critic, KL per token in the reward) | rloo (leave-one-"
                                "out baseline, KL in the sequence reward) | grpo (group-normalized, KL as a k3 term "
                                "in the loss) | reinforce_pp (return-to-go, KL per token in the reward, normalized over "
                                "the batch); the last three train no value model")
    group_size: int = arg(1, "responses sampled per prompt in a batch (rloo and grpo need ≥ 2; --batch_size counts "
                             "responses and must be a multiple)", low=1)
    reward: str = arg("rm", "rm | gold: the reward model, or the tiny world's gold judge × --gold_scale (the oracle)")
    gold_scale: float = arg(10.0, "--reward gold: the gold score (in [0, 1]) times this, near the RM's spread",
                            positive=True)


def load_models(cfg, device):
    """(policy, ref_policy, reward_model, value_model, tok): the policy and a frozen reference from SFT, a frozen
    reward model, and a value model initialized from the reward model (§3.5). All in eval mode, for good: the
    update must score tokens exactly as the rollout did (ratio 1 before any step), so dropout stays off."""
    policy, tok, _ = load_model(cfg.init, "lm", device)
    ref_policy = (load_model(cfg.reference, "lm", device)[0] if cfg.reference else copy.deepcopy(policy))
    ref_policy.requires_grad_(False)
    if read_checkpoint(cfg.reward_model)["head"] != "scalar":
        raise SystemExit(f"{cfg.reward_model}: not a reward model (no scalar head)")
    reward_model, rm_tok, _ = load_model(cfg.reward_model, "scalar", device)
    if rm_tok.name != tok.name:
        raise SystemExit(f"tokenizers differ: policy {tok.name!r}, reward model {rm_tok.name!r}")
    reward_model.requires_grad_(False)
    value_model = copy.deepcopy(reward_model).requires_grad_(True)
    for m in (policy, ref_policy, reward_model, value_model):
        m.eval()
    return policy, ref_policy, reward_model, value_model, tok


# ----------------------------------------------------------------------------------------------------------------
# rollout and scoring; tokens (B, P+N) are left-padded prompts followed by right-padded responses

def response_logprobs(model, tokens, mask, P, temperature, compiled=None):
    """log π(y_t | x, y_<t) and the entropy of π(· | x, y_<t) for the response tokens tokens[:, P:], each (B, N).

    Hidden state t predicts token t+1, so only hidden states P−1 .. P+N−2 go through the LM head (chunked, no
    logits tensor). The rollout scores and the update recompute with this one function: at lr 0, ratio == 1.
    """
    h = model.hidden_states(tokens[:, :-1], attention_mask=mask[:, :-1], start=P - 1)  # (B, N, C)
    return token_logprobs_and_entropy(h, model.lm_head.weight, tokens[:, P:], temperature, compiled=compiled)


def response_values(value_model, tokens, mask, P):
    """V(x, y_<t) for each response token t, (B, N): read where token t is predicted, as its log-prob is.
    float32 also under bf16 autocast: returns, advantages and the value loss are computed in float32."""
    return value_model(tokens[:, :-1], attention_mask=mask[:, :-1], start=P - 1).float()  # (B, N)


@torch.no_grad()
def score(policy, ref_policy, value_model, tokens, mask, P, eos_id, temperature, compiled=None):
    """Everything PPO stores about a rollout batch's token ids, as tensors with batch dimension first (the RM's
    scores come from the response text: `rollout`). value_model None (critic-free estimators): values are 0."""
    response_mask = mask[:, P:]  # (B, N) real response tokens, EOS included
    last = P + response_mask.sum(1) - 1  # (B,) index of the last real token: the EOS if one was emitted
    rows = torch.arange(len(tokens), device=tokens.device)
    return {
        "tokens": tokens, "mask": mask, "response_mask": response_mask,
        "logprobs": response_logprobs(policy, tokens, mask, P, temperature, compiled)[0],  # (B, N) log π_old
        "ref_logprobs": response_logprobs(ref_policy, tokens, mask, P, temperature, compiled)[0],  # (B, N) log π_SFT
        "values": (response_values(value_model, tokens, mask, P) if value_model is not None
                   else torch.zeros_like(response_mask, dtype=torch.float32)),  # (B, N) V_old
        "finished": tokens[rows, last] == eos_id,  # (B,) the response ended with EOS
    }


def rollout(policy, ref_policy, reward_model, value_model, tok, prompts, cfg):
    """Sample one response per prompt (dropout off, full softmax at T) and score it; returns (batch, P, responses).

    The RM reads the decoded response text through `reward.rm_input`, as it read every response in training,
    not the sampled ids: those can be a non-canonical BPE split of the same text, or hold template tokens, which
    the RM never saw. b["retokenized"] marks the samples whose ids differ from the RM's encoding of their text.
    Critic-free estimators skip the value model; --reward gold skips the RM (main scores with the judge)."""
    gen = generate(policy, [tok.format_prompt(p) for p in prompts], cfg.max_new_tokens, tok.eos_id, tok.pad_id,
                   temperature=cfg.temperature, compiled=cfg.compile)
    P = gen.prompt_len
    critic = value_model if cfg.estimator == "gae" else None
    b = score(policy, ref_policy, critic, gen.tokens, gen.attention_mask, P, tok.eos_id, cfg.temperature, cfg.compile)
    sampled = [row[:n] for row, n in zip(gen.tokens[:, P:].tolist(), b["response_mask"].sum(1).tolist())]
    finished = b["finished"].tolist()
    responses = [tok.decode_response(ids) for ids in sampled]
    if cfg.reward == "rm":
        b["scores"] = score_texts(reward_model, tok, prompts, responses, finished, gen.tokens.device).float()  # (B,)
    b["retokenized"] = torch.tensor([ids != tok.encode(y) + [tok.eos_id] * f
                                     for ids, y, f in zip(sampled, responses, finished)], device=gen.tokens.device)
    return b, P, responses


def compute_rewards(scores, finished, logprobs, ref_logprobs, response_mask, kl_coef, kl_kind="k1",
                    missing_eos_penalty=1.0):
    """Per-token rewards of eq. (2): −β·KL_t on every response token, plus the RM score on the last real token
    (the EOS), lowered by missing_eos_penalty for a response that never emitted EOS: at any RM score, not
    finishing earns less than finishing. Returns (rewards, kl, final): (B, N), (B, N) 0 on padding, and the
    (B,) reward added at the last token."""
    kl = torch.where(response_mask, rlhf.kl_penalty(logprobs, ref_logprobs, kl_kind), 0.0)  # (B, N)
    rewards = -kl_coef * kl
    last = response_mask.sum(1) - 1  # (B,) position of the last real response token
    final = scores - missing_eos_penalty * (~finished).float()  # (B,)
    rewards[torch.arange(len(rewards), device=rewards.device), last] += final
    return rewards, kl, final


def compute_advantages(rewards, values, response_mask, gamma, lam, compiled=False):
    """GAE advantages, whitened over the batch's real tokens, and returns R = A + V (from the raw advantages)."""
    gae = kernels.gae_scan if compiled else rlhf.gae  # the compiled reverse scan, or its eager twin
    advantages, returns = gae(rewards, values, response_mask, gamma, lam)
    return dist.masked_whiten(advantages, response_mask), returns  # over all ranks' tokens


def estimate_advantages(rewards, final, b, cfg):
    """(advantages, returns) of a rollout batch by cfg.estimator: GAE with the value model (PPO), or one of
    rlhf.py's critic-free estimators (their returns are the rollout's zero values: no value loss uses them)."""
    m = b["response_mask"]
    if cfg.estimator == "gae":
        return compute_advantages(rewards, b["values"], m, cfg.gamma, cfg.lam, cfg.compile)
    if cfg.estimator == "rloo":  # the sequence reward: RM score − β·Σ KL_t (the per-token rewards summed)
        advantages = rlhf.rloo_advantages(rewards.sum(1), m, cfg.group_size)
    elif cfg.estimator == "grpo":  # the outcome reward alone; the KL is a loss term
        advantages = rlhf.grpo_advantages(final, m, cfg.group_size)
    else:
        advantages = dist.masked_whiten(rlhf.reinforce_pp_advantages(rewards, m), m)
    return advantages, b["values"]


def batch_prompts(prompts, step, batch_size, seed):
    """The prompts of batch `step`: a fresh seeded shuffle per pass over the prompts (a tail shorter than a batch
    is skipped). A function of (seed, step) only, so --resume restores the data order from the step."""
    per_pass = len(prompts) // batch_size
    pass_, i = divmod(step, per_pass)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed * 1000 + pass_))
    return [prompts[j] for j in order[i * batch_size:(i + 1) * batch_size].tolist()]


# ----------------------------------------------------------------------------------------------------------------
# the update

def make_optimizers(policy, value_model, cfg):
    """Adam for the policy and for the value model; compiled runs take the fused Adam (one kernel per step)."""
    fused = cfg.compile or None  # None: torch's default (foreach); fused=False would mean the slower per-tensor loop
    return (torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5, fused=fused),
            torch.optim.Adam(value_model.parameters(), lr=cfg.value_lr, eps=1e-5, fused=fused))


def ppo_losses(policy, value_model, mb, P, ptx_ids, cfg, kl_coef=0.0):
    """One minibatch's loss, for one backward: clipped policy loss + clipped value loss + γ·ptx loss.
    Policy and value are separate models, so the value loss needs no coefficient (Adam is scale-invariant).
    Critic-free estimators: no value loss; GRPO adds β·k3 KL(π_θ || π_ref) per real token (its KL is in the loss)."""
    m = mb["response_mask"]
    logprobs, entropy = response_logprobs(policy, mb["tokens"], mb["mask"], P, cfg.temperature,
                                          cfg.compile)  # (b, N) each
    if cfg.estimator == "gae":
        values = response_values(value_model, mb["tokens"], mb["mask"], P)  # (b, N)
        ppo_loss = kernels.ppo_loss_fused if cfg.compile else kernels.ppo_loss  # one compiled graph, or its twin
        pg_loss, v_loss, stats = ppo_loss(logprobs, mb["logprobs"], mb["advantages"], values, mb["values"],
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


def ppo_update(policy, value_model, optimizers, b, P, cfg, step, ptx_stream=None, ema=None, dtype="float32",
               kl_coef=0.0):
    """cfg.ppo_epochs passes over the batch in shuffled minibatches; returns stats averaged over all micro-batches.

    Several ranks: `b` is this rank's share of the rollouts and a minibatch is cfg.minibatch_size episodes over all
    ranks. Each minibatch is cfg.grad_accum micro-batches; a micro-batch's loss (means over its response tokens) is
    weighted by its share of the global minibatch's response tokens, so any split into micro-batches and ranks
    gives the same gradient (the ptx term, a mean over sequences, gets the same weights: still a weighted mean)."""
    B, device, world = len(b["tokens"]), b["tokens"].device, dist.world_size()
    mb_size = cfg.minibatch_size // world  # this rank's share of a minibatch
    trained = {"policy": policy, "value": value_model} if cfg.estimator == "gae" else {"policy": policy}
    sums, n = {}, 0
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(B).to(device)
        for start in range(0, B, mb_size):
            idx = perm[start:start + mb_size]
            n_tokens = dist.all_reduce_sum(b["response_mask"][idx].sum())  # real tokens in the global minibatch
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            for micro in idx.chunk(cfg.grad_accum):
                mb = {k: v[micro] for k, v in b.items()}
                ptx_ids = None
                if cfg.ptx_coef > 0:
                    n_ptx = max(1, round(cfg.ptx_per_episode * len(micro)))
                    ptx_ids = get_batch(ptx_stream, n_ptx, cfg.ptx_block_size, device)  # (n_ptx, block + 1)
                with dist.autocast(device, dtype):
                    loss, terms, stats = ppo_losses(policy, value_model, mb, P, ptx_ids, cfg, kl_coef)
                for name, term in terms.items():
                    if not torch.isfinite(term):
                        raise SystemExit(f"step {step + 1}: non-finite {name} loss ({term.item()})")
                share = mb["response_mask"].sum() / n_tokens  # this micro-batch's share of the minibatch's tokens
                (loss * share * world).backward()  # average_gradients divides by the number of ranks
                for k, v in {**{f"{k}_loss": t for k, t in terms.items()}, **stats}.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
                n += 1
            for name, model in trained.items():
                dist.average_gradients(model)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                if not torch.isfinite(norm):
                    raise SystemExit(f"step {step + 1}: non-finite {name} gradient norm")
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


# ----------------------------------------------------------------------------------------------------------------
# evaluation

def evaluate(model, tok, world, prompts, val_stream, cfg, device):
    """Gold report of T-sampled answers to held-out prompts and the pretraining validation loss (alignment tax)."""
    g = torch.Generator(device=device).manual_seed(cfg.seed)  # the same stream for every model evaluated
    responses = sample_responses(model, tok, prompts, cfg.max_new_tokens, cfg.temperature, generator=g)
    report = gold_report(world, prompts, responses)
    report["val_loss"] = val_loss(model, val_stream, model.config.block_size, device)
    return report


def main(argv=None):
    cfg = parse_config(PPOConfig, argv)
    dist.init(cfg.device)  # under torchrun: one process per device, each its own share of every batch's rollouts
    device = setup(cfg)
    dtype = dist.resolve_dtype(cfg.dtype, device)
    if cfg.batch_size % dist.world_size() or cfg.minibatch_size % dist.world_size():
        raise SystemExit(f"--batch_size and --minibatch_size must be multiples of the {dist.world_size()} processes")
    if cfg.estimator not in ("gae", "rloo", "grpo", "reinforce_pp"):
        raise SystemExit(f"--estimator {cfg.estimator!r}: expected gae, rloo, grpo or reinforce_pp")
    if cfg.estimator in ("rloo", "grpo") and cfg.group_size < 2:
        raise SystemExit(f"--estimator {cfg.estimator} compares samples of one prompt: --group_size must be ≥ 2")
    if (cfg.batch_size // cfg.group_size) % dist.world_size() or cfg.batch_size % cfg.group_size:
        raise SystemExit(f"--batch_size {cfg.batch_size} must be --group_size {cfg.group_size} × a multiple of the "
                         f"{dist.world_size()} processes")
    if cfg.reward not in ("rm", "gold") or (cfg.reward == "gold" and cfg.data):
        raise SystemExit(f"--reward {cfg.reward!r}: expected rm, or gold (the tiny world's judge, not with --data)")
    cfg.compile = kernels.use_compile(device) if cfg.compile is None else cfg.compile  # resolved, saved in state.pt
    try:
        prompts = [r["prompt"] for r in read_jsonl(cfg.data, "ppo")] if cfg.data else None
        ptx_docs = read_text(cfg.ptx_data) if cfg.ptx_data else None
    except DataError as e:
        print(e)
        raise SystemExit(2)
    world = make_world(cfg.world_seed, cfg.world_scale)
    prompts = prompts or world.prompts("ppo")
    if len(prompts) < cfg.batch_size:
        raise SystemExit(f"{len(prompts)} prompts, fewer than one batch of {cfg.batch_size}")

    policy, ref_policy, reward_model, value_model, tok = load_models(cfg, device)
    if cfg.data:  # room for the prompt and the longest response, checked before anything is written
        T = policy.config.block_size
        lengths = [(f"{cfg.data}:{n}", len(tok.format_prompt(p))) for p, n in zip(prompts, line_numbers(cfg.data))]
        try:
            check_lengths(lengths, T - cfg.max_new_tokens, "prompt",
                          f"block_size {T} - max_new_tokens {cfg.max_new_tokens} =")
        except DataError as e:
            print(e)
            raise SystemExit(2)
    else:
        check_room(tok, prompts, cfg.max_new_tokens, policy.config.block_size)
    if dist.world_size() > 1:
        torch.manual_seed(cfg.seed + dist.rank())  # each rank samples its own rollouts
    ema = copy.deepcopy(policy).requires_grad_(False) if cfg.ema > 0 else None
    for m in (policy, value_model):
        checkpoint_or_compile(m, cfg.activation_checkpointing, cfg.compile)
    if cfg.compile:  # the frozen models are never checkpointed (no backward)
        for m in (ref_policy, reward_model):
            kernels.compile_model(m)
    opt_policy, opt_value = make_optimizers(policy, value_model, cfg)
    kl_ctl = rlhf.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    ptx_stream = token_stream(tok, ptx_docs or world.pretrain_docs("train")) if cfg.ptx_coef > 0 else None
    print(f"{len(prompts)} prompts | policy and value {policy.num_params() / 1e6:.2f}M parameters each")

    step, state_path, log_path = 0, os.path.join(cfg.out, "state.pt"), os.path.join(cfg.out, "log.jsonl")
    if cfg.resume and os.path.exists(state_path):
        state = read_checkpoint(state_path, map_location=device)
        policy.load_state_dict(state["model"])
        opt_policy.load_state_dict(state["optimizer"])
        value_model.load_state_dict(state["extra"]["value_model"])
        opt_value.load_state_dict(state["extra"]["value_optimizer"])
        kl_ctl.load_state_dict(state["extra"]["kl_ctl"])
        if ema is not None:
            ema.load_state_dict(state["extra"]["ema"])
        step = state["step"]
        print(f"resumed from {state_path} at step {step}")
    if dist.is_main():
        os.makedirs(cfg.out, exist_ok=True)
        log_lines = open(log_path).readlines()[:step] if step and os.path.exists(log_path) else []
        with open(log_path + ".tmp", "w") as f:  # drop lines of updates after the resumed state
            f.writelines(log_lines)
        os.replace(log_path + ".tmp", log_path)  # atomic: a kill here cannot lose the lines kept

    total = cfg.batches if cfg.max_steps < 0 else min(cfg.batches, cfg.max_steps)
    progress = Progress(total, cfg.log_every, None, device, start=step)  # FLOPs counted per batch: batch_flops
    if step:
        set_rng_state(state["rng"])
    t_start = time.perf_counter()
    while step < total:
        t0 = time.perf_counter()
        for opt, lr in ((opt_policy, cfg.lr), (opt_value, cfg.value_lr)):
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / cfg.warmup)
        group = batch_prompts(prompts, step, cfg.batch_size // cfg.group_size, cfg.seed)
        batch = [p for p in dist.shard(group) for _ in range(cfg.group_size)]  # this rank's prompts, each k times
        with dist.autocast(device, dtype):
            b, P, responses = rollout(policy, ref_policy, reward_model, value_model, tok, batch, cfg)
        if not cfg.data:
            gold = torch.tensor([world.gold_score(p, y, f) for p, y, f in zip(batch, responses, b["finished"].tolist())],
                                dtype=torch.float64)
            if cfg.reward == "gold":  # the oracle: the judge the labelers only approximate
                b["scores"] = (cfg.gold_scale * gold).to(device=device, dtype=torch.float32)
        kl_coef = kl_ctl.kl_coef
        rewards, kl, final = compute_rewards(b["scores"], b["finished"], b["logprobs"], b["ref_logprobs"],
                                             b["response_mask"], 0.0 if cfg.estimator == "grpo" else kl_coef,
                                             cfg.kl_kind, cfg.missing_eos_penalty)  # GRPO: the KL is in the loss
        for name, x in (("KL", kl), ("reward", rewards)):
            if not torch.isfinite(x).all():
                raise SystemExit(f"step {step + 1}: non-finite {name} in the rollout")
        b["advantages"], b["returns"] = estimate_advantages(rewards, final, b, cfg)
        m = b["response_mask"]
        k1 = torch.where(m, rlhf.kl_penalty(b["logprobs"], b["ref_logprobs"], "k1"), 0.0).sum(1)  # (B,) per response
        k3 = torch.where(m, rlhf.kl_penalty(b["logprobs"], b["ref_logprobs"], "k3"), 0.0).sum(1)
        # means over the global batch (all ranks); explained_var is this rank's
        log = {"step": step + 1, "episodes": (step + 1) * cfg.batch_size, "reward": dist.mean(final).item(),
               "rm_score": dist.mean(b["scores"]).item(), "kl": dist.mean(k1).item(), "kl_k3": dist.mean(k3).item(),
               "kl_coef": kl_coef, "response_len": dist.mean(m.sum(1).float()).item(),
               "eos_fraction": dist.mean(b["finished"].float()).item(),
               "retokenized": dist.mean(b["retokenized"].float()).item()}
        if cfg.estimator == "gae":
            log["explained_var"] = rlhf.explained_variance(b["values"], b["returns"], m).item()
        if not cfg.data:
            log["gold"] = dist.mean(gold).item()
        log.update(ppo_update(policy, value_model, (opt_policy, opt_value), b, P, cfg, step, ptx_stream, ema, dtype,
                              kl_coef))
        if cfg.adaptive_kl:
            kl_ctl.update(log["kl"], cfg.batch_size)
        step += 1
        seconds = time.perf_counter() - t0
        n_tokens = b["mask"].numel() * dist.world_size()
        log.update(tokens_per_s=n_tokens / seconds, seconds=seconds)
        if dist.is_main():
            with open(log_path, "a") as f:
                f.write(json.dumps(log) + "\n")
        flops = sum(batch_flops(policy, value_model, *b["tokens"].shape, P, cfg.ppo_epochs).values())
        flops *= dist.world_size()  # every rank ran its share of the batch
        progress.step(step - 1, n_tokens, flops, **{k: log[k] for k in ("reward", "gold", "kl") if k in log})
        if (step % cfg.save_every == 0 or step == total) and dist.is_main():
            extra = {"value_model": value_model.state_dict(), "value_optimizer": opt_value.state_dict(),
                     "kl_ctl": kl_ctl.state_dict(), "ema": ema.state_dict() if ema is not None else None}
            write_state(state_path, make_checkpoint(policy, policy.config, "lm", tok, asdict(cfg), step,
                                                    opt_policy, extra))
    train_seconds = time.perf_counter() - t_start

    final = ema if ema is not None else policy
    results = {"steps": step, "episodes": step * cfg.batch_size, "train_seconds": train_seconds}
    if not cfg.data:
        test_prompts, val_stream = world.prompts("test"), token_stream(tok, world.pretrain_docs("val"))
        ppo, sft = (evaluate(m, tok, world, test_prompts, val_stream, cfg, device) for m in (final, ref_policy))
        rate, interval = win_rate(ppo["scores"], sft["scores"])
        by_cat = {c: win_rate([s for p, s in zip(test_prompts, ppo["scores"]) if world.category(p) == c],
                              [s for p, s in zip(test_prompts, sft["scores"]) if world.category(p) == c])[0]
                  for c in sorted(set(map(world.category, test_prompts)))}
        results.update(gold={"ppo": ppo["gold"], "sft": sft["gold"]}, win_rate=rate, win_rate_95=interval,
                       win_rate_by_category=by_cat, val_loss={"ppo": ppo["val_loss"], "sft": sft["val_loss"]},
                       eos_fraction={"ppo": ppo["eos_fraction"], "sft": sft["eos_fraction"]},
                       components={"ppo": ppo["components"], "sft": sft["components"]})
        print(f"test gold: PPO {ppo['gold']:.4f} vs SFT {sft['gold']:.4f} | win rate vs SFT {rate:.1%} "
              f"[{interval[0]:.1%}, {interval[1]:.1%}] | val loss: PPO {ppo['val_loss']:.4f} vs SFT "
              f"{sft['val_loss']:.4f} | {train_seconds:.0f}s")
    if dist.is_main():
        write_results(cfg.out, make_checkpoint(final, final.config, "lm", tok, asdict(cfg), step, extra=results),
                      results)
    return results


if __name__ == "__main__":
    main()
