"""Stage 2: the reward model, trained on labeler rankings with InstructGPT's K-choose-2 ranking loss.

For each RM prompt the SFT policy samples K responses (K drawn from 4..9 as in the paper); a simulated labeler
ranks them; the RM (the SFT trunk with a scalar head instead of the unembedding) scores each response at its last
real token, and all C(K,2) comparisons of a prompt form one batch element (Ouyang et al. 2022, sec. 3.5). After
training, the head's bias is shifted so that the labelers' demonstrations score mean 0 (reward normalization).

    python train_rm.py --init runs/default/sft/ckpt.pt --out runs/default/rm
    python train_rm.py --data rankings.jsonl --init gpt2 --out runs/mine/rm     # your own rankings, HH or chat pairs
"""
import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from nanorlhf import dist, kernels
from nanorlhf.checkpoint import make_checkpoint
from nanorlhf.common import (Progress, adamw, check_finite, check_room, checkpoint_or_compile, cosine_lr, epoch_batch,
                             load_model, pad, read_checkpoint, resume, setup, write_results, write_state)
from nanorlhf.config import TrainConfig, arg, parse_config
from nanorlhf.data import DataError, check_lengths, line_numbers, read_jsonl
from nanorlhf.evaluation import expected_agreement, pair_accuracy, sample_sets
from nanorlhf.reward import rm_input, score_groups, score_records
from nanorlhf.rlhf import ranked_pairs, ranking_loss
from nanorlhf.world import calibrate_tau, make_world


CANDIDATES = ("policy", "policy+demo", "policy+contrast", "contrast")


@dataclass
class RMConfig(TrainConfig):
    init: str = arg("runs/default/sft/ckpt.pt", "SFT checkpoint (or GPT-2 folder): policy that samples, RM trunk")
    out: str = arg("runs/default/rm", "output directory (ckpt.pt: the normalized RM; state.pt: resume state)")
    n_prompts: int = arg(1000, "train on the first N RM prompts of the tiny world (-1 = all); sampling dominates")
    k_min: int = arg(4, "fewest responses ranked per prompt (paper: 4)", low=2)
    k_max: int = arg(9, "most responses ranked per prompt (paper: 9)", low=2)
    temperature: float = arg(1.0, "sampling temperature of the SFT policy (1.0: diverse candidates)", positive=True)
    max_new_tokens: int = arg(48, "longest sampled response", low=1)
    gen_batch_size: int = arg(256, "sequences sampled at once (measured fastest on CPU: 128-256)", low=1)
    n_calibrate: int = arg(300, "response sets used to calibrate the labeler temperature (two labelers agree 75%)",
                           low=1)
    holdout: float = arg(0.05, "--data: fraction of prompts held out for evaluation", low=0, high=0.5)
    batch_size: int = arg(16, "prompts per step (each with all its K responses)", low=1)
    epochs: int = arg(1, "passes over the rankings (paper: 1; more overfits)", low=1)
    lr: float = arg(1e-3, "peak learning rate (AdamW)", low=0)
    warmup: int = arg(10, "linear warm-up steps, then cosine decay to 10%", low=0)
    weight_decay: float = arg(0.0, "AdamW weight decay on matrices", low=0)
    n_norm: int = arg(1000, "demonstrations scored for the reward normalization", low=1)
    save_every: int = arg(50, "write state.pt every N steps", low=1)
    log_every: int = arg(10, "progress line every N steps", low=1)
    policy: str = arg("", "tiny world: the policy that samples the candidates (empty = --init); iterated RLHF "
                          "passes the latest PPO policy")
    prompt_offset: int = arg(0, "tiny world: skip the first N RM prompts (iterated RLHF: fresh prompts each round)",
                             low=0)
    extra_comparisons: list[str] = arg([], "comparisons.jsonl files of earlier rounds, trained on as well")
    labeler_tau: float = arg(0.0, "tiny world: the labelers' temperature; 0 = calibrate to 75% agreement", low=0)
    candidates: str = arg("policy", "tiny world: what the labeler ranks for each RM prompt. policy: the policy's K "
                                    "samples (the paper); policy+demo: those and the labeler's own demonstration; "
                                    "policy+contrast: those, and the ideal answer against a copy with one fact "
                                    "changed as a second ranked pair (world.contrast_pair); contrast: those pairs "
                                    "alone (what an RM can learn from correctness pairs: docs/findings.md)")
    previous_rm: str = arg("", "a reward model to evaluate on the same held-out rankings (the last round's)")
    rankings: str = arg("", "tiny world: the folder of another train_rm.py run whose rankings to train on (the "
                            "first --n_prompts of its training prompts, its held-out and normalization sets), "
                            "instead of sampling: reward models of other sizes or seeds on the same labels")


