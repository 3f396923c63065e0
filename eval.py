"""The report card: evaluate every stage of a run on held-out test prompts that no stage trained on.

    python eval.py --run runs/default

- Win rate vs SFT under the gold judge (the paper's Figure 1 analogue), with a 95% bootstrap interval over
  prompts, for base, SFT, PPO and PPO-ptx; mean gold score, its components, and per task category.
- Win rate vs SFT by judge, on the same samples: the gold judge, labelers of the training labelers' taste, and a
  held-out panel of other tastes (docs/labelers.md); for the over-optimization study's β too.
- Reward model: held-out accuracy, the labeler-agreement ceiling, accuracy against gold (from train_rm.py).
- Alignment tax: pretraining validation loss of every model.
- Over-optimization: gold and RM score against KL from the PPO logs (Gao et al. 2022), and for best-of-N.
- Beyond the paper (when run.py ran them): best-of-N, DPO, RFT, GRPO, RLOO, REINFORCE++, PPO on the gold judge
  (the oracle) and iterated-RLHF rounds in one table of method × win rate (mean over training seeds, their spread,
  95% interval) × gold × helpful × KL from SFT × labels × minutes; Gao et al. 2022's functional forms fitted to
  best-of-N and to each RL method's training curve.
Writes results.json, report.md and PNG plots (if matplotlib is installed) into the run folder.
"""
import json
import os
import statistics
from dataclasses import dataclass

import numpy as np
import torch

from nanorlhf.checkpoint import load_checkpoint
from nanorlhf.common import check_room, load_model, response_logprob_sums, setup, token_stream, val_loss
from nanorlhf.config import CommonConfig, arg, parse_config
from nanorlhf.engine import generate
from nanorlhf.evaluation import (bootstrap_mean, category_means, fit_gao, gold_eval, pair_accuracy,
                                 preference_wins, seed_win_rate, sigmoid, win_rate)
from nanorlhf.reward import score_texts
from nanorlhf.rlhf import ranked_pairs, response_logprobs_and_entropy
from nanorlhf.world import KIND_COMPONENTS, make_world

POLICIES = ["base", "sft", "ppo", "ppo_ptx"]
METHOD_LABELS = {"ppo": "PPO", "ppo_ptx": "PPO-ptx", "grpo": "GRPO", "rloo": "RLOO", "reinforce_pp": "REINFORCE++",
                 "oracle": "PPO on gold (oracle)", "dpo": "DPO", "rft": "RFT"}
BASELINES = [k for k in METHOD_LABELS if k not in POLICIES]  # run.py --baselines
RL_METHODS = ["ppo", "ppo_ptx", "grpo", "rloo", "reinforce_pp", "oracle"]  # a training curve of (KL, gold)


@dataclass
class EvalConfig(CommonConfig):
    run: str = arg("runs/default", "run folder holding base/ sft/ rm/ ppo/ ppo_ptx/ (missing stages are skipped)")
    samples: int = arg(2, "samples per test prompt and model (temperature 1, as PPO samples)", low=1)
    max_new_tokens: int = arg(48, "response length limit", low=1)
    temperature: float = arg(1.0, "sampling temperature for every model", positive=True)
    bootstrap: int = arg(1000, "bootstrap resamples for the 95% intervals", low=1)
    rms: list[str] = arg([], "reward-model checkpoints (tiny world) to compare instead of a run: held-out accuracy "
                            "against the labelers and its ceiling, and the accuracy on each kind of contrast pair; "
                            "RMs trained on more than one number of comparisons also give --out/rm_curve.png")
    ensemble: bool = arg(False, "--rms: add a row for the ensemble of the listed reward models (the mean of their "
                                "normalized scores)")


def overoptimization(log_path):
    """(kl, rm_score, gold) per PPO update from a log.jsonl, or [] if there is none."""
    if not os.path.exists(log_path):
        return []
    rows = [json.loads(line) for line in open(log_path) if line.strip()]
    return [(r["kl"], r["reward"], r["gold"]) for r in rows if "gold" in r]


def seed_runs(run, key):
    """The run folders of a method's training seeds that exist: key, key_s2, key_s3, … (run.py --seeds)."""
    names, k = [key], 2
    while os.path.exists(os.path.join(run, f"{key}_s{k}", "ckpt.pt")):
        names.append(f"{key}_s{k}")
        k += 1
    return [n for n in names if os.path.exists(os.path.join(run, n, "ckpt.pt"))]


def rounds(run):
    """The iterated-RLHF rounds present in a run folder: [2, 3, ...] (round 1 is rm/ and ppo/)."""
    k = 2
    while os.path.exists(os.path.join(run, f"ppo_r{k}", "ckpt.pt")):
        k += 1
    return list(range(2, k))


@torch.no_grad()
def kl_from_sft(model, sft, tok, prompts, cfg, device):
    """KL(π || π_SFT) per response, the mean of Σ_t log π(y_t) − log π_SFT(y_t) (k1) over the model's own samples
    at the evaluation temperature, scored on the sampled token ids (not re-tokenized text), dropout off: the
    distributions that were sampled."""
    model.eval()
    sft.eval()
    total, gen = 0.0, torch.Generator(device=device).manual_seed(cfg.seed + 1)
    for i in range(0, len(prompts), 64):
        g = generate(model, [tok.format_prompt(p) for p in prompts[i:i + 64]], cfg.max_new_tokens, tok.eos_id,
                     tok.pad_id, temperature=cfg.temperature, generator=gen)
        P = g.prompt_len
        logp = response_logprobs_and_entropy(model, g.tokens, g.attention_mask, P, cfg.temperature)[0]  # (B, N)
        ref = response_logprobs_and_entropy(sft, g.tokens, g.attention_mask, P, cfg.temperature)[0]  # (B, N)
        total += ((logp - ref) * g.attention_mask[:, P:]).sum().item()  # response tokens only
    return total / len(prompts)


