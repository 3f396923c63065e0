"""The whole InstructGPT recipe in one command, on the built-in tiny world:

    base pretraining → SFT → reward model → PPO → PPO-ptx → over-optimization study → evaluation (report card)

    python run.py                   # ≈9 minutes on 2 CPU cores (it prints its ETA); outputs in runs/default/
    python run.py --quick           # ≈2 minutes, tiny sizes: tries the code, not the quality bar
    python run.py --preset paper    # the paper-scale world (33,000 RM prompts): its stages took 65 min at 1 thread
    python run.py --device cuda     # on a GPU: the gpu preset, the paper-sized world and larger models
    python run.py --baselines       # + best-of-N, DPO, RFT, GRPO, RLOO, REINFORCE++ and the oracle, 3 seeds each
    python run.py --rounds 3        # iterated RLHF: 3 rounds of sample → rank → RM → PPO
    python run.py --no-study        # skip the over-optimization study (PPO twice as long at β = 0.01 and 0.3)

A stage whose checkpoint exists is skipped (--force redoes everything); an interrupted stage resumes from its
state.pt. Each stage is its own script (train_base.py, train_sft.py, train_rm.py, train_ppo.py, eval.py), run here
as a process of its own with the command line printed before it starts, so any stage can be rerun by hand.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from nanorlhf.common import get_device, set_threads
from nanorlhf.config import PPOConfig, arg, parse_config, print_config
from nanorlhf.engine import generate
from nanorlhf.model import GPT, GPTConfig
from nanorlhf.rlhf import ppo_batch_flops
from nanorlhf.tokenizer import Tokenizer
from nanorlhf.world import MAX_SCALE, make_world


@dataclass
class RunConfig:
    out: str = arg("runs/default", "run folder: one subfolder per stage, plus results.json, report.md, plots")
    device: str = arg("cpu", "cpu | cuda")
    seed: int = arg(1337, "seed of every stage")
    world_seed: int = arg(0, "seed of the tiny world")
    quick: bool = arg(False, "tiny sizes (≈2 minutes): for tests and trying the code; shrinks either preset")
    preset: str = arg("auto", "stage sizes: cpu (the default world, ≈9 min on 2 cores) | paper (the world at the "
                              "paper's scale, 13k / 33k / 31k SFT / RM / PPO prompts, on 2 cores: docs/findings.md) | "
                              "gpu (the paper-sized world and larger models for one GPU, sized by a FLOP estimate for "
                              "≤ 10 min on an H100) | auto (gpu with --device cuda, else cpu)")
    force: bool = arg(False, "redo every stage even if its checkpoint exists")
    baselines: bool = arg(False, "also best-of-N from SFT (N = 1 … 64), DPO, RFT (SFT on the labelers' best-ranked "
                                 "responses), the critic-free RL methods GRPO, RLOO and REINFORCE++, and PPO against "
                                 "the gold judge (the oracle), all on the RM's comparisons, each with --seeds seeds")
    seeds: int = arg(3, "--baselines: training seeds per method (--seed, --seed + 1, …; the world stays the same)",
                     low=1)
    rounds: int = arg(1, "rounds of RLHF (1 = the paper). Round k ranks round k−1's policy's samples on fresh RM "
                         "prompts, retrains the RM on all comparisons so far, and continues PPO (reference: SFT)", low=1)
    study: bool = arg(True, "over-optimization study: PPO twice as long at β = 0.01 and β = 0.3 (--no-study skips)")


ROOT = os.path.dirname(os.path.abspath(__file__))
# each stage's script and flags: (script, default preset, quick preset). Everything else is the stage's own default.
STAGES = {
    "base": ("train_base.py", [], ["--steps", "60", "--eval_every", "60", "--n_layer", "2", "--n_head", "4",
                                       "--n_embd", "64"]),
    "sft": ("train_sft.py", [], ["--epochs", "2"]),
    "rm": ("train_rm.py", [], ["--n_prompts", "60", "--n_calibrate", "30", "--n_norm", "50"]),
    "ppo": ("train_ppo.py", [], ["--batches", "3", "--batch_size", "16", "--minibatch_size", "8"]),
    "ppo_ptx": ("train_ppo.py", ["--ptx_coef", "0.5"], ["--ptx_coef", "0.5", "--batches", "3", "--batch_size", "16",
                                                   "--minibatch_size", "8"]),
}
# --preset paper: the world at the paper's scale (1.0: 3,000 test prompts and 13,000 / 33,000 / 31,000 SFT / RM / PPO
# prompts) on 2 CPU cores: the default sizes, SFT for 3 epochs over 7× the default's steps, the RM on all 637,820
# pairs of the 33,000 RM prompts. docs/findings.md ("At the paper's scale") chose the RM's size: a 3× larger one
# orders SFT's samples and the correctness pairs no better, and PPO over-optimizes it sooner.
PAPER_STAGES = {
    "base": [],
    "sft": ["--epochs", "3"],
    "rm": ["--n_prompts", "-1"],
    "ppo": [],
    "ppo_ptx": ["--ptx_coef", "0.5"],
}
# its stages' seconds measured one at a time at 1 thread beside another run on the reference machine (base: the
# default's at 2 threads), so the ETA errs long
PAPER_SECONDS = {"base": 179, "sft": 403, "rm": 2324, "ppo": 205, "ppo_ptx": 254, "eval": 554}
# --baselines: train_ppo.py with another advantage estimator or reward, on the same rollouts, budget and β as PPO
METHOD_FLAGS = {"grpo": ["--estimator", "grpo", "--group_size", "4"],
                "rloo": ["--estimator", "rloo", "--group_size", "4"],
                "reinforce_pp": ["--estimator", "reinforce_pp"], "oracle": ["--reward", "gold"]}
# --preset gpu: the tiny world at the paper's scale (1.0: 3,000 test prompts and 13,000 / 33,000 / 31,000 SFT / RM /
# PPO prompts; 2.8M tokens of pretraining text) with 25M-parameter models (8 layers, d 512: 27× the CPU's). The base
# model reads the text ≈ 11 times, with dropout 0.1 against memorizing it; SFT passes 3 times over the 13,000
# demonstrations; the RM ranks K = 4–9 samples for 30,000 of the RM prompts (3,000 left for a second --rounds); PPO
# and PPO-ptx see 30,720 episodes each, about one per PPO prompt. Sized by the FLOP estimate run.py prints
# (gpu_estimate) for ≤ 10 minutes on one H100 (≈ 14 PFLOP: 2.4 min at the assumed 100 TFLOP/s, a 4× margin
# for small matrices and sampling, which run far below peak).
PAPER_WORLD_SCALE = str(MAX_SCALE)
GPU_STAGES = {
    "base": ["--n_layer", "8", "--n_head", "8", "--n_embd", "512", "--block_size", "128", "--dropout", "0.1",
             "--steps", "4000", "--batch_size", "64", "--warmup", "200", "--lr", "6e-4", "--eval_every", "1000",
             "--log_every", "100"],
    "sft": ["--lr", "1e-4", "--epochs", "3"],
    "rm": ["--n_prompts", "30000", "--lr", "1e-4", "--k_min", "4", "--k_max", "9", "--max_new_tokens", "48",
           "--gen_batch_size", "1024"],
    "ppo": ["--batches", "120", "--batch_size", "256", "--minibatch_size", "64"],
    "ppo_ptx": ["--ptx_coef", "0.5", "--batches", "120", "--batch_size", "256", "--minibatch_size", "64"],
}
# the ETA line: each stage's seconds in the preset's run on the reference machine, a quiet 2-core AMD EPYC VM
# (docs/performance.md), scaled by probe() here against REFERENCE_PROBE (probe() there) until a stage has run, then
# by the stages already timed here
EXPECTED_SECONDS = {"cpu": {"base": 179, "sft": 26, "rm": 30, "ppo": 54, "ppo_ptx": 69, "eval": 18},
                    "paper": PAPER_SECONDS}
REFERENCE_PROBE = (0.235, 0.18)


PRESET_STAGES = {"paper": PAPER_STAGES, "gpu": GPU_STAGES}


def preset(cfg):
    """cpu | paper | gpu: --preset, with auto resolved by the device."""
    if cfg.preset not in ("auto", "cpu", "paper", "gpu"):
        raise SystemExit(f"--preset {cfg.preset}: expected auto, cpu, paper or gpu")
    return cfg.preset if cfg.preset != "auto" else "gpu" if get_device(cfg.device).type == "cuda" else "cpu"


def world_scale(cfg):
    return "0.01" if cfg.quick else PAPER_WORLD_SCALE if preset(cfg) in PRESET_STAGES else "0.1"


def stage_flags(cfg, name):
    """The flags run.py gives a pipeline stage: the preset's, then --quick's (later flags win: any preset, shrunk)."""
    _, default, quick = STAGES[name]
    flags = PRESET_STAGES[preset(cfg)][name] if preset(cfg) in PRESET_STAGES else default
    return flags + quick if cfg.quick else flags


def flag(flags, name):
    """The value a stage reads for `name` from these flags (the last one given); the gpu preset states every size
    its estimate reads."""
    values = [v for k, v in zip(flags, flags[1:]) if k == name]
    if not values:
        raise ValueError(f"the preset's flags do not state {name}")
    return float(values[-1])


def gpu_estimate(cfg):
    """FLOPs of the main stages with the preset's flags (the study and --baselines not counted), by the models'
    formulas: training 6N + 12·L·C·T per token (GPT.flops_per_token), sampling a third of that, PPO by
    rlhf.ppo_batch_flops; token counts from the world's prompts and demonstrations, responses at their longest
    (48 tokens). The time assumes 100 TFLOP/s (≈10% of an H100's bf16 peak: small models, much of it decoding),
    an estimate until the preset is measured on a GPU. Returns {stage: FLOPs}."""
    world = make_world(cfg.world_seed, float(world_scale(cfg)))
    tok = Tokenizer.load("tiny")
    base, sft, rm = (stage_flags(cfg, name) for name in ("base", "sft", "rm"))
    T = int(flag(base, "--block_size"))
    with torch.device("meta"):
        lm = GPT(GPTConfig(block_size=T, vocab_size=(tok.vocab_size + 63) // 64 * 64,
                           n_layer=int(flag(base, "--n_layer")), n_head=int(flag(base, "--n_head")),
                           n_embd=int(flag(base, "--n_embd"))))
    demos = [len(tok.format_example(p, y)[0]) for p, y in world.sft_demos("sft")]
    P = round(sum(len(tok.format_prompt(p)) for p in world.prompts("ppo")) / len(world.prompts("ppo")))
    N, rm_new = PPOConfig.max_new_tokens, int(flag(rm, "--max_new_tokens"))
    n_rm = int(flag(rm, "--n_prompts"))
    n_rm = len(world.prompts("rm")) if n_rm < 0 else min(n_rm, len(world.prompts("rm")))  # -1: all
    rm_tokens = n_rm * (flag(rm, "--k_min") + flag(rm, "--k_max")) / 2 * (P + rm_new)  # ranked responses + prompts
    flops = {"base": flag(base, "--steps") * flag(base, "--batch_size") * T * lm.flops_per_token(T),
             "sft": flag(sft, "--epochs") * sum(demos) * lm.flops_per_token(max(demos)),
             "rm": rm_tokens * (1 + 1 / 3) * lm.flops_per_token(P + rm_new)}  # sampling + training
    for name in ("ppo", "ppo_ptx"):
        ppo = parse_config(PPOConfig, stage_flags(cfg, name))
        flops[name] = ppo.batches * sum(ppo_batch_flops(lm, lm, ppo.batch_size, P + N, P, ppo.ppo_epochs).values())
    total = sum(flops.values())
    print(f"--preset {preset(cfg)}: {lm.num_params() / 1e6:.1f}M-parameter models; estimated " + ", ".join(
        f"{k} {v / 1e15:.2f}" for k, v in flops.items()) + f" PFLOP; {total / 1e15:.1f} PFLOP in all ≈ "
        f"{total / 100e12 / 60:.1f} min at 100 TFLOP/s (an assumed throughput, not a measurement)")
    return flops


def stage_args(cfg, name, extra):
    d = os.path.join(cfg.out, name)
    args = ["--out", d, "--device", cfg.device, "--seed", str(cfg.seed), "--world_seed", str(cfg.world_seed),
            "--world_scale", world_scale(cfg)]
    upstream = {"sft": "base", "rm": "sft", "ppo": "sft", "ppo_ptx": "sft"}.get(name)
    if upstream:
        args += ["--init", os.path.join(cfg.out, upstream, "ckpt.pt")]
    if name in ("ppo", "ppo_ptx"):
        args += ["--reward_model", os.path.join(cfg.out, "rm", "ckpt.pt")]
    if os.path.exists(os.path.join(d, "state.pt")):
        args += ["--resume"]
    return args + extra


def write_rft_data(comparisons, path):
    """Rejection-sampling fine-tuning data: each ranked prompt's best-ranked response as a demonstration (skipped
    if it is empty or never ended: SFT would teach it to end where it did not)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for line in open(comparisons):
            r = json.loads(line)
            best = r["ranking"].index(0)
            if r["responses"][best].strip() and r["finished"][best]:
                f.write(json.dumps({"prompt": r["prompt"], "response": r["responses"][best]}) + "\n")


