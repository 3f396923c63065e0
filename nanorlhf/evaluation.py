"""Sampling responses to prompts and judging them: the tiny world's gold judge, win rates, and how well scores
agree with rankings (shared by every stage)."""
import math
import statistics

import numpy as np
import torch

from nanorlhf.engine import generate
from nanorlhf.rlhf import ranked_pairs


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


def sample_sets(policy, tok, prompts, ks, max_new_tokens, temperature, batch_size, generator):
    """k_i responses from the policy to prompt i: a list of (responses, finished) per prompt. All prompts' samples
    go through the sampler together (generation dominates the time of the stages that rank or rerank them)."""
    flat = [p for p, k in zip(prompts, ks) for _ in range(k)]
    out = sample_responses(policy, tok, flat, max_new_tokens, temperature, batch_size=batch_size, generator=generator)
    sets, i = [], 0
    for k in ks:
        sets.append(([y for y, _ in out[i:i + k]], [f for _, f in out[i:i + k]]))
        i += k
    return sets


def gold_eval(model, tok, world, prompts, max_new_tokens, temperature=1.0, greedy=False, seed=0):
    """gold_report of the model's responses to prompts, sampled with a fresh generator seeded `seed`: every model
    (and every epoch) compared is judged on the same random stream, and the training RNG is left untouched."""
    g = torch.Generator(device=model.transformer.wte.weight.device).manual_seed(seed)
    responses = sample_responses(model, tok, prompts, max_new_tokens, temperature, greedy=greedy, generator=g)
    return gold_report(world, prompts, responses)


def gold_report(world, prompts, responses):
    """Mean gold score, its components, per-category means and EOS fraction of (text, finished) responses, and
    each one's gold score, text and whether it ended."""
    comps = [world.gold_components(p, y, f) for p, (y, f) in zip(prompts, responses)]
    scores = [world.gold_score(p, y, f) for p, (y, f) in zip(prompts, responses)]
    return {
        "gold": statistics.mean(scores),
        "components": {k: statistics.mean(c[k] for c in comps) for k in comps[0]},
        "by_category": category_means([world.category(p) for p in prompts], scores),
        "eos_fraction": statistics.mean(f for _, f in responses),
        "scores": scores,
        "responses": [y for y, _ in responses],
        "finished": [f for _, f in responses],
    }


def category_means(categories, values):
    """{category: the mean of its items' values}, categories sorted."""
    groups = {}
    for c, v in zip(categories, values):
        groups.setdefault(c, []).append(v)
    return {c: statistics.mean(v) for c, v in sorted(groups.items())}


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
    return bootstrap_mean(wins, seed, n_boot)


def bootstrap_mean(wins, seed=0, n_boot=1000):
    """The mean of per-prompt wins and its 95% bootstrap interval (prompts resampled with replacement)."""
    wins = np.asarray(wins, dtype=float)
    boot = np.random.default_rng(seed).choice(wins, (n_boot, len(wins))).mean(1)
    return float(wins.mean()), [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]


def preference_wins(utilities, baseline, tau):
    """A judge's win of each prompt: its probability of preferring a model draw to a baseline draw — for a labeler
    at temperature tau, Plackett–Luce with K = 2 (Bradley–Terry): σ((u − u_baseline)/τ) — averaged over every pair
    of the prompt's draws (model draw × baseline draw). tau = 0 is the noise-free limit, the gold judge: 1 if u is
    higher, ½ on a tie, 0 if lower. `utilities` and `baseline`: per prompt, the judge's utility of each draw."""
    def prefer(a, b):
        return (a > b) + 0.5 * (a == b) if tau == 0 else sigmoid((a - b) / tau)
    return [statistics.mean(prefer(a, b) for a in us for b in bs) for us, bs in zip(utilities, baseline)]


def fit_gao(d, gain, form):
    """Least-squares (a, b) of Gao et al. 2022's functional forms for the gold gain over the initial policy at
    d = √KL(π ‖ π_init): best-of-N ("bon") gain = d·(a − b·d); RL ("rl") gain = d·(a − b·log d). Both are linear in
    (a, b), so one lstsq solves them; RL points need d > 0. (Returned as alpha, beta: results.json's keys.)"""
    d, gain = np.asarray(d, dtype=float), np.asarray(gain, dtype=float)
    second = d * d if form == "bon" else d * np.log(d)
    (alpha, beta), *_ = np.linalg.lstsq(np.stack([d, -second], 1), gain, rcond=None)
    return float(alpha), float(beta)


def pair_accuracy(scores, ranks):
    """Fraction of the pairs ranked apart (rlhf.ranked_pairs, 0 = best) that `scores` order the same way; a tie in
    scores counts one half (identical responses get identical scores)."""
    hits = total = 0
    for s, r in zip(scores, ranks):
        for w, l in ranked_pairs(r):
            total += 1
            hits += 0.5 if s[w] == s[l] else float(s[w] > s[l])
    return hits / max(total, 1)


def sigmoid(x):
    """σ(x) = 1 / (1 + e^−x) for any float x: exp only ever sees −|x| ≤ 0, so it may underflow to 0 but never
    overflows (math.exp(−x) raises once −x > 709.78: a utility gap of 0.1 at τ = 1e-4 is x = ±1000)."""
    e = math.exp(-abs(x))
    return 1 / (1 + e) if x >= 0 else e / (1 + e)  # σ(x) = e^x / (1 + e^x) for x < 0


def expected_agreement(scores, utilities, tau):
    """Accuracy and ceiling without the labelers' sampling noise. A Plackett-Luce labeler puts i above j with
    probability p = σ((u_i − u_j)/τ), so a scorer agrees with it w.p. p or 1 − p (½ on a tie in scores) and two
    independent labelers agree w.p. p² + (1 − p)². Averaged over all pairs: (expected accuracy, ceiling)."""
    acc = ceiling = total = 0
    for s, u in zip(scores, utilities):
        for i in range(len(u)):
            for j in range(i + 1, len(u)):
                p = sigmoid((u[i] - u[j]) / tau)
                acc += 0.5 if s[i] == s[j] else p if s[i] > s[j] else 1 - p
                ceiling += p * p + (1 - p) * (1 - p)
                total += 1
    return acc / max(total, 1), ceiling / max(total, 1)
