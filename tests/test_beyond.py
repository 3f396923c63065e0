"""Beyond the paper: best-of-N selection, DPO's pair wiring, and --quick runs of run.py --baselines --rounds 2
--study. The best-of-N KL formula and the DPO loss itself are tested against hand/brute-force cases in
test_rlhf.py; here: what the scripts feed them."""
import copy
import json
import math
import os
import random
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import eval as evaluate_run
import run
from baselines.bestofn import best_of_n
from baselines.train_dpo import pair_logprobs
from nanorlhf.evaluation import win_rate
from nanorlhf.model import GPT, GPTConfig
from nanorlhf.rlhf import dpo_loss, ranked_pairs
from nanorlhf.tokenizer import Tokenizer
from nanorlhf.world import make_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_best_of_n_picks_the_argmax_of_the_first_n_of_each_draws_block():
    rm = [0.1, 0.5, 0.3, 0.2, 0.9, 0.0, 0.9, 0.1]  # two draws, a block of 4 samples each
    assert best_of_n(rm, 1, 4) == [0, 4]  # best-of-1 is plain sampling: the first sample of each block
    assert best_of_n(rm, 2, 4) == [1, 4]
    assert best_of_n(rm, 4, 4) == [1, 4]  # a tie (0.9, 0.9 in block 2) goes to the first
    assert best_of_n([0.3, 0.1, 0.9, 0.5, 0.2, 0.8], 3, 3) == [2, 5]


def test_one_estimand_best_of_1_from_the_sft_samples_is_exactly_even():
    """Every row is a prompt's mean gold over the same number of draws. Best-of-1 computed from SFT's own samples
    then ties SFT on every prompt: exactly 50%, with a degenerate interval; and each N draws `draws` picks."""
    rng = random.Random(0)
    draws, n_max, prompts = 2, 8, 50
    gold = [[rng.random() for _ in range(draws * n_max)] for _ in range(prompts)]
    rm = [[g + rng.gauss(0, 0.3) for g in gs] for gs in gold]
    sft = [statistics.mean(gs[d * n_max] for d in range(draws)) for gs in gold]  # SFT: the draws' first samples
    for n in (1, 2, 8):
        picks = [best_of_n(r, n, n_max) for r in rm]
        assert all(len(p) == draws for p in picks)  # the same number of draws as SFT's row
        per_prompt = [statistics.mean(g[i] for i in p) for g, p in zip(gold, picks)]
        rate, ci = win_rate(per_prompt, sft)
        if n == 1:
            assert rate == 0.5 and ci == [0.5, 0.5]
        else:
            assert rate > 0.6  # picking by a noisy RM still beats plain sampling on gold


def test_ranked_pairs_by_hand():
    assert sorted(ranked_pairs([2, 0, 1])) == [(1, 0), (1, 2), (2, 0)]  # (chosen, rejected)
    assert ranked_pairs([0, 0]) == []  # a tie is no comparison


def test_dpo_logprobs_align_pairs_and_mask_the_prompt():
    torch.manual_seed(0)
    tok = Tokenizer.load("tiny")
    policy = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32)).eval()
    reference = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32)).eval()
    responses, finished = ["the cat is red.", "blue", "a dog lives in the jungle"], [True, False, True]
    record = {"prompt": "name a color.", "ranking": [2, 0, 1],
              "examples": [tok.format_example("name a color.", y, f) for y, f in zip(responses, finished)]}
    prompt_len = len(tok.format_prompt("name a color."))
    for (ids, mask), y, f in zip(record["examples"], responses, finished):
        assert ids[prompt_len:] == tok.encode(y) + [tok.eos_id] * f  # the EOS only if the response ended
        assert mask == [0] * prompt_len + [1] * (len(ids) - prompt_len)

    def brute(model, i):  # one unpadded sequence, full logits, the response tokens summed one by one
        ids = torch.tensor(record["examples"][i][0])
        logp = F.log_softmax(model(ids[None])[0].double(), -1)  # (T, V)
        return sum(logp[t - 1, ids[t]].item() for t in range(prompt_len, len(ids)))

    pc, pr, rc, rr, _ = pair_logprobs(policy, reference, [record], tok.pad_id, "cpu")  # (3,) each, one per pair
    pairs = ranked_pairs(record["ranking"])
    assert sorted(pairs) == [(1, 0), (1, 2), (2, 0)]  # response 1 is best, then 2, then 0
    for k, (c, r) in enumerate(pairs):
        assert pc[k].item() == pytest.approx(brute(policy, c), abs=1e-4)
        assert pr[k].item() == pytest.approx(brute(policy, r), abs=1e-4)
        assert rc[k].item() == pytest.approx(brute(reference, c), abs=1e-4)
        assert rr[k].item() == pytest.approx(brute(reference, r), abs=1e-4)
    # policy == reference (DPO's step 0): every implicit reward is 0, the loss exactly log 2
    *logprobs, weights = pair_logprobs(policy, copy.deepcopy(policy), [record], tok.pad_id, "cpu")
    assert dpo_loss(*logprobs, 0.1, weights)[0].item() == pytest.approx(math.log(2), abs=1e-6)