def beyond_stages(cfg):
    """The opt-in stages beyond the paper: name → (script, expected seconds, args). `args` is a function, called
    when the stage starts: later rounds read the labeler temperature the first RM calibrated."""
    def ckpt(name):
        return os.path.join(cfg.out, name, "ckpt.pt")

    def metrics(name):  # a finished stage's results: later stages size themselves by what it did
        return json.load(open(os.path.join(cfg.out, name, "metrics.json")))
    rm_flags, ppo_flags = stage_flags(cfg, "rm"), stage_flags(cfg, "ppo")
    stages = {}
    if cfg.baselines:
        world = ["--device", cfg.device, "--seed", str(cfg.seed), "--world_seed", str(cfg.world_seed),
                 "--world_scale", world_scale(cfg)]
        stages["bestofn"] = ("baselines/bestofn.py", 240, lambda: ["--run", cfg.out, "--ns", "1", "2", "4", "8", "16",
                                                                   "32", "64"] + world)
        ppo_extra = ppo_flags
        for j in range(cfg.seeds):  # every method with the same budget (PPO's batches and episodes) and β
            suffix, seed = ("", []) if j == 0 else (f"_s{j + 1}", ["--seed", str(cfg.seed + j)])
            rl = ["--init", ckpt("sft"), "--reward_model", ckpt("rm")] + ppo_extra + seed
            if j > 0:  # seed 1 of PPO and PPO-ptx is the pipeline's own run
                stages[f"ppo{suffix}"] = ("train_ppo.py", 60, lambda s=suffix, a=rl: stage_args(cfg, f"ppo{s}", a))
                stages[f"ppo_ptx{suffix}"] = ("train_ppo.py", 80, lambda s=suffix, a=rl: stage_args(
                    cfg, f"ppo_ptx{s}", a + ["--ptx_coef", "0.5"]))
            for name, flags in METHOD_FLAGS.items():
                stages[f"{name}{suffix}"] = ("train_ppo.py", 60, lambda n=name, s=suffix, a=rl, f=flags: stage_args(
                    cfg, f"{n}{s}", a + f))
            stages[f"dpo{suffix}"] = ("baselines/train_dpo.py", 90, lambda s=suffix, a=seed: stage_args(
                cfg, f"dpo{s}", ["--init", ckpt("sft"), "--comparisons",
                                 os.path.join(cfg.out, "rm", "comparisons.jsonl")] + a))
            stages[f"rft{suffix}"] = ("train_sft.py", 60, lambda s=suffix, a=seed: stage_args(cfg, f"rft{s}", [
                "--init", ckpt("sft"), "--data", os.path.join(cfg.out, "rft", "best_ranked.jsonl"),
                "--epochs", "2" if cfg.quick else "3", "--lr", "3e-4", "--warmup", "5"] + a))
    for k in range(2, cfg.rounds + 1):
        prev_rm, prev_ppo = ("rm", "ppo") if k == 2 else (f"rm_r{k - 1}", f"ppo_r{k - 1}")
        stages[f"rm_r{k}"] = ("train_rm.py", 150, lambda k=k, prev_rm=prev_rm, prev_ppo=prev_ppo: stage_args(
            cfg, f"rm_r{k}", ["--init", ckpt("sft"), "--policy", ckpt(prev_ppo), "--seed", str(cfg.seed + k - 1),
                              "--prompt_offset", str((k - 1) * metrics("rm")["train_prompts"]),
                              "--previous_rm", ckpt(prev_rm),
                              "--extra_comparisons", os.path.join(cfg.out, prev_rm, "comparisons.jsonl"),
                              "--labeler_tau", str(metrics("rm")["labeler_tau"])] + rm_flags))
        stages[f"ppo_r{k}"] = ("train_ppo.py", 170, lambda k=k, prev_ppo=prev_ppo: stage_args(
            cfg, f"ppo_r{k}", ["--init", ckpt(prev_ppo), "--reference", ckpt("sft"), "--seed", str(cfg.seed + k - 1),
                               "--reward_model", ckpt(f"rm_r{k}")] + ppo_flags))
    if cfg.study:  # twice as many batches as the PPO run (the gpu preset has no expected seconds: no ETA)
        seconds = 2 * expected_seconds(cfg).get("ppo", 0)
        for beta in ("0.01", "0.3"):
            stages[f"study_kl{beta}"] = ("train_ppo.py", seconds, lambda beta=beta: stage_args(
                cfg, f"study_kl{beta}", ["--init", ckpt("sft"), "--reward_model", ckpt("rm")]
                + ppo_flags + ["--kl_coef", beta, "--batches", str(2 * metrics("ppo")["steps"])]))
    return stages


