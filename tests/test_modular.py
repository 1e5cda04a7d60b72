"""exp_modular.py: data, input checks, and a smoke run as a user would run it."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import common
import harness
import exp_modular as em

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke" / "modular.yaml"


@pytest.mark.parametrize("op", em.OPS)
def test_labels_are_right(op):
    p = 7
    d = em.make_data(op, p, 0.5, 0, "cpu")
    x = torch.cat([d["x_train"], d["x_test"]])
    y = torch.cat([d["y_train"], d["y_test"]])
    for (a, b), label in zip(x.tolist(), y.tolist()):
        if op == "add":
            assert label == (a + b) % p
        elif op == "sub":
            assert label == (a - b) % p
        elif op == "mul":
            assert label == (a * b) % p
        else:
            assert b != 0 and (label * b) % p == a  # label = a / b mod p
    pairs = {tuple(v) for v in x.tolist()}
    assert len(pairs) == len(x) == (p * (p - 1) if op == "div" else p * p)  # every pair once


def test_split_sizes_and_determinism():
    d = em.make_data("add", 113, 0.25, 0, "cpu")
    assert len(d["y_train"]) == round(0.25 * 113 ** 2) == 3192 and len(d["y_test"]) == 113 ** 2 - 3192
    train = {tuple(v) for v in d["x_train"].tolist()}
    assert not train & {tuple(v) for v in d["x_test"].tolist()}
    again = em.make_data("add", 113, 0.25, 0, "cpu")
    assert torch.equal(d["x_train"], again["x_train"])
    other = em.make_data("add", 113, 0.25, 1, "cpu")
    assert not torch.equal(d["x_train"], other["x_train"])
    # the model seed does not move the split: the split has its own generator
    torch.manual_seed(123)
    assert torch.equal(em.make_data("add", 113, 0.25, 0, "cpu")["x_train"], d["x_train"])


@pytest.mark.parametrize("flags, words", [
    ({"p": 1}, "p must be >= 2"),
    ({"train_frac": 0.0}, "train_frac must be in (0, 1)"),
    ({"train_frac": 1.0}, "train_frac must be in (0, 1)"),
    ({"train_frac": 0.0001, "p": 7}, "empty train or test set"),
    ({"op": "div", "p": 12}, "needs a prime p"),
    ({"epochs": 0}, "epochs must be positive"),
    ({"width": -3}, "width must be positive"),
    ({"phases": "weak,finetune"}, "phases must be"),
    ({"phases": "groktransfer"}, "needs the 'weak' phase"),
    ({"transfer_at": 1.5}, "transfer_at must be in (0, 1]"),
])
def test_check_rejects_bad_values(flags, words):
    with pytest.raises(common.ConfigError) as e:
        em.check(em.Config(**flags))
    assert words in str(e.value)


def test_resolve_fills_paper_values_per_op():
    add, mul = em.resolve(em.Config(op="add")), em.resolve(em.Config(op="mul"))
    assert (add.gt_init_scale, add.gt_lr, add.gt_wd) == (0.3, 1e-3, 1.0)
    assert (mul.gt_init_scale, mul.gt_lr, mul.gt_wd) == (0.3, 5e-3, 3.0)
    # paper: lr 0.1, see SETTINGS
    assert (add.scratch_init_scale, add.scratch_lr, add.scratch_wd) == (0.1, 1e-2, 2.0)
    assert em.resolve(em.Config(op="mul", gt_lr=0.02)).gt_lr == 0.02  # an explicit value is kept


def test_load_weak_embedding_checks_the_file(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"embedding": torch.randn(11, 4)}, good)
    assert harness.load_weak_embedding(str(good), 11).shape == (11, 4)
    torch.save(torch.randn(10, 4), tmp_path / "shape.pt")
    with pytest.raises(common.ConfigError, match="vocabulary size 10 but p = 11"):
        harness.load_weak_embedding(str(tmp_path / "shape.pt"), 11)
    torch.save({"embedding": [1, 2, 3]}, tmp_path / "list.pt")
    with pytest.raises(common.ConfigError, match="must hold a float tensor"):
        harness.load_weak_embedding(str(tmp_path / "list.pt"), 11)
    (tmp_path / "text.pt").write_text("not a tensor")
    with pytest.raises(common.ConfigError, match="is not a saved tensor"):
        harness.load_weak_embedding(str(tmp_path / "text.pt"), 11)
    with pytest.raises(common.ConfigError, match="not found"):
        harness.load_weak_embedding(str(tmp_path / "missing.pt"), 11)


def run_script(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "exp_modular.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_smoke_run_writes_a_complete_run_directory(tmp_path):
    out = tmp_path / "run"
    r = run_script("--config", str(SMOKE), "--device", "cpu", "--out", str(out))
    assert r.returncode == 0, r.stderr
    for name in ("config.yaml", "metrics.csv", "summary.json", "dynamics.png", "embedding.pt", "models.pt"):
        assert (out / name).is_file(), name
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    smoke = yaml.safe_load(SMOKE.read_text())
    assert cfg["p"] == smoke["p"] and cfg["gt_lr"] == smoke["gt_lr"]
    # left unset in the smoke config: the paper's value, resolved and saved
    assert cfg["gt_init_scale"] == 0.3

    s = json.loads((out / "summary.json").read_text())
    assert s["device"] == "cpu" and s["n_train"] + s["n_test"] == smoke["p"] ** 2
    fields = {"first_epoch_train_95", "first_epoch_test_95", "time_gap", "final_train_acc", "final_test_acc",
              "epochs", "wall_s"}
    assert set(s["phases"]) == {"weak", "groktransfer", "scratch"}
    for phase, band in s["phases"].items():
        ps = band["members"][0]  # one member; the band fields beside it are a band of one
        assert fields <= set(ps) and band["time_gap_median"] == ps["time_gap"], phase
        # summary agrees with metrics.csv
        last = harness.read_metrics(out / "metrics.csv")[phase]["metrics"][-1, 0]
        assert ps["final_test_acc"] == pytest.approx(float(last[common.TEST_ACC]))
        assert ps["epochs"] == (smoke["weak_epochs"] if phase == "weak" else smoke["epochs"])
    # sensible: the targets fit their training set, and the Time Gap is consistent with its epochs
    for phase in ("groktransfer", "scratch"):
        ps = s["phases"][phase]["members"][0]
        assert ps["final_train_acc"] == 1.0
        if ps["time_gap"] is not None:
            assert ps["time_gap"] == ps["first_epoch_test_95"] - ps["first_epoch_train_95"]

    metrics = harness.read_metrics(out / "metrics.csv")
    for phase, d in metrics.items():
        assert np.isfinite(d["metrics"]).all()
        assert d["epochs"][0] == 0 and d["epochs"][-1] == s["phases"][phase]["epochs"]
        assert abs(d["metrics"][-1, 0, 3] - s["phases"][phase]["members"][0]["final_test_acc"]) < 1e-6
    emb = torch.load(out / "embedding.pt", weights_only=True)
    assert emb["embedding"].shape == (smoke["p"], 4)

    # the saved embedding is reused without training the weak model again, and gives the same GT phase
    out2 = tmp_path / "reuse"
    r = run_script("--config", str(SMOKE), "--device", "cpu", "--out", str(out2),
                   "--weak_embedding", str(out / "embedding.pt"), "--phases", "groktransfer")
    assert r.returncode == 0, r.stderr
    s2 = json.loads((out2 / "summary.json").read_text())
    assert list(s2["phases"]) == ["groktransfer"]
    gt, gt2 = (x["phases"]["groktransfer"]["members"][0]["final_test_acc"] for x in (s, s2))
    assert gt2 == pytest.approx(gt, abs=1e-6)


def test_transfer_at_stops_the_weak_model(tmp_path):
    out = tmp_path / "run"
    r = run_script("--config", str(SMOKE), "--device", "cpu", "--out", str(out), "--phases", "weak",
                   "--transfer_at", "0.08", "--weak_epochs", "3000")
    assert r.returncode == 0, r.stderr
    weak = json.loads((out / "summary.json").read_text())["phases"]["weak"]
    assert weak["transfer_target_reached"] and weak["transfer_epoch"][0] < 3000
    assert weak["transfer_test_acc"][0] >= 0.08 and weak["epochs"] == weak["transfer_epoch"][0]


def test_seeds_run_as_members_and_match_single_seed_runs(tmp_path):
    """--seeds 2 trains seeds 0 and 1 together; each member's curve equals that seed run alone."""
    base = ["--config", str(SMOKE), "--device", "cpu", "--weak_epochs", "100", "--epochs", "60", "--quiet"]
    r = run_script(*base, "--seeds", "2", "--out", str(tmp_path / "both"))
    assert r.returncode == 0, r.stderr
    both = harness.read_metrics(tmp_path / "both" / "metrics.csv")
    s = json.loads((tmp_path / "both" / "summary.json").read_text())
    assert len(s["phases"]["groktransfer"]["members"]) == 2 and "time_gap_mean" in s["phases"]["scratch"]
    assert torch.load(tmp_path / "both" / "embedding.pt", weights_only=True)["embedding"].shape == (2, 23, 4)
    for seed in (0, 1):
        r = run_script(*base, "--seed", str(seed), "--out", str(tmp_path / f"s{seed}"))
        assert r.returncode == 0, r.stderr
        alone = harness.read_metrics(tmp_path / f"s{seed}" / "metrics.csv")
        for phase in ("weak", "groktransfer", "scratch"):
            np.testing.assert_allclose(both[phase]["metrics"][:, seed], alone[phase]["metrics"][:, 0],
                                       rtol=1e-4, atol=1e-5)


