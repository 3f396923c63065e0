"""Stage 3: PPO and PPO-ptx against the reward model, with a per-token KL penalty to SFT (InstructGPT §3.5, eq. (2)).

One PPO iteration, as main runs it: collect a rollout (`rollout`: one response per prompt sampled from the policy,
and every number PPO needs about it) → per-token rewards of eq. (2), −β·KL on every response token and the RM score
on its last (rlhf.ppo_rewards) → advantages by the --estimator's row of ESTIMATORS (PPO: GAE with a value model) →
--ppo_epochs passes of clipped policy and value updates in minibatches (`ppo_update`, `minibatch_loss`), with γ·ptx
(next-token loss on pretraining text) in the same loss for PPO-ptx → log, save. The math is nanorlhf/rlhf.py's, the
model nanorlhf/model.py's, the sampler nanorlhf/engine.py's; the flags are config.PPOConfig.

The critic-free estimators of ESTIMATORS replace GAE and the value model (which they do not build) on the same
rollout and clipped policy update: rloo and grpo sample --group_size responses per prompt (the batch keeps
--batch_size episodes), reinforce_pp one. --reward gold trains against the tiny world's gold judge instead of the
RM (the oracle: what a perfect reward model would give).

    python train_ppo.py --out runs/default/ppo
    python train_ppo.py --out runs/default/ppo_ptx --ptx_coef 0.5
    python train_ppo.py --out runs/default/grpo --estimator grpo --group_size 4
"""
import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from nanorlhf import dist, kernels, rlhf
from nanorlhf.checkpoint import make_checkpoint
from nanorlhf.common import (Progress, check_finite, check_room, checkpoint_or_compile, epoch_batch, get_batch,
                             lm_loss, load_model, read_checkpoint, resume, setup, token_stream, val_loss, write_results,
                             write_state)
from nanorlhf.config import PPOConfig, flag_error, parse_config
from nanorlhf.data import DataError, check_lengths, line_numbers, read_jsonl, read_text
from nanorlhf.engine import generate
from nanorlhf.evaluation import gold_eval, win_rate
from nanorlhf.reward import score_texts
from nanorlhf.world import make_world


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator (--estimator): how a rollout's per-token rewards become advantages."""
    advantages: Callable  # (rewards, values, response_mask, cfg) → (B, N) advantages; values None without a value model
    value_model: bool  # trains a value model (initialized from the RM) on the returns R = A + V, A before whitening
    kl: str  # where β's KL penalty goes: "reward" (−β·KL_t on each token, eq. (2)) | "loss" (β·k3 KL(π_θ || π_ref))
    whiten: bool  # advantages whitened over the batch's real tokens (all ranks)
    groups: bool = False  # compares the --group_size samples of each prompt (consecutive in the batch; needs ≥ 2)


# The advantage estimators. A new one: its function in nanorlhf/rlhf.py, a row here, a test (docs/extending.md).
ESTIMATORS = {
    # PPO: GAE (Schulman et al. 2016) with the value model; --compile: kernels.gae, the same numbers
    "gae": Estimator(lambda rewards, values, m, cfg: (kernels.gae if kernels.enabled else rlhf.gae)(
        rewards, values, m, cfg.discount, cfg.lam)[0], value_model=True, kl="reward", whiten=True),
    # RLOO (Ahmadian et al. 2024): the sequence reward, RM score − β·Σ_t KL_t, minus the other samples' mean
    "rloo": Estimator(lambda rewards, values, m, cfg: rlhf.rloo_advantages(rewards.sum(1), m, cfg.group_size),
                      value_model=False, kl="reward", whiten=False, groups=True),
    # GRPO (Shao et al. 2024): the outcome reward (no KL in it: β = 0 there) normalized within its group
    "grpo": Estimator(lambda rewards, values, m, cfg: rlhf.grpo_advantages(rewards.sum(1), m, cfg.group_size),
                      value_model=False, kl="loss", whiten=False, groups=True),
    # REINFORCE++ (Hu 2025): each token's reward-to-go, whitened over the batch
    "reinforce_pp": Estimator(lambda rewards, values, m, cfg: rlhf.reward_to_go(rewards, m),
                              value_model=False, kl="reward", whiten=True),
}


