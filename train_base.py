"""Stage 0: pretrain the tiny world's "GPT-3" from scratch on its internet text.

The base model learns the facts, the forum threads and the rude replies, but never sees the instruction template:
it knows things without following instructions. Its loss on held-out world text is the yardstick of the
alignment tax later on.

    python train_base.py --out runs/default/base
"""
import os
import re
import time
from dataclasses import asdict, dataclass

import torch

from nanorlhf.checkpoint import make_checkpoint, save_checkpoint
from nanorlhf.common import (Progress, adamw, check_finite, cosine_lr, get_batch, lm_loss, resume, setup,
                             token_stream, val_loss, write_state)
from nanorlhf.config import CommonConfig, arg, parse_config
from nanorlhf.engine import generate
from nanorlhf.model import GPT, GPTConfig
from nanorlhf.tokenizer import Tokenizer
from nanorlhf.world import make_world


@dataclass
class BaseConfig(CommonConfig):
    out: str = arg("runs/default/base", "output directory (ckpt.pt: the base model; state.pt: resume state)")
    n_layer: int = arg(4, "transformer blocks", low=1)
    n_head: int = arg(4, "attention heads", low=1)
    n_embd: int = arg(128, "model width", low=1)
    block_size: int = arg(128, "context length", low=2)
    dropout: float = arg(0.0, "dropout (none for pretraining)", low=0, high=1)
    batch_size: int = arg(32, "sequences per step", low=1)
    lr: float = arg(2e-3, "peak learning rate (AdamW)", low=0)
    warmup: int = arg(50, "linear warm-up steps", low=0)
    steps: int = arg(700, "optimizer steps (cosine decay to 10%)", low=1)
    weight_decay: float = arg(0.1, "AdamW weight decay on matrices", low=0)
    eval_every: int = arg(200, "evaluate validation loss every N steps", low=1)
    log_every: int = arg(25, "progress line every N steps", low=1)


@torch.no_grad()
def fact_accuracy(model, tok, world, device):
    """Greedy completion of fact prefixes in pretraining style ("the color of the banana is") == the fact."""
    probes = world.fact_probes()
    prompts = [tok.encode(prefix) for prefix, _ in probes]
    gen = generate(model, prompts, max_new_tokens=3, eos_id=tok.eos_id, pad_id=tok.pad_id, greedy=True)
    P = gen.prompt_len
    hits = [re.findall(r"[a-z0-9]+", tok.decode_response(gen.tokens[i, P:].tolist()))[:1] == [answer]
            for i, (_, answer) in enumerate(probes)]
    return sum(hits) / len(hits)


def main(argv=None):
    cfg = parse_config(BaseConfig, argv)
    device = setup(cfg)
    world = make_world(cfg.world_seed, cfg.world_scale)
    tok = Tokenizer.load("tiny")
    train, val = token_stream(tok, world.pretrain_docs("train")), token_stream(tok, world.pretrain_docs("val"))
    print(f"pretraining text: {len(train):,} train tokens, {len(val):,} validation tokens, vocab {tok.vocab_size}")

    vocab = (tok.vocab_size + 63) // 64 * 64  # padded to a multiple of 64 for faster matmuls
    mconf = GPTConfig(block_size=cfg.block_size, vocab_size=vocab, n_layer=cfg.n_layer, n_head=cfg.n_head,
                      n_embd=cfg.n_embd, dropout=cfg.dropout)
    model = GPT(mconf).to(device)
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    print(f"model: {model.num_params() / 1e6:.2f}M parameters")

    state = resume(cfg, model, opt)
    step, state_path = state["step"] if state else 0, os.path.join(cfg.out, "state.pt")

    total = cfg.steps if cfg.max_steps < 0 else min(cfg.steps, cfg.max_steps)
    progress = Progress(total, cfg.log_every, model.flops_per_token(cfg.block_size), device, start=step)
    t0 = time.perf_counter()
    model.train()
    while step < total:
        lr = cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = get_batch(train, cfg.batch_size, cfg.block_size, device)
        loss = lm_loss(model, batch, torch.ones_like(batch, dtype=torch.bool))
        check_finite(loss, step + 1, "pretraining loss", state_path)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        progress.step(step, batch.numel(), loss=loss.item(), lr=lr)
        step += 1
        if step % cfg.eval_every == 0 or step == total:
            print(f"step {step}: validation loss {val_loss(model, val, cfg.block_size, device):.4f}")
            write_state(state_path, make_checkpoint(model, mconf, "lm", tok, asdict(cfg), step, opt))

    results = {"val_loss": val_loss(model, val, cfg.block_size, device),
               "fact_accuracy": fact_accuracy(model, tok, world, device), "seconds": time.perf_counter() - t0}
    print(f"base model: validation loss {results['val_loss']:.4f} | fact accuracy {results['fact_accuracy']:.1%}")
    save_checkpoint(os.path.join(cfg.out, "ckpt.pt"),
                    make_checkpoint(model, mconf, "lm", tok, asdict(cfg), step, extra=results))
    return results


if __name__ == "__main__":
    main()