def test_dpo_weighs_every_prompt_once_as_the_rm_does():
    """A K = 2 prompt (1 pair) and a K = 4 prompt (6 pairs) in one batch: the loss is the mean over the two prompts
    of each prompt's mean pair loss (computed here pair by pair), not the mean over the 7 pairs."""
    torch.manual_seed(0)
    tok = Tokenizer.load("tiny")
    conf = GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32)
    policy, reference = GPT(conf).eval(), GPT(conf).eval()
    records = []
    for prompt, ys in (("name a fruit.", ["apple.", "the sky"]), ("name a color.", ["red.", "blue!", "no", "a cat"])):
        records.append({"prompt": prompt, "ranking": list(range(len(ys))),
                        "examples": [tok.format_example(prompt, y) for y in ys]})
    *logprobs, weights = pair_logprobs(policy, reference, records, tok.pad_id, "cpu")
    loss = dpo_loss(*logprobs, 0.5, weights)[0].item()
    per_pair = [-F.logsigmoid(0.5 * ((a - c) - (b - d))).item() for a, b, c, d in zip(*logprobs)]
    assert len(per_pair) == 7
    assert loss == pytest.approx((per_pair[0] + sum(per_pair[1:]) / 6) / 2, rel=1e-5)
    assert abs(loss - sum(per_pair) / 7) > 1e-4


