"""train_rm.py: the reward score's pooling, reward normalization, K = 2 pairs, CLI smoke run, bad data, resume, the
closed-form labeler agreement at any temperature. (ranking_loss itself is checked against a brute-force loop in
test_rlhf.py.)"""
import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch

import train_rm
from nanorlhf.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from nanorlhf.common import load_model, pad
from nanorlhf.evaluation import expected_agreement, pair_accuracy
from nanorlhf.model import GPT, GPTConfig
from nanorlhf.reward import score
from nanorlhf.world import Labeler, make_world, pairwise_agreement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--world_scale", "0.01", "--n_prompts", "12", "--k_min", "2", "--k_max", "4", "--max_new_tokens", "8",
        "--n_calibrate", "12", "--n_norm", "20", "--batch_size", "4", "--log_every", "1"]


def tiny_model(head="scalar", seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=64, vocab_size=1024, n_layer=1, n_head=2, n_embd=32, dropout=0.0), head=head)
    if head == "scalar":
        torch.nn.init.normal_(model.score.weight)  # a fresh head is near zero; make scores clearly distinct
    return model.eval()


@pytest.fixture
def lm_ckpt(tmp_path):
    """A tiny untrained LM checkpoint: the stand-in SFT model the reward model starts from."""
    model = tiny_model(head="lm")
    path = str(tmp_path / "sft.pt")
    save_checkpoint(path, make_checkpoint(model, model.config, "lm", "tiny", {}, 0))
    return path


