"""run.py's presets: --preset auto picks gpu on CUDA; the gpu preset's flags reach every stage's config (the
pipeline, the study, --baselines and --rounds); its FLOP estimate; and the gpu preset shrunk by --quick runs end to
end on CPU (the device is all it skips)."""
import json
import os

import pytest

import run
import train_base
import train_ppo
import train_rm
import train_sft
from conftest import run_py
from nanorlhf.config import PPOConfig, parse_config
from nanorlhf.tokenizer import Tokenizer
from nanorlhf.world import make_world

CONFIG_OF = {"train_base.py": train_base.BaseConfig, "train_sft.py": train_sft.SFTConfig,
             "train_rm.py": train_rm.RMConfig, "train_ppo.py": PPOConfig}


def gpu_cfg(*args, out="/tmp/unused"):
    return parse_config(run.RunConfig, ["--preset", "gpu", "--out", str(out), *args])


def stage_configs(cfg):
    """name → the config each stage would parse from the argv run.py builds for it (nothing runs). The study
    reads how many steps PPO took from its metrics.json: written here as a finished PPO run would."""
    os.makedirs(os.path.join(cfg.out, "ppo"), exist_ok=True)
    with open(os.path.join(cfg.out, "ppo", "metrics.json"), "w") as f:
        json.dump({"steps": parse_config(PPOConfig, run.stage_flags(cfg, "ppo")).batches}, f)
    out = {name: parse_config(CONFIG_OF[script], run.stage_args(cfg, name, run.stage_flags(cfg, name)))
           for name, (script, _, _) in run.STAGES.items()}
    for name, (script, _, make_args) in run.beyond_stages(cfg).items():
        if script in CONFIG_OF and not name.startswith("rm_r"):  # rm_r2 reads the first RM's metrics
            out[name] = parse_config(CONFIG_OF[script], make_args())
    return out


def test_preset_auto_is_cpu_on_cpu_and_the_cpu_flags_are_unchanged():
    cfg = parse_config(run.RunConfig, ["--out", "/tmp/unused"])
    assert run.preset(cfg) == "cpu" and run.world_scale(cfg) == "0.1"
    assert all(run.stage_flags(cfg, name) == default for name, (_, default, _) in run.STAGES.items())
    with pytest.raises(SystemExit):
        run.preset(parse_config(run.RunConfig, ["--preset", "tpu"]))


def test_gpu_preset_flags_reach_every_stage(tmp_path):
    configs = stage_configs(gpu_cfg("--baselines", "--seeds", "1", out=tmp_path))
    assert {c.world_scale for c in configs.values()} == {1.0}  # the paper-sized world
    base = configs["base"]
    assert (base.n_layer, base.n_head, base.n_embd, base.dropout, base.steps) == (8, 8, 512, 0.1, 4000)
    assert (configs["rm"].n_prompts, configs["rm"].gen_batch_size, configs["sft"].lr) == (30000, 1024, 1e-4)
    for name in ("ppo", "ppo_ptx", "grpo", "rloo", "reinforce_pp", "oracle"):
        c = configs[name]
        assert (c.batches, c.batch_size, c.minibatch_size) == (120, 256, 64), name
    assert configs["ppo_ptx"].ptx_coef == 0.5 and configs["ppo"].ptx_coef == 0.0
    assert configs["study_kl0.01"].batches == configs["study_kl0.3"].batches == 240  # twice PPO's


def test_quick_shrinks_the_gpu_preset(tmp_path):
    configs = stage_configs(gpu_cfg("--quick", out=tmp_path))
    assert {c.world_scale for c in configs.values()} == {0.01}
    assert (configs["base"].n_layer, configs["base"].n_embd, configs["base"].steps) == (2, 64, 60)
    assert (configs["ppo"].batches, configs["ppo"].batch_size, configs["study_kl0.3"].batches) == (3, 16, 6)


def test_paper_preset_deals_the_papers_world_to_every_stage(tmp_path):
    """--preset paper: the world at scale 1.0 for every stage, its own flags, and its own stage seconds for the ETA
    (the study's twice its PPO's); --quick shrinks it as it shrinks the others."""
    cfg = parse_config(run.RunConfig, ["--preset", "paper", "--out", str(tmp_path)])
    configs = stage_configs(cfg)
    assert {c.world_scale for c in configs.values()} == {1.0}
    assert configs["rm"].n_prompts == -1 and configs["sft"].epochs == 3  # all 33,000 RM prompts
    assert configs["ppo_ptx"].ptx_coef == 0.5 and configs["ppo"].ptx_coef == 0.0
    assert run.expected_seconds(cfg) == run.PAPER_SECONDS != run.EXPECTED_SECONDS["cpu"]
    assert run.beyond_stages(cfg)["study_kl0.3"][1] == 2 * run.PAPER_SECONDS["ppo"]
    quick = stage_configs(parse_config(run.RunConfig, ["--preset", "paper", "--quick", "--out", str(tmp_path)]))
    assert {c.world_scale for c in quick.values()} == {0.01} and quick["rm"].n_prompts == 60