def check_config(cfg):
    """Exit with one line (status 2) on flags that cannot work together, before anything is loaded."""
    world_size = dist.world_size()
    if cfg.batch_size % world_size or cfg.minibatch_size % world_size:
        flag_error(f"--batch_size and --minibatch_size must be multiples of the {world_size} processes")
    if cfg.batch_size % cfg.minibatch_size:
        flag_error(f"--minibatch_size {cfg.minibatch_size}: must divide --batch_size {cfg.batch_size} (each "
                   f"optimizer step takes a full minibatch of episodes)")
    if cfg.estimator not in ESTIMATORS:
        flag_error(f"--estimator {cfg.estimator!r}: expected one of {', '.join(ESTIMATORS)}")
    if ESTIMATORS[cfg.estimator].groups and cfg.group_size < 2:
        flag_error(f"--estimator {cfg.estimator} compares samples of one prompt: --group_size must be ≥ 2")
    if (cfg.batch_size // cfg.group_size) % world_size or cfg.batch_size % cfg.group_size:
        flag_error(f"--batch_size {cfg.batch_size} must be --group_size {cfg.group_size} × a multiple of the "
                   f"{world_size} processes")
    if cfg.reward not in ("rm", "gold") or (cfg.reward == "gold" and cfg.data):
        flag_error(f"--reward {cfg.reward!r}: expected rm, or gold (the tiny world's judge, not with --data)")


def check_prompts(cfg, prompts, tok, block_size):
    """Room for every prompt and the longest response, checked before anything is written."""
    if not cfg.data:
        return check_room(tok, prompts, cfg.max_new_tokens, block_size)
    lengths = [(f"{cfg.data}:{n}", len(tok.format_prompt(p))) for p, n in zip(prompts, line_numbers(cfg.data))]
    try:
        check_lengths(lengths, block_size - cfg.max_new_tokens, "prompt",
                      f"block_size {block_size} - max_new_tokens {cfg.max_new_tokens} =")
    except DataError as e:
        print(e)
        raise SystemExit(2)


def load_models(cfg, device):
    """(policy, ref_policy, reward_model, value_model, tok): the policy and a frozen reference from SFT, a frozen
    reward model, and a value model initialized from the reward model (§3.5), None for an estimator without one. All
    in eval mode, for good: the update must score tokens exactly as the rollout did (ratio 1 before any step), so
    dropout stays off."""
    policy, tok, _ = load_model(cfg.init, "lm", device)
    ref_policy = (load_model(cfg.reference, "lm", device)[0] if cfg.reference else copy.deepcopy(policy))
    ref_policy.requires_grad_(False)
    if read_checkpoint(cfg.reward_model)["head"] != "scalar":
        raise SystemExit(f"{cfg.reward_model}: not a reward model (no scalar head)")
    reward_model, rm_tok, _ = load_model(cfg.reward_model, "scalar", device)
    if rm_tok.name != tok.name:
        raise SystemExit(f"tokenizers differ: policy {tok.name!r}, reward model {rm_tok.name!r}")
    reward_model.requires_grad_(False)
    value_model = None
    if ESTIMATORS[cfg.estimator].value_model:
        value_model = copy.deepcopy(reward_model).requires_grad_(True)
    for m in (policy, ref_policy, reward_model, value_model):
        if m is not None:
            m.eval()
    return policy, ref_policy, reward_model, value_model, tok


def make_optimizers(policy, value_model, cfg):
    """[Adam for the policy, Adam for the value model (if any)]; --compile takes the fused Adam (one kernel per
    step)."""
    fused = cfg.compile or None  # None: torch's default (foreach); fused=False would mean the slower per-tensor loop
    optimizers = [torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5, fused=fused)]
    if value_model is not None:
        optimizers.append(torch.optim.Adam(value_model.parameters(), lr=cfg.value_lr, eps=1e-5, fused=fused))
    return optimizers


# ----------------------------------------------------------------------------------------------------------------
# the pieces of one PPO iteration

