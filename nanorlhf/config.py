"""Command-line interfaces generated from config dataclasses.

A script declares its flags once, as a dataclass subclassing CommonConfig (every script's flags) or TrainConfig
(those and the training flags of SFT, RM and PPO):

    @dataclass
    class SFTConfig(TrainConfig):
        lr: float = arg(3e-4, "peak learning rate")

    cfg = parse_config(SFTConfig, description=__doc__)  # --lr, --data, ... ; --help lists each with its default
    print_config(cfg)
"""

import argparse
import copy
import dataclasses
import os
import sys
import types
import typing


def arg(default=dataclasses.MISSING, help="", low=None, high=None, positive=False):
    """A dataclass field with help text; mutable defaults are copied per instance. No default = required flag.
    low / high: the smallest / largest value the flag accepts; positive: it must be > 0 (parse_config checks)."""
    metadata = {"help": help, "low": low, "high": high, "positive": positive}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _out_of_range(value, metadata):
    """Why value breaks the field's bounds, or None. NaN breaks every bound."""
    low, high = metadata.get("low"), metadata.get("high")
    if metadata.get("positive") and not value > 0:
        return "must be > 0"
    if low is not None and not value >= low:
        return f"must be ≥ {low}"
    if high is not None and not value <= high:
        return f"must be ≤ {high}"
    return None


@dataclasses.dataclass
class CommonConfig:
    data: str = arg("", "JSONL data file; empty = the built-in tiny world")
    init: str = arg("", "checkpoint file or GPT-2 folder to start from")
    out: str = arg("runs/run", "output directory")
    max_steps: int = arg(-1, "stop after this many steps; -1 = the full schedule", low=-1)
    seed: int = arg(1337, "seed for torch, numpy and python random")
    device: str = arg("cpu", "cpu | cuda")
    threads: int = arg(0, "torch CPU threads; 0 = one per core that other processes leave free at the start "
                          "(OMP_NUM_THREADS, if set); the numbers repeat at the same count", low=0)
    resume: bool = arg(False, "continue from the checkpoint in --out")
    world_seed: int = arg(0, "seed of the built-in tiny world (used when --data is empty)")
    world_scale: float = arg(0.1, "size of the tiny world's splits, as a fraction of the paper's 13k/33k/31k "
                                   "SFT/RM/PPO prompts; at most 1.0 (above 0.2: the bigger world, docs/world-scale.md)",
                             positive=True)


@dataclasses.dataclass
class TrainConfig(CommonConfig):
    """CommonConfig and the flags of the scripts that train through the hot path (SFT, RM, PPO): how, not what."""
    dtype: str = arg("auto", "auto | bfloat16 | float32: autocast dtype of the forward passes (auto: bf16 on CUDA)")
    grad_accum: int = arg(1, "micro-batches per optimizer step (per rank); the batch is split, the update is the same",
                          low=1)
    activation_checkpointing: bool = arg(False, "recompute each block's activations in the backward (less memory)")
    compile: bool | None = arg(None, "torch.compile the hot path (kernels.py: the transformer, decode step, fused "
                                     "log-probs and losses; fused Adam); None = on for CUDA, off for CPU")