def round_prompts(world, offset, n):
    """The RM prompts one round ranks: n of the world's distinct RM prompts (-1 = all) from `offset` on, so rounds
    with offsets 0, n, 2n, … never rank a prompt twice."""
    prompts = world.prompts("rm")[offset:]
    return prompts[:n] if n > 0 else prompts


def world_rankings(cfg, world, tok, device):
    """Training and evaluation rankings in the tiny world. Held out: the world's "val" prompts (never trained on),
    sampled first with their own generator so they do not depend on --n_prompts, and ranked by two fresh
    labelers: the first is the reference, the second's agreement with it is the ceiling."""
    policy, _, _ = load_model(cfg.policy or cfg.init, head="lm", device=device)
    rng = random.Random(cfg.seed)
    train_prompts = round_prompts(world, cfg.prompt_offset, cfg.n_prompts)
    if not train_prompts:
        raise SystemExit(f"--prompt_offset {cfg.prompt_offset}: no RM prompts left ({len(world.prompts('rm'))} in all)")
    eval_prompts = world.prompts("val")
    check_room(tok, eval_prompts + train_prompts, cfg.max_new_tokens, policy.config.block_size)
    t0 = time.perf_counter()
    sets = []
    for i, prompts in enumerate((eval_prompts, train_prompts)):
        ks = [rng.randint(cfg.k_min, cfg.k_max) for _ in prompts]
        sets.append(sample_sets(policy, tok, prompts, ks, cfg.max_new_tokens, cfg.temperature, cfg.gen_batch_size,
                                torch.Generator(device).manual_seed(cfg.seed + i)))
    eval_sets, train_sets = sets
    flat = [f for ys, fs in train_sets + eval_sets for f in fs]
    print(f"sampled {len(flat):,} responses to {len(train_prompts) + len(eval_prompts):,} prompts in "
          f"{time.perf_counter() - t0:.1f}s ({statistics.mean(flat):.1%} ended with EOS)")
    # the tiny-world notes: calibrate the labelers on the candidates they will really rank
    n = min(cfg.n_calibrate, len(train_prompts))
    world.tau = cfg.labeler_tau or calibrate_tau(world, train_prompts[:n], [ys for ys, _ in train_sets[:n]],
                                                 [fs for _, fs in train_sets[:n]])
    labeler = world.labeler(cfg.seed)
    demos = world.sft_demos("rm")  # the labelers' demonstrations: the reward normalization's reference
    if cfg.candidates == "policy+demo":
        demo_of = dict(demos)
        train_sets = [(ys + [demo_of[p]], fs + [True]) for p, (ys, fs) in zip(train_prompts, train_sets)]
    train = [{"prompt": p, "responses": ys, "finished": fs, "ranking": labeler.rank(p, ys, fs)}
             for p, (ys, fs) in zip(train_prompts, train_sets)] if cfg.candidates != "contrast" else []
    if cfg.candidates.endswith("contrast"):  # pairs that differ in correctness alone, of this round's prompts
        mine = set(train_prompts)
        train += [{"prompt": p, "responses": [b, w], "finished": [True, True], "ranking": labeler.rank(p, [b, w])}
                  for p, b, w in world.contrast_pairs("rm", "correctness") if p in mine]
    first, second = world.labeler(cfg.seed + 1), world.labeler(cfg.seed + 2)
    held = []
    for p, (ys, fs) in zip(eval_prompts, eval_sets):
        utility = first.utilities(p, ys, fs)  # the same for both labelers: only their noise differs
        held.append({"prompt": p, "responses": ys, "finished": fs, "ranking": first.rank_utilities(utility),
                     "ranking2": second.rank_utilities(utility),
                     "gold": [world.gold_score(p, y, f) for y, f in zip(ys, fs)], "utility": utility})
    gold_spread = statistics.mean(statistics.pstdev(r["gold"]) for r in held)
    print(f"labeler temperature tau {world.tau:.4f} (two labelers agree on 75% of pairs) | "
          f"held-out gold std within a prompt's samples {gold_spread:.3f}")
    return train, held, demos[:cfg.n_norm]