@torch.no_grad()
def rollout(policy, ref_policy, reward_model, value_model, tok, prompts, cfg, world=None):
    """Sample one response per prompt from π_old (dropout off, full softmax at T) and score it; returns (b, P,
    responses): b the rollout, every tensor (B, ...) and every per-token one (B, N) over the response positions.

    The RM reads the decoded response text through `reward.rm_input`, as it read every response in training, not
    the sampled ids: those can be a non-canonical BPE split of the same text, or hold template tokens, which the RM
    never saw; b["retokenized"] marks the samples whose ids differ from the RM's encoding of their text. world: the
    tiny world, whose gold judge scores every response (None with --data: no gold); with --reward gold its score is
    the reward (the oracle)."""
    gen = generate(policy, [tok.format_prompt(p) for p in prompts], cfg.max_new_tokens, tok.eos_id, tok.pad_id,
                   temperature=cfg.temperature)
    tokens, mask, P, T = gen.tokens, gen.attention_mask, gen.prompt_len, cfg.temperature  # tokens, mask: (B, P+N)
    response_mask = mask[:, P:]  # (B, N) real response tokens, EOS included
    last = P + response_mask.sum(1) - 1  # (B,) index of the last real token: the EOS if one was emitted
    finished = tokens[torch.arange(len(tokens), device=tokens.device), last] == tok.eos_id  # (B,)
    sampled = [row[:n] for row, n in zip(tokens[:, P:].tolist(), response_mask.sum(1).tolist())]
    responses = [tok.decode_response(ids) for ids in sampled]
    gold = None
    if world is not None:
        gold = torch.tensor([world.gold_score(p, y, f) for p, y, f in zip(prompts, responses, finished.tolist())],
                            dtype=torch.float64)
    if cfg.reward == "gold":  # the oracle: the judge the labelers only approximate
        scores = (cfg.gold_scale * gold).to(device=tokens.device, dtype=torch.float32)
    else:
        scores = score_texts(reward_model, tok, prompts, responses, finished.tolist(), tokens.device).float()
    b = {
        "tokens": tokens, "mask": mask, "response_mask": response_mask,
        "logprobs": rlhf.response_logprobs_and_entropy(policy, tokens, mask, P, T)[0],  # (B, N) log π_old
        "ref_logprobs": rlhf.response_logprobs_and_entropy(ref_policy, tokens, mask, P, T)[0],  # log π_SFT
        "values": rlhf.response_values(value_model, tokens, mask, P) if value_model is not None else None,  # V_old
        "scores": scores,  # (B,) the RM's score of each response (--reward gold: gold_scale × the judge's)
        "gold": gold,  # (B,) the gold judge's score, float64 on the CPU (None with --data)
        "finished": finished,  # (B,) the response ended with EOS
        "retokenized": torch.tensor([ids != tok.encode(y) + [tok.eos_id] * f  # (B,)
                                     for ids, y, f in zip(sampled, responses, finished.tolist())],
                                    device=tokens.device),
    }
    return b, P, responses


def batch_log(b, final, returns, kl_coef, step, cfg):
    """The rollout's diagnostics: means over the global batch (all ranks); explained_var is this rank's."""
    m = b["response_mask"]
    k1 = torch.where(m, rlhf.kl_estimate(b["logprobs"], b["ref_logprobs"], "k1"), 0.0).sum(1)  # (B,) per response
    k3 = torch.where(m, rlhf.kl_estimate(b["logprobs"], b["ref_logprobs"], "k3"), 0.0).sum(1)
    log = {"step": step + 1, "episodes": (step + 1) * cfg.batch_size, "reward": dist.mean(final).item(),
           "rm_score": dist.mean(b["scores"]).item(), "kl": dist.mean(k1).item(), "kl_k3": dist.mean(k3).item(),
           "kl_coef": kl_coef, "response_len": dist.mean(m.sum(1).float()).item(),
           "eos_fraction": dist.mean(b["finished"].float()).item(),
           "retokenized": dist.mean(b["retokenized"].float()).item()}
    if b["values"] is not None:
        log["explained_var"] = rlhf.explained_variance(b["values"], returns, m).item()
    if b["gold"] is not None:
        log["gold"] = dist.mean(b["gold"]).item()
    return log