def probe():
    """This machine's speed at the pipeline's two kinds of work, (training, sampling) seconds, each the best of a
    few runs on the default base model (4 layers, d 128): a forward + backward of 32 sequences of 128 tokens, and
    sampling 32 tokens for 64 prompts with the KV cache (small matrices: Python and per-op overhead). A quarter
    second of matmuls first brings idle cores to their clock; about two seconds in all."""
    torch.manual_seed(0)  # run.py trains nothing itself: every stage is a process of its own with its own seed
    model = GPT(GPTConfig(block_size=128, vocab_size=1024, n_layer=4, n_head=4, n_embd=128, dropout=0.0))
    ids = torch.randint(0, 1024, (32, 128))
    prompts = torch.randint(0, 1024, (64, 24)).tolist()
    a, t0 = torch.randn(512, 512), time.perf_counter()
    while time.perf_counter() - t0 < 0.25:
        a @ a

    def best(work, n):
        seconds = []
        for _ in range(n):
            t = time.perf_counter()
            work()
            seconds.append(time.perf_counter() - t)
        return min(seconds)
    train = best(lambda: model(ids).logsumexp(-1).mean().backward(), 5)
    sample = best(lambda: generate(model, prompts, 32, eos_id=1024, pad_id=0), 3)  # EOS outside the vocabulary
    return train, sample