def report_card(cfg, device):
    """Every figure of the report card (results.json) for the run folder cfg.run."""
    world = make_world(cfg.world_seed, cfg.world_scale)
    prompts = world.prompts("test")
    val_docs = world.pretrain_docs("val")
    results = {"gold_score": {}, "gold_components": {}, "gold_by_category": {}, "win_rate_vs_sft": {},
               "win_rate_ci": {}, "pretrain_val_loss": {}, "eos_fraction": {}, "examples": {}, "kl_from_sft": {}}
    per_prompt, draws = {}, {}  # draws: each model's (responses, finished), cfg.samples per prompt
    rm_path = os.path.join(cfg.run, "rm", "ckpt.pt")
    rm, rm_tok, _ = load_model(rm_path, "scalar", device) if os.path.exists(rm_path) else (None, None, None)
    if rm is not None:
        rm.eval()
    sft_path = os.path.join(cfg.run, "sft", "ckpt.pt")
    sft = load_model(sft_path, "lm", device)[0] if os.path.exists(sft_path) else None
    extra_seeds = [n for key in METHOD_LABELS for n in seed_runs(cfg.run, key)[1:]]
    reps = [p for p in prompts for _ in range(cfg.samples)]
    for name in POLICIES + BASELINES + extra_seeds + [f"ppo_r{k}" for k in rounds(cfg.run)]:
        path = os.path.join(cfg.run, name, "ckpt.pt")
        if not os.path.exists(path):
            print(f"{name}: no checkpoint at {path}, skipped")
            continue
        model, tok, _ = load_model(path, "lm", device)
        check_room(tok, prompts, cfg.max_new_tokens, model.config.block_size)
        rep = gold_eval(model, tok, world, reps, cfg.max_new_tokens, cfg.temperature, seed=cfg.seed)  # same noise
        draws[name] = rep["responses"], rep["finished"]
        per_prompt[name] = [statistics.mean(rep["scores"][i * cfg.samples:(i + 1) * cfg.samples])
                            for i in range(len(prompts))]
        results["gold_score"][name] = rep["gold"]
        results["gold_components"][name] = rep["components"]
        results["gold_by_category"][name] = rep["by_category"]
        results["eos_fraction"][name] = rep["eos_fraction"]
        results["examples"][name] = [{"prompt": p, "response": y, "gold": s}
                                     for p, y, s in list(zip(reps, rep["responses"], rep["scores"]))[:12:cfg.samples]]
        if rm is not None:
            with torch.no_grad():
                rm_scores = score_texts(rm, rm_tok, reps, rep["responses"], rep["finished"], device)
            results.setdefault("rm_on_samples", {})[name] = rm_sample_accuracy(rep["scores"], rm_scores.tolist(),
                                                                               cfg.samples)
        stream = token_stream(tok, val_docs)
        results["pretrain_val_loss"][name] = val_loss(model, stream, model.config.block_size, device)
        if sft is not None:
            results["kl_from_sft"][name] = kl_from_sft(model, sft, tok, prompts, cfg, device)
        print(f"{name}: gold {rep['gold']:.3f} | pretraining val loss {results['pretrain_val_loss'][name]:.4f}")
    bon_path = os.path.join(cfg.run, "bestofn.json")
    if os.path.exists(bon_path):  # bestofn.py: per-prompt gold of the picks, on the same test prompts
        results["best_of_n"] = json.load(open(bon_path))
        if results["best_of_n"]["draws"] != cfg.samples:
            raise SystemExit(f"{bon_path}: best-of-N scored each prompt from {results['best_of_n']['draws']} draws, "
                             f"the models from --samples {cfg.samples}: "
                             f"rerun baselines/bestofn.py --draws {cfg.samples}")
        for r in results["best_of_n"]["by_n"].values():
            per_prompt[f"best_of_{r['n']}"] = r.pop("gold_per_prompt")
    if "sft" in per_prompt:
        for name, scores in per_prompt.items():  # every row: a prompt's mean gold over cfg.samples draws
            rate, (lo, hi) = win_rate(scores, per_prompt["sft"], cfg.seed, cfg.bootstrap)
            results["win_rate_vs_sft"][name], results["win_rate_ci"][name] = rate, [lo, hi]
            print(f"{name}: win rate vs SFT {rate:.1%} (95% CI {lo:.1%}-{hi:.1%})")
    if rm is not None:
        m = load_checkpoint(rm_path)["extra"]
        results["rm_accuracy"], results["labeler_agreement"] = m.get("accuracy"), m.get("ceiling")
        results["rm_gold_accuracy"] = m.get("gold_accuracy")
        if m.get("labeler_tau"):  # the tiny world's RM: which kinds of difference does it perceive?
            results["rm_by_kind"] = rm_by_kind(rm, rm_tok, world, m["labeler_tau"], device, sft)
    studies = sorted(d for d in os.listdir(cfg.run) if d.startswith("study_"))  # run.py --study
    results["overoptimization"] = {n: overoptimization(os.path.join(cfg.run, n, "log.jsonl"))
                                   for n in ["ppo", "ppo_ptx"] + studies + [f"ppo_r{k}" for k in rounds(cfg.run)]}
    results["gold_peak_kl"] = {n: gold_peak(pts) for n, pts in results["overoptimization"].items() if pts}
    if "sft" in draws:
        for name in studies:  # sampled as every model is, for the judges alone
            path = os.path.join(cfg.run, name, "ckpt.pt")
            if os.path.exists(path):
                model, tok, _ = load_model(path, "lm", device)
                rep = gold_eval(model, tok, world, reps, cfg.max_new_tokens, cfg.temperature, seed=cfg.seed)
                draws[name] = rep["responses"], rep["finished"]
        results["win_by_judge"] = by_judge(world, prompts, draws, [seed_runs(cfg.run, k) for k in POLICIES + BASELINES],
                                           cfg)
        results["study_by_judge"] = by_judge(world, prompts, draws, [[n] for n in ["ppo"] + studies], cfg)
        for n, row in results["study_by_judge"].items():
            row["kl_coef"] = load_checkpoint(os.path.join(cfg.run, n, "ckpt.pt"))["config"]["kl_coef"]
            row["final_kl"] = results["overoptimization"][n][-1][0] if results["overoptimization"].get(n) else None
    seconds_path = os.path.join(cfg.run, "seconds.json")
    results["seconds"] = json.load(open(seconds_path)) if os.path.exists(seconds_path) else {}
    results["rounds"] = round_table(cfg.run, results)
    results["methods"] = methods_table(cfg.run, results, len(world.prompts("sft")), per_prompt, cfg)
    results["gao_fits"] = gao_fits(cfg.run, results)
    return results