def run_script(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_rm.py"), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT)


def test_padding_never_changes_a_score():
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    short = torch.randint(0, 1000, (5,), generator=g).tolist()
    long = torch.randint(0, 1000, (11,), generator=g).tolist()
    alone = model(torch.tensor([short]))[0, -1]  # independent: the last position of an unpadded row
    ids, mask = pad([short, long], pad_id=0)  # (2, 11)
    ids[0, 5:] = torch.randint(0, 1000, (6,), generator=g)  # junk in the pad positions
    scores = score(model, ids, mask)
    torch.testing.assert_close(scores[0], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores[1], model(torch.tensor([long]))[0, -1], rtol=0, atol=1e-5)


def test_score_is_read_at_the_last_real_token():
    model = tiny_model()
    ids = torch.tensor([[5, 17, 42, 9, 0, 0, 0]])  # (1, 7): four real tokens, then padding
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    base = score(model, ids, mask)
    after = ids.clone()
    after[0, 4] = 77  # the token after the last real one
    torch.testing.assert_close(score(model, after, mask), base, rtol=0, atol=0)
    last = ids.clone()
    last[0, 3] = 77  # the last real token itself
    assert (score(model, last, mask) - base).abs().item() > 1e-4


def test_pair_accuracy_hand_case():
    # pairs of ranking [0, 1, 2]: (0,1) (0,2) (1,2); scores order (0,1) right, (0,2) tied, (1,2) wrong
    assert pair_accuracy([[2.0, 1.0, 2.0]], [[0, 1, 2]]) == pytest.approx((1 + 0.5 + 0) / 3)
    assert pair_accuracy([[0.0, 0.0]], [[0, 0]]) == 0  # a tie in the ranking is no pair


def test_smoke_run_and_normalization(tmp_path, lm_ckpt):
    out = tmp_path / "rm"
    proc = run_script("--init", lm_ckpt, "--out", str(out), "--max_steps", "3", *TINY)
    assert proc.returncode == 0, proc.stderr
    assert "step 3/3" in proc.stdout and "labeler temperature tau" in proc.stdout
    assert sorted(os.listdir(out)) == ["ckpt.pt", "comparisons.jsonl", "metrics.json", "state.pt"]
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    extra = ckpt["extra"]
    assert ckpt["head"] == "scalar" and ckpt["step"] == 3
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(extra)
    for key in ("accuracy", "ceiling", "gold_accuracy"):
        assert 0 <= extra[key] <= 1
    # a fresh computation: the saved model (shifted bias included) scores the demonstrations at mean 0
    model, tok, _ = load_model(str(out / "ckpt.pt"), head="scalar")
    model.eval()
    world = make_world(0, 0.01)
    with torch.no_grad():
        scores = [model(torch.tensor([tok.format_prompt(p) + tok.encode(y) + [tok.eos_id]]))[0, -1].item()
                  for p, y in world.sft_demos("rm")[:20]]
    assert statistics.mean(scores) == pytest.approx(0, abs=1e-4)
    assert statistics.pstdev(scores) == pytest.approx(extra["demo_reward_std"], rel=1e-4)
    assert abs(extra["reward_shift"]) > 1e-3  # the shift was needed: unshifted, the mean is -shift, not 0


def hh_pairs(n):
    """HH-RLHF-style dialogues (K = 2): the chosen reply is always polite, the rejected one rude."""
    rows = []
    for i in range(n):
        human = f"\n\nHuman: tell me about the number {i}.\n\nAssistant:"
        rows.append({"chosen": human + " thank you, happy to help.", "rejected": human + " ugh, stupid question."})
    return rows


def test_hh_pairs_train(tmp_path, lm_ckpt):
    data = tmp_path / "hh.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in hh_pairs(60)))
    out = tmp_path / "rm"
    res = train_rm.main(["--data", str(data), "--init", lm_ckpt, "--out", str(out), "--batch_size", "8",
                         "--lr", "3e-3", "--warmup", "2", "--epochs", "3", "--n_norm", "20"])
    assert res["steps"] == 3 * 8  # 57 training prompts (3 held out), 8 per step
    model, tok, _ = load_model(str(out / "ckpt.pt"), head="scalar")
    model.eval()
    held = [(f"\n\nHuman: tell me about the number {i}.\n\nAssistant:", i) for i in (100, 200, 300)]
    with torch.no_grad():
        for prompt, _ in held:  # unseen prompts: the polite reply must win
            chosen, rejected = (model(torch.tensor([tok.format_prompt(prompt) + tok.encode(y) + [tok.eos_id]]))[0, -1]
                                for y in ("thank you, happy to help.", "ugh, stupid question."))
            assert chosen > rejected
    assert res["accuracy"] == 1.0


def test_bad_data_exits_2_and_writes_nothing(tmp_path, lm_ckpt):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join([json.dumps({"prompt": "a", "responses": ["x", "y"], "ranking": [0, 1]}),
                               json.dumps({"prompt": "b", "responses": ["x", "y"], "ranking": [0, 2]}),
                               "{oops"]))
    out = tmp_path / "rm"
    proc = run_script("--data", str(data), "--init", lm_ckpt, "--out", str(out))
    assert proc.returncode == 2
    assert f"{data}:2: ranking:" in proc.stdout and f"{data}:3: line: invalid JSON" in proc.stdout
    assert not out.exists()


