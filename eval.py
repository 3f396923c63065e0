"""The report card: evaluate every stage of a run on held-out test prompts that no stage trained on.

    python eval.py --run runs/default

- Win rate vs SFT under the gold judge (the paper's Figure 1 analogue), with a 95% bootstrap interval over
  prompts, for base, SFT, PPO and PPO-ptx; mean gold score, its components, and per task category.
- Reward model: held-out accuracy, the labeler-agreement ceiling, accuracy against gold (from train_rm.py).
- Alignment tax: pretraining validation loss of every model.
- Over-optimization: gold and RM score against KL from the PPO logs (Gao et al. 2022).
Writes results.json, report.md and PNG plots (if matplotlib is installed) into the run folder.
"""
import json
import os
import statistics
from dataclasses import dataclass

import torch

from nanorlhf.checkpoint import load_checkpoint
from nanorlhf.common import load_model, setup, token_stream, val_loss
from nanorlhf.config import CommonConfig, arg, parse_config
from nanorlhf.evaluation import gold_report, sample_responses, win_rate
from nanorlhf.world import make_world

POLICIES = ["base", "sft", "ppo", "ppo_ptx"]


@dataclass
class EvalConfig(CommonConfig):
    run: str = arg("runs/default", "run folder holding base/ sft/ rm/ ppo/ ppo_ptx/ (missing stages are skipped)")
    samples: int = arg(2, "samples per test prompt and model (temperature 1, as PPO samples)")
    max_new_tokens: int = arg(48, "response length limit")
    temperature: float = arg(1.0, "sampling temperature for every model")
    bootstrap: int = arg(1000, "bootstrap resamples for the 95% intervals")


def overoptimization(log_path):
    """(kl, rm_score, gold) per PPO update from a log.jsonl, or [] if there is none."""
    if not os.path.exists(log_path):
        return []
    rows = [json.loads(line) for line in open(log_path) if line.strip()]
    return [(r["kl"], r["reward"], r["gold"]) for r in rows if "gold" in r]


def evaluate(cfg, device):
    world = make_world(cfg.world_seed, cfg.world_scale)
    prompts = world.prompts("test")
    val_docs = world.pretrain_docs("val")
    results = {"gold_score": {}, "gold_components": {}, "gold_by_category": {}, "win_rate_vs_sft": {},
               "win_rate_ci": {}, "pretrain_val_loss": {}, "eos_fraction": {}, "examples": {}}
    per_prompt = {}
    for name in POLICIES:
        path = os.path.join(cfg.run, name, "ckpt.pt")
        if not os.path.exists(path):
            print(f"{name}: no checkpoint at {path}, skipped")
            continue
        model, tok, _ = load_model(path, "lm", device)
        gen = torch.Generator(device=device).manual_seed(cfg.seed)  # same sampling noise for every model
        reps = [p for p in prompts for _ in range(cfg.samples)]
        responses = sample_responses(model, tok, reps, cfg.max_new_tokens, cfg.temperature, generator=gen)
        rep = gold_report(world, reps, responses)
        per_prompt[name] = [statistics.mean(rep["scores"][i * cfg.samples:(i + 1) * cfg.samples])
                            for i in range(len(prompts))]
        results["gold_score"][name] = rep["gold"]
        results["gold_components"][name] = rep["components"]
        results["gold_by_category"][name] = rep["by_category"]
        results["eos_fraction"][name] = rep["eos_fraction"]
        results["examples"][name] = [{"prompt": p, "response": y, "gold": s}
                                     for p, (y, _), s in list(zip(reps, responses, rep["scores"]))[:12:cfg.samples]]
        stream = token_stream(tok, val_docs)
        results["pretrain_val_loss"][name] = val_loss(model, stream, model.config.block_size, device)
        print(f"{name}: gold {rep['gold']:.3f} | pretraining val loss {results['pretrain_val_loss'][name]:.4f}")
    if "sft" in per_prompt:
        for name, scores in per_prompt.items():
            rate, (lo, hi) = win_rate(scores, per_prompt["sft"], cfg.seed, cfg.bootstrap)
            results["win_rate_vs_sft"][name], results["win_rate_ci"][name] = rate, [lo, hi]
            print(f"{name}: win rate vs SFT {rate:.1%} (95% CI {lo:.1%}-{hi:.1%})")
    rm_path = os.path.join(cfg.run, "rm", "ckpt.pt")
    if os.path.exists(rm_path):
        m = load_checkpoint(rm_path)["extra"]
        results["rm_accuracy"], results["labeler_agreement"] = m.get("accuracy"), m.get("ceiling")
        results["rm_gold_accuracy"] = m.get("gold_accuracy")
    results["overoptimization"] = {n: overoptimization(os.path.join(cfg.run, n, "log.jsonl"))
                                   for n in ("ppo", "ppo_ptx")}
    seconds_path = os.path.join(cfg.run, "seconds.json")
    results["seconds"] = json.load(open(seconds_path)) if os.path.exists(seconds_path) else {}
    return results


def _fmt(x, pct=False):
    if x is None:
        return "–"
    return f"{x:.1%}" if pct else f"{x:.3f}"


def write_report(results, path, machine=""):
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
    if results.get("seconds"):
        lines += ["## Time per stage (s)", "", "| " + " | ".join(results["seconds"]) + " |",
                  "|---" * len(results["seconds"]) + "|",
                  "| " + " | ".join(f"{v:.0f}" for v in results["seconds"].values()) + " |", ""]
    lines += ["## Samples (first test prompts)", ""]
    for n in names:
        for ex in results["examples"][n][:3]:
            lines.append(f"- **{n}** `{ex['prompt']}` → `{ex['response']}` (gold {ex['gold']:.2f})")
    lines += ["", "Plots: `win_rates.png`, `overoptimization.png`, `training.png`."]
    open(path, "w").write("\n".join(lines) + "\n")


def make_plots(results, run):
    """PNG plots; matplotlib is optional (a message, not a crash, without it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping plots (pip install matplotlib)")
        return []
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
            kl, rm, gold = zip(*pts)
            axes[0].plot(kl, rm, ".-", label=n)
            axes[1].plot(kl, gold, ".-", label=n)
        axes[0].set_title("proxy: reward-model score")
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
    return written


def _save(fig, plt, run, name):
    path = os.path.join(run, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    cfg = parse_config(EvalConfig, argv)
    device = setup(cfg)
    results = evaluate(cfg, device)
    with open(os.path.join(cfg.run, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    machine = f"{os.cpu_count()} CPU cores" if device.type == "cpu" else torch.cuda.get_device_name()
    write_report(results, os.path.join(cfg.run, "report.md"), machine)
    for path in make_plots(results, cfg.run):
        print(f"wrote {path}")
    print(f"wrote {os.path.join(cfg.run, 'results.json')} and {os.path.join(cfg.run, 'report.md')}")
    return results


if __name__ == "__main__":
    main()