def judge_wins(world, prompts, draws, baseline, k):
    """Per judge, each prompt's win of a model's k draws over the baseline's (evaluation.preference_wins): the gold
    judge (noise-free, τ = 0); a labeler of the training labelers' taste; each held-out panel labeler
    (world.panel); and the panel, the mean of its labelers' probabilities. The labelers' temperatures are all
    calibrated on the same candidates to 75% agreement. draws, baseline: (responses, finished), k per prompt."""
    reps = [p for p in prompts for _ in range(k)]

    def per_prompt(utility, responses, finished):  # the judge's utility of each draw, k per prompt
        u = [utility(p, y, f) for p, y, f in zip(reps, responses, finished)]
        return [u[i * k:(i + 1) * k] for i in range(len(prompts))]
    judges = {"gold, per draw pair": (world.gold_score, 0),
              "training labelers": (world.labeler(0).utility, world.tau),
              **{f"panel: {n}": (lab.utility, lab.tau) for n, lab in world.panel.items()}}
    wins = {j: preference_wins(per_prompt(u, *draws), per_prompt(u, *baseline), tau) for j, (u, tau) in judges.items()}
    wins["held-out panel"] = list(np.mean([wins[f"panel: {n}"] for n in world.panel], axis=0))
    return wins


def by_judge(world, prompts, draws, methods, cfg):
    """{method: {judge: {win_rate, ci}}} against SFT, for each method (a list of its seeds' run names, pooled as
    seed_win_rate pools them: each prompt's wins averaged over the seeds), and the training labelers' win minus the
    panel's ("taste gap": the part of the margin a change of taste takes away), with paired 95% bootstrap
    intervals over prompts."""
    out = {}
    for names in methods:
        names = [n for n in names if n in draws]
        if not names:
            continue
        seeds = [judge_wins(world, prompts, draws[n], draws["sft"], cfg.samples) for n in names]
        wins = {j: np.mean([s[j] for s in seeds], axis=0) for j in seeds[0]}
        wins["taste gap"] = wins["training labelers"] - wins["held-out panel"]
        out[names[0]] = {j: dict(zip(("win_rate", "ci"), bootstrap_mean(w, cfg.seed, cfg.bootstrap)))
                         for j, w in wins.items()}
    return out


def gao_fits(run, results):
    """Gao et al. 2022's forms fitted to the gold gain over SFT at d = √KL: best-of-N, d(a − b·d), from its rows
    (analytic KL, gain over best-of-1); each RL method, d(a − b·log d), from the (KL, gold) of every training batch
    of all its seeds (gain over the first batch's gold: samples of the SFT policy, before any update)."""
    fits = {}
    bon = sorted(results.get("best_of_n", {}).get("by_n", {}).values(), key=lambda r: r["n"])
    if len(bon) >= 3 and bon[0]["n"] == 1:
        d = [r["kl"] ** 0.5 for r in bon]
        gain = [r["gold"] - bon[0]["gold"] for r in bon]
        fits["best-of-N"] = dict(zip(("alpha", "beta"), fit_gao(d, gain, "bon")), points=list(zip(d, gain)))
    for key in RL_METHODS:
        logs = [overoptimization(os.path.join(run, n, "log.jsonl")) for n in seed_runs(run, key)]
        logs = [pts for pts in logs if pts]
        if not logs:
            continue
        start = statistics.mean(pts[0][2] for pts in logs)
        points = [(kl ** 0.5, gold - start) for pts in logs for kl, _, gold in pts if kl > 1e-6]
        if len(points) >= 3:
            fits[METHOD_LABELS[key]] = dict(zip(("alpha", "beta"), fit_gao(*zip(*points), "rl")), points=points)
    return fits