def test_resume_is_bit_identical(tmp_path, lm_ckpt):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    train_rm.main(["--init", lm_ckpt, "--out", str(straight), "--max_steps", "3", "--save_every", "1", *TINY])
    train_rm.main(["--init", lm_ckpt, "--out", str(resumed), "--max_steps", "1", "--save_every", "1", *TINY])
    after_one = load_checkpoint(str(resumed / "state.pt"))["model"]
    train_rm.main(["--init", lm_ckpt, "--out", str(resumed), "--max_steps", "3", "--save_every", "1", "--resume",
                   *TINY])
    a, b = load_checkpoint(str(straight / "ckpt.pt")), load_checkpoint(str(resumed / "ckpt.pt"))
    assert a["step"] == b["step"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = load_checkpoint(str(straight / "state.pt")), load_checkpoint(str(resumed / "state.pt"))
    for k in sa["optimizer"]["state"]:
        assert torch.equal(sa["optimizer"]["state"][k]["exp_avg"], sb["optimizer"]["state"][k]["exp_avg"])
    assert a["extra"]["accuracy"] == b["extra"]["accuracy"]
    assert not torch.equal(after_one["score.weight"], sb["model"]["score.weight"])  # steps 2-3 did train


def test_expected_agreement_matches_simulated_labelers():
    """The closed form (Plackett-Luce pairwise marginals) vs the empirical agreement of simulated labelers."""
    utilities, tau, scores = [0.3, 0.25, 0.1, 0.1], 0.05, [1.0, 2.0, 0.5, 0.5]

    class Fixed(Labeler):
        def utility(self, prompt, response, finished=True):
            return utilities[int(response)]

    a, b = Fixed(None, 1, tau), Fixed(None, 2, tau)
    responses = [str(i) for i in range(len(utilities))]
    ranks_a = [a.rank("p", responses) for _ in range(20000)]
    ranks_b = [b.rank("p", responses) for _ in range(20000)]
    acc, ceiling = expected_agreement([scores], [utilities], tau)
    assert acc == pytest.approx(pair_accuracy([scores] * 20000, ranks_a), abs=0.01)
    assert ceiling == pytest.approx(pairwise_agreement(ranks_a, ranks_b), abs=0.01)


@pytest.mark.parametrize("tau", [1e-4, 10.0])
def test_expected_agreement_is_finite_at_any_temperature(tau):
    """One pair scored s_0 > s_1: the expected accuracy is the labeler's p = σ((u_0 − u_1)/τ) itself and the
    ceiling p² + (1 − p)². Reference: σ(x) = (1 + tanh(x/2))/2, which never overflows. At τ = 1e-4 the gaps
    ±0.3 are x = ±3000, past the range of exp."""
    for gap in (0.3, -0.3, 5e-5, -2e-4, 0.0):
        utilities = [0.4 + gap, 0.4]
        x = (utilities[0] - utilities[1]) / tau
        p = (1 + math.tanh(x / 2)) / 2
        acc, ceiling = expected_agreement([[1.0, 0.0]], [utilities], tau)
        assert 0 <= acc <= 1 and acc == pytest.approx(p, rel=1e-12, abs=1e-15)
        assert ceiling == pytest.approx(p * p + (1 - p) * (1 - p), rel=1e-12, abs=1e-15)


def test_cold_labelers_run(tmp_path, lm_ckpt):
    """--labeler_tau 1e-4: near-deterministic labelers; the closed-form evaluation must not overflow."""
    res = train_rm.main(["--init", lm_ckpt, "--out", str(tmp_path / "rm"), "--max_steps", "2", "--labeler_tau",
                         "1e-4", *TINY])
    assert res["labeler_tau"] == 1e-4 and res["steps"] == 2
    assert 0 <= res["accuracy_expected"] <= 1 and 0.5 <= res["ceiling_expected"] <= 1


def test_epoch_batch_covers_each_item_once_per_epoch_and_depends_only_on_seed_and_step():
    from nanorlhf.common import epoch_batch

    items = list(range(10))  # batch 4: epochs of 3 steps (4, 4, 2)
    epochs = [[epoch_batch(items, e * 3 + i, 4, seed=7) for i in range(3)] for e in range(2)]
    for batches in epochs:
        assert [len(b) for b in batches] == [4, 4, 2]
        assert sorted(x for b in batches for x in b) == items
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    assert epoch_batch(items, 4, 4, seed=7) == epochs[1][1]  # no state: a resumed run gets the same batch


@pytest.fixture(scope="module")
def ranked_by_candidates(tmp_path_factory):
    """comparisons.jsonl of one short run per --candidates value, from one tiny LM."""
    tmp = tmp_path_factory.mktemp("candidates")
    model = tiny_model(head="lm")
    save_checkpoint(str(tmp / "sft.pt"), make_checkpoint(model, model.config, "lm", "tiny", {}, 0))
    ranked = {}
    for c in train_rm.CANDIDATES:
        train_rm.main(["--init", str(tmp / "sft.pt"), "--out", str(tmp / c), "--max_steps", "1", "--candidates", c,
                       *TINY])
        ranked[c] = [json.loads(line) for line in open(tmp / c / "comparisons.jsonl")]
    return ranked


@pytest.mark.parametrize("candidates", ["policy+demo", "policy+contrast", "contrast"])
def test_candidates_add_exactly_what_they_name(ranked_by_candidates, candidates):
    """--candidates: the demonstration joins each ranked set; the contrast pairs are the ideal
    answer against a copy that the gold judge finds worse in correctness alone, of this run's RM prompts only."""
    world = make_world(0, 0.01)
    prompts = world.prompts("rm")[:12]
    policy, got = ranked_by_candidates["policy"], ranked_by_candidates[candidates]
    assert [r["prompt"] for r in policy] == prompts
    if candidates == "policy+demo":
        demos = dict(world.sft_demos("rm"))
        assert [r["prompt"] for r in got] == prompts
        for r, q in zip(got, policy):
            assert r["responses"] == q["responses"] + [demos[r["prompt"]]] and r["finished"] == q["finished"] + [True]
            assert sorted(r["ranking"]) == list(range(len(r["responses"])))
        return
    pairs = got[len(policy):] if candidates == "policy+contrast" else got
    if candidates == "policy+contrast":
        assert got[:len(policy)] == policy  # the policy's ranked sets are untouched
    assert len(pairs) >= 3 and {r["prompt"] for r in pairs} <= set(prompts)
    for r in pairs:
        better, worse = r["responses"]
        assert better == world.task(r["prompt"]).ideal and sorted(r["ranking"]) == [0, 1]
        gb, gw = (world.gold_components(r["prompt"], y) for y in (better, worse))
        changed = {k for k in gb if gb[k] != gw[k]}
        assert changed and changed <= {"helpful", "honest"} and all(gb[k] >= gw[k] for k in changed)


def test_candidates_other_than_policy_need_the_tiny_world(tmp_path, lm_ckpt):
    data = tmp_path / "r.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "responses": ["a", "b"], "ranking": [0, 1]}) + "\n")
    proc = run_script("--init", lm_ckpt, "--out", str(tmp_path / "rm"), "--data", str(data), "--candidates", "contrast")
    assert proc.returncode == 1 and "needs the tiny world" in proc.stderr
    assert not (tmp_path / "rm").exists()


def test_rankings_reuses_another_runs_labels_without_sampling(tmp_path, lm_ckpt, monkeypatch):
    """--rankings: a reward model of another size and seed trains on the first --n_prompts of another run's
    rankings, held out on the same rankings, and samples nothing; another world is refused."""
    first = tmp_path / "first"
    train_rm.main(["--init", lm_ckpt, "--out", str(first), "--max_steps", "1", *TINY])
    torch.manual_seed(1)
    wider = GPT(GPTConfig(block_size=64, vocab_size=1024, n_layer=2, n_head=2, n_embd=48, dropout=0.0), head="lm")
    save_checkpoint(str(tmp_path / "wider.pt"), make_checkpoint(wider, wider.config, "lm", "tiny", {}, 0))

    def no_sampling(*args, **kwargs):
        raise AssertionError("--rankings sampled")
    monkeypatch.setattr(train_rm, "sample_sets", no_sampling)
    tiny = TINY[:TINY.index("--n_prompts")] + TINY[TINY.index("--n_prompts") + 2:]
    second = tmp_path / "second"
    train_rm.main(["--init", str(tmp_path / "wider.pt"), "--out", str(second), "--max_steps", "1", "--seed", "7",
                   "--rankings", str(first), "--n_prompts", "5", *tiny])
    ours, theirs = ([json.loads(line) for line in open(d / "comparisons.jsonl")] for d in (second, first))
    assert len(theirs) == 12 and ours == theirs[:5]
    a, b = (load_checkpoint(str(d / "ckpt.pt"))["extra"] for d in (first, second))
    assert b["train_prompts"] == 5 and b["labeler_tau"] == a["labeler_tau"]
    assert b["eval_prompts"] == a["eval_prompts"] and b["ceiling"] == a["ceiling"]  # the same held-out rankings
    assert load_checkpoint(str(second / "ckpt.pt"))["model_config"]["n_embd"] == 48
    for bad, says in ((["--world_scale", "0.02"], "--world_scale 0.01 there, 0.02 here"),
                      (["--n_prompts", "13"], "12 training prompts, fewer than --n_prompts 13")):
        with pytest.raises(SystemExit, match=says):
            train_rm.main(["--init", lm_ckpt, "--out", str(tmp_path / "bad"), "--rankings", str(first),
                           *tiny, *bad])