def minibatch_loss(policy, value_model, mb, P, ptx_ids, cfg, kl_coef=0.0):
    """One minibatch's loss, for one backward: clipped policy loss + clipped value loss + γ·ptx loss, the PPO-ptx
    objective of eq. (2) as a loss (rlhf.ppo_rewards). Returns (loss, terms, stats).
    Policy and value are separate models, so the value loss needs no coefficient (Adam is scale-invariant).
    Without a value model, no value loss; an estimator whose KL is in the loss (GRPO) adds β·k3 KL(π_θ || π_ref).
    The policy and value losses and the KL term are means over the minibatch's real response tokens, GRPO's too:
    DeepSeekMath's GRPO (Shao et al. 2024, eq. (19)) averages over each response's tokens first, then over
    responses; the token mean weighs long responses more (as Liu et al. 2025, "Dr. GRPO", and PPO here). The ptx
    term is a mean over the tokens of ptx_ids (n_ptx pretraining sequences, all of one length, all real)."""
    m = mb["response_mask"]
    logprobs, entropy = rlhf.response_logprobs_and_entropy(policy, mb["tokens"], mb["mask"], P,
                                                           cfg.temperature)  # (b, N)
    if value_model is not None:
        values = rlhf.response_values(value_model, mb["tokens"], mb["mask"], P)  # (b, N)
        losses = kernels.compiled(rlhf.ppo_losses) if kernels.enabled else rlhf.ppo_losses
        pg_loss, v_loss, stats = losses(logprobs, mb["logprobs"], mb["advantages"], values, mb["values"],
                                        mb["returns"], m, cfg.clip_eps, cfg.value_clip)
        terms = {"policy": pg_loss, "value": v_loss}
    else:
        pg_loss, stats = rlhf.policy_loss(logprobs, mb["logprobs"], mb["advantages"], m, cfg.clip_eps)
        terms = {"policy": pg_loss}
    if ESTIMATORS[cfg.estimator].kl == "loss":
        terms["kl"] = kl_coef * rlhf.masked_mean(rlhf.kl_estimate(logprobs, mb["ref_logprobs"], "k3"), m)
    loss = sum(terms.values())
    if ptx_ids is not None:
        all_tokens = torch.ones_like(ptx_ids, dtype=torch.bool)
        terms["ptx"] = lm_loss(policy, ptx_ids, all_tokens)  # −E log π(x), x ~ D_pretrain
        loss = loss + cfg.ptx_coef * terms["ptx"]
    stats["entropy"] = rlhf.masked_mean(entropy, m)  # per real token
    return loss, terms, stats


def ppo_update(policy, value_model, optimizers, b, advantages, returns, P, cfg, step, kl_coef=0.0, ptx_stream=None,
               ema=None, dtype="float32"):
    """cfg.ppo_epochs passes over the rollout b with its advantages and returns (None without a value model), in
    shuffled minibatches of cfg.minibatch_size episodes, one optimizer step of the policy and the value model each;
    returns the stats averaged over all micro-batches and ranks. ema: the policy's weight average, updated after
    every step."""
    device = b["tokens"].device
    batch = {k: b[k] for k in ("tokens", "mask", "response_mask", "logprobs", "ref_logprobs")}  # what the loss reads
    batch["advantages"] = advantages
    trained = {"policy": policy}
    if value_model is not None:
        batch.update(values=b["values"], returns=returns)
        trained["value"] = value_model
    state_path = os.path.join(cfg.out, "state.pt")  # named by the NaN guard: the last good state
    sums, n = {}, 0
    for _ in range(cfg.ppo_epochs):
        for micro_batches in rlhf.minibatches(batch, cfg.minibatch_size, cfg.grad_accum):
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
            rlhf.optimizer_step(trained, optimizers, cfg.max_grad_norm, step, state_path)
            if ema is not None:
                with torch.no_grad():
                    for p_ema, p in zip(ema.parameters(), policy.parameters()):
                        p_ema.lerp_(p, 1 - cfg.ema)  # ema ← decay·ema + (1 − decay)·θ
    return {k: (dist.all_reduce_sum(v / n) / dist.world_size()).item() for k, v in sums.items()}


# ----------------------------------------------------------------------------------------------------------------
# state, logs and the final check

def restore_state(cfg, policy, value_model, optimizers, kl_ctl, ema, device):
    """--resume: every model, optimizer and controller as state.pt left them; returns the batches done (0 if
    starting fresh)."""
    state = resume(cfg, policy, optimizers[0], map_location=device)
    if state is None:
        return 0
    if value_model is not None:
        value_model.load_state_dict(state["extra"]["value_model"])
        optimizers[1].load_state_dict(state["extra"]["value_optimizer"])
    kl_ctl.load_state_dict(state["extra"]["kl_ctl"])
    if ema is not None:
        ema.load_state_dict(state["extra"]["ema"])
    return state["step"]


def save_state(path, cfg, policy, value_model, optimizers, kl_ctl, ema, tok, step):
    """state.pt, written atomically: what restore_state reads back (value_model None: no value model)."""
    extra = {"value_model": value_model.state_dict() if value_model is not None else None,
             "value_optimizer": optimizers[1].state_dict() if value_model is not None else None,
             "kl_ctl": kl_ctl.state_dict(), "ema": ema.state_dict() if ema is not None else None}
    write_state(path, make_checkpoint(policy, policy.config, "lm", tok, asdict(cfg), step, optimizers[0], extra))


