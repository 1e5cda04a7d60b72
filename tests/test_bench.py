"""bench.py runs on the CPU at a tiny size and writes the table it prints; its FLOP counts agree with
torch's own FLOP counter."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import common

ROOT = Path(__file__).resolve().parents[1]


def run_bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--device", "cpu", "--p", "11",
                        "--warmup", "1",
                        *args, "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text())


def test_bench_tiny_cpu_run_writes_every_row(tmp_path):
    b = run_bench(tmp_path, "--d_embed", "8", "--width", "16", "--epochs", "6", "--Ks", "1", "3",
                  "--precisions", "float32", "bf16")
    assert [(row["loop"], row["K"], row["precision"], row["eval_every"]) for row in b["rows"]] == [
        ("plain", 1, "float32", 10), ("plain/ep", 1, "float32", 1), ("trainer", 1, "float32", 10),
        ("trainer", 1, "float32", 10), ("trainer", 1, "bf16", 10), ("trainer", 3, "float32", 10),
        ("trainer", 3, "bf16", 10)]
    for row in b["rows"]:
        assert row["ms_per_model_epoch"] > 0 and row["tflops"] > 0
        assert row["peak_mib"] is None  # no CUDA memory on a CPU
    assert b["rows"][0]["speedup_vs_plain"] == 1.0


@pytest.mark.parametrize("workload", ["fnn", "transformer2"])
def test_forward_flops_per_point_match_torch_flop_counter(tmp_path, workload):
    """The count bench.py uses (per point, forward) against torch's FlopCounterMode on the same model."""
    b = run_bench(tmp_path, "--workload", workload, "--d_embed", "8", "--width", "16", "--epochs", "1",
                  "--Ks", "2", "--precisions", "float32")
    cfg = bench.Config(workload=workload, p=11, d_embed=8, width=16)
    if workload == "fnn":
        model = common.token_mlp(11, 2, 8, [16, 16], 11, 1.0, [0])
    else:
        model = common.transformer(11, 2, 11, **bench.TRANSFORMERS[workload], init_scales=1.0, seeds=[0])
    x = bench.make_data(cfg.p, cfg.train_frac, "cpu")["x_train"][:10]
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert b["workload"]["forward_flops_per_point"] == pytest.approx(counter.get_total_flops() / 10, rel=0.02)


def test_plain_loop_learns_and_evaluates_at_its_cadence():
    cfg = bench.Config(p=11, d_embed=8, width=32, lr=1e-2, wd=0.0)
    data = bench.make_data(11, 0.5, "cpu")
    log = bench.plain_loop(cfg, data, 60, 10)
    assert len(log) == 6 and log[-1][0] < log[0][0] and log[-1][1] == 1.0  # train loss falls, train acc 100%
    assert len(bench.plain_loop(cfg, data, 5, 1)) == 5


def test_bench_transformer_workload_rows_per_precision(tmp_path):
    b = run_bench(tmp_path, "--workload", "transformer2", "--epochs", "2", "--Ks", "1", "2",
                  "--precisions", "float32", "bf16")
    # no plain row; K = 1 at each precision, then K = 2 (K = 1 is not repeated)
    assert [(row["loop"], row["K"], row["precision"]) for row in b["rows"]] == [
        ("trainer", 1, "float32"), ("trainer", 1, "bf16"), ("trainer", 2, "float32"), ("trainer", 2, "bf16")]
    assert b["workload"]["model"] == "transformer2" and b["workload"]["n_layers"] == 2


@pytest.mark.parametrize("T", [2, 5])
def test_written_attention_equals_the_fused_kernel(T):
    """The written-out causal attention that the bench times against SDPA: same values, same gradients."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, T, 8, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    fused = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    written = bench.written_attention(q, k, v)
    assert torch.allclose(written, fused, atol=1e-12)
    g_fused = torch.autograd.grad(fused.sum(), (q, k, v))
    g_written = torch.autograd.grad(written.sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(g_written, g_fused))
    assert torch.allclose(written[:, :, 0], v[:, :, 0])  # the first position sees only itself


def test_bench_attention_workload_rows(tmp_path):
    b = run_bench(tmp_path, "--workload", "attention", "--epochs", "1", "--Ks", "1", "2",
                  "--precisions", "float32", "bf16")
    assert [(r["model"], r["K"], r["precision"]) for r in b["rows"]] == [
        (model, K, prec) for model in ("transformer8", "transformer2") for K in (1, 2)
        for prec in ("float32", "bf16")]
    for r in b["rows"]:
        assert r["sdpa_ms"] > 0 and r["written_ms"] > 0
        assert r["sdpa_over_written"] == pytest.approx(r["sdpa_ms"] / r["written_ms"], rel=0.01, abs=1e-3)
