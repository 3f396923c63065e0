"""Real hardware: several processes (data parallel), bf16 autocast, activation checkpointing.

Data parallel as DistributedDataParallel does it: every rank holds the whole model, runs its shard of the global
batch, and the gradients are averaged over ranks before each optimizer step, so all ranks stay identical. The
scripts score tokens with `model.hidden_states` (no logits tensor) rather than `forward`, which DDP's wrapper
does not see, so the average is one explicit call, `average_gradients(model)`, after the last micro-batch.
A single process (no WORLD_SIZE, or WORLD_SIZE=1) never touches torch.distributed: every helper is a no-op.

    torchrun --nproc_per_node 4 train_sft.py --data demos.jsonl --init gpt2_folder --device cuda
"""
import atexit
import contextlib
import functools
import os
import sys

import torch
import torch.distributed as td
from torch.utils.checkpoint import checkpoint


def init(device):
    """Join the process group if launched by torchrun (WORLD_SIZE > 1): nccl on CUDA (each rank on GPU
    LOCAL_RANK, so "cuda" means that GPU), gloo on CPU. Ranks other than 0 print nothing from here on."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not td.is_initialized():
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        td.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
        # leave the group before the interpreter exits, however the script ends: a process that exits with the
        # group alive can abort in the backend's threads ("terminate called without an active exception")
        atexit.register(close)
        if not is_main():
            sys.stdout = open(os.devnull, "w")


def world_size():
    return td.get_world_size() if td.is_initialized() else 1


def rank():
    return td.get_rank() if td.is_initialized() else 0


def is_main():
    """Rank 0 logs and saves; the others only compute."""
    return rank() == 0


def shard(items):
    """This rank's share of a global batch: every world_size-th item, starting at its rank."""
    return items[rank()::world_size()]


def all_reduce_sum(x):
    """Sum of a tensor over ranks (a new tensor; x itself is unchanged)."""
    x = x.clone()
    if world_size() > 1:
        td.all_reduce(x)
    return x


def average_gradients(model):
    """Replace each gradient by its mean over ranks (what DDP does during backward), in one flat all-reduce."""
    if world_size() == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:  # a rank whose shard was empty still takes part, with zeros
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    td.all_reduce(flat)
    flat /= world_size()
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


def barrier():
    if world_size() > 1:
        td.barrier()


def close():
    if td.is_initialized():
        td.destroy_process_group()


def resolve_dtype(name, device):
    """--dtype: "auto" = bfloat16 on CUDA, float32 on CPU."""
    if name == "auto":
        name = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    if name not in ("bfloat16", "float32"):
        raise SystemExit(f"--dtype {name}: expected auto, bfloat16 or float32")
    return name


def autocast(device, dtype):
    """bf16 autocast for matmuls (weights, optimizer state and losses stay fp32; bf16 has fp32's exponent range,
    so no loss scaling is needed); a no-op context for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def checkpoint_blocks(model):
    """Activation checkpointing (Chen et al. 2016): each transformer block keeps only its input and recomputes its
    activations in the backward pass, trading one extra forward for memory. Same numbers, dropout included (the
    RNG state is replayed). The instance's forward is replaced, so parameter names and checkpoints are unchanged."""
    for block in model.transformer.h:
        block.forward = functools.partial(checkpoint, type(block).forward.__get__(block), use_reentrant=False)
    return model


def mean(x):
    """Mean of all elements of x over every rank's x (the global batch's mean)."""
    if world_size() == 1:
        return x.mean()
    return all_reduce_sum(x.sum()) / all_reduce_sum(torch.tensor(float(x.numel()), device=x.device))
