"""Stage 1 (InstructGPT step 1): supervised fine-tuning of the base model on demonstrations.

Loss on the response tokens and the closing EOS only; the prompt is context (Ouyang et al. 2022, sec. 3.5).
Cosine LR decay, residual dropout, several epochs; the paper saw validation loss overfit after ~1 epoch while
more epochs still raised the RM score, so it chose the SFT checkpoint by RM score on a validation set. Here the
tiny world's gold judge plays that role: ckpt.pt holds the epoch with the best mean gold score of sampled (T=1)
validation responses (with --data: the epoch with the lowest validation loss).

    python train_sft.py --init runs/default/base/ckpt.pt --out runs/default/sft
    python train_sft.py --data demos.jsonl --init gpt2_folder --out runs/mine/sft    # {"prompt", "response"} lines
    python train_sft.py --data chats.jsonl --init gpt2_folder --out runs/mine/sft    # or {"messages": [...]} lines
"""
import math
import os
import time
from dataclasses import asdict, dataclass

import torch

from nanorlhf import dist, evaluation, kernels
from nanorlhf.checkpoint import make_checkpoint, save_checkpoint
from nanorlhf.common import (Progress, adamw, check_finite, check_room, checkpoint_or_compile, cosine_lr, lm_loss,
                             load_model, pad, resume, setup, write_state)
from nanorlhf.config import TrainConfig, arg, parse_config
from nanorlhf.data import DataError, check_lengths, line_numbers, read_jsonl
from nanorlhf.world import make_world


@dataclass
class SFTConfig(TrainConfig):
    init: str = arg("runs/default/base/ckpt.pt", "base model: nanorlhf checkpoint file or GPT-2 folder")
    out: str = arg("runs/default/sft", "output directory (ckpt.pt: the chosen epoch; state.pt: resume state)")
    epochs: int = arg(10, "passes over the demonstrations (paper: 16; here sampled gold plateaus by ~9)", low=1)
    batch_size: int = arg(32, "demonstrations per step", low=1)
    lr: float = arg(1e-3, "peak learning rate (AdamW)", low=0)
    warmup: int = arg(20, "linear warm-up steps, then cosine decay to 10%", low=0)
    weight_decay: float = arg(0.1, "AdamW weight decay on matrices", low=0)
    dropout: float = arg(0.2, "residual dropout during SFT (paper: 0.2); not stored in the model config", low=0, high=1)
    grad_clip: float = arg(1.0, "clip the gradient norm to this", positive=True)
    max_new_tokens: int = arg(48, "response length limit when sampling for the gold evaluation", low=1)
    log_every: int = arg(50, "progress line every N steps", low=1)
    save_every: int = arg(100, "write state.pt every N steps (and at every epoch end)", low=1)


def chat(prompt, response):
    """A prompt-response pair as a one-turn chat."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def load_demos(cfg, world):
    """(train, val) lists of (chat, where); `where` names the example in error messages."""
    if not cfg.data:
        train = [(chat(p, y), f"sft demo {i}") for i, (p, y) in enumerate(world.sft_demos("sft"))]
        val = [(chat(p, y), f"val demo {i}") for i, (p, y) in enumerate(world.sft_demos("val"))]
        return train, val
    records = read_jsonl(cfg.data, "sft")
    if len(records) < 2:
        raise DataError(f"{cfg.data}: {len(records)} record(s); need at least 2 (train + validation)")
    demos = [(r["messages"] if "messages" in r else chat(r["prompt"], r["response"]), f"{cfg.data}:{n}")
             for r, n in zip(records, line_numbers(cfg.data))]
    n_val = max(1, len(demos) // 20)  # the last 5% are held out for validation
    return demos[:-n_val], demos[-n_val:]


def tokenize(tok, demos, block_size):
    """(ids, loss_mask) per demonstration, the loss on its assistant turns; any example longer than the context is
    an error naming it."""
    examples = [tok.format_chat(messages) for messages, _ in demos]
    check_lengths([(where, len(ids)) for (ids, _), (_, where) in zip(examples, demos)], block_size, "example")
    return examples


def make_batch(examples, idx, pad_id, device):
    """Right-padded (ids, loss_mask), both (B, T); padding has loss_mask 0."""
    ids, _ = pad([examples[i][0] for i in idx], pad_id, device=device)
    loss_mask, _ = pad([examples[i][1] for i in idx], 0, device=device)
    return ids, loss_mask.bool()


def set_dropout(model, p):
    """Residual dropout (the two residual branches of each block), as the paper's "residual dropout"."""
    for block in model.transformer.h:
        block.attn.resid_dropout.p = p
        block.mlp.dropout.p = p


