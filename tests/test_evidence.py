"""Evidence: held-out prompts stay held out across iterated rounds, the KL column is measured with dropout off,
and the bootstrap interval has the width and coverage it claims."""
import json
import os

import numpy as np
import pytest
import torch

import eval as evaluate_run
import run
import train_rm
from nanorlhf.config import parse_config
from nanorlhf.evaluation import win_rate
from nanorlhf.model import GPT, GPTConfig
from nanorlhf.tokenizer import Tokenizer
from nanorlhf.world import make_world


def test_each_iterated_round_ranks_prompts_no_earlier_round_ranked(tmp_path):
    """run.py --rounds 4 --quick: the prompts each round's RM stage ranks (round 1: the rm stage) are disjoint."""
    cfg = parse_config(run.RunConfig, ["--quick", "--rounds", "4", "--out", str(tmp_path)])
    os.makedirs(tmp_path / "rm")
    json.dump({"labeler_tau": 0.1}, open(tmp_path / "rm" / "metrics.json", "w"))
    argvs = [run.stage_args(cfg, "rm", run.STAGES["rm"][2])]
    argvs += [args() for name, (_, _, args) in run.beyond_stages(cfg).items() if name.startswith("rm_r")]
    assert len(argvs) == 4
    world, seen = make_world(0, 0.01), set()
    for argv in argvs:
        rm_cfg = parse_config(train_rm.RMConfig, argv)
        prompts = train_rm.round_prompts(world, rm_cfg.prompt_offset, rm_cfg.n_prompts)
        assert len(prompts) == rm_cfg.n_prompts and len(set(prompts)) == len(prompts)
        assert not seen & set(prompts)
        seen |= set(prompts)


def test_kl_from_sft_is_measured_with_dropout_off():
    """A model with dropout 0.5 in its config, left in train mode, against an identical copy: the KL of the
    sampled distributions is exactly 0 (with dropout on, the two forwards would differ)."""
    torch.manual_seed(0)
    tok = Tokenizer.load("tiny")
    model = GPT(GPTConfig(block_size=64, vocab_size=1024, n_layer=1, n_head=2, n_embd=32, dropout=0.5)).train()
    sft = GPT(model.config).train()
    sft.load_state_dict(model.state_dict())
    cfg = evaluate_run.EvalConfig(max_new_tokens=8)
    kl = evaluate_run.kl_from_sft(model, sft, tok, ["what color is the fox?", "name two fruits."], cfg, "cpu")
    assert kl == 0.0


def test_bootstrap_interval_has_its_width_and_coverage():
    """Wins ~ Bernoulli(0.7) over 400 prompts: the 95% interval's width is the normal approximation's
    2·1.96·√(p(1−p)/n) ≈ 0.090 within 15%, and over 300 independent data sets it covers 0.7 about 95% of the time."""
    rng = np.random.default_rng(0)
    p, n, covered, widths = 0.7, 400, 0, []
    for k in range(300):
        scores = (rng.random(n) < p).astype(float)  # 1 beats the baseline's 0.5, 0 loses to it
        rate, (lo, hi) = win_rate(scores, np.full(n, 0.5), seed=k, n_boot=1000)
        assert lo < rate < hi
        covered += lo <= p <= hi
        widths.append(hi - lo)
    assert np.mean(widths) == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / n), rel=0.15)
    assert 0.90 <= covered / 300 <= 0.99
