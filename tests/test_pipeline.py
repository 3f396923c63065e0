import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import run_py
from nanorlhf.checkpoint import load_checkpoint
from nanorlhf.evaluation import win_rate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_win_rate_by_hand():
    rate, (lo, hi) = win_rate([1.0, 0.0, 0.5, 0.9], [0.0, 1.0, 0.5, 0.1])
    assert rate == pytest.approx((1 + 0 + 0.5 + 1) / 4)  # a tie counts 1/2
    assert 0.0 <= lo <= rate <= hi <= 1.0
    assert win_rate([0.3] * 5, [0.3] * 5) == (0.5, [0.5, 0.5])


def test_response_logprob_sums_is_the_sum_of_the_response_tokens_logprobs():
    from nanorlhf.common import response_logprob_sums
    from nanorlhf.model import GPT, GPTConfig
    from nanorlhf.tokenizer import Tokenizer
    tok = Tokenizer.load("tiny")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32)).eval()
    prompts, responses = ["what is 3 plus 4?", "name a red fruit."], ["7.", "the apple is red, i think!"]
    examples = [tok.format_example(p, y) for p, y in zip(prompts, responses)]
    got = response_logprob_sums(model, examples, tok.pad_id, "cpu")
    for i, (p, y) in enumerate(zip(prompts, responses)):  # one unpadded sequence at a time, full log-softmax
        prompt = tok.format_prompt(p)
        ids = torch.tensor([prompt + tok.encode(y) + [tok.eos_id]])
        logp = torch.log_softmax(model(ids)[0].double(), -1)
        want = sum(logp[t - 1, ids[0, t]].item() for t in range(len(prompt), ids.shape[1]))
        assert got[i].item() == pytest.approx(want, abs=1e-4)


def test_rm_sample_accuracy_by_hand():
    from eval import rm_sample_accuracy
    # two prompts, three draws each; prompt 1: gold 1 > 0 > -1, RM agrees on 2 of 3 pairs; prompt 2: RM ties on
    # (0, 1) (half right) and orders (0, 2) and (1, 2) as gold does; equal gold forms no pair (the last line)
    gold = [1.0, 0.0, -1.0, 0.5, 0.2, 0.6]
    rm = [0.3, 0.9, -2.0, 0.1, 0.1, 0.4]
    on = rm_sample_accuracy(gold, rm, 3)
    assert on["pairs"] == 3 + 3
    assert on["accuracy"] == pytest.approx((2 + 0.5 + 1 + 1) / 6)
    assert rm_sample_accuracy([0.0, 0.0], [1.0, 2.0], 2) == {"pairs": 0, "accuracy": None}


def test_category_means_by_hand():
    from nanorlhf.evaluation import category_means
    cats = ["sum", "fact", "sum", "sum"]
    rm, lm = category_means(cats, [True, False, False, True]), category_means(cats, [1, 1, 0, 0])
    assert list(rm) == list(lm) == ["fact", "sum"]
    assert rm["fact"] == 0 and lm["fact"] == 1
    assert rm["sum"] == pytest.approx(2 / 3) and lm["sum"] == pytest.approx(1 / 3)