def record(log, b, P, seconds, step, progress, log_path, policy, reward_model, cfg):
    """A batch's line of log.jsonl (rank 0) and the progress line, with tokens/s and MFU over all ranks."""
    n_tokens = b["mask"].numel() * dist.world_size()
    log.update(tokens_per_s=n_tokens / seconds, seconds=seconds)
    if dist.is_main():
        with open(log_path, "a") as f:
            f.write(json.dumps(log) + "\n")
    flops = sum(rlhf.ppo_batch_flops(policy, reward_model, *b["tokens"].shape, P, cfg.ppo_epochs,
                                     ESTIMATORS[cfg.estimator].value_model).values())
    progress.step(step - 1, n_tokens, flops * dist.world_size(),  # every rank ran its share of the batch
                  **{k: log[k] for k in ("reward", "gold", "kl") if k in log})


def keep_log_lines(path, step):
    """--resume: drop the lines of updates after the resumed state (a fresh run: an empty log)."""
    lines = open(path).readlines()[:step] if step and os.path.exists(path) else []
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)  # atomic: a kill here cannot lose the lines kept


def final_evaluation(policy, ref_policy, tok, world, cfg, device):
    """A quick check of the trained policy against SFT on the held-out test prompts, from one T-sampled answer per
    prompt: gold score, win rate (overall and per category), pretraining validation loss (the alignment tax) and
    EOS fraction. Named "1 sample": the report card (eval.py) samples twice per prompt, a different estimand."""
    prompts, val_stream = world.prompts("test"), token_stream(tok, world.pretrain_docs("val"))
    trained, sft = ({**gold_eval(m, tok, world, prompts, cfg.max_new_tokens, cfg.temperature, seed=cfg.seed),
                  "val_loss": val_loss(m, val_stream, m.config.block_size, device)} for m in (policy, ref_policy))
    rate, interval = win_rate(trained["scores"], sft["scores"])
    by_cat = {c: win_rate([s for p, s in zip(prompts, trained["scores"]) if world.category(p) == c],
                          [s for p, s in zip(prompts, sft["scores"]) if world.category(p) == c])[0]
              for c in sorted(set(map(world.category, prompts)))}
    print(f"quick check, 1 sample per test prompt: gold PPO {trained['gold']:.4f} vs SFT {sft['gold']:.4f} | "
          f"win rate vs SFT (1 sample) {rate:.1%} "
          f"[{interval[0]:.1%}, {interval[1]:.1%}] | val loss: PPO {trained['val_loss']:.4f} vs SFT "
          f"{sft['val_loss']:.4f}")
    return {"gold": {"ppo": trained["gold"], "sft": sft["gold"]}, "win_rate_1sample": rate,
            "win_rate_1sample_95": interval, "win_rate_1sample_by_category": by_cat,
            "val_loss": {"ppo": trained["val_loss"], "sft": sft["val_loss"]},
            "eos_fraction": {"ppo": trained["eos_fraction"], "sft": sft["eos_fraction"]},
            "components": {"ppo": trained["components"], "sft": sft["components"]}}


