"""The whole InstructGPT recipe in one command, on the built-in tiny world:

    base pretraining → SFT → reward model → PPO → PPO-ptx → evaluation (report card)

    python run.py                   # ≈15 minutes on 2 CPU cores; outputs in runs/default/
    python run.py --quick           # ≈2 minutes, tiny sizes: tries the code, not the quality bar
    python run.py --device cuda     # on a GPU

A stage whose checkpoint exists is skipped (--force redoes everything); an interrupted stage resumes from its
state.pt. Each stage is its own script (train_base.py, train_sft.py, train_rm.py, train_ppo.py, eval.py),
called here with the flags printed before it starts, so any stage can be rerun by hand.
"""
import json
import os
import shutil
import time
from dataclasses import dataclass

import eval as evaluate_run
import train_base
import train_ppo
import train_rm
import train_sft
from nanorlhf.config import arg, parse_config, print_config


@dataclass
class RunConfig:
    out: str = arg("runs/default", "run folder: one subfolder per stage, plus results.json, report.md, plots")
    device: str = arg("cpu", "cpu | cuda")
    seed: int = arg(1337, "seed of every stage")
    world_seed: int = arg(0, "seed of the tiny world")
    quick: bool = arg(False, "tiny preset (≈2 minutes): for tests and trying the code")
    force: bool = arg(False, "redo every stage even if its checkpoint exists")


# flags of each stage: (default preset, quick preset). Everything else is the stage's own default.
STAGES = {
    "base": (train_base, [], ["--steps", "60", "--eval_every", "60", "--n_layer", "2", "--n_embd", "64"]),
    "sft": (train_sft, [], ["--epochs", "2"]),
    "rm": (train_rm, [], ["--n_prompts", "60", "--n_calibrate", "30", "--n_norm", "50"]),
    "ppo": (train_ppo, [], ["--batches", "3", "--batch_size", "16", "--minibatch_size", "8"]),
    "ppo_ptx": (train_ppo, ["--ptx_coef", "0.5"], ["--ptx_coef", "0.5", "--batches", "3", "--batch_size", "16",
                                                   "--minibatch_size", "8"]),
}
# rough share of the default run's time per stage, for the ETA line
EXPECTED_SECONDS = {"base": 200, "sft": 90, "rm": 150, "ppo": 170, "ppo_ptx": 190, "eval": 60}


def stage_args(cfg, name, extra):
    d = os.path.join(cfg.out, name)
    args = ["--out", d, "--device", cfg.device, "--seed", str(cfg.seed), "--world_seed", str(cfg.world_seed),
            "--world_scale", "0.01" if cfg.quick else "0.1"]
    upstream = {"sft": "base", "rm": "sft", "ppo": "sft", "ppo_ptx": "sft"}.get(name)
    if upstream:
        args += ["--init", os.path.join(cfg.out, upstream, "ckpt.pt")]
    if name in ("ppo", "ppo_ptx"):
        args += ["--reward_model", os.path.join(cfg.out, "rm", "ckpt.pt")]
    if os.path.exists(os.path.join(d, "state.pt")):
        args += ["--resume"]
    return args + extra


def main(argv=None):
    cfg = parse_config(RunConfig, argv)
    print_config(cfg)
    if cfg.force and os.path.isdir(cfg.out):
        shutil.rmtree(cfg.out)
    os.makedirs(cfg.out, exist_ok=True)
    seconds_path = os.path.join(cfg.out, "seconds.json")
    seconds = json.load(open(seconds_path)) if os.path.exists(seconds_path) else {}
    names = list(STAGES) + ["eval"]
    t_start = time.perf_counter()
    for i, name in enumerate(names):
        left = sum(EXPECTED_SECONDS[n] for n in names[i:] if n not in seconds)
        if name != "eval" and os.path.exists(os.path.join(cfg.out, name, "ckpt.pt")):
            print(f"\n=== [{i + 1}/{len(names)}] {name}: checkpoint exists, skipped (--force to redo) ===")
            continue
        eta = "" if cfg.quick else f" | ETA for the rest ≈ {left / 60:.0f} min"
        if name == "eval":
            args = ["--run", cfg.out, "--device", cfg.device, "--seed", str(cfg.seed),
                    "--world_seed", str(cfg.world_seed), "--world_scale", "0.01" if cfg.quick else "0.1"]
            module = evaluate_run
        else:
            module, default, quick = STAGES[name]
            args = stage_args(cfg, name, quick if cfg.quick else default)
        print(f"\n=== [{i + 1}/{len(names)}] {name}: python {module.__name__}.py {' '.join(args)}{eta} ===", flush=True)
        t0 = time.perf_counter()
        module.main(args)
        seconds[name] = time.perf_counter() - t0
        json.dump(seconds, open(seconds_path, "w"), indent=1)
    print(f"\nall stages done in {(time.perf_counter() - t_start) / 60:.1f} min: see {cfg.out}/report.md")


if __name__ == "__main__":
    main()
