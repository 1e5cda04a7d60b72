"""CUDA-only checks, skipped without a GPU: K members on the device train like each alone, the TF32 and
bf16 phases train, auto_members fills the memory, --deterministic repeats bit for bit, the compute time
is synchronised, and a script runs end to end with --device cuda."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import harness

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parents[1]
DEV = torch.device("cuda")


def _data(p=23, n_train=300):
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).T
    x, y = torch.stack([a, b], 1), (a + b) % p
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:n_train], perm[n_train:]
    return {k: v.to(DEV) for k, v in dict(x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te]).items()}


def _transformer(seeds=(0,)):
    return common.transformer(23, 2, 23, n_layers=1, d_model=32, d_mlp=64, n_heads=2, d_head=16,
                              init_scales=1.0,
                              seeds=list(seeds)).to(DEV)


def test_k_members_on_cuda_train_like_each_alone():
    data = _data()
    scales, lrs, seeds = [1.0, 0.5, 2.0], [1e-2, 3e-3, 3e-2], [0, 1, 2]
    together = common.token_mlp(23, 2, 8, [32], 23, scales, seeds).to(DEV)
    h = common.train(together, data, epochs=50, lr=lrs, wd=0.1, eval_every=10, quiet=True)
    for k in range(3):
        alone = common.token_mlp(23, 2, 8, [32], 23, [scales[k]], [seeds[k]]).to(DEV)
        ha = common.train(alone, data, epochs=50, lr=lrs[k], wd=0.1, eval_every=10, quiet=True)
        np.testing.assert_allclose(h["metrics"][:, k], ha["metrics"][:, 0], rtol=1e-3, atol=1e-4)
    assert (h["metrics"][-1, :, common.TRAIN_LOSS] < h["metrics"][0, :, common.TRAIN_LOSS]).all()


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_phases_train_and_keep_float32_weights(precision):
    model = _transformer()
    h = common.train(model, _data(), epochs=60, lr=3e-3, wd=0.1, eval_every=10, quiet=True,
                     precision=precision)
    m = h["metrics"][:, 0]
    assert np.isfinite(m).all() and m[-1, common.TRAIN_LOSS] < 0.8 * m[0, common.TRAIN_LOSS]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # bf16 is autocast, not bf16 weights
    assert not torch.backends.cuda.matmul.allow_tf32  # the context restores the setting


def test_auto_members_fills_the_memory_up_to_the_cap_in_balanced_batches():
    def build(scales):
        return common.token_mlp(23, 2, 8, [32], 23, scales, [0] * len(scales)).to(DEV)
    # a tiny model: the cap (256) binds, and 1000 points run as 4 batches of 250
    assert harness.auto_members(build, _data(), 1000) == 250
    assert harness.auto_members(build, _data(), 1000, cap=1000, headroom=1e-6) < 250  # memory binds


def test_deterministic_runs_repeat_bit_for_bit():
    try:
        runs = []
        for _ in range(2):
            harness.set_seed(0, deterministic=True)
            h = common.train(_transformer(), _data(), epochs=30, lr=3e-3, wd=0.1, eval_every=5, quiet=True)
            runs.append(h["metrics"])
        np.testing.assert_array_equal(runs[0], runs[1])
    finally:
        torch.use_deterministic_algorithms(False)


def test_compute_time_is_synchronised_and_excludes_evaluation():
    h = common.train(_transformer(seeds=range(4)), _data(), epochs=40, lr=3e-3, wd=0.1,
                     eval_every=10, quiet=True)
    c = np.asarray(h["compute_s"])
    assert len(c) == len(h["epochs"]) and np.all(np.diff(c) >= 0) and 0 < c[-1] <= h["wall_s"]


def test_modular_smoke_run_on_cuda_names_the_gpu(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "exp_modular.py"), "--config",
                        str(ROOT / "configs/smoke/modular.yaml"),
                        "--device", "cuda", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["device"] == torch.cuda.get_device_name(0)
    assert all(np.isfinite(p["final_train_loss"]) for p in s["phases"].values())