@pytest.fixture(scope="module")
def paper_world():
    """The gpu preset's world (scale 1.0), built once for the module."""
    return make_world(0, float(run.PAPER_WORLD_SCALE))


def test_gpu_estimate_counts_every_main_stage_and_fits_ten_minutes(capsys, monkeypatch, paper_world):
    monkeypatch.setattr(run, "make_world", lambda seed, scale: paper_world)
    flops = run.gpu_estimate(gpu_cfg())
    assert set(flops) == {"base", "sft", "rm", "ppo", "ppo_ptx"} and all(f > 0 for f in flops.values())
    assert flops["base"] == pytest.approx(4000 * 64 * 128 * 6 * 25.8e6, rel=0.15)  # ≈ 6N per token, N ≈ 26M
    assert sum(flops.values()) / 100e12 <= 10 * 60 / 2  # half the 10 minutes at the assumed 100 TFLOP/s, or less
    assert "an assumed throughput, not a measurement" in capsys.readouterr().out


def test_the_paper_sized_world_fits_the_gpu_context(paper_world):
    """Every prompt of the gpu preset's world (scale 1.0) leaves room in the base model's context for the longest
    response, and the world holds the RM prompts the preset asks for."""
    cfg, world, tok = gpu_cfg(), paper_world, Tokenizer.load("tiny")
    assert (cfg.world_seed, run.world_scale(cfg)) == (0, "1.0")
    room = run.flag(run.stage_flags(cfg, "base"), "--block_size") - run.flag(run.stage_flags(cfg, "rm"), "--max_new_tokens")
    assert max(len(tok.format_prompt(p)) for p in world.tasks) <= room
    assert run.flag(run.stage_flags(cfg, "rm"), "--n_prompts") < len(world.prompts("rm"))


@pytest.mark.slow
def test_gpu_preset_shrunk_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "run"
    log = run_py("--preset", "gpu", "--no-study", "--out", str(out))
    assert "--preset gpu:" in log  # the estimate line
    for stage in ("base", "sft", "rm", "ppo", "ppo_ptx"):
        assert (out / stage / "ckpt.pt").exists(), stage
    assert "--dropout 0.1" in log and "--n_head 8" in log  # the gpu flags, then --quick's
    assert set(json.loads((out / "results.json").read_text())["gold_score"]) == {"base", "sft", "ppo", "ppo_ptx"}


def test_eta_scales_by_the_probe_then_by_the_stages_timed_here():
    """Before any stage has run: the expected seconds × the mean of the probe's training and sampling ratios to the
    reference's; after: × how long the timed stages took against their expected seconds. Stages already timed are
    not counted again."""
    expected = {"a": 10, "b": 20, "c": 30}
    train, sample = run.REFERENCE_PROBE
    assert run.eta_seconds(["a", "b", "c"], expected, {}, (train * 2, sample * 2)) == pytest.approx(120)
    assert run.eta_seconds(["a", "b", "c"], expected, {}, (train * 3, sample)) == pytest.approx(60 * (3 + 1) / 2)
    assert run.eta_seconds(["b", "c"], expected, {"a": 25}, run.REFERENCE_PROBE) == pytest.approx(125)
    assert run.eta_seconds(["c"], expected, {"a": 5, "b": 10}, (1.0, 1.0)) == pytest.approx(15)


def test_the_first_eta_is_within_a_quarter_of_the_reference_run():
    """The first ETA line against the default run's measured seconds on the reference machine (the AMD EPYC VM's
    stages, whose sum EXPECTED_SECONDS holds): with the probe reading the reference's figures, the ETA for the whole
    run is the sum of the stages' seconds, and a probe 10% off on either kind of work moves it by 5%."""
    stages = list(run.STAGES) + ["study_kl0.01", "study_kl0.3", "eval"]
    cpu = run.EXPECTED_SECONDS["cpu"]
    expected = {**cpu, "study_kl0.01": 2 * cpu["ppo"], "study_kl0.3": 2 * cpu["ppo"]}
    measured = 179 + 26 + 30 + 54 + 69 + 104 + 101 + 18  # the stages of `python run.py` there, in seconds
    eta = run.eta_seconds(stages, expected, {}, run.REFERENCE_PROBE)
    assert abs(eta / measured - 1) < 0.25
    train, sample = run.REFERENCE_PROBE
    assert run.eta_seconds(stages, expected, {}, (train * 1.1, sample)) == pytest.approx(1.05 * eta)
