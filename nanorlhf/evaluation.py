"""Sampling responses to prompts and judging them with the tiny world's gold judge (shared by every stage)."""
import statistics

import numpy as np
import torch

from nanorlhf.engine import generate


@torch.no_grad()
def sample_responses(model, tok, prompts, max_new_tokens=48, temperature=1.0, greedy=False, batch_size=64,
                     generator=None):
    """Responses to instruction prompts: a list of (text, finished) where finished = the model emitted EOS."""
    out = []
    device = model.transformer.wte.weight.device
    for i in range(0, len(prompts), batch_size):
        ids = [tok.format_prompt(p) for p in prompts[i:i + batch_size]]
        gen = generate(model, ids, max_new_tokens, tok.eos_id, tok.pad_id, temperature=temperature, greedy=greedy,
                       generator=generator)
        resp = gen.tokens[:, gen.prompt_len:].cpu()  # (B, N)
        for row in resp.tolist():
            out.append((tok.decode_response(row), tok.eos_id in row))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out


def gold_report(world, prompts, responses):
    """Mean gold score, its components, and per-category means for (text, finished) responses."""
    comps = [world.gold_components(p, y, f) for p, (y, f) in zip(prompts, responses)]
    scores = [world.gold_score(p, y, f) for p, (y, f) in zip(prompts, responses)]
    by_cat = {}
    for p, s in zip(prompts, scores):
        by_cat.setdefault(world.category(p), []).append(s)
    return {
        "gold": statistics.mean(scores),
        "components": {k: statistics.mean(c[k] for c in comps) for k in comps[0]},
        "by_category": {c: statistics.mean(v) for c, v in sorted(by_cat.items())},
        "eos_fraction": statistics.mean(f for _, f in responses),
        "scores": scores,
    }


def win_rate(scores, baseline, seed=0, n_boot=1000):
    """Fraction of prompts where the model's gold score beats the baseline's (ties ½), with a 95% bootstrap
    interval over prompts."""
    return seed_win_rate([scores], baseline, seed, n_boot)


def seed_win_rate(seed_scores, baseline, seed=0, n_boot=1000):
    """Win rate against the baseline of a method trained with several seeds (one list of per-prompt scores per
    seed): each prompt's wins (ties ½) averaged over the seeds, so the rate is the mean of the seeds' rates; the
    95% bootstrap interval resamples prompts."""
    b = np.array(baseline)
    wins = np.mean([(np.array(s) > b) + 0.5 * (np.array(s) == b) for s in seed_scores], axis=0)  # (prompts,)
    boot = np.random.default_rng(seed).choice(wins, (n_boot, len(wins))).mean(1)
    return float(wins.mean()), [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]


def fit_gao(d, gain, form):
    """Least-squares (α, β) of Gao et al. 2022's functional forms for the gold gain over the initial policy at
    d = √KL(π ‖ π_init): best-of-N ("bon") gain = d·(α − β·d); RL ("rl") gain = d·(α − β·log d). Both are linear in
    (α, β), so one lstsq solves them; RL points need d > 0."""
    d, gain = np.asarray(d, dtype=float), np.asarray(gain, dtype=float)
    second = d * d if form == "bon" else d * np.log(d)
    (alpha, beta), *_ = np.linalg.lstsq(np.stack([d, -second], 1), gain, rcond=None)
    return float(alpha), float(beta)
