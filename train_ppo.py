"""Stage 3: PPO and PPO-ptx against the reward model, with a per-token KL penalty to SFT (InstructGPT §3.5, eq. (2)).

Each PPO batch: sample one response per prompt from the policy (KV-cached, full softmax at temperature T) → score
it with full forwards (policy and reference log-probs, values, RM score) → per-token rewards −β·KL plus the RM
score on the EOS → GAE → `ppo_epochs` passes of clipped policy and value updates in minibatches, with γ·ptx
(next-token loss on pretraining text) added to the same loss for PPO-ptx. The math, the scoring and the minibatch
update are nanorlhf/rlhf.py's (bench.py runs them too), the model nanorlhf/model.py's, the sampler
nanorlhf/engine.py's; the flags are config.PPOConfig.

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
from dataclasses import asdict

import torch

from nanorlhf import dist, kernels, rlhf
from nanorlhf.checkpoint import make_checkpoint
from nanorlhf.common import (Progress, check_finite, check_room, checkpoint_or_compile, epoch_batch, load_model,
                             read_checkpoint, resume, setup, token_stream, val_loss, write_results, write_state)
from nanorlhf.config import PPOConfig, flag_error, parse_config
from nanorlhf.data import DataError, check_lengths, line_numbers, read_jsonl, read_text
from nanorlhf.engine import generate
from nanorlhf.evaluation import gold_eval, win_rate
from nanorlhf.reward import score_texts
from nanorlhf.world import make_world


def check_config(cfg):
    """Exit with one line (status 2) on flags that cannot work together, before anything is loaded."""
    world_size = dist.world_size()
    if cfg.batch_size % world_size or cfg.minibatch_size % world_size:
        flag_error(f"--batch_size and --minibatch_size must be multiples of the {world_size} processes")
    if cfg.batch_size % cfg.minibatch_size:
        flag_error(f"--minibatch_size {cfg.minibatch_size}: must divide --batch_size {cfg.batch_size} (each "
                   f"optimizer step takes a full minibatch of episodes)")
    if cfg.estimator not in ("gae", "rloo", "grpo", "reinforce_pp"):
        flag_error(f"--estimator {cfg.estimator!r}: expected gae, rloo, grpo or reinforce_pp")
    if cfg.estimator in ("rloo", "grpo") and cfg.group_size < 2:
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
# the pieces of one PPO batch

def rollout(policy, ref_policy, reward_model, value_model, tok, prompts, cfg):
    """Sample one response per prompt (dropout off, full softmax at T) and score it; returns (batch, P, responses).

    The RM reads the decoded response text through `reward.rm_input`, as it read every response in training,
    not the sampled ids: those can be a non-canonical BPE split of the same text, or hold template tokens, which
    the RM never saw. b["retokenized"] marks the samples whose ids differ from the RM's encoding of their text.
    Critic-free estimators skip the value model; --reward gold skips the RM (main scores with the judge)."""
    gen = generate(policy, [tok.format_prompt(p) for p in prompts], cfg.max_new_tokens, tok.eos_id, tok.pad_id,
                   temperature=cfg.temperature)
    P = gen.prompt_len
    critic = value_model if cfg.estimator == "gae" else None
    b = rlhf.score_rollout(policy, ref_policy, critic, gen.tokens, gen.attention_mask, P, tok.eos_id, cfg.temperature)
    sampled = [row[:n] for row, n in zip(gen.tokens[:, P:].tolist(), b["response_mask"].sum(1).tolist())]
    finished = b["finished"].tolist()
    responses = [tok.decode_response(ids) for ids in sampled]
    if cfg.reward == "rm":
        b["scores"] = score_texts(reward_model, tok, prompts, responses, finished, gen.tokens.device).float()  # (B,)
    b["retokenized"] = torch.tensor([ids != tok.encode(y) + [tok.eos_id] * f
                                     for ids, y, f in zip(sampled, responses, finished)], device=gen.tokens.device)
    return b, P, responses


def estimate_advantages(rewards, final, b, cfg):
    """(advantages, returns) of a rollout batch by cfg.estimator: GAE with the value model (PPO), or one of
    rlhf.py's critic-free estimators (their returns are the rollout's zero values: no value loss uses them)."""
    m = b["response_mask"]
    if cfg.estimator == "gae":
        return rlhf.gae_advantages(rewards, b["values"], m, cfg.gamma, cfg.lam)
    if cfg.estimator == "rloo":  # the sequence reward: RM score − β·Σ KL_t (the per-token rewards summed)
        advantages = rlhf.rloo_advantages(rewards.sum(1), m, cfg.group_size)
    elif cfg.estimator == "grpo":  # the outcome reward alone; the KL is a loss term
        advantages = rlhf.grpo_advantages(final, m, cfg.group_size)
    else:
        advantages = rlhf.masked_whiten(rlhf.reinforce_pp_advantages(rewards, m), m, dist.all_reduce_sum)
    return advantages, b["values"]


def batch_log(b, final, kl_coef, gold, step, cfg):
    """The rollout's diagnostics: means over the global batch (all ranks); explained_var is this rank's."""
    m = b["response_mask"]
    k1 = torch.where(m, rlhf.kl_estimate(b["logprobs"], b["ref_logprobs"], "k1"), 0.0).sum(1)  # (B,) per response
    k3 = torch.where(m, rlhf.kl_estimate(b["logprobs"], b["ref_logprobs"], "k3"), 0.0).sum(1)
    log = {"step": step + 1, "episodes": (step + 1) * cfg.batch_size, "reward": dist.mean(final).item(),
           "rm_score": dist.mean(b["scores"]).item(), "kl": dist.mean(k1).item(), "kl_k3": dist.mean(k3).item(),
           "kl_coef": kl_coef, "response_len": dist.mean(m.sum(1).float()).item(),
           "eos_fraction": dist.mean(b["finished"].float()).item(),
           "retokenized": dist.mean(b["retokenized"].float()).item()}
    if cfg.estimator == "gae":
        log["explained_var"] = rlhf.explained_variance(b["values"], b["returns"], m).item()
    if gold is not None:
        log["gold"] = dist.mean(gold).item()
    return log


def restore_state(cfg, policy, value_model, optimizers, kl_ctl, ema, device):
    """--resume: every model, optimizer and controller as state.pt left them; returns the batches done (0 if
    starting fresh)."""
    state = resume(cfg, policy, optimizers[0], map_location=device)
    if state is None:
        return 0
    value_model.load_state_dict(state["extra"]["value_model"])
    optimizers[1].load_state_dict(state["extra"]["value_optimizer"])
    kl_ctl.load_state_dict(state["extra"]["kl_ctl"])
    if ema is not None:
        ema.load_state_dict(state["extra"]["ema"])
    return state["step"]


def save_state(path, cfg, policy, value_model, optimizers, kl_ctl, ema, tok, step):
    """state.pt, written atomically: what restore_state reads back."""
    extra = {"value_model": value_model.state_dict(), "value_optimizer": optimizers[1].state_dict(),
             "kl_ctl": kl_ctl.state_dict(), "ema": ema.state_dict() if ema is not None else None}
    write_state(path, make_checkpoint(policy, policy.config, "lm", tok, asdict(cfg), step, optimizers[0], extra))


def record(log, b, P, seconds, step, progress, log_path, policy, value_model, cfg):
    """A batch's line of log.jsonl (rank 0) and the progress line, with tokens/s and MFU over all ranks."""
    n_tokens = b["mask"].numel() * dist.world_size()
    log.update(tokens_per_s=n_tokens / seconds, seconds=seconds)
    if dist.is_main():
        with open(log_path, "a") as f:
            f.write(json.dumps(log) + "\n")
    flops = sum(rlhf.ppo_batch_flops(policy, value_model, *b["tokens"].shape, P, cfg.ppo_epochs).values())
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

    # models: policy and frozen reference from SFT, frozen RM, value model from the RM
    policy, ref_policy, reward_model, value_model, tok = load_models(cfg, device)
    check_prompts(cfg, prompts, tok, policy.config.block_size)
    if dist.world_size() > 1:
        torch.manual_seed(cfg.seed + dist.rank())  # each rank samples its own rollouts
    ema = copy.deepcopy(policy).requires_grad_(False) if cfg.ema > 0 else None
    for m in (policy, value_model):
        checkpoint_or_compile(m, cfg.activation_checkpointing)
    for m in (ref_policy, reward_model):  # frozen: never checkpointed (no backward)
        kernels.compile_model(m)
    opt_policy, opt_value = rlhf.make_optimizers(policy, value_model, cfg)
    kl_ctl = rlhf.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    ptx_stream = token_stream(tok, ptx_docs or world.pretrain_docs("train")) if cfg.ptx_coef > 0 else None
    print(f"{len(prompts)} prompts | policy and value {policy.num_params() / 1e6:.2f}M parameters each")

    step = restore_state(cfg, policy, value_model, (opt_policy, opt_value), kl_ctl, ema, device)
    state_path, log_path = os.path.join(cfg.out, "state.pt"), os.path.join(cfg.out, "log.jsonl")
    if dist.is_main():
        os.makedirs(cfg.out, exist_ok=True)
        keep_log_lines(log_path, step)

    total = cfg.batches if cfg.max_steps < 0 else min(cfg.batches, cfg.max_steps)
    progress = Progress(total, cfg.log_every, None, device, start=step)  # FLOPs counted per batch: rlhf.ppo_batch_flops
    t_start = time.perf_counter()
    while step < total:
        t0 = time.perf_counter()
        for opt, lr in ((opt_policy, cfg.lr), (opt_value, cfg.value_lr)):  # linear warm-up, then constant
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / cfg.warmup)

        # rollout: a response per prompt from π_old, scored by π_old, π_SFT, V and the RM (or the gold judge)
        group = epoch_batch(prompts, step, cfg.batch_size // cfg.group_size, cfg.seed * 1000, drop_last=True)
        batch = [p for p in dist.shard(group) for _ in range(cfg.group_size)]  # this rank's prompts, each k times
        with dist.autocast(device, dtype):
            b, P, responses = rollout(policy, ref_policy, reward_model, value_model, tok, batch, cfg)
        gold = None
        if not cfg.data:
            finished = b["finished"].tolist()
            gold = torch.tensor([world.gold_score(p, y, f) for p, y, f in zip(batch, responses, finished)],
                                dtype=torch.float64)
            if cfg.reward == "gold":  # the oracle: the judge the labelers only approximate
                b["scores"] = (cfg.gold_scale * gold).to(device=device, dtype=torch.float32)

        # rewards, eq. (2): −β·KL_t on every response token, the RM score on its last (GRPO: the KL is in the loss)
        kl_coef = kl_ctl.kl_coef
        rewards, kl, final = rlhf.ppo_rewards(b["scores"], b["finished"], b["logprobs"], b["ref_logprobs"],
                                              b["response_mask"], 0.0 if cfg.estimator == "grpo" else kl_coef,
                                              cfg.kl_kind, cfg.missing_eos_penalty)
        check_finite(kl, step + 1, "KL in the rollout", state_path)
        check_finite(rewards, step + 1, "reward in the rollout", state_path)

        # advantages: GAE with the value model, whitened over the batch (or a critic-free estimator's)
        b["advantages"], b["returns"] = estimate_advantages(rewards, final, b, cfg)

        # update: K epochs of minibatches, each one step on clipped policy loss + value loss + γ·ptx
        log = batch_log(b, final, kl_coef, gold, step, cfg)
        log.update(rlhf.ppo_update(policy, value_model, (opt_policy, opt_value), b, P, cfg, step, ptx_stream, ema,
                                   dtype, kl_coef))
        if cfg.adaptive_kl:
            kl_ctl.update(log["kl"], cfg.batch_size)
        step += 1

        # log and save
        record(log, b, P, time.perf_counter() - t0, step, progress, log_path, policy, value_model, cfg)
        if (step % cfg.save_every == 0 or step == total) and dist.is_main():
            save_state(state_path, cfg, policy, value_model, (opt_policy, opt_value), kl_ctl, ema, tok, step)
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
