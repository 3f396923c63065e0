"""Baseline: Direct Preference Optimization (Rafailov et al. 2023) on the comparisons the reward model saw.

No reward model and no sampling: every pair (y_w, y_l) implied by a labeler's ranking (all C(K,2) of a prompt,
ties dropped) raises the policy's log-ratio to the frozen SFT reference on y_w over y_l,
    loss = −log σ( β·log π(y_w|x)/π_SFT(y_w|x) − β·log π(y_l|x)/π_SFT(y_l|x) )          (Rafailov et al. eq. 7)
where log π(y|x) sums the response tokens (and the EOS, if the response ended) and never the prompt's. As in the
RM, a prompt's K responses go through the model once, all its pairs are formed from those K log-probs, and each
prompt counts once in the loss: its C(K,2) pairs' losses are averaged, then the prompts' (Ouyang et al. §3.5).

    python baselines/train_dpo.py --init runs/default/sft/ckpt.pt --comparisons runs/default/rm/comparisons.jsonl \\
        --out runs/default/dpo
"""
import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root: nanorlhf/
from nanorlhf.checkpoint import make_checkpoint
from nanorlhf.common import (Progress, check_finite, cosine_lr, epoch_batch, load_model, response_logprob_sums,
                             resume, setup, write_results, write_state)
from nanorlhf.config import CommonConfig, arg, parse_config
from nanorlhf.data import DataError, check_lengths
from nanorlhf.rlhf import dpo_loss, ranked_pairs


@dataclass
class DPOConfig(CommonConfig):
    init: str = arg("runs/default/sft/ckpt.pt", "SFT checkpoint: the initial policy and the frozen reference")
    comparisons: str = arg("runs/default/rm/comparisons.jsonl", "rankings written by train_rm.py (the RM's labels)")
    out: str = arg("runs/default/dpo", "output directory (ckpt.pt, state.pt, metrics.json)")
    beta: float = arg(0.1, "β: the KL strength of the implicit reward β·log π/π_SFT (paper default 0.1)", positive=True)
    epochs: int = arg(1, "passes over the ranked prompts", low=1)
    batch_size: int = arg(8, "ranked prompts per step, each with all its pairs", low=1)
    lr: float = arg(1e-4, "peak learning rate (AdamW), cosine decay to 10%", low=0)
    warmup: int = arg(5, "linear warm-up steps", low=0)
    grad_clip: float = arg(1.0, "clip the gradient norm to this", positive=True)
    log_every: int = arg(10, "progress line every N steps", low=1)
    save_every: int = arg(50, "write state.pt every N steps", low=1)


def pair_logprobs(policy, reference, records, pad_id, device):
    """Policy and reference log π(y|x) (common.response_logprob_sums) of every pair of a batch of records: four (P,)
    tensors, chosen then rejected, pair p's entries aligned across all four; and the (P,) pair weights 1 / (pairs of its prompt ×
    prompts), so that every prompt weighs the same whatever its K."""
    examples, chosen, rejected, weights = [], [], [], []
    for r in records:
        base = len(examples)
        examples += r["examples"]
        pairs = ranked_pairs(r["ranking"])
        for i, j in pairs:
            chosen.append(base + i)
            rejected.append(base + j)
            weights.append(1 / (len(pairs) * len(records)))
    logp = response_logprob_sums(policy, examples, pad_id, device)  # (N,)
    with torch.no_grad():
        ref = response_logprob_sums(reference, examples, pad_id, device)  # (N,)
    c, r = torch.tensor(chosen, device=device), torch.tensor(rejected, device=device)
    return logp[c], logp[r], ref[c], ref[r], torch.tensor(weights, device=device)


def main(argv=None):
    cfg = parse_config(DPOConfig, argv)
    device = setup(cfg)
    t_start = time.perf_counter()
    policy, tok, _ = load_model(cfg.init, "lm", device)
    # dropout off in both models: at step 0 the policy equals the reference and the loss is exactly log 2
    policy.eval()
    reference = copy.deepcopy(policy).requires_grad_(False)
    records = [json.loads(line) for line in open(cfg.comparisons) if line.strip()]
    records = [r for r in records if ranked_pairs(r["ranking"])]
    for r in records:
        r["examples"] = [tok.format_example(r["prompt"], y, f) for y, f in zip(r["responses"], r["finished"])]
    try:
        check_lengths([(f"{cfg.comparisons}: {r['prompt']!r}", len(e[0])) for r in records for e in r["examples"]],
                      policy.config.block_size, "prompt + response")
    except DataError as e:
        print(e)
        raise SystemExit(2)
    n_pairs = sum(len(ranked_pairs(r["ranking"])) for r in records)
    print(f"{len(records)} ranked prompts, {n_pairs} pairs | policy {policy.num_params() / 1e6:.2f}M parameters")

    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    state = resume(cfg, policy, opt, map_location=device)
    step, state_path = state["step"] if state else 0, os.path.join(cfg.out, "state.pt")
    schedule = cfg.epochs * -(-len(records) // cfg.batch_size)  # epochs of ceil(N / batch_size) steps
    total = schedule if cfg.max_steps < 0 else min(schedule, cfg.max_steps)
    avg_len = sum(len(e[0]) for r in records for e in r["examples"]) / sum(len(r["examples"]) for r in records)
    progress = Progress(total, cfg.log_every, policy.flops_per_token(round(avg_len)) * 4 / 3, device, start=step,
                        name="dpo ")  # the reference's forward adds a third
    sums, start = {}, step  # the summary averages the steps this invocation ran
    while step < total:
        batch = epoch_batch(records, step, cfg.batch_size, cfg.seed)  # resumable: a function of (seed, step)
        lr = cosine_lr(step, schedule, cfg.lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        *logprobs, weights = pair_logprobs(policy, reference, batch, tok.pad_id, device)
        loss, stats = dpo_loss(*logprobs, cfg.beta, weights)  # each prompt's pairs averaged, then the prompts
        check_finite(loss, step + 1, "DPO loss", state_path)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        check_finite(grad_norm, step + 1, "DPO gradient norm", state_path)
        opt.step()
        metrics = {"loss": loss.item(), **{k: v.item() for k, v in stats.items()}}
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
        n_tokens = sum(len(e[0]) for r in batch for e in r["examples"])
        progress.step(step, n_tokens, loss=loss.item(), acc=metrics["reward_accuracy"], lr=lr)
        step += 1
        if step % cfg.save_every == 0 or step == total:
            write_state(state_path, make_checkpoint(policy, policy.config, "lm", tok, asdict(cfg), step, opt))

    results = {"steps": step, "ranked_prompts": len(records), "pairs": n_pairs, "beta": cfg.beta,
               **{f"mean_{k}": v / max(step - start, 1) for k, v in sums.items()}, "seconds": time.perf_counter() - t_start}
    print("dpo: " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()))
    write_results(cfg.out, make_checkpoint(policy, policy.config, "lm", tok, asdict(cfg), step, extra=results), results)
    return results


if __name__ == "__main__":
    main()
