"""Determinism as the README states it: the same command on the same machine and thread count gives a
byte-identical metrics.csv. Run with the default thread count (every core), in a subprocess each, at a
size where the embedding's backward is split across threads (p 61, d_embed 128: 1830 x 2 rows of 128
gathered from a 61-row table; plain indexing's backward summed them in a timing-dependent order)."""
import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_three_repeats_under_the_default_threads_write_identical_metrics(tmp_path):
    args = ["--config", str(ROOT / "configs/smoke/modular.yaml"), "--p", "61", "--d_embed", "128", "--width",
            "64",
            "--weak_epochs", "20", "--epochs", "20", "--phases", "weak,groktransfer", "--quiet"]
    digests = []
    for i in range(3):
        out = tmp_path / f"r{i}"
        r = subprocess.run([sys.executable, str(ROOT / "exp_modular.py"), *args, "--out", str(out)],
                           capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        digests.append(hashlib.sha256((out / "metrics.csv").read_bytes()).hexdigest())
    assert len(set(digests)) == 1, digests