def reuse_rankings(cfg):
    """--rankings: the rankings another run sampled and ranked (kept in its state.pt), its first --n_prompts
    training prompts; refused unless it ranked the same world with the same labelers."""
    state = read_checkpoint(os.path.join(cfg.rankings, "state.pt"))
    theirs, data = state["config"], state["extra"]["data"]
    same = ("world_seed", "world_scale", "candidates", "prompt_offset")  # --seed may differ: the training's own
    differ = [f"--{k} {theirs.get(k)!r} there, {getattr(cfg, k)!r} here" for k in same
              if theirs.get(k) != getattr(cfg, k)]
    if differ or data["tau"] is None:
        raise SystemExit(f"--rankings {cfg.rankings}: not the same world and labelers: " + ("; ".join(differ) or
                         "its rankings came from --data"))
    if 0 < cfg.n_prompts and len(data["train"]) < cfg.n_prompts:
        raise SystemExit(f"--rankings {cfg.rankings}: {len(data['train']):,} training prompts, fewer than "
                         f"--n_prompts {cfg.n_prompts:,}")
    return {**data, "train": data["train"][:cfg.n_prompts] if cfg.n_prompts > 0 else data["train"]}


def file_rankings(cfg, records):
    """Rankings from --data (every response counted as finished); a seeded 5% of prompts held out.
    Normalization uses the best response of each training prompt (the demonstration's stand-in)."""
    records = [{**r, "finished": [True] * len(r["responses"])} for r in records]
    random.Random(cfg.seed).shuffle(records)
    n_eval = max(1, round(cfg.holdout * len(records))) if len(records) > 1 else 0
    train, held = records[n_eval:], records[:n_eval]
    norm = [(r["prompt"], r["responses"][r["ranking"].index(0)]) for r in train[:cfg.n_norm]]
    return train, held, norm


def check_file_lengths(cfg, records, tok, block_size):
    """--data: every prompt + response + EOS must fit the context (the score is read at the end, so nothing may be
    cut), checked before anything is trained or written."""
    lengths = [(f"{cfg.data}:{n}", len(tok.format_prompt(r["prompt"])) + max(map(len, map(tok.encode, r["responses"])))
                + 1) for r, n in zip(records, line_numbers(cfg.data))]
    check_lengths(lengths, block_size, "example (prompt + longest response)")