@torch.no_grad()
def rm_by_kind(model, tok, world, tau, device, lm=None):
    """RM accuracy on the test prompts' contrast pairs (world.contrast_pair: two answers that differ in one kind of
    quality alone) — the fraction where the RM scores the gold-better answer higher — beside what labelers at
    temperature tau manage on the same pairs: a labeler's mean probability of ordering a pair as gold does
    (σ(Δutility / τ), Plackett–Luce with K = 2), and the accuracy of an RM that learned the labelers' utility
    exactly (Δutility > 0; the labelers' biases for "!" and length can flip a pair). With `lm` (the SFT model that
    the RM's trunk starts from): how often its likelihood log π(y | x) is higher for the better answer — whether the
    knowledge the RM needs is in the trunk it starts from."""
    model.eval()
    labeler = world.labeler(0)
    out = {}
    for kind in KIND_COMPONENTS:
        pairs = world.contrast_pairs("test", kind)
        prompts, better, worse = (list(x) for x in zip(*pairs))
        finished = [True] * len(pairs)
        s_better = score_texts(model, tok, prompts, better, finished, device)
        s_worse = score_texts(model, tok, prompts, worse, finished, device)
        du = [labeler.utility(p, b) - labeler.utility(p, w) for p, b, w in pairs]
        right = {"rm_accuracy": (s_better > s_worse).tolist()}
        if lm is not None:  # log π(y | x) of each finished answer
            lm.eval()
            lm_better, lm_worse = (response_logprob_sums(lm, [tok.format_example(p, y) for p, y in zip(prompts, ys)],
                                                         tok.pad_id, device) for ys in (better, worse))
            right["sft_likelihood_accuracy"] = (lm_better > lm_worse).tolist()
        out[kind] = {"pairs": len(pairs), "labeler_accuracy": statistics.mean(sigmoid(d / tau) for d in du),
                     "ideal_rm_accuracy": statistics.mean(d > 0 for d in du),
                     **{k: statistics.mean(v) for k, v in right.items()}}
        if kind == "correctness":  # where the RM is blind: a fact, a sum, a copied word, …
            categories = [world.category(p) for p in prompts]
            out[kind]["by_category"] = {"pairs": {c: categories.count(c) for c in sorted(set(categories))},
                                        **{k: category_means(categories, v) for k, v in right.items()}}
    return out


def rm_sample_accuracy(gold, rm_scores, k):
    """The RM's accuracy on a policy's own samples: over the pairs among each prompt's k draws (consecutive in
    both lists) whose gold scores differ, the fraction the RM orders as gold does (evaluation.pair_accuracy, gold
    as the ranking). On PPO's samples it shows whether the RM still tells better from worse where the policy has
    moved (over-optimization starts there)."""
    starts = range(0, len(gold), k)
    ranks = [[-g for g in gold[i:i + k]] for i in starts]  # a ranking: lower is better, equal gold forms no pair
    pairs = sum(len(ranked_pairs(r)) for r in ranks)
    return {"pairs": pairs, "accuracy": pair_accuracy([rm_scores[i:i + k] for i in starts], ranks) if pairs else None}