def main(argv=None):
    cfg = parse_config(PPOConfig, argv)
    dist.init(cfg.device)  # under torchrun: one process per device, each its own share of every batch's rollouts
    device = setup(cfg)
    dtype = dist.resolve_dtype(cfg.dtype, device)
    check_config(cfg)
    cfg.compile = kernels.enable(cfg.compile, device)  # the one switch; resolved, saved in state.pt

    # data: instruction prompts for the rollouts, pretraining text for ptx
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

    # models: policy and frozen reference from SFT, frozen RM, value model from the RM (if the estimator has one)
    estimator = ESTIMATORS[cfg.estimator]
    policy, ref_policy, reward_model, value_model, tok = load_models(cfg, device)
    check_prompts(cfg, prompts, tok, policy.config.block_size)
    if dist.world_size() > 1:
        torch.manual_seed(cfg.seed + dist.rank())  # each rank samples its own rollouts
    ema = copy.deepcopy(policy).requires_grad_(False) if cfg.ema > 0 else None
    for m in (policy, value_model):
        if m is not None:
            checkpoint_or_compile(m, cfg.activation_checkpointing)
    for m in (ref_policy, reward_model):  # frozen: never checkpointed (no backward)
        kernels.compile_model(m)
    optimizers = make_optimizers(policy, value_model, cfg)  # [policy's, value model's (if any)]
    kl_ctl = rlhf.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    ptx_stream = token_stream(tok, ptx_docs or world.pretrain_docs("train")) if cfg.ptx_coef > 0 else None
    value = f" | value model {value_model.num_params() / 1e6:.2f}M (the RM's size)" if value_model else ""
    print(f"{len(prompts)} prompts | policy {policy.num_params() / 1e6:.2f}M parameters{value}")

    step = restore_state(cfg, policy, value_model, optimizers, kl_ctl, ema, device)
    state_path, log_path = os.path.join(cfg.out, "state.pt"), os.path.join(cfg.out, "log.jsonl")
    if dist.is_main():
        os.makedirs(cfg.out, exist_ok=True)
        keep_log_lines(log_path, step)

    total = cfg.batches if cfg.max_steps < 0 else min(cfg.batches, cfg.max_steps)
    progress = Progress(total, cfg.log_every, None, device, start=step)  # FLOPs counted per batch: rlhf.ppo_batch_flops
    t_start = time.perf_counter()
    while step < total:
        t0 = time.perf_counter()
        for opt, lr in zip(optimizers, (cfg.lr, cfg.value_lr)):  # linear warm-up, then constant
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / cfg.warmup)

        # 1. rollout: a response per prompt from π_old, scored by π_old, π_SFT, V, the RM (or the judge) and gold
        group = epoch_batch(prompts, step, cfg.batch_size // cfg.group_size, cfg.seed * 1000, drop_last=True)
        batch = [p for p in dist.shard(group) for _ in range(cfg.group_size)]  # this rank's prompts, each k times
        with dist.autocast(device, dtype):
            b, P, _ = rollout(policy, ref_policy, reward_model, value_model, tok, batch, cfg,
                              None if cfg.data else world)
        m = b["response_mask"]  # (B, N)

        # 2. rewards, eq. (2): −β·KL_t on every response token, the RM score on its last (β = 0 here if the
        # estimator puts the KL in the loss)
        kl_coef = kl_ctl.kl_coef
        rewards, kl, final = rlhf.ppo_rewards(b["scores"], b["finished"], b["logprobs"], b["ref_logprobs"], m,
                                              kl_coef if estimator.kl == "reward" else 0.0, cfg.kl_kind,
                                              cfg.missing_eos_penalty)
        check_finite(kl, step + 1, "KL in the rollout", state_path)
        check_finite(rewards, step + 1, "reward in the rollout", state_path)

        # 3. advantages by the estimator; the value model's targets, the returns R = A + V (before whitening)
        advantages = estimator.advantages(rewards, b["values"], m, cfg)  # (B, N), 0 on padding
        returns = advantages + b["values"] if estimator.value_model else None
        if estimator.whiten:
            advantages = rlhf.masked_whiten(advantages, m, dist.all_reduce_sum)

        # 4. update: ppo_epochs passes of minibatches, each one step on clipped policy loss + value loss + γ·ptx
        log = batch_log(b, final, returns, kl_coef, step, cfg)
        log.update(ppo_update(policy, value_model, optimizers, b, advantages, returns, P, cfg, step, kl_coef,
                              ptx_stream, ema, dtype))
        if cfg.adaptive_kl:
            kl_ctl.update(log["kl"], cfg.batch_size)
        step += 1

        # 5. log and save
        record(log, b, P, time.perf_counter() - t0, step, progress, log_path, policy, reward_model, cfg)
        if (step % cfg.save_every == 0 or step == total) and dist.is_main():
            save_state(state_path, cfg, policy, value_model, optimizers, kl_ctl, ema, tok, step)
    train_seconds = time.perf_counter() - t_start

    # the EMA of the policy's weights (if any) is the final policy: evaluated against SFT and saved
    final_policy = ema if ema is not None else policy
    results = {"steps": step, "episodes": step * cfg.batch_size, "train_seconds": train_seconds}
    if not cfg.data:
        results.update(final_evaluation(final_policy, ref_policy, tok, world, cfg, device))
    if dist.is_main():
        write_results(cfg.out, make_checkpoint(final_policy, final_policy.config, "lm", tok, asdict(cfg), step,
                                               extra=results), results)
    return results


if __name__ == "__main__":
    main()
