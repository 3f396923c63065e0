"""Several processes (gloo, CPU): two ranks, each with half of a global batch, make the same update as one process
with the whole batch (SFT step, PPO update), and whitening / means are over the global batch."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import train_ppo
import train_sft
from nanorlhf import dist, rlhf
from nanorlhf.checkpoint import make_checkpoint, save_checkpoint
from nanorlhf.config import PPOConfig
from nanorlhf.model import GPT, GPTConfig
from nanorlhf.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMOS = [("hi", "hello there"), ("what is two plus two?", "four"), ("name a color", "the color is red."),
         ("count", "one two three four five six"), ("say yes", "yes"), ("why is the sky blue?", "light scatters.")]
PROMPTS = ["hi", "what is two plus two?", "name a color", "count to three", "why?", "say yes", "a b c", "ok"]


def tiny_checkpoints(folder):
    tok = Tokenizer.load("tiny")
    torch.manual_seed(0)
    mconf = GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32)
    paths = {}
    for head in ("lm", "scalar"):
        paths[head] = os.path.join(folder, f"{head}.pt")
        save_checkpoint(paths[head], make_checkpoint(GPT(mconf, head=head), mconf, head, tok, {}, 0))
    return paths


def sft_step(grad_accum=1):
    """One SGD step on the 6 demonstrations (this rank's shard of them); SGD, as Adam's first step is ~lr·sign(g),
    which would blow float noise on near-zero gradients up to full steps."""
    tok = Tokenizer.load("tiny")
    examples = [tok.format_example(p, y) for p, y in DEMOS]
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loss, _ = train_sft.accumulate_lm_gradients(model, examples, list(range(6)), tok.pad_id, grad_accum, "float32",
                                                "cpu")
    opt.step()
    return loss.item(), [p.detach().clone() for p in model.parameters()]


def ppo_step(paths):
    """The whole rollout batch is made on every rank (same seed); each rank keeps its rows and updates on them."""
    cfg = PPOConfig(init=paths["lm"], reward_model=paths["scalar"], max_new_tokens=8, batch_size=8,
                        minibatch_size=8, ppo_epochs=1, lr=1e-3, value_lr=1e-3, compile=False)
    torch.manual_seed(0)
    policy, ref_policy, reward_model, value_model, tok = train_ppo.load_models(cfg, "cpu")
    b, P, _ = train_ppo.rollout(policy, ref_policy, reward_model, value_model, tok, PROMPTS, cfg)
    for i in range(4):
        b["response_mask"][i, 2 + i:] = False  # ragged: ranks hold different numbers of response tokens
    rewards, _, _ = rlhf.ppo_rewards(b["scores"], b["finished"], b["logprobs"], b["ref_logprobs"],
                                     b["response_mask"], cfg.kl_coef)
    mine = slice(dist.rank(), None, dist.world_size())  # dist.shard's rows
    b = {k: v[mine] for k, v in b.items() if v is not None}  # (no gold: no world)
    advantages, returns = rlhf.gae(rewards[mine], b["values"], b["response_mask"], 1.0, 0.95)  # as train_ppo.main
    advantages = rlhf.masked_whiten(advantages, b["response_mask"], dist.all_reduce_sum)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3, eps=1e-5) for m in (policy, value_model)]
    stats = train_ppo.ppo_update(policy, value_model, opts, b, advantages, returns, P, cfg, step=0)
    return stats, advantages, [p.detach().clone() for m in (policy, value_model) for p in m.parameters()]


def worker(rank, port, folder, paths):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init("cpu")
    x = torch.tensor([1.0, 2.0, 3.0]) if rank == 0 else torch.tensor([10.0])
    mask = torch.tensor([[True, True, False]]) if rank == 0 else torch.tensor([[True, False, False]])
    whitened = rlhf.masked_whiten(torch.tensor([[1.0, 2.0, 7.0]]) if rank == 0 else torch.tensor([[4.0, 9.0, 9.0]]),
                                  mask, dist.all_reduce_sum)
    result = {"mean": dist.mean(x).item(), "whitened": whitened, "sft": sft_step(), "ppo": ppo_step(paths)}
    torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
    dist.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_make_the_same_update_as_one_process(tmp_path):
    paths = tiny_checkpoints(str(tmp_path))
    mp.spawn(worker, args=(free_port(), str(tmp_path), paths), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    assert ranks[0]["mean"] == ranks[1]["mean"] == 4.0  # (1 + 2 + 3 + 10) / 4
    # global whitening of the real tokens 1, 2 (rank 0) and 4 (rank 1): mean 7/3, unbiased variance 7/3
    expected = rlhf.masked_whiten(torch.tensor([[1.0, 2.0, 4.0]]), torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(ranks[0]["whitened"][0, :2], expected[0, :2])
    torch.testing.assert_close(ranks[1]["whitened"][0, 0], expected[0, 2])
    assert ranks[0]["whitened"][0, 2] == 0 and (ranks[1]["whitened"][0, 1:] == 0).all()

    loss, weights = sft_step()  # one process, the whole batch
    for r in ranks:
        assert r["sft"][0] == pytest.approx(loss, rel=1e-5)
        for a, b in zip(r["sft"][1], weights):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    _, advantages, weights = ppo_step(paths)
    torch.testing.assert_close(ranks[0]["ppo"][1], advantages[0::2])  # whitened over both ranks' tokens
    torch.testing.assert_close(ranks[1]["ppo"][1], advantages[1::2])
    for r in ranks:
        for a, b in zip(r["ppo"][2], weights):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
