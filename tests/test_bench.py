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
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--device", "cpu", "--p", "11", "--warmup", "1",
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
        assert row["ms_per_model_epoch"] > 0 and row["tflops"] > 0 and row["peak_mib"] is None  # no CUDA on a CPU
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