def accumulate_lm_gradients(model, examples, batch, pad_id, grad_accum, dtype, device):
    """Gradient of the global batch's loss, the mean over all its target tokens, from this rank's shard of
    `batch` in `grad_accum` micro-batches. Each micro-batch's mean is weighted by its share of the batch's target
    tokens, so every split into micro-batches and ranks gives the same gradient (a plain 1/N per micro-batch
    would weight a token by the length of the micro-batch it landed in). Returns (global loss, tokens seen)."""
    n_global = sum(sum(examples[j][1][1:]) for j in batch)  # target tokens in the global batch (all ranks know)
    mine = dist.shard(batch)
    size = max(1, -(-len(mine) // grad_accum))  # ceil: micro-batch size (a short last batch can leave a rank none)
    loss, n_tokens = torch.zeros((), device=device), 0
    for k in range(0, len(mine), size):
        micro = mine[k:k + size]
        ids, loss_mask = make_batch(examples, micro, pad_id, device)
        weight = sum(sum(examples[j][1][1:]) for j in micro) / n_global
        with dist.autocast(device, dtype):
            micro_loss = lm_loss(model, ids, loss_mask) * weight  # mean over the micro-batch's response + EOS
        (micro_loss * dist.world_size()).backward()  # average_gradients divides by the number of ranks
        loss += micro_loss.detach()
        n_tokens += ids.numel()
    dist.average_gradients(model)
    return dist.all_reduce_sum(loss), n_tokens * dist.world_size()


@torch.no_grad()
def validation_loss(model, examples, pad_id, device, batch_size=64):
    """Response-token cross-entropy over all validation tokens (a token-weighted mean, not a mean of batches)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        ids, loss_mask = make_batch(examples, range(i, min(i + batch_size, len(examples))), pad_id, device)
        n = loss_mask[:, 1:].sum().item()  # lm_loss averages over these target tokens
        total += lm_loss(model, ids, loss_mask).item() * n
        count += n
    model.train()
    return total / count


def gold_sampled_and_greedy(model, tok, world, prompts, cfg):
    """Mean gold score of greedy and sampled (T=1) responses, the samples on the same seeded stream every call
    (evaluation.gold_eval), so epochs (and base vs SFT) are compared on the same random draws."""
    s = evaluation.gold_eval(model, tok, world, prompts, cfg.max_new_tokens, seed=cfg.seed)
    g = evaluation.gold_eval(model, tok, world, prompts, cfg.max_new_tokens, greedy=True)
    return {"gold_sampled": s["gold"], "gold_greedy": g["gold"], "eos_fraction_sampled": s["eos_fraction"],
            "by_category_sampled": s["by_category"]}


def main(argv=None):
    cfg = parse_config(SFTConfig, argv)
    dist.init(cfg.device)  # under torchrun: one process per device, each a shard of every batch
    device = setup(cfg)
    cfg.compile = kernels.enable(cfg.compile, device)  # the one switch; resolved, saved in state.pt
    dtype = dist.resolve_dtype(cfg.dtype, device)
    world = None if cfg.data else make_world(cfg.world_seed, cfg.world_scale)
    try:
        train_demos, val_demos = load_demos(cfg, world)
    except DataError as e:
        print(e)
        raise SystemExit(2)

    model, tok, _ = load_model(cfg.init, "lm", device)
    mconf = model.config  # the init's config, dropout included: later stages start from it unchanged
    try:
        train = tokenize(tok, train_demos, mconf.block_size)
        val = tokenize(tok, val_demos, mconf.block_size)
    except DataError as e:
        print(e)
        raise SystemExit(2)
    if world is not None:  # the gold evaluation samples responses to the world's validation and test prompts
        check_room(tok, world.prompts("val") + world.prompts("test"), cfg.max_new_tokens, mconf.block_size)
    n_tok = sum(len(ids) for ids, _ in train)
    print(f"demonstrations: {len(train)} train ({n_tok:,} tokens), {len(val)} validation | "
          f"model: {model.num_params() / 1e6:.2f}M parameters from {cfg.init}")
    set_dropout(model, cfg.dropout)
    checkpoint_or_compile(model, cfg.activation_checkpointing)
    opt = adamw(model, cfg.lr, cfg.weight_decay, fused=cfg.compile)

    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    stop = total if cfg.max_steps < 0 else min(total, cfg.max_steps)
    by_gold = world is not None  # the paper's choice (RM score); with --data only validation loss is available
    criterion = "sampled gold score on validation prompts" if by_gold else "validation loss"

    step, perm, history, best = 0, None, [], None  # best: {"epoch", "score", "model"} of the chosen epoch
    state_path = os.path.join(cfg.out, "state.pt")
    state = resume(cfg, model, opt, map_location=device)  # the data order and dropout streams continue too
    if state is not None:
        step = state["step"]
        perm, history, best = state["extra"]["perm"], state["extra"]["history"], state["extra"]["best"]

    def save_state():
        if not dist.is_main():
            return
        extra = {"perm": perm, "history": history, "best": best}
        write_state(state_path, make_checkpoint(model, mconf, "lm", tok, asdict(cfg), step, opt, extra))

    def evaluate_epoch(epoch):
        """Validation metrics of the current weights; keep them as `best` if they beat the chosen epoch."""
        nonlocal best
        metrics = {"epoch": epoch, "step": step, "val_loss": validation_loss(model, val, tok.pad_id, device)}
        if by_gold:
            metrics.update(gold_sampled_and_greedy(model, tok, world, world.prompts("val"), cfg))
        score = metrics["gold_sampled"] if by_gold else -metrics["val_loss"]
        if best is None or score > best["score"]:
            best = {"epoch": epoch, "score": score, "model": {k: v.clone() for k, v in model.state_dict().items()}}
        shown = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "epoch" and isinstance(v, float))
        print(f"epoch {epoch:g}: {shown}" + (" (best so far)" if best["epoch"] == epoch else ""))
        return metrics

    mean_len = n_tok / len(train)
    progress = Progress(stop, cfg.log_every, model.flops_per_token(round(mean_len)), device, start=step, name="sft ")
    t0 = time.perf_counter()
    model.train()
    while step < stop:
        epoch, i = divmod(step, steps_per_epoch)
        if i == 0:
            perm = torch.randperm(len(train)).tolist()  # this epoch's order, from the seeded global RNG
        batch = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]  # the global batch; each rank takes a shard
        lr = cosine_lr(step, total, cfg.lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss, n_tokens = accumulate_lm_gradients(model, train, batch, tok.pad_id, cfg.grad_accum, dtype, device)
        check_finite(loss, step + 1, "SFT loss", state_path)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        check_finite(grad_norm, step + 1, "SFT grad norm", state_path)
        opt.step()
        step += 1
        progress.step(step - 1, n_tokens, loss=loss.item(), lr=lr)
        if step % steps_per_epoch == 0:
            history.append(evaluate_epoch(step // steps_per_epoch))
        if step % cfg.save_every == 0 or step % steps_per_epoch == 0 or step == stop:
            save_state()
    if step % steps_per_epoch or best is None:  # stopped mid-epoch by --max_steps: a candidate too
        history.append(evaluate_epoch(round(step / steps_per_epoch, 2)))
    train_seconds = time.perf_counter() - t0
    print(f"chosen: epoch {best['epoch']:g} of {len(history)} evaluated, by {criterion}")

    results = {"epochs": history, "chosen_epoch": best["epoch"], "chosen_by": criterion,
               "chosen": next(m for m in history if m["epoch"] == best["epoch"]), "train_seconds": train_seconds}
    model.load_state_dict(best["model"])
    if by_gold:  # held-out test prompts: the SFT model vs the base model with the same template and sampling
        test = world.prompts("test")
        base, _, _ = load_model(cfg.init, "lm", device)
        results["test"] = {"sft": gold_sampled_and_greedy(model, tok, world, test, cfg),
                           "base": gold_sampled_and_greedy(base, tok, world, test, cfg)}
        for name in ("base", "sft"):
            m = results["test"][name]
            print(f"test gold ({len(test)} prompts) {name:4s}: sampled {m['gold_sampled']:.4f} | "
                  f"greedy {m['gold_greedy']:.4f} | EOS {m['eos_fraction_sampled']:.0%}")
    if dist.is_main():
        save_checkpoint(os.path.join(cfg.out, "ckpt.pt"),
                        make_checkpoint(model, mconf, "lm", tok, asdict(cfg), step, extra=results))
    print(f"sft: {step} steps in {train_seconds:.0f}s, wrote {os.path.join(cfg.out, 'ckpt.pt')}")
    return results


if __name__ == "__main__":
    main()