GRID = ["--config", str(SMOKE), "--device", "cpu", "--grid", "--grid_phase", "scratch", "--grid_init_scales",
        "0.5",
        "--grid_lrs", "1e-2", "3e-2", "--grid_wds", "1", "3", "--grid_stop_at", "0.9", "--quiet"]


def test_grid_shards_merge_into_the_unsharded_grid(tmp_path):
    """Two shards and --merge give the same grid.csv as one run; one point per batch (members 1) so
    every point is computed the same way in both."""
    r = run_script(*GRID, "--members", "1", "--out", str(tmp_path / "all"))
    assert r.returncode == 0, r.stderr
    for i in (0, 1):
        r = run_script(*GRID, "--members", "1", "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}"))
        assert r.returncode == 0, r.stderr
        assert [row["point"] for row in harness.read_grid(tmp_path / f"s{i}" / "grid.csv")] == [i, i + 2]
    r = merge(str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "merged" / "grid.csv").read_text() == (tmp_path / "all" / "grid.csv").read_text()
    rows = harness.read_grid(tmp_path / "all" / "grid.csv")
    # the grid discriminates
    assert len(rows) == 4
    assert {r["status"] for r in rows} >= {"reached", "not_reached"}
    meta, merged = (json.loads((tmp_path / d / "grid.json").read_text()) for d in ("all", "merged"))
    assert meta["best"] == merged["best"] == harness.best_point(rows) and meta["n_points"] == 4
    assert (meta["phase"], meta["threshold"], meta["lrs"]) == ("scratch", 0.9, [1e-2, 3e-2])
    assert (tmp_path / "all" / "grid.png").is_file() and (tmp_path / "merged" / "grid.png").is_file()
    # an incomplete set of shards, or a shard given twice, is refused
    r = merge(str(tmp_path / "s0"), "--out", str(tmp_path / "part"))
    assert r.returncode == 2 and "2 of 4 grid points" in r.stderr and not (tmp_path / "part").exists()
    r = merge(str(tmp_path / "s0"), str(tmp_path / "s0"), "--out", str(tmp_path / "twice"))
    assert r.returncode == 2 and "in both" in r.stderr
    # never over a shard or another run: the target must be new or empty, and the shards stay as they were
    before = (tmp_path / "s0" / "grid.csv").read_bytes()
    for target in ("s0", "all"):
        r = merge(str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / target))
        assert r.returncode == 2 and "already holds files" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert (tmp_path / "s0" / "grid.csv").read_bytes() == before
    r = merge("nowhere", "--out", str(tmp_path / "m"))
    assert r.returncode == 2 and "no grid.csv and grid.json in nowhere" in r.stderr


