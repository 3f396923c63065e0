"""Checkpoints: atomic save, safe load (weights_only=True), and RNG state capture.

Every stage (base, SFT, RM, PPO) writes the same dict layout, built by `make_checkpoint`:
    {
        "format": 1,                  # marks the file as ours; load_checkpoint rejects anything else
        "model": state_dict,          # the policy / reward / value model's weights
        "model_config": dict,         # dataclasses.asdict(GPTConfig): GPT(GPTConfig(**d), head=...) rebuilds it
        "head": "lm" | "scalar",      # language-model head or the scalar head of reward/value models
        "tokenizer": str,             # Tokenizer.name, a spec that Tokenizer.load() rebuilds
        "config": dict,               # the script's resolved config dataclass, as a dict
        "step": int,                  # optimizer steps taken
        "optimizer": state_dict | None,
        "rng": rng_state(),           # so --resume continues the same random stream
        "extra": dict,                # stage-specific results (metrics, value-model weights, ...)
    }
Only plain containers, numbers, strings and tensors go in, so torch.load(weights_only=True) reads it back.
"""

import dataclasses
import os
import pickle
import random
import zipfile

import numpy as np
import torch

FORMAT = 1


class CheckpointError(Exception):
    """A checkpoint file is missing, truncated or not ours; the message names the file."""


def make_checkpoint(model, model_config, head, tokenizer, config, step, optimizer=None, extra=None):
    model = getattr(model, "_orig_mod", model)  # torch.compile wraps the module and prefixes its keys
    return {
        "format": FORMAT,
        "model": model.state_dict(),
        "model_config": _as_dict(model_config),
        "head": head,
        "tokenizer": tokenizer if isinstance(tokenizer, str) else tokenizer.name,
        "config": _as_dict(config),
        "step": step,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng_state(),
        "extra": extra or {},
    }


def _as_dict(x):
    return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else dict(x)


def save_checkpoint(path, ckpt):
    """Write atomically: a crash mid-save leaves the previous file at `path` intact."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"  # same directory, so os.replace is an atomic rename on one filesystem
    try:
        with open(tmp, "wb") as f:
            torch.save({**ckpt, "format": FORMAT}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path) or ".")  # the rename itself survives a power cut
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive whose directory sits at the very end
        raise CheckpointError(f"{path}: truncated or corrupt (not a complete torch.save zip archive)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: not a nanorlhf checkpoint (holds objects other than tensors and plain "
                              "containers, which weights_only=True refuses)") from None
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt checkpoint ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise CheckpointError(f"{path}: not a nanorlhf checkpoint (holds a {type(ckpt).__name__}, no 'format' key)")
    if ckpt["format"] != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format']!r}, this code reads format {FORMAT}")
    return ckpt


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state():
    """Torch (CPU, CUDA), python `random` and numpy global states, as tensors/lists/ints for weights_only."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    # RNG states must be CPU byte tensors even if the checkpoint was loaded with map_location="cuda"
    torch.set_rng_state(state["torch"].cpu())
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