def expected_seconds(cfg):
    """The preset's stages' seconds on the reference machine (the gpu preset's: not measured, no ETA)."""
    return EXPECTED_SECONDS.get(preset(cfg), {})


def eta_seconds(to_run, expected, seconds, speeds):
    """Seconds the stages `to_run` should take here: their expected seconds, scaled by how the stages already timed
    on this machine (seconds.json) compared with theirs, or before any, by probe() (`speeds`) against
    REFERENCE_PROBE: the mean of the training and the sampling ratio."""
    ran = [n for n in expected if n in seconds]
    if ran:
        speed = sum(seconds[n] for n in ran) / sum(expected[n] for n in ran)
    else:
        speed = sum(here / there for here, there in zip(speeds, REFERENCE_PROBE)) / len(REFERENCE_PROBE)
    return speed * sum(expected[n] for n in to_run if n not in seconds)


def main(argv=None):
    cfg = parse_config(RunConfig, argv)
    print_config(cfg)
    get_device(cfg.device)  # a device this machine lacks stops here, before any stage
    if preset(cfg) == "gpu":
        gpu_estimate(cfg)
    if cfg.force and os.path.isdir(cfg.out):
        shutil.rmtree(cfg.out)
    os.makedirs(cfg.out, exist_ok=True)
    seconds_path = os.path.join(cfg.out, "seconds.json")
    seconds = json.load(open(seconds_path)) if os.path.exists(seconds_path) else {}
    beyond = beyond_stages(cfg)
    names = list(STAGES) + list(beyond) + ["eval"]
    expected = {**expected_seconds(cfg), **{n: s for n, (_, s, _) in beyond.items()}}
    show_eta = not cfg.quick and preset(cfg) in EXPECTED_SECONDS
    speeds = None
    if show_eta:
        set_threads(0)  # the probe runs at the thread count the stages will take
        speeds = probe()
    t_start = time.perf_counter()
    for i, name in enumerate(names):
        done = os.path.join(cfg.out, "bestofn.json" if name == "bestofn" else os.path.join(name, "ckpt.pt"))
        if name != "eval" and os.path.exists(done):
            print(f"\n=== [{i + 1}/{len(names)}] {name}: checkpoint exists, skipped (--force to redo) ===")
            continue
        eta = ""
        if show_eta:
            basis = "stages timed here" if seconds else "a probe: ±30%"
            eta = f" | ETA for the rest ≈ {eta_seconds(names[i:], expected, seconds, speeds) / 60:.1f} min ({basis})"
        if name == "eval":
            args = ["--run", cfg.out, "--device", cfg.device, "--seed", str(cfg.seed),
                    "--world_seed", str(cfg.world_seed), "--world_scale", world_scale(cfg)]
            script = "eval.py"
        elif name in beyond:
            script, _, make_args = beyond[name]
            if name == "rft":  # the seeds' RFT runs (rft_s2, …) read the same file
                write_rft_data(os.path.join(cfg.out, "rm", "comparisons.jsonl"),
                               os.path.join(cfg.out, "rft", "best_ranked.jsonl"))
            args = make_args()
        else:
            script = STAGES[name][0]
            args = stage_args(cfg, name, stage_flags(cfg, name))
        print(f"\n=== [{i + 1}/{len(names)}] {name}: python {script} {' '.join(args)}{eta} ===", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, os.path.join(ROOT, script), *args])  # one process per stage
        if code:
            raise SystemExit(f"{name}: python {script} exited with {code}; rerun run.py to resume from its state.pt")
        seconds[name] = time.perf_counter() - t0
        json.dump(seconds, open(seconds_path, "w"), indent=1)
    print(f"\nall stages done in {(time.perf_counter() - t_start) / 60:.1f} min: see {cfg.out}/report.md")


if __name__ == "__main__":
    main()