def merge(*args):
    return subprocess.run([sys.executable, str(ROOT / "harness.py"), "merge", *args], capture_output=True,
                          text=True,
                          cwd=ROOT)


def test_grid_over_groktransfer_trains_the_weak_model_first(tmp_path):
    out = tmp_path / "gt"
    r = run_script("--config", str(SMOKE), "--device", "cpu", "--grid", "--grid_init_scales", "0.3",
                   "--grid_lrs", "1e-2", "--grid_wds", "1", "2", "--epochs", "50", "--quiet",
                   "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "embedding.pt").is_file()
    assert list(json.loads((out / "summary.json").read_text())["phases"]) == ["weak"]
    rows = harness.read_grid(out / "grid.csv")
    assert [(r["init_scale"], r["lr"], r["wd"]) for r in rows] == [(0.3, 1e-2, 1.0), (0.3, 1e-2, 2.0)]
    weak_epochs = yaml.safe_load(SMOKE.read_text())["weak_epochs"]
    assert json.loads((out / "grid.json").read_text())["weak"]["epochs"] == weak_epochs


@pytest.mark.parametrize("args, words", [
    (["--grid", "--shard", "2/2"], "0 <= i < n"),
    (["--shard", "0/2"], "shard needs --grid"),
    (["--grid", "--seeds", "2"], "one seed per point"),
    (["--grid", "--grid_lrs", "0.1", "-1"], "grid_lrs must be"),
    (["--grid", "--grid_phase", "weak"], "'grid_phase' must be one of"),
    (["--grid", "--members", "-1"], "members must be >= 0"),
])
def test_bad_grid_input_exits_2(tmp_path, args, words):
    r = run_script("--config", str(SMOKE), "--out", str(tmp_path / "run"), *args, cwd=tmp_path)
    assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "run").exists()