@pytest.mark.slow
def test_quick_pipeline_end_to_end(quick_run):
    out = quick_run
    for stage in ("base", "sft", "rm", "ppo", "ppo_ptx", "study_kl0.01", "study_kl0.3"):  # the study is on by default
        assert (out / stage / "ckpt.pt").exists(), stage
    results = json.loads((out / "results.json").read_text())
    for key in ("win_rate_vs_sft", "gold_score", "rm_accuracy", "labeler_agreement", "pretrain_val_loss", "seconds"):
        assert key in results, key
    assert set(results["gold_score"]) == {"base", "sft", "ppo", "ppo_ptx"}
    assert results["win_rate_vs_sft"]["sft"] == 0.5  # SFT against itself: every prompt a tie
    by_judge = results["win_by_judge"]  # the same samples judged by gold, training labelers and the held-out panel
    assert list(by_judge) == ["base", "sft", "ppo", "ppo_ptx"]
    for judge, r in by_judge["sft"].items():
        assert r["win_rate"] == pytest.approx(0.0 if judge == "taste gap" else 0.5, abs=1e-12), judge
    for r in by_judge["ppo"].values():
        assert r["ci"][0] <= r["win_rate"] <= r["ci"][1]
    study = results["study_by_judge"]  # along β: the study's two runs and PPO's own
    assert sorted(r["kl_coef"] for r in study.values()) == [0.01, 0.1, 0.3]
    assert set(results["seconds"]) >= {"base", "sft", "rm", "ppo", "ppo_ptx"}
    for name in ("sft", "ppo", "ppo_ptx"):  # the RM judged on each policy's own samples (2 draws a prompt)
        on = results["rm_on_samples"][name]
        assert on["pairs"] > 0 and 0 <= on["accuracy"] <= 1
    for kind in ("correctness", "harmlessness", "conciseness"):
        assert 0 <= results["rm_by_kind"][kind]["sft_likelihood_accuracy"] <= 1
    # eval.py --rms: the RM alone, the same accuracies as in the run's report
    from eval import main as eval_main
    row = eval_main(["--rms", str(out / "rm" / "ckpt.pt"), "--world_scale", "0.01"]).splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    rm_ckpt = load_checkpoint(str(out / "rm" / "ckpt.pt"))
    parameters = sum(v.numel() for k, v in rm_ckpt["model"].items() if k != "lm_head.weight")  # tied to wte
    assert cells[1:3] == [f"{parameters / 1e6:.2f}M", f"{rm_ckpt['extra']['pairs']:,}"]
    assert cells[3] == f"{results['rm_accuracy']:.1%} ({results['labeler_agreement']:.1%})"
    assert cells[5:] == [f"{results['rm_by_kind'][k]['rm_accuracy']:.1%}" for k in ("correctness", "harmlessness",
                                                                                     "conciseness")]
    # --ensemble: the mean of two copies of one RM scores as that RM does, pair by pair
    rows = eval_main(["--rms", str(out / "rm" / "ckpt.pt"), str(out / "rm" / "ckpt.pt"), "--ensemble",
                      "--world_scale", "0.01"]).splitlines()
    assert rows[-1].split("|")[6:] == rows[-2].split("|")[6:] and rows[-1].startswith("| mean of the 2 |")
    with pytest.raises(SystemExit, match="not a reward model trained on the tiny world"):
        eval_main(["--rms", str(out / "sft" / "ckpt.pt"), "--world_scale", "0.01"])
    correct = results["rm_by_kind"]["correctness"]  # by category: the pairs and accuracies of the whole, split
    cats = correct["by_category"]
    assert sum(cats["pairs"].values()) == correct["pairs"]
    for key in ("rm_accuracy", "sft_likelihood_accuracy"):
        assert list(cats[key]) == list(cats["pairs"])
        assert sum(n * cats[key][c] for c, n in cats["pairs"].items()) == pytest.approx(correct["pairs"] * correct[key])
    report = (out / "report.md").read_text()
    assert "win rate vs SFT" in report and "ppo_ptx" in report
    assert "| category | pairs | RM | SFT's likelihood |" in report
    assert "## Win rate vs SFT by judge" in report and "| study_kl0.01 | 0.01 |" in report
    plots = report_plots(report)  # the report names every plot the run folder holds, and only those
    assert sorted(plots) == sorted(p.name for p in out.glob("*.png"))
    assert {"win_rates.png", "overoptimization.png", "training.png"} <= set(plots)
    for png in plots:
        assert (out / png).stat().st_size > 1000, png
    # a second run finds every checkpoint and skips all training stages
    assert run_py("--out", str(out), timeout=300).count("checkpoint exists, skipped") == 7


def report_plots(report):
    """The file names on the report's `Plots:` line ([] if it has none)."""
    line = next((l for l in report.splitlines() if l.startswith("Plots:")), "")
    return re.findall(r"`([^`]+\.png)`", line)


@pytest.mark.slow
def test_report_names_the_plots_written_or_how_to_get_them(quick_run, tmp_path, monkeypatch):
    """Without matplotlib the report names no plot and says how to draw them; with it, exactly the files written."""
    from eval import make_plots, write_report
    results = json.loads((quick_run / "results.json").read_text())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails, as where it is not installed
    assert make_plots(results, str(tmp_path)) is None and os.listdir(tmp_path) == []
    write_report(results, str(tmp_path / "report.md"), "", None)
    report = (tmp_path / "report.md").read_text()
    assert ".png" not in report and report_plots(report) == []
    assert ("matplotlib is not installed): `pip install matplotlib`, then run "
            f"`python eval.py --run {tmp_path}` again.") in report
    monkeypatch.undo()
    plots = make_plots(results, str(tmp_path))
    write_report(results, str(tmp_path / "report.md"), "", plots)
    assert sorted(report_plots((tmp_path / "report.md").read_text())) == sorted(
        p for p in os.listdir(tmp_path) if p.endswith(".png")) != []


def test_the_set_up_installs_what_the_plots_need():
    """The README's set-up is `pip install torch -r requirements.txt`: the plots' matplotlib must be in it."""
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        assert "matplotlib" in [line.split("#")[0].strip() for line in f]


def test_reward_ensemble_is_the_mean_of_its_members():
    from eval import MeanReward
    from nanorlhf.model import GPT, GPTConfig
    torch.manual_seed(0)
    conf = GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16)
    members = [GPT(conf, head="scalar").eval() for _ in range(3)]
    ids = torch.randint(0, 50, (2, 9))
    want = sum(m(ids) for m in members) / 3  # (B, T)
    torch.testing.assert_close(MeanReward(members)(ids), want)
    assert MeanReward(members).config is members[0].config


def test_eval_of_a_folder_without_checkpoints_exits_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--run", str(tmp_path)], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"--run {tmp_path}: no checkpoints to evaluate")
    assert os.listdir(tmp_path) == []  # nothing written
