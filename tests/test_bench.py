"""bench.py runs on the CPU at a tiny size and writes the table it prints."""
import json
import subprocess
import sys
from pathlib import Path

import bench

ROOT = Path(__file__).resolve().parents[1]


def test_bench_tiny_cpu_run_writes_every_row(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--device", "cpu", "--p", "11", "--d_embed", "8",
                        "--width", "16", "--epochs", "6", "--warmup", "1", "--Ks", "1", "3",
                        "--precisions", "float32", "bf16", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    b = json.loads(out.read_text())
    assert [(row["loop"], row["K"], row["precision"]) for row in b["rows"]] == [
        ("reference", 1, "float32"), ("trainer", 1, "float32"), ("trainer", 1, "float32"), ("trainer", 1, "bf16"),
        ("trainer", 3, "float32"), ("trainer", 3, "bf16")]
    for row in b["rows"]:
        assert row["ms_per_model_epoch"] > 0 and row["tflops"] > 0 and row["peak_mib"] is None  # no CUDA memory on a CPU
    assert b["rows"][0]["speedup_vs_reference"] == 1.0
    n_train = round(0.25 * 11 ** 2)
    assert b["workload"]["flops_per_model_epoch"] == 6 * n_train * (2 * 8 * 16 + 16 * 16 + 16 * 11)


def test_reference_loop_learns_and_logs_every_epoch():
    cfg = bench.Config(p=11, d_embed=8, width=32, lr=1e-2, wd=0.0)
    import exp_modular
    data = exp_modular.make_data("add", 11, 0.5, 0, "cpu")
    log = bench.reference_loop(cfg, data, 60)
    assert len(log) == 60 and log[-1][0] < log[0][0] and log[-1][1] == 1.0  # train loss falls, train acc 100%


def test_bad_bench_input_exits_2(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--precisions", "fp8", "--out", str(tmp_path / "b.json")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "precisions must be" in r.stderr and not (tmp_path / "b.json").exists()


def test_bench_transformer_workload_rows_per_precision(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--device", "cpu", "--workload", "transformer2", "--p", "11",
                        "--epochs", "2", "--warmup", "1", "--Ks", "1", "2", "--precisions", "float32", "bf16",
                        "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    b = json.loads(out.read_text())
    # no reference row; K = 1 at each precision, then K = 2 (K = 1 is not repeated)
    assert [(row["loop"], row["K"], row["precision"]) for row in b["rows"]] == [
        ("trainer", 1, "float32"), ("trainer", 1, "bf16"), ("trainer", 2, "float32"), ("trainer", 2, "bf16")]
    assert b["workload"]["model"] == "transformer2" and b["workload"]["n_layers"] == 2
    n_train = round(0.25 * 11 ** 2)
    assert b["workload"]["flops_per_model_epoch"] == bench.common.transformer_flops(
        2 * n_train, 2, 128, 512, 4, 32, 2, 11, n_train)