def accumulate_ranking_gradients(model, tok, batch, grad_accum, dtype, device):
    """Gradient of the global batch's ranking loss (a mean over its prompts with at least one pair) from this
    rank's shard, in `grad_accum` micro-batches, each weighted by its share of those prompts: any split into
    micro-batches and ranks gives the same gradient. Returns (global loss, this rank's scores, responses scored)."""
    n_global = sum(bool(ranked_pairs(r["ranking"])) for r in batch)  # prompts with a pair, over all ranks
    mine = dist.shard(batch)
    size = max(1, -(-len(mine) // grad_accum))  # ceil: micro-batch size (a short last batch can leave a rank none)
    loss, scores, n_responses = torch.zeros((), device=device), [], 0
    loss_fn = kernels.compiled(ranking_loss) if kernels.enabled else ranking_loss  # --compile: one graph
    for k in range(0, len(mine), size):
        micro = mine[k:k + size]
        with dist.autocast(device, dtype):
            rewards, valid = score_groups(model, tok, micro, device)  # (b, K), (b, K)
        ranks = pad([r["ranking"] for r in micro], 0, device=device)[0]  # (b, K), padding masked by `valid`
        weight = sum(bool(ranked_pairs(r["ranking"])) for r in micro) / max(n_global, 1)
        micro_loss = loss_fn(rewards.float(), ranks, valid) * weight  # eq. (1)
        (micro_loss * dist.world_size()).backward()  # average_gradients divides by the number of ranks
        loss += micro_loss.detach()
        scores += rewards.detach().float().tolist()
        n_responses += int(valid.sum())
    dist.average_gradients(model)
    return dist.all_reduce_sum(loss), scores, n_responses * dist.world_size()


def held_out_accuracy(model, tok, held, tau, device):
    """Held-out pairwise accuracy against the labeler, its ceiling (a second labeler on the same pairs), the same
    two without labeler noise, and the accuracy against gold on pairs whose gold scores differ."""
    if not held:
        return {}
    scores = score_records(model, tok, held, device)
    out = {"accuracy": pair_accuracy(scores, [r["ranking"] for r in held]), "eval_prompts": len(held)}
    if "ranking2" in held[0]:
        out["ceiling"] = pair_accuracy([[-x for x in r["ranking2"]] for r in held], [r["ranking"] for r in held])
        utilities = [r["utility"] for r in held]
        out["accuracy_expected"], out["ceiling_expected"] = expected_agreement(scores, utilities, tau)
        out["gold_accuracy"] = pair_accuracy(scores, [[-g for g in r["gold"]] for r in held])
    return out


def main(argv=None):
    cfg = parse_config(RMConfig, argv)
    dist.init(cfg.device)  # under torchrun: one process per device, each a shard of every batch
    device = setup(cfg)
    if cfg.k_min > cfg.k_max:
        raise SystemExit(f"--k_min {cfg.k_min} is larger than --k_max {cfg.k_max}")
    if cfg.candidates not in CANDIDATES:
        raise SystemExit(f"--candidates {cfg.candidates}: expected one of {', '.join(CANDIDATES)}")
    if cfg.data and cfg.rankings:
        raise SystemExit("--rankings reuses a tiny-world run's rankings; --data gives its own")
    if cfg.data and cfg.candidates != "policy":
        raise SystemExit(f"--candidates {cfg.candidates} needs the tiny world; --data gives its own rankings")
    cfg.compile = kernels.enable(cfg.compile, device)  # the one switch; resolved, saved in state.pt
    dtype = dist.resolve_dtype(cfg.dtype, device)
    t_start = time.perf_counter()

    # model: the SFT trunk with a fresh scalar head instead of the unembedding (its tokenizer reads the data)
    model, tok, _ = load_model(cfg.init, head="scalar", device=device)
    print(f"reward model: {model.num_params() / 1e6:.2f}M parameters")
    checkpoint_or_compile(model, cfg.activation_checkpointing)
    opt = adamw(model, cfg.lr, cfg.weight_decay, fused=cfg.compile)
    state = resume(cfg, model, opt)

    # data: rankings of the SFT policy's samples (tiny world) or of --data; kept in state.pt for --resume
    if state is not None:
        data = state["extra"]["data"]
    elif cfg.data:
        try:
            records = read_jsonl(cfg.data, "rm")
            check_file_lengths(cfg, records, tok, model.config.block_size)
        except DataError as e:
            print(e)
            raise SystemExit(2)
        train, held, norm = file_rankings(cfg, records)
        data = {"train": train, "eval": held, "norm": norm, "tau": None}
    elif cfg.rankings:
        data = reuse_rankings(cfg)
    else:
        world = make_world(cfg.world_seed, cfg.world_scale)
        train, held, norm = world_rankings(cfg, world, tok, device)
        data = {"train": train, "eval": held, "norm": norm, "tau": world.tau}
    if state is None:  # earlier rounds' comparisons (iterated RLHF): trained on together with this round's
        data["train"] = [json.loads(line) for path in cfg.extra_comparisons for line in open(path)] + data["train"]
    train, held = data["train"], data["eval"]
    data_seconds = time.perf_counter() - t_start
    print(f"rankings: {len(train):,} training prompts, {sum(len(r['responses']) for r in train):,} responses, "
          f"{len(held):,} held-out prompts")

    # loop: each step a batch of prompts, each with all its K responses (K forward passes, C(K,2) pairs)
    step = state["step"] if state else 0
    state_path = os.path.join(cfg.out, "state.pt")
    schedule = cfg.epochs * -(-len(train) // cfg.batch_size)  # epochs of ceil(N / batch_size) steps
    total = schedule if cfg.max_steps < 0 else min(schedule, cfg.max_steps)
    avg_len = statistics.mean(len(rm_input(tok, r["prompt"], y, True, model.config.block_size))
                              for r in train[:200] for y in r["responses"])
    progress = Progress(total, cfg.log_every, model.flops_per_token(avg_len), device, start=step)
    model.train()
    while step < total:
        batch = epoch_batch(train, step, cfg.batch_size, cfg.seed)  # resumable: a function of (seed, step)
        lr = cosine_lr(step, schedule, cfg.lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss, scores, n_responses = accumulate_ranking_gradients(model, tok, batch, cfg.grad_accum, dtype, device)
        check_finite(loss, step + 1, "ranking loss", state_path)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        check_finite(grad_norm, step + 1, "ranking loss gradient norm", state_path)
        opt.step()
        acc = pair_accuracy(scores, [r["ranking"] for r in dist.shard(batch)])  # this rank's; zip drops padding
        n_tokens = round(n_responses * avg_len)  # ≈ responses × their mean length
        progress.step(step, n_tokens, loss=loss.item(), acc=acc, lr=lr)
        step += 1
        if (step % cfg.save_every == 0 or step == total) and dist.is_main():
            write_state(state_path, make_checkpoint(model, model.config, "scalar", tok, asdict(cfg), step, opt,
                                                    extra={"data": data}))

    # reward normalization (paper sec. 3.5): shift the head's bias so the demonstrations score mean 0
    demos = [{"prompt": p, "responses": [y], "finished": [True]} for p, y in data["norm"]]
    raw = [s[0] for s in score_records(model, tok, demos, device)]
    shift = -statistics.mean(raw)
    with torch.no_grad():
        model.score.bias += shift
    normed = [s[0] for s in score_records(model, tok, demos, device)]

    # save: the normalized RM, its held-out accuracy, and the comparisons it trained on
    previous = {}
    if cfg.previous_rm:  # how well the last round's RM judges this round's (new policy's) samples
        old, _, _ = load_model(cfg.previous_rm, head="scalar", device=device)
        previous = {f"previous_rm_{k}": v for k, v in held_out_accuracy(old, tok, held, data["tau"], device).items()}
    results = {**held_out_accuracy(model, tok, held, data["tau"], device), "reward_shift": shift,
               "demo_reward_mean": statistics.mean(normed), "demo_reward_std": statistics.pstdev(normed),
               "labeler_tau": data["tau"], "steps": step, "train_prompts": len(train),
               "data_seconds": data_seconds, "seconds": time.perf_counter() - t_start,
               "pairs": sum(len(ranked_pairs(r["ranking"])) for r in train), **previous}
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}
    print("reward model: " + " | ".join(f"{k} {v}" for k, v in shown.items()))
    if dist.is_main():
        write_results(cfg.out, make_checkpoint(model, model.config, "scalar", tok, asdict(cfg), step, extra=results),
                      results)
        with open(os.path.join(cfg.out, "comparisons.jsonl"), "w") as f:  # the exact labels, for DPO / RFT / rounds
            f.writelines(json.dumps({k: r[k] for k in ("prompt", "responses", "finished", "ranking")}) + "\n"
                         for r in train)
    return results


if __name__ == "__main__":
    main()
