"""GPU checks, skipped without CUDA: the compiled CUDA paths (CUDA-graph decode, fused log-probs, PPO loss, GAE)
equal their eager twins or an independent float64 CPU computation, a PPO run goes end to end on the GPU, and
bench.py's GPU sections (W2 in bf16, training MFU, the peer in bf16) run at tiny sizes."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from nanorlhf import kernels, rlhf
from test_engine import check_compiled_generation, tiny
from test_kernels import lm_head_case, reference_logprobs
from test_ppo import ROOT, log_lines, tiny_checkpoints

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_graph_decode_matches_eager_and_replays_without_recompiling():
    from torch._dynamo.utils import counters

    counters.clear()
    check_compiled_generation(tiny(eos_bias=2.0).cuda())  # rows finish at different steps
    assert counters["inductor"]["cudagraph_skips"] == 0, "the decode step fell back from CUDA graphs"


@pytest.mark.parametrize("chunk_size", [7, 4096])
def test_token_logprobs_compiled_on_cuda_matches_float64_reference(chunk_size):
    hidden, weight, targets = lm_head_case(N=None, C=16, V=301, dtype=torch.float64, lead=(5, 9))  # N = 45
    expected = reference_logprobs(hidden, weight, targets, 0.8)
    grad_out = torch.randn(5, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = torch.autograd.grad((expected * grad_out).sum(), (hidden, weight))
    h, w = (x.detach().float().cuda().requires_grad_() for x in (hidden, weight))
    with kernels.compiling():
        logp, entropy = kernels.token_logprobs_and_entropy(h, w, targets.cuda(), 0.8, chunk_size)
    torch.testing.assert_close(logp.double().cpu(), expected, atol=1e-4, rtol=0)
    got = torch.autograd.grad((logp * grad_out.float().cuda()).sum(), (h, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double().cpu(), b, atol=1e-4, rtol=1e-4)
    log_p = torch.log_softmax(hidden.detach() @ weight.detach().T / 0.8, dim=-1)
    torch.testing.assert_close(entropy.double().cpu(), -(log_p.exp() * log_p).sum(-1), atol=1e-4, rtol=0)


def test_ppo_loss_and_gae_compiled_on_cuda_match_cpu_float64():
    g = torch.Generator().manual_seed(0)
    B, T = 6, 11
    x = [torch.randn(B, T, generator=g, dtype=torch.float64) for _ in range(6)]
    lengths = torch.tensor([11, 1, 5, 8, 0, 3])
    mask = torch.arange(T)[None] < lengths[:, None]  # ragged, one empty row
    want = rlhf.ppo_losses(*x, mask, 0.2, 0.2)
    with kernels.compiling():
        got = kernels.compiled(rlhf.ppo_losses)(*(t.float().cuda() for t in x), mask.cuda(), 0.2, 0.2)
    torch.testing.assert_close(got[0].double().cpu(), want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1].double().cpu(), want[1], atol=1e-5, rtol=1e-5)
    for k in want[2]:
        torch.testing.assert_close(got[2][k].double().cpu(), want[2][k], atol=1e-5, rtol=1e-5)
    rewards, values = x[0], x[1]
    with kernels.compiling():
        adv, ret = kernels.gae(rewards.float().cuda(), values.float().cuda(), mask.cuda(), 1.0, 0.95)
    adv_want, ret_want = rlhf.gae(rewards, values, mask, 1.0, 0.95)
    torch.testing.assert_close(adv.double().cpu() * mask, adv_want * mask, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ret.double().cpu() * mask, ret_want * mask, atol=1e-4, rtol=1e-4)


def test_ppo_run_on_cuda_compiled_by_default(tmp_path):
    paths = tiny_checkpoints(str(tmp_path))
    out = tmp_path / "ppo"
    argv = [sys.executable, os.path.join(ROOT, "train_ppo.py"), "--init", paths["lm"], "--reward_model",
            paths["scalar"], "--out", str(out), "--world_scale", "0.01", "--batch_size", "8", "--minibatch_size", "4",
            "--ppo_epochs", "2", "--max_new_tokens", "12", "--log_every", "1", "--max_steps", "3", "--device", "cuda",
            "--ptx_coef", "0.5"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "TORCH_LOGS": "recompiles"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = log_lines(out)
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(line["value_loss"])) for line in lines)
    print(proc.stderr[-3000:])  # the recompile log, for the record (pytest -s shows it)


def test_bench_w2_tiny_on_cuda_in_bf16_eager_and_compiled(capsys):
    import bench

    figures = bench.report_ppo(bench.tiny(bench.W2), torch.device("cuda"), batches=1)
    assert set(figures["modes"]) == {"eager", "compiled"}
    assert "; bfloat16" in capsys.readouterr().out  # W2 runs as train_ppo does on CUDA


def test_bench_training_mfu_tiny_on_cuda_reports_memory_and_adamw(capsys):
    import bench

    config = bench.GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=64, dropout=0.0)
    bench.report_train_mfu(torch.device("cuda"), (2, 4), 64, steps=2, config=config)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train ")]
    assert len(lines) == 4 and all("bfloat16" in line and "peak memory" in line for line in lines)


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="the optional peer (trl) is not installed")
def test_bench_peer_w2_tiny_on_cuda_in_bf16():
    import bench

    with bench.peer_run(bench.tiny(bench.W2), torch.device("cuda"), batches=1, threads=2) as step:
        times = [step(0), step(1)]
    assert all(t[0] > 0 for t in times)