@dataclasses.dataclass
class PPOConfig(TrainConfig):
    """train_ppo.py's flags (bench.py and run.py's FLOP estimate read them too)."""
    init: str = arg("runs/default/sft/ckpt.pt", "SFT checkpoint: the initial policy and the frozen reference")
    reward_model: str = arg("runs/default/rm/ckpt.pt", "reward model checkpoint (normalized); also inits the value model")
    reference: str = arg("", "the frozen reference π_SFT of the KL penalty; empty = --init (iterated RLHF: round k "
                             "starts from round k-1's policy, the reference stays SFT)")
    out: str = arg("runs/default/ppo", "output directory (ckpt.pt, state.pt, log.jsonl, metrics.json)")
    ptx_data: str = arg("", "pretraining text for ptx (documents separated by blank lines); empty = the tiny world's")
    batches: int = arg(40, "PPO batches (rollout + update); episodes = batches × batch_size", low=1)
    batch_size: int = arg(64, "prompts (episodes) per rollout", low=1)
    minibatch_size: int = arg(16, "episodes per gradient step (paper: 64 of 512)", low=1)
    ppo_epochs: int = arg(4, "passes over each rollout (paper: 1; 4 here: ~2.5k episodes in all, so reuse them)", low=1)
    lr: float = arg(3e-5, "policy learning rate (Adam), constant after warm-up", low=0)
    value_lr: float = arg(1e-4, "value model learning rate (Adam)", low=0)
    warmup: int = arg(10, "linear learning-rate warm-up over this many batches (paper: 10 iterations)", low=1)
    max_grad_norm: float = arg(1.0, "clip the policy's and the value model's gradient norms to this", positive=True)
    temperature: float = arg(1.0, "sampling temperature of the rollouts (the log-probs use the same T)", positive=True)
    max_new_tokens: int = arg(48, "longest response; one that does not end by then pays --missing_eos_penalty", low=1)
    kl_coef: float = arg(0.1, "β, the per-token KL penalty to SFT (paper: 0.02; at 0.02 our RM is over-optimized)",
                         low=0)
    kl_kind: str = arg("k1", "per-token KL approximation in the reward: k1 = log π/π_SFT (paper) | k3 (≥ 0)")
    adaptive_kl: bool = arg(False, "adapt β toward --target_kl (Ziegler et al. 2019) instead of keeping it fixed")
    target_kl: float = arg(2.0, "target KL per response (nats, k1 summed over tokens) for --adaptive_kl", positive=True)
    kl_horizon: int = arg(1000, "episodes over which --adaptive_kl moves β by at most 20%", low=1)
    discount: float = arg(1.0, "GAE discount (paper: 1, no discount)", low=0, high=1)
    lam: float = arg(0.95, "GAE λ (paper: 0.95)", low=0, high=1)
    clip_eps: float = arg(0.2, "PPO ratio clip ε (paper: 0.2)", positive=True)
    value_clip: float = arg(0.2, "value clip around the rollout's values", positive=True)
    missing_eos_penalty: float = arg(1.0, "subtracted from the RM score of a response that never emitted EOS (so not "
                                          "finishing never pays: the RM score is kept, then lowered)", low=0)
    ptx_coef: float = arg(0.0, "γ, weight of the pretraining loss (PPO-ptx); 0 = plain PPO (paper: 27.8)", low=0)
    ptx_per_episode: float = arg(0.5, "pretraining sequences per RL episode in each minibatch (paper: 8)", low=0)
    ptx_block_size: int = arg(64, "tokens per pretraining sequence", low=1)
    ema: float = arg(0.0, "decay of an EMA of the policy weights, saved as ckpt.pt (paper: 0.992); 0 = off",
                     low=0, high=0.9999)
    log_every: int = arg(5, "progress line every N batches", low=1)
    save_every: int = arg(10, "write state.pt every N batches", low=1)
    estimator: str = arg("gae", "advantage estimator, a row of train_ppo.py's ESTIMATORS (which says where each "
                                "puts β's KL): gae (PPO: GAE with a value model) | rloo (leave-one-out baseline) | "
                                "grpo (group-normalized) | reinforce_pp (reward-to-go, whitened); the last three build "
                                "no value model")
    group_size: int = arg(1, "responses sampled per prompt in a batch (rloo and grpo need ≥ 2; --batch_size counts "
                             "responses and must be a multiple)", low=1)
    reward: str = arg("rm", "rm | gold: the reward model, or the tiny world's gold judge × --gold_scale (the oracle)")
    gold_scale: float = arg(10.0, "--reward gold: the gold score (in [0, 1]) times this, near the RM's spread",
                            positive=True)


def _optional_of(tp):
    """X for Optional[X] / X | None, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def parse_config(cls, argv=None, description=None):
    """Parse `argv` (default sys.argv[1:]) into a `cls` instance. The description defaults to the running
    script's docstring."""
    if description is None:
        description = getattr(sys.modules.get("__main__"), "__doc__", None)
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue  # derived in __post_init__, not a flag
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        required = default is dataclasses.MISSING
        bounds = [f"{op} {f.metadata[k]}" for k, op in (("low", "≥"), ("high", "≤")) if f.metadata.get(k) is not None]
        bounds = (["> 0"] if f.metadata.get("positive") else []) + bounds
        help_text = f.metadata.get("help", "") + (" (required" if required else f" (default: {default!r}")
        help_text += "".join(f"; {b}" for b in bounds) + ")"
        kwargs = dict(default=None if required else default, required=required, help=help_text.replace("%", "%%"))
        tp = hints[f.name]
        optional = _optional_of(tp)
        base = optional or tp
        if base is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kwargs)
        elif base in (int, float, str):
            convert = base if optional is None else (lambda s, b=base: None if s.lower() == "none" else b(s))
            parser.add_argument(f"--{f.name}", type=convert, metavar=base.__name__.upper(), **kwargs)
        elif typing.get_origin(base) is list and typing.get_args(base)[0] in (int, float, str):
            item = typing.get_args(base)[0]
            parser.add_argument(f"--{f.name}", type=item, nargs="*", metavar=item.__name__.upper(), **kwargs)
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported config type {tp!r}")
    values = vars(parser.parse_args(argv))
    for f in dataclasses.fields(cls):
        value = values.get(f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            problem = _out_of_range(value, f.metadata)
            if problem:
                flag_error(f"--{f.name} {value}: {problem}")
    out = values.get("out")
    if out and os.path.exists(out) and not os.path.isdir(out):
        flag_error(f"--out {out}: an existing file; --out names a folder (created if missing)")
    return cls(**values)


def flag_error(message):
    """A flag that cannot work: one line on stderr, exit status 2 (a usage error, as argparse's own), before
    anything is loaded or written."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def print_config(cfg):
    """Print the resolved config, one field per line, so every run's log records its flags and seed."""
    print(f"{type(cfg).__name__}:")
    for f in dataclasses.fields(cfg):
        print(f"  {f.name} = {getattr(cfg, f.name)!r}")
