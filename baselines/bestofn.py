"""Baseline: best-of-N sampling from SFT, reranked by the reward model, on the held-out test prompts.

No training: sample N responses at temperature 1, keep the one the RM scores highest. Its KL from SFT has a closed
form, log N − (N−1)/N (rlhf.best_of_n_kl), so gold (truth) and RM score (proxy) can be set against KL just as PPO's
log does (Gao et al. 2022): where the RM keeps rising and gold flattens, the RM is being over-optimized.
One estimand for every row of the report card: a prompt's score is the mean gold of --draws independent draws
(eval.py's --samples, 2: as every model is scored). A best-of-N draw picks from N fresh samples: each prompt gets
draws × max(ns) samples, draw d owns the block of max(ns) samples d·max(ns) …, and best-of-N's draw d picks the
RM's best among the first N of that block. N = 1 is plain sampling from SFT: its win rate against SFT should be
≈ 50% (the sanity row).

    python baselines/bestofn.py --run runs/default          # reads sft/ckpt.pt and rm/ckpt.pt, writes bestofn.json
"""
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root: nanorlhf/
from nanorlhf.common import check_room, load_model, setup
from nanorlhf.config import CommonConfig, arg, parse_config
from nanorlhf.evaluation import sample_sets
from nanorlhf.reward import score_records
from nanorlhf.rlhf import best_of_n_kl
from nanorlhf.world import gold_from_components, make_world


@dataclass
class BestOfNConfig(CommonConfig):
    run: str = arg("runs/default", "run folder with sft/ckpt.pt and rm/ckpt.pt; bestofn.json is written there")
    ns: list[int] = arg([1, 4, 16, 64], "the N of best-of-N (1 = plain sampling, the sanity row)")
    temperature: float = arg(1.0, "sampling temperature (the KL formula assumes the policy's own distribution)",
                             positive=True)
    max_new_tokens: int = arg(48, "response length limit (as eval.py)", low=1)
    gen_batch_size: int = arg(256, "sequences sampled at once", low=1)
    draws: int = arg(2, "independent best-of-N picks per prompt; must equal eval.py's --samples (one estimand)", low=1)


def best_of_n(rm_scores, n, block):
    """Indices of the picks, one per draw: rm_scores (one prompt's samples) is cut into consecutive blocks of
    `block` samples, one block per draw; a draw picks the argmax of the first n samples of its block (the first
    of equal scores)."""
    return [g + max(range(n), key=lambda i: rm_scores[g + i]) for g in range(0, len(rm_scores), block)]


def main(argv=None):
    cfg = parse_config(BestOfNConfig, argv)
    device = setup(cfg)
    t0 = time.perf_counter()
    n_max = max(cfg.ns)
    if min(cfg.ns) < 1:
        raise SystemExit(f"--ns {cfg.ns}: every N must be at least 1")
    world = make_world(cfg.world_seed, cfg.world_scale)
    prompts = world.prompts("test")
    policy, tok, _ = load_model(os.path.join(cfg.run, "sft", "ckpt.pt"), "lm", device)
    check_room(tok, prompts, cfg.max_new_tokens, policy.config.block_size)
    reward_model, _, _ = load_model(os.path.join(cfg.run, "rm", "ckpt.pt"), "scalar", device)
    sets = sample_sets(policy, tok, prompts, [cfg.draws * n_max] * len(prompts), cfg.max_new_tokens, cfg.temperature,
                       cfg.gen_batch_size, torch.Generator(device).manual_seed(cfg.seed))
    records = [{"prompt": p, "responses": ys, "finished": fs} for p, (ys, fs) in zip(prompts, sets)]
    rm = score_records(reward_model, tok, records, device)  # normalized RM score of every sample
    comps = [[world.gold_components(p, y, f) for y, f in zip(ys, fs)] for p, (ys, fs) in zip(prompts, sets)]
    gold = [[gold_from_components(c) for c in cs] for cs in comps]
    results = {"prompts": len(prompts), "draws": cfg.draws, "samples_per_prompt": cfg.draws * n_max, "by_n": {}}
    for n in cfg.ns:
        picks = [best_of_n(s, n, n_max) for s in rm]
        per_prompt = [statistics.mean(g[i] for i in idx) for g, idx in zip(gold, picks)]
        results["by_n"][str(n)] = {
            "n": n, "kl": best_of_n_kl(n), "gold": statistics.mean(per_prompt),
            "rm": statistics.mean(statistics.mean(s[i] for i in idx) for s, idx in zip(rm, picks)),
            "helpful": statistics.mean(statistics.mean(c[i]["helpful"] for i in idx) for c, idx in zip(comps, picks)),
            "gold_per_prompt": per_prompt}
        r = results["by_n"][str(n)]
        print(f"best-of-{n}: KL {r['kl']:.3f} | RM {r['rm']:.4f} | gold {r['gold']:.4f}")
    results["seconds"] = time.perf_counter() - t0
    with open(os.path.join(cfg.run, "bestofn.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"best-of-N on {len(prompts)} test prompts × {cfg.draws * n_max} samples in {results['seconds']:.0f}s")
    return results


if __name__ == "__main__":
    main()