@pytest.mark.slow
def test_quick_baselines_rounds_and_study_fill_the_report(beyond_run):
    out = beyond_run
    results = json.loads((out / "results.json").read_text())
    methods = [r["method"] for r in results["methods"]]
    best_of = [f"best-of-{n}" for n in (1, 2, 4, 8, 16, 32, 64)]
    trained = ["PPO", "PPO-ptx", "GRPO", "RLOO", "REINFORCE++", "PPO on gold (oracle)", "DPO", "RFT"]
    assert methods == ["SFT", *best_of, *trained, "RLHF round 2"]
    for row in results["methods"]:
        assert 0 <= row["win_rate"] <= 1 and row["minutes"] > 0 and row["labels"], row
        assert row["win_rate_ci"][0] <= row["win_rate"] <= row["win_rate_ci"][1]
        assert row["seeds"] == 1
    assert results["methods"][0]["win_rate"] == 0.5 and results["methods"][0]["kl"] == 0.0
    assert [r["n"] for r in results["best_of_n"]["by_n"].values()] == [1, 2, 4, 8, 16, 32, 64]
    assert results["best_of_n"]["draws"] == 2  # as many draws per prompt as eval.py's --samples
    assert "best-of-N" in results["gao_fits"] and (out / "gao_fits.png").exists()
    # iterated RLHF: round 2's RM saw round 1's comparisons plus new ones, sampled by round 1's policy
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    r1, r2 = results["rounds"]
    assert r2["pairs"] > r1["pairs"] > 0 and r2["previous_rm_accuracy"] is not None
    round1 = (out / "rm" / "comparisons.jsonl").read_text().splitlines()
    round2 = (out / "rm_r2" / "comparisons.jsonl").read_text().splitlines()
    assert round2[:len(round1)] == round1 and len(round2) == 2 * len(round1)
    rm_prompts = make_world(0, 0.01).prompts("rm")  # round 2 ranks the next, fresh RM prompts
    assert [json.loads(x)["prompt"] for x in round2] == rm_prompts[:2 * len(round1)]
    ppo_r2 = torch.load(out / "ppo_r2" / "ckpt.pt", weights_only=True)["config"]
    assert ppo_r2["reference"].endswith(os.path.join("sft", "ckpt.pt"))
    assert ppo_r2["init"].endswith(os.path.join("ppo", "ckpt.pt"))
    # RFT trained on each prompt's best-ranked response
    best = [json.loads(x) for x in (out / "rft" / "best_ranked.jsonl").read_text().splitlines()]
    expected = []
    for r in map(json.loads, round1):
        i = r["ranking"].index(0)
        if r["responses"][i].strip() and r["finished"][i]:  # an empty or unfinished best is no demonstration
            expected.append({"prompt": r["prompt"], "response": r["responses"][i]})
    assert best == expected and len(best) > len(round1) // 2
    assert set(results["gold_peak_kl"]) >= {"ppo", "study_kl0.01", "study_kl0.3", "ppo_r2"}
    report = (out / "report.md").read_text()
    for section in ("Methods on the same label budget", "Best-of-N", "Iterated RLHF", "where gold peaks", "Gao et al."):
        assert section in report


def test_seeds_run_every_method_again_with_the_next_seeds(tmp_path):
    """--baselines --seeds 3: each trained method's stages are method, method_s2, method_s3 with seeds s, s + 1,
    s + 2 and otherwise the same flags (PPO and PPO-ptx: the first seed is the pipeline's own stage); eval finds
    the seeds' folders."""
    cfg = run.parse_config(run.RunConfig, ["--baselines", "--seeds", "3", "--out", str(tmp_path)])
    stages = run.beyond_stages(cfg)

    def parsed(argv):  # (the last --seed, the other flags as a sorted list without --out and --seed)
        drop = {i + d for i, x in enumerate(argv) if x in ("--out", "--seed") for d in (0, 1)}
        seed = int(argv[len(argv) - argv[::-1].index("--seed")])
        return seed, sorted(x for i, x in enumerate(argv) if i not in drop)

    for key in ("grpo", "rloo", "reinforce_pp", "oracle", "dpo", "rft", "ppo", "ppo_ptx"):
        names = [key, f"{key}_s2", f"{key}_s3"]
        runs = [parsed(stages[n][2]() if n in stages else run.stage_args(cfg, n, run.STAGES[n][1])) for n in names]
        assert [s for s, _ in runs] == [1337, 1338, 1339], key
        assert runs[0][1] == runs[1][1] == runs[2][1], key
    for name in ("grpo", "grpo_s2", "grpo_s3"):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "ckpt.pt").write_bytes(b"")
    assert evaluate_run.seed_runs(str(tmp_path), "grpo") == ["grpo", "grpo_s2", "grpo_s3"]


@pytest.mark.slow
def test_dpo_resume_is_bit_identical(quick_run, tmp_path):
    args = [sys.executable, "baselines/train_dpo.py", "--init", str(quick_run / "sft" / "ckpt.pt"), "--comparisons",
            str(quick_run / "rm" / "comparisons.jsonl"), "--world_scale", "0.01", "--max_steps", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run(args + ["--out", str(tmp_path / "a")], cwd=ROOT, capture_output=True, text=True, env=env)
    half = subprocess.run(args[:-1] + ["2", "--out", str(tmp_path / "b")], cwd=ROOT, capture_output=True, text=True,
                          env=env)
    rest = subprocess.run(args + ["--out", str(tmp_path / "b"), "--resume"], cwd=ROOT, capture_output=True,
                          text=True, env=env)
    for p in (whole, half, rest):
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
