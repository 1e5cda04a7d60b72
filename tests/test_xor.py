"""exp_xor.py: the data, one gradient step against a hand computation, the span form against the
dense model, r_W, the one-step claim on a small setting, and smoke runs as a user would run them."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import harness
import exp_xor as ex

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke" / "xor.yaml"


def run_script(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "exp_xor.py"), *args], capture_output=True,
                          text=True, cwd=cwd)


def test_data_labels_noise_and_determinism():
    d = ex.make_data(50, 30, 0.05, 40, 0, "cpu")
    x, y = d["x_train"], d["y_train"]
    assert x.shape == (50, 30) and d["s_test"].shape == (40, 30) and d["s_test"].dtype == torch.int8
    assert set(x[:, :2].abs().flatten().tolist()) == {1.0}
    assert torch.allclose(x[:, 2:].abs(), torch.tensor(0.05))
    assert torch.equal(y, x[:, 0] * x[:, 1])
    xt = torch.cat([xs for _, xs in ex.chunks_of_test(d, rows=7)])  # chunked floats == the whole sample
    assert torch.equal(xt, d["s_test"].float() * d["scale"]) and torch.equal(d["y_test"], xt[:, 0] * xt[:, 1])
    assert torch.equal(ex.make_data(50, 30, 0.05, 40, 0, "cpu")["x_train"], x)
    assert not torch.equal(ex.make_data(50, 30, 0.05, 40, 1, "cpu")["x_train"], x)
    assert 0.3 < (y > 0).float().mean() < 0.7  # both labels present
    signs = torch.cat([x[:, :2], d["s_test"][:, :2].float()])
    assert len({tuple(r) for r in signs.tolist()}) == 4  # all four clusters


@pytest.mark.parametrize("form, loss", [("torch", "exp"), ("literal", "exp"), ("torch", "logistic")])
def test_one_gd_step_equals_the_formula_by_hand(form, loss):
    """p = 3, n = 2, m = 2, written out element by element."""
    X = torch.tensor([[1.0, 1.0, 0.1], [1.0, -1.0, -0.1]])
    y = torch.tensor([1.0, -1.0])
    W = torch.tensor([[0.5, -0.2], [0.3, 0.4], [-0.1, 0.2]])
    a = torch.tensor([0.7, -0.6])
    lr, wd = 0.1, 0.1
    Wn, an = ex.dense_scratch_step(W[None], a[None], X, y, lr, wd, form, loss)
    s = 1 - wd if form == "literal" else 1 - lr * wd
    gW, ga = [[0.0, 0.0] for _ in range(3)], [0.0, 0.0]
    for i in range(2):
        h = [sum(X[i, r].item() * W[r, j].item() for r in range(3)) for j in range(2)]
        f = sum(a[j].item() * max(h[j], 0) for j in range(2))
        z = -y[i].item() * f
        dl = -y[i].item() * (math.exp(z) if loss == "exp" else 1 / (1 + math.exp(-z)))  # d loss / d f
        for j in range(2):
            ga[j] += dl * max(h[j], 0) / 2
            for r in range(3):
                gW[r][j] += dl * a[j].item() * (h[j] > 0) * X[i, r].item() / 2
    want_W = torch.tensor([[s * W[r, j].item() - lr * gW[r][j] for j in range(2)] for r in range(3)])
    want_a = torch.tensor([s * a[j].item() - lr * ga[j] for j in range(2)])
    torch.testing.assert_close(Wn[0], want_W)
    torch.testing.assert_close(an[0], want_a)


@pytest.mark.parametrize("form", ["torch", "literal"])
def test_span_form_follows_the_dense_model(form):
    """train_scratch (W = c W0 + X^T Z) and the dense model stepped with dense_scratch_step agree."""
    cfg = ex.Config(p=60, n=24, n_test=30, scratch_width=16, scratch_epochs=25, eval_every=5, wd_form=form,
                    scratch_lr=0.5, quiet=True)
    d = ex.make_data(cfg.n, cfg.p, cfg.eps, cfg.n_test, 0, "cpu")
    h = ex.train_scratch(cfg, d, [3, 4], "cpu")
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    W = torch.stack([torch.cat([w for _, _, w in ex.default_init_chunks(g, cfg.p, 16, cfg.p)]) for g in gens])
    a = torch.stack([(torch.rand(16, generator=g) * 2 - 1) / 4 for g in gens])
    X, y = d["x_train"], d["y_train"]
    for epoch in range(1, 26):
        W, a = ex.dense_scratch_step(W, a, X, y, cfg.scratch_lr, cfg.scratch_wd, form, cfg.loss)
        if epoch % 5 == 0:
            row = h["metrics"][list(h["epochs"]).index(epoch)]  # (2, 5)
            loss, f, _, _ = ex.two_layer_grads(torch.matmul(X, W), a, y, cfg.loss)
            f_t = ex.forward_on_test(d, W, a)
            np.testing.assert_allclose(row[:, 0], loss.numpy(), rtol=1e-4)
            np.testing.assert_allclose(row[:, 1], (torch.sign(f) == y).float().mean(1).numpy())
            np.testing.assert_allclose(row[:, 3], (torch.sign(f_t) == d["y_test"]).float().mean(1).numpy())
            norm = torch.sqrt(W.pow(2).sum((1, 2)) + a.pow(2).sum(1))
            np.testing.assert_allclose(row[:, 4], norm.numpy(), rtol=1e-4)
    assert h["metrics"][-1, :, 0].max() < h["metrics"][0, :, 0].min()  # it did train


def test_norm_ratio_and_neuron_features_on_a_constructed_layer():
    W = torch.zeros(6, 3)
    W[0, 0], W[1, 1] = 3.0, 4.0
    W[2:] = 1.0
    assert ex.norm_ratio(W[None]).item() == pytest.approx((math.sqrt(12) / 2) / (5 / math.sqrt(2)))
    W = torch.zeros(10, 3)
    W[:2, 0] = torch.tensor([-1.0, 1.0])
    W[:2, 1] = torch.tensor([2.0, -2.0])
    W[:2, 2] = torch.tensor([-1.0, -0.9])
    W[2:, 2] = 0.1
    feats = ex.neuron_features(W)
    assert [f["feature"] for f in feats] == [[-1, 1], [1, -1], [-1, -1]]
    assert feats[0]["cosine_first_two"] == pytest.approx(1.0)
    assert feats[0]["cosine_full"] == pytest.approx(1.0)
    assert feats[2]["cosine_full"] < feats[2]["cosine_first_two"] < 1
    assert feats[2]["rest_over_signal_norm"] == pytest.approx(math.sqrt(8 * 0.01) / math.sqrt(1.81), abs=1e-4)


def test_one_step_claim_holds_on_a_small_setting():
    """Theorem 3.2 on p = 400, n = 300: U of the form the theorem assumes (three of the four features,
    small noise rows), a fixed, V ~ Unif{±0.4}^3, one GD step with lr 2: all training points right and
    (nearly) all test points."""
    cfg = ex.Config(p=400, n=300, n_test=1000, target_width=1024, target_epochs=1, quiet=True)
    d = ex.make_data(cfg.n, cfg.p, cfg.eps, cfg.n_test, 0, "cpu")
    U = torch.zeros(cfg.p, 3)
    U[:2] = torch.tensor([[-1.0, 1.0, -1.0], [1.0, -1.0, -1.0]])  # columns (-1, 1), (1, -1), (-1, -1)
    # ||delta||_F ~ eps sqrt(p/n)/5
    U[2:] = torch.randn(cfg.p - 2, 3, generator=torch.Generator().manual_seed(0)) * 0.01
    h = ex.train_target(cfg, d, U[None], [0], "cpu")
    before, after = h["metrics"][0, 0], h["metrics"][list(h["epochs"]).index(1), 0]
    assert before[1] < 0.9  # not solved at initialisation
    assert after[1] == 1.0 and after[3] >= 0.99


def test_smoke_run_writes_everything(tmp_path):
    out = tmp_path / "run"
    r = run_script("--config", str(SMOKE), "--out", str(out))
    assert r.returncode == 0, r.stderr
    for name in ("config.yaml", "metrics.csv", "summary.json", "dynamics.png", "neurons.png",
                 "embedding3d.png", "embedding.pt"):
        assert (out / name).is_file(), name
    s = json.loads((out / "summary.json").read_text())
    assert list(s["phases"]) == ["scratch", "weak", "groktransfer"]
    gt, weak = s["phases"]["groktransfer"], s["phases"]["weak"]
    features = weak["weak_neuron_features"][0]  # member 0's three neurons
    assert len(features) == 3 and all(len(f["feature"]) == 2 for f in features)
    m = harness.read_metrics(out / "metrics.csv")
    # the row after one step
    one = m["groktransfer"]["metrics"][list(m["groktransfer"]["epochs"]).index(1), 0]
    assert gt["one_step_train_acc"] == pytest.approx([float(one[common.TRAIN_ACC])])
    assert gt["one_step_test_acc"] == pytest.approx([float(one[common.TEST_ACC])])
    assert m["scratch"]["epochs"][-1] == 40 and m["groktransfer"]["epochs"][:3].tolist() == [0, 1, 2]
    at1 = m["groktransfer"]["metrics"][1, 0]
    assert at1[1] == pytest.approx(gt["one_step_train_acc"][0])
    assert at1[3] == pytest.approx(gt["one_step_test_acc"][0])
    U = torch.load(out / "embedding.pt", weights_only=True)["U"]
    assert U.shape == (1, 300, 3)
    assert weak["norm_ratio"][0] == pytest.approx(ex.norm_ratio(U).item(), rel=1e-5)


def test_studies_smoke(tmp_path):
    r = run_script("--config", str(SMOKE), "--study", "norm_ratio", "--weak_epochs", "30", "--out",
                   str(tmp_path / "nr"))
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "nr" / "summary.json").read_text())
    assert len(s["results"]["vs_p"]) == 4 and len(s["results"]["vs_n"]) == 4
    assert set(s["slopes"]) == {f"{w}_eps_{e:.6g}" for w in ("vs_p", "vs_n") for e in (0.05, 0.1)}
    assert all(np.isfinite(v) for v in s["slopes"].values())
    assert (tmp_path / "nr" / "norm_ratio.png").is_file()
    r = run_script("--config", str(SMOKE), "--study", "weak_width", "--weak_widths", "1", "2", "--out",
                   str(tmp_path / "ww"))
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "ww" / "summary.json").read_text())
    assert list(s["phases"]) == ["weak-1", "target-1", "weak-2", "target-2"]
    assert (tmp_path / "ww" / "neurons_1.png").is_file() and (tmp_path / "ww" / "dynamics.png").is_file()