def gold_peak(points, window=3):
    """The KL where gold, smoothed by a centred moving average, peaks: past it, PPO buys RM score with gold."""
    gold = [statistics.mean(p[2] for p in points[max(0, i - window // 2):i + window // 2 + 1])
            for i in range(len(points))]
    return points[max(range(len(points)), key=gold.__getitem__)][0]


def _rm_extra(run, name):
    path = os.path.join(run, name, "ckpt.pt")
    return load_checkpoint(path)["extra"] if os.path.exists(path) else {}


def _pairs(run, rm):
    """Pairwise comparisons an RM trained on (all rounds so far), from the comparisons.jsonl train_rm.py wrote."""
    path = os.path.join(run, rm, "comparisons.jsonl")
    return (sum(len(ranked_pairs(json.loads(line)["ranking"])) for line in open(path)) if os.path.exists(path)
            else None)


def round_table(run, results):
    """Per round of iterated RLHF: gold, win rate, labels, and the accuracy (vs the labelers) on the samples of
    the policy the round's RM was trained for: round 1's RM on SFT samples; round k's RM, and round k−1's, on
    round k−1's PPO policy's samples (the distribution shift the retraining is meant to fix)."""
    if not rounds(run):
        return []
    table = []
    for k, (rm, ppo) in enumerate([("rm", "ppo")] + [(f"rm_r{k}", f"ppo_r{k}") for k in rounds(run)], start=1):
        m = _rm_extra(run, rm)
        table.append({"round": k, "policy": ppo, "gold": results["gold_score"].get(ppo),
                      "win_rate": results["win_rate_vs_sft"].get(ppo), "pairs": _pairs(run, rm),
                      "rm_accuracy": m.get("accuracy"), "previous_rm_accuracy": m.get("previous_rm_accuracy")})
    return table


def methods_table(run, results, n_demos, per_prompt, cfg):
    """One row per method that ran: win rate vs SFT (the mean over its training seeds, their range, and a 95%
    bootstrap interval over prompts), gold, helpful, KL from SFT (measured; analytic for best-of-N), labels
    (demonstrations + pairwise comparisons) and minutes: every stage it needs, base model included, its own stage
    averaged over seeds."""
    sec = results["seconds"]

    def minutes(stages, own):
        own = [sec[s] for s in own if s in sec]
        if not own or not all(s in sec for s in stages):
            return None
        return (sum(sec[s] for s in stages) + statistics.mean(own)) / 60
    pairs = _pairs(run, "rm")
    rlhf_labels = f"{n_demos} demos + {pairs} pairs" if pairs else None
    paper = ["base", "sft", "rm"]
    rows = []

    def add(method, names, kl, labels, mins, gold=None, helpful=None):
        rates = [results["win_rate_vs_sft"][n] for n in names]
        rate, ci = seed_win_rate([per_prompt[n] for n in names], per_prompt["sft"], cfg.seed, cfg.bootstrap)
        rows.append({"method": method, "seeds": len(names), "win_rate": rate, "seed_range": [min(rates), max(rates)],
                     "win_rate_ci": ci, "kl": kl, "labels": labels, "minutes": mins,
                     "gold": gold if gold is not None else statistics.mean(results["gold_score"][n] for n in names),
                     "helpful": helpful if helpful is not None else statistics.mean(
                         results["gold_components"][n]["helpful"] for n in names)})
    if "sft" not in per_prompt:
        return rows
    add("SFT", ["sft"], 0.0, f"{n_demos} demos", minutes(["base"], ["sft"]))
    for r in results.get("best_of_n", {}).get("by_n", {}).values():
        add(f"best-of-{r['n']}", [f"best_of_{r['n']}"], r["kl"], rlhf_labels, minutes(paper, ["bestofn"]), r["gold"],
            r.get("helpful"))
    for key, method in METHOD_LABELS.items():
        names = [n for n in seed_runs(run, key) if n in per_prompt]
        if names:
            add(method, names, statistics.mean(results["kl_from_sft"][n] for n in names),
                "gold judge" if key == "oracle" else rlhf_labels, minutes(paper, names))
    stages = paper + ["ppo"]
    for r in results["rounds"][1:]:
        stages += [f"rm_r{r['round']}"]
        add(f"RLHF round {r['round']}", [r["policy"]], results["kl_from_sft"].get(r["policy"]),
            f"{n_demos} demos + {r['pairs']} pairs", minutes(stages, [r["policy"]]))
        stages += [r["policy"]]
    return rows


def _fmt(x, pct=False):
    """A figure for the report: a rate to 0.1% (no "-0.0%" for float noise around 0), else 3 decimals; – if absent."""
    if x is None:
        return "–"
    return f"{round(x, 3) + 0.0:.1%}" if pct else f"{x:.3f}"


def write_report(results, path, machine, plots):
    """report.md; `plots`: the PNG files make_plots wrote, or None if matplotlib is not installed."""
    names = list(results["gold_score"])
    cats = sorted({c for n in names for c in results["gold_by_category"][n]})
    comps = list(next(iter(results["gold_components"].values()), {}))
    lines = ["# nanorlhf report card", "", f"Held-out test prompts; machine: {machine}.", "",
             "| model | win rate vs SFT (95% CI) | gold score | " + " | ".join(comps) + " | pretrain val loss |",
             "|---" * (4 + len(comps)) + "|"]
    for n in names:
        wr, ci = results["win_rate_vs_sft"].get(n), results["win_rate_ci"].get(n)
        wr_s = f"{wr:.1%} ({ci[0]:.0%}–{ci[1]:.0%})" if wr is not None else "–"
        lines.append(f"| {n} | {wr_s} | {_fmt(results['gold_score'][n])} | "
                     + " | ".join(_fmt(results["gold_components"][n][c]) for c in comps)
                     + f" | {_fmt(results['pretrain_val_loss'][n])} |")
    lines += ["", "## Gold score by task category", "", "| category | " + " | ".join(names) + " |",
              "|---" * (1 + len(names)) + "|"]
    for c in cats:
        lines.append(f"| {c} | " + " | ".join(_fmt(results["gold_by_category"][n].get(c)) for n in names) + " |")
    lines += ["", "## Reward model", "",
              f"- held-out accuracy vs labelers: {_fmt(results.get('rm_accuracy'), True)}",
              f"- labeler agreement (ceiling): {_fmt(results.get('labeler_agreement'), True)}",
              f"- accuracy vs gold ordering: {_fmt(results.get('rm_gold_accuracy'), True)}", ""]
    if results.get("rm_by_kind"):
        lines += ["Accuracy on test-prompt pairs that differ in one kind of quality alone (the gold-better answer "
                  "scored higher), beside a labeler's (its mean probability of ordering the pair as gold does) and "
                  "an RM that learned the labelers' utility exactly, and the SFT model's own likelihood log π(y | x) "
                  "(does the trunk the RM starts from know which answer is better?):", "",
                  "| difference | pairs | RM | a labeler | ideal RM | SFT's likelihood |", "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {v['pairs']} | {_fmt(v['rm_accuracy'], True)} | {_fmt(v['labeler_accuracy'], True)} | "
                  f"{_fmt(v['ideal_rm_accuracy'], True)} | {_fmt(v.get('sft_likelihood_accuracy'), True)} |"
                  for k, v in results["rm_by_kind"].items()]
        lines += ["", "Correctness pairs by task category (the knowledge each needs: a fact, a sum, a word copied from "
                  "the prompt, …):", "", "| category | pairs | RM | SFT's likelihood |", "|---|---|---|---|"]
        cats = results["rm_by_kind"]["correctness"]["by_category"]
        lines += [f"| {c} | {n} | {_fmt(cats['rm_accuracy'][c], True)} | "
                  f"{_fmt(cats.get('sft_likelihood_accuracy', {}).get(c), True)} |" for c, n in cats["pairs"].items()]
        lines.append("")
    if results.get("rm_on_samples"):
        lines += ["Accuracy on each policy's own samples (pairs of a test prompt's draws whose gold differs, ordered "
                  "as gold orders them):", "", "| policy | pairs | RM accuracy |", "|---|---|---|"]
        lines += [f"| {n} | {v['pairs']} | {_fmt(v['accuracy'], True)} |" for n, v in results["rm_on_samples"].items()
                  if n in POLICIES]
        lines.append("")
    if results.get("seconds"):
        lines += ["## Time per stage (s)", "", "| " + " | ".join(results["seconds"]) + " |",
                  "|---" * len(results["seconds"]) + "|",
                  "| " + " | ".join(f"{v:.0f}" for v in results["seconds"].values()) + " |", ""]
    lines += judge_report(results)
    lines += beyond_report(results)
    lines += ["## Samples (first test prompts)", ""]
    for n in names:
        for ex in results["examples"][n][:3]:
            lines.append(f"- **{n}** `{ex['prompt']}` → `{ex['response']}` (gold {ex['gold']:.2f})")
    if plots is None:
        lines += ["", "Plots: none (matplotlib is not installed): `pip install matplotlib`, then run "
                  f"`python eval.py --run {os.path.dirname(path) or '.'}` again."]
    elif plots:
        lines += ["", "Plots: " + ", ".join(f"`{os.path.basename(p)}`" for p in plots) + "."]
    open(path, "w").write("\n".join(lines) + "\n")


def judge_report(results):
    """The win rate vs SFT by judge, for the report card's models and along the over-optimization study's β."""
    rows, study = results.get("win_by_judge", {}), results.get("study_by_judge", {})
    if not rows:
        return []
    panel = [j for j in next(iter(rows.values())) if j.startswith("panel: ")]
    main = ["gold, per draw pair", "training labelers", "held-out panel", "taste gap"]

    def cell(r):
        return f"{_fmt(r['win_rate'], True)} ({_fmt(r['ci'][0], True)}–{_fmt(r['ci'][1], True)})"
    lines = ["## Win rate vs SFT by judge", "",
             "The same samples judged three ways: each prompt's win is the judge's probability of preferring a model "
             "draw to an SFT draw, σ(Δutility / τ), averaged over the pairs of the prompt's draws (the gold judge: "
             "τ = 0, ½ on a tie), then over prompts, with a 95% bootstrap interval. Training labelers: the taste of "
             "those who ranked the RM's comparisons (gold + \"!\" + length); held-out panel: the mean of labelers "
             "who rank nothing a model trains on (" + ", ".join(p.removeprefix("panel: ") for p in panel) + "; "
             "docs/labelers.md); each at the temperature where two of a kind agree on 75% of the pairs of the same "
             "demonstration-like candidates. Taste gap: "
             "training labelers − panel, paired interval. The gold column is gold's win over draw pairs, another "
             "estimand than the headline win rate (which compares each prompt's mean gold), and so another name.", "",
             "| model | " + " | ".join(main + panel) + " |", "|---" * (1 + len(main) + len(panel)) + "|"]
    lines += [f"| {n} | " + " | ".join([cell(r[j]) for j in main] + [_fmt(r[j]['win_rate'], True) for j in panel]) + " |"
              for n, r in rows.items()]
    if len(study) > 1:
        lines += ["", "Along the over-optimization study's β (final KL: the last PPO batch's, nats per response):", "",
                  "| run | β | final KL | " + " | ".join(main) + " |", "|---" * (3 + len(main)) + "|"]
        lines += [f"| {n} | {r['kl_coef']} | {_fmt(r['final_kl'])} | " + " | ".join(cell(r[j]) for j in main) + " |"
                  for n, r in sorted(study.items(), key=lambda kv: kv[1]["kl_coef"])]
    return lines + [""]


def methods_report(rows):
    lines = ["## Methods on the same label budget", "",
             "Win rate vs SFT: the mean over the method's training seeds (seeds: how many; range: the lowest and "
             "highest seed), with a 95% bootstrap interval over prompts. KL from SFT per response in nats "
             "(best-of-N: the analytic log N − (N−1)/N; others: k1 on their own test samples); minutes: every stage "
             "the method needs, base model included, on this machine. One estimand for every row: a prompt's mean "
             "gold over the same number of draws (a best-of-N draw picks from N fresh samples); best-of-1 is plain "
             "sampling from SFT, the ≈ 50% sanity row.", "",
             "| method | seeds | win rate vs SFT | seed range | 95% CI | gold | helpful | KL from SFT | labels used "
             "| minutes |", "|---" * 10 + "|"]
    for r in rows:
        mins = "–" if r["minutes"] is None else f"{r['minutes']:.1f}"
        lo, hi = r["seed_range"]
        spread = f"{lo:.1%}–{hi:.1%}" if r["seeds"] > 1 else "–"
        lines.append(f"| {r['method']} | {r['seeds']} | {_fmt(r['win_rate'], True)} | {spread} | "
                     f"{r['win_rate_ci'][0]:.1%}–{r['win_rate_ci'][1]:.1%} | {_fmt(r['gold'])} | "
                     f"{_fmt(r['helpful'])} | {_fmt(r['kl'])} | {r['labels'] or '–'} | {mins} |")
    return lines + [""]


def gao_report(fits):
    lines = ["## Gao et al. 2022's functional forms", "", "Gold gain over SFT against d = √KL: best-of-N fitted with "
             "d(a − b·d), each RL method's training batches (all seeds) with d(a − b·log d) (the fit's coefficients "
             "a and b; β is the KL coefficient).",
             "", "| method | form | a | b | points |", "|---|---|---|---|---|"]
    for name, f in fits.items():
        form = "d(a − b·d)" if name == "best-of-N" else "d(a − b·log d)"
        lines.append(f"| {name} | {form} | {f['alpha']:.4f} | {f['beta']:.4f} | {len(f['points'])} |")
    return lines + [""]


def beyond_report(results):
    """The report's sections beyond the paper: other methods on the same labels, iterated rounds, over-optimization."""
    rows = results.get("methods", [])
    lines = []
    if any(r["method"] not in ("SFT", "PPO", "PPO-ptx") for r in rows):
        lines += methods_report(rows)
    if results.get("gao_fits"):
        lines += gao_report(results["gao_fits"])
    if results.get("best_of_n"):
        lines += ["## Best-of-N: truth (gold) and proxy (RM) against KL", "", "| N | KL | RM score | gold |",
                  "|---|---|---|---|"]
        lines += [f"| {r['n']} | {r['kl']:.3f} | {r['rm']:.4f} | {r['gold']:.4f} |"
                  for r in results["best_of_n"]["by_n"].values()]
        lines.append("")
    if results.get("rounds"):
        lines += ["## Iterated RLHF", "", "RM accuracy vs the labelers on the samples of the policy it was trained "
                  "for (round 1: SFT; round k: round k−1's PPO policy), and the previous round's RM on the same.", "",
                  "| round | gold | win rate vs SFT | pairs so far | RM accuracy | previous RM accuracy |",
                  "|---" * 6 + "|"]
        lines += [f"| {r['round']} | {_fmt(r['gold'])} | {_fmt(r['win_rate'], True)} | {r['pairs']} | "
                  f"{_fmt(r['rm_accuracy'], True)} | {_fmt(r['previous_rm_accuracy'], True)} |"
                  for r in results["rounds"]]
        lines.append("")
    if results.get("gold_peak_kl"):
        lines += ["## Over-optimization: where gold peaks", "", "KL (nats) at which the PPO run's gold score "
                  "(3-update moving average) peaks; past it the RM score still rises.",
                  "", "| run | KL at the gold peak | final KL | final RM score | final gold |", "|---" * 5 + "|"]
        for n, kl in results["gold_peak_kl"].items():
            end_kl, end_rm, end_gold = results["overoptimization"][n][-1]
            lines.append(f"| {n} | {kl:.2f} | {end_kl:.2f} | {end_rm:.3f} | {end_gold:.3f} |")
        lines.append("")
    return lines


def _pyplot(what):
    """matplotlib.pyplot (drawing to files), or None with a message naming `what` is skipped, where matplotlib is
    not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping {what} (pip install matplotlib)")
        return None
    return plt


def make_plots(results, run):
    """PNG plots into `run`: the paths written, or None (and a message, not a crash) if matplotlib is not
    installed."""
    plt = _pyplot("plots")
    if plt is None:
        return None
    written = []
    names = list(results["win_rate_vs_sft"])
    if names:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        rates = [results["win_rate_vs_sft"][n] for n in names]
        err = [[r - results["win_rate_ci"][n][0] for n, r in zip(names, rates)],
               [results["win_rate_ci"][n][1] - r for n, r in zip(names, rates)]]
        ax.bar(names, rates, yerr=err, capsize=4, color=["#999", "#4a7", "#47c", "#c74"][:len(names)])
        ax.axhline(0.5, color="k", lw=0.8, ls="--")
        ax.set_ylabel("win rate vs SFT (gold judge)")
        ax.set_ylim(0, 1)
        ax.set_title("Held-out prompts: who wins against SFT?")
        written.append(_save(fig, plt, run, "win_rates.png"))
    curves = {n: pts for n, pts in results["overoptimization"].items() if pts}
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for n, pts in curves.items():
            kl, rm, gold = (smooth(c) for c in zip(*pts))  # per-update values are noisy: 5-update moving average
            axes[0].plot(kl, rm, "-", label=n)
            line, = axes[1].plot(kl, gold, "-", label=n)
            axes[1].axvline(results["gold_peak_kl"][n], color=line.get_color(), ls=":", lw=1)  # gold's peak
        bon = results.get("best_of_n", {}).get("by_n", {}).values()
        if bon:  # best-of-N at its analytic KL
            axes[0].plot([r["kl"] for r in bon], [r["rm"] for r in bon], "k*--", label="best-of-N")
            axes[1].plot([r["kl"] for r in bon], [r["gold"] for r in bon], "k*--", label="best-of-N")
        axes[0].set_title("proxy: the optimized reward (RM − EOS penalty)")
        axes[1].set_title("truth: gold score")
        for ax in axes:
            ax.set_xlabel("KL(policy || SFT) per response (nats)")
            ax.legend()
        written.append(_save(fig, plt, run, "overoptimization.png"))
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
        for n, pts in curves.items():
            kl, rm, gold = zip(*pts)
            for ax, ys, title in zip(axes, (rm, gold, kl), ("RM score", "gold score", "KL")):
                ax.plot(ys, label=n)
                ax.set_title(title)
                ax.set_xlabel("PPO update")
        axes[0].legend()
        written.append(_save(fig, plt, run, "training.png"))
    if results.get("gao_fits"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, f in results["gao_fits"].items():
            d, gain = (np.array(c) for c in zip(*f["points"]))
            dots, = ax.plot(d, gain, ".", ms=3, alpha=0.4)
            grid = np.linspace(max(d.min(), 1e-3), d.max(), 100)
            fit = grid * (f["alpha"] - f["beta"] * (grid if name == "best-of-N" else np.log(grid)))
            ax.plot(grid, fit, "-", color=dots.get_color(), label=f"{name}: a {f['alpha']:.3f}, b {f['beta']:.3f}")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("d = √KL(policy ‖ SFT)")
        ax.set_ylabel("gold gain over SFT")
        ax.set_title("Gao et al. 2022's forms, fitted")
        ax.legend(fontsize=7)
        written.append(_save(fig, plt, run, "gao_fits.png"))
    return written


def smooth(xs, window=5):
    """Trailing moving average (shorter at the start)."""
    return [sum(xs[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(xs))]


def _save(fig, plt, run, name):
    path = os.path.join(run, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class MeanReward(torch.nn.Module):
    """An ensemble of reward models of one world: the mean of their normalized scores (Coste et al. 2024)."""

    def __init__(self, models):
        super().__init__()
        self.models, self.config = torch.nn.ModuleList(models), models[0].config

    def forward(self, ids):
        return torch.stack([m(ids) for m in self.models]).mean(0)  # (B, T)


def rm_table(paths, world, device, ensemble=False, out=None):
    """One row per reward model (the tables of docs/findings.md): its parameters and the comparisons it trained
    on, the accuracies train_rm.py measured on its held-out rankings, and rm_by_kind's on the test prompts' contrast
    pairs; with `ensemble`, a last row for the mean of their scores (contrast pairs only: each RM was held out on
    rankings of its own candidates). RMs trained on more than one number of comparisons also give `out`/rm_curve.png
    (plot_rm_curve)."""
    lines = ["| reward model | parameters | comparisons | held-out accuracy (ceiling) | vs gold ordering | "
             "correctness | harmlessness | conciseness |", "|---|---|---|---|---|---|---|---|"]

    def cells(kinds):  # a row's accuracies on the contrast pairs
        return " | ".join(_fmt(kinds[k]["rm_accuracy"], True) for k in KIND_COMPONENTS)

    models, points = [], []
    for path in paths:
        m = load_checkpoint(path)["extra"]
        if not m.get("labeler_tau"):
            raise SystemExit(f"--rms {path}: not a reward model trained on the tiny world's labels")
        model, tok, _ = load_model(path, "scalar", device)
        models.append(model)
        kinds = rm_by_kind(model, tok, world, m["labeler_tau"], device)
        pairs = m.get("pairs")
        points.append((model.num_params(), pairs, kinds["correctness"]["rm_accuracy"]))
        lines.append(f"| {path} | {model.num_params() / 1e6:.2f}M | {f'{pairs:,}' if pairs else '–'} | "
                     f"{_fmt(m['accuracy'], True)} ({_fmt(m['ceiling'], True)}) | {_fmt(m['gold_accuracy'], True)} | "
                     f"{cells(kinds)} |")
        print(lines[-1])
    if ensemble:
        kinds = rm_by_kind(MeanReward(models), tok, world, m["labeler_tau"], device)
        lines.append(f"| mean of the {len(models)} | — | — | — | — | {cells(kinds)} |")
        print(lines[-1])
    if out and len({p for _, p, _ in points if p}) > 1:
        path = plot_rm_curve([p for p in points if p[1]], out)
        if path:
            print(f"wrote {path}")
    return lines


def plot_rm_curve(points, out):
    """The RM's data-scaling curve: accuracy on the correctness contrast pairs against the comparisons trained on
    (log axis), one line per RM size through the mean over seeds at each count, each seed a dot. `points`:
    (parameters, comparisons, accuracy). Returns the PNG's path, or None without matplotlib."""
    plt = _pyplot("rm_curve.png")
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for size in sorted({n for n, _, _ in points}):
        mine = [(pairs, acc) for n, pairs, acc in points if n == size]
        xs = sorted({pairs for pairs, _ in mine})
        line, = ax.plot(xs, [statistics.mean(a for p, a in mine if p == x) for x in xs], "-o", ms=3,
                        label=f"{size / 1e6:.2f}M parameters")
        ax.plot(*zip(*mine), ".", color=line.get_color(), alpha=0.6)
    ax.axhline(0.5, color="k", lw=0.8, ls="--")  # chance
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    counts = sorted({pairs for _, pairs, _ in points})
    ax.set_xticks(counts, [f"{c / 1e3:.0f}k" for c in counts])
    ax.set_ylim(0.4, 1)
    ax.set_xlabel("comparisons trained on (pairs)")
    ax.set_ylabel("accuracy on correctness pairs")
    ax.set_title("Does the RM learn correctness from more comparisons?")
    ax.legend(fontsize=8)
    os.makedirs(out, exist_ok=True)
    return _save(fig, plt, out, "rm_curve.png")


def main(argv=None):
    cfg = parse_config(EvalConfig, argv)
    device = setup(cfg)
    if cfg.rms:
        return "\n".join(rm_table(cfg.rms, make_world(cfg.world_seed, cfg.world_scale), device, cfg.ensemble,
                                   cfg.out))
    found = [n for n in POLICIES + BASELINES if os.path.exists(os.path.join(cfg.run, n, "ckpt.pt"))]
    if not found:
        raise SystemExit(f"--run {cfg.run}: no checkpoints to evaluate (expected the --out folder of run.py, "
                         f"holding {', '.join(n + '/ckpt.pt' for n in POLICIES)})")
    results = report_card(cfg, device)
    with open(os.path.join(cfg.run, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    machine = f"{os.cpu_count()} CPU cores" if device.type == "cpu" else torch.cuda.get_device_name()
    plots = make_plots(results, cfg.run)
    write_report(results, os.path.join(cfg.run, "report.md"), machine, plots)
    for path in plots or []:
        print(f"wrote {path}")
    print(f"wrote {os.path.join(cfg.run, 'results.json')} and {os.path.join(cfg.run, 'report.md')}")
    return results


if __name__ == "__main__":
    main()
