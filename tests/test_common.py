"""Unit tests for common.py: each compares against a value computed another way."""
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import common
import harness
import plots
from common import ConfigError


def write_metrics(path, rows):
    harness.write_csv(path, rows, ["phase", "member", "epoch", *common.METRICS])


# ----------------------------------------------------------------------------- config


@dataclass
class Cfg:
    op: str = "add"
    p: int = 113
    lr: float = 1e-3
    stop_at: float | None = None
    deterministic: bool = False
    name: str = ""


CHOICES = {"op": ("add", "mul")}


def test_config_precedence_defaults_file_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("p: 31\nlr: 1e-2   # YAML 1.1 reads this as a string; it must still be a float\nop: mul\n")
    cfg = harness.parse_config(Cfg(), ["--config", str(f), "--lr", "5e-3"], CHOICES)
    assert cfg.p == 31 and cfg.op == "mul"  # from the file
    assert cfg.lr == 5e-3 and isinstance(cfg.lr, float)  # the flag beats the file
    assert harness.parse_config(Cfg(), [], CHOICES) == Cfg()  # defaults untouched
    # flag before --config still wins: precedence does not depend on order
    cfg = harness.parse_config(Cfg(), ["--lr=0.5", "--config", str(f)], CHOICES)
    assert cfg.lr == 0.5


def test_config_type_conversions():
    cfg = harness.parse_config(Cfg(), ["--p", "1e2", "--stop_at", "0.9", "--deterministic"], CHOICES)
    assert cfg.p == 100 and isinstance(cfg.p, int)
    assert cfg.stop_at == 0.9 and cfg.deterministic is True
    cfg = harness.parse_config(Cfg(stop_at=0.5), ["--stop_at", "none", "--deterministic", "false"], CHOICES)
    assert cfg.stop_at is None and cfg.deterministic is False


@pytest.mark.parametrize("argv, words", [
    (["--nope", "1"], ["unknown config key 'nope'", "valid keys", "lr"]),
    (["--p", "1.5"], ["'p'", "int"]),
    (["--p", "abc"], ["'p'", "int"]),
    (["--lr", "fast"], ["'lr'", "float"]),
    (["--op", "pow"], ["'op'", "add, mul"]),
    (["--deterministic", "maybe"], ["'deterministic'", "bool"]),
    (["--lr"], ["'lr' needs a value"]),
    (["stray"], ["unexpected argument 'stray'"]),
    (["--config", "/no/such/file.yaml"], ["config file not found"]),
])
def test_config_errors_name_the_problem(argv, words):
    with pytest.raises(ConfigError) as e:
        harness.parse_config(Cfg(), argv, CHOICES)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("p: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        harness.parse_config(Cfg(), ["--config", str(bad)], CHOICES)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("width: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'width'"):
        harness.parse_config(Cfg(), ["--config", str(unknown)], CHOICES)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("p: true\n")
    with pytest.raises(ConfigError, match="'p' expects int"):
        harness.parse_config(Cfg(), ["--config", str(wrong)], CHOICES)


# ----------------------------------------------------------------------------- models


def test_default_init_matches_pytorch_bounds():
    gen = torch.Generator().manual_seed(0)
    w = common.linear_init(gen, 64, (64, 4000), 0.3)
    bound = 0.3 / math.sqrt(64)
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound  # uniform up to the bound
    ref = torch.nn.Linear(64, 4000, bias=False).weight
    assert abs(w.std() / 0.3 - ref.std()) < 0.02 * ref.std()  # same spread as nn.Linear's default
    e = common.embedding_init(gen, (200, 200), 2.0)
    assert abs(e.std() - 2.0) < 0.05  # nn.Embedding's N(0, 1), times the scale


def test_factored_embedding_equals_dense_product_and_trains_both_factors():
    torch.manual_seed(0)
    weak = torch.randn(7, 3)
    emb = common.factored_embedding(weak, vocab=7, d_target=5, init_scales=[1.0, 0.5], seeds=[1, 2])
    table = emb.table()  # (2, 7, 5)
    for k in range(2):
        A, B = emb.A[k].detach(), emb.B[k].detach()
        dense = torch.tensor([[sum(float(A[i, r]) * float(B[r, j]) for r in range(3)) for j in range(5)]
                              for i in range(7)])
        torch.testing.assert_close(table[k], dense, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(emb.A[k], weak)  # A starts as the weak embedding, unscaled
    x = torch.randn(4, 7)
    torch.testing.assert_close(emb.project(x), x @ table, rtol=1e-5, atol=1e-5)
    (table ** 2).sum().backward()
    assert emb.A.grad.abs().sum() > 0 and emb.B.grad.abs().sum() > 0
    assert emb.B[0].abs().max() <= 1 / math.sqrt(3) and emb.B[1].abs().max() <= 0.5 / math.sqrt(3)


def test_factored_embedding_shape_errors():
    with pytest.raises(ConfigError, match="vocabulary 7 but the task needs 9"):
        common.factored_embedding(torch.randn(7, 3), vocab=9, d_target=5, init_scales=1.0, seeds=[0])
    with pytest.raises(ConfigError, match="weak embedding must be"):
        common.factored_embedding(torch.randn(3, 7, 3), vocab=7, d_target=5, init_scales=1.0, seeds=[0])
    with pytest.raises(ValueError, match="FactoredEmbedding needs"):
        common.FactoredEmbedding(torch.randn(1, 7, 3), torch.randn(1, 4, 5))


def test_token_mlp_matches_a_plain_torch_forward():
    model = common.token_mlp(vocab=11, n_tokens=2, d_embed=3, widths=[8, 6], n_out=11,
                             init_scales=[1.0, 0.2], seeds=[3, 4])
    x = torch.randint(0, 11, (20, 2))
    out = model(x)  # (2, 20, 11)
    for k in range(2):
        E = model.embed.weight[k]
        h = torch.cat([E[x[:, 0]], E[x[:, 1]]], 1)
        h = torch.relu(h @ model.layers[0][k])
        h = torch.relu(h @ model.layers[1][k])
        torch.testing.assert_close(out[k], h @ model.layers[2][k])


def test_member_init_depends_only_on_its_seed_and_scale():
    a = common.token_mlp(11, 2, 3, [8], 11, [1.0, 0.5, 2.0], [0, 1, 2])
    b = common.token_mlp(11, 2, 3, [8], 11, [0.5], [1])
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa[1], pb[0])


# ----------------------------------------------------------------------------- optimiser and training


def test_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    w0 = torch.randn(2, 5, 4)
    ours = torch.nn.Parameter(w0.clone())
    refs = [torch.nn.Parameter(w0[k].clone()) for k in range(2)]
    opt = common.AdamW([ours], lr=[1e-2, 3e-3], wd=[1.0, 0.1], betas=(0.9, 0.98), eps=1e-8)
    ref_opts = [torch.optim.AdamW([refs[0]], lr=1e-2, weight_decay=1.0, betas=(0.9, 0.98), eps=1e-8,
                                  foreach=False),
                torch.optim.AdamW([refs[1]], lr=3e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-8,
                                  foreach=False)]
    for step in range(20):
        target = torch.randn(5, 4)
        ours.grad = None
        ((ours - target) ** 3).sum().backward()
        opt.step()
        for r, o in zip(refs, ref_opts):
            o.zero_grad()
            ((r - target) ** 3).sum().backward()
            o.step()
    for k in range(2):
        torch.testing.assert_close(ours[k], refs[k], rtol=1e-5, atol=1e-6)


def _data(p=13, seed=0):
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).T
    x, y = torch.stack([a, b], 1), (a + b) % p
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:100], perm[100:]
    return dict(x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te])


def test_k_members_train_like_each_alone():
    data = _data()
    scales, lrs, wds, seeds = [1.0, 0.5, 2.0], [1e-2, 3e-3, 5e-2], [1.0, 0.0, 0.1], [0, 1, 2]
    together = common.token_mlp(13, 2, 4, [16], 13, scales, seeds)
    h = common.train(together, data, epochs=60, lr=lrs, wd=wds, eval_every=10, quiet=True)
    assert h["metrics"].shape == (len(h["epochs"]), 3, 5)
    for k in range(3):
        alone = common.token_mlp(13, 2, 4, [16], 13, [scales[k]], [seeds[k]])
        ha = common.train(alone, data, epochs=60, lr=lrs[k], wd=wds[k], eval_every=10, quiet=True)
        np.testing.assert_allclose(h["metrics"][:, k], ha["metrics"][:, 0], rtol=1e-4, atol=1e-5)
        for pt, pa in zip(together.parameters(), alone.parameters()):
            torch.testing.assert_close(pt[k], pa[0], rtol=1e-4, atol=1e-5)
    # members do learn (otherwise the comparison above would be trivial)
    assert (h["metrics"][-1, :, 0] < h["metrics"][0, :, 0]).all()


def test_stop_at_freezes_a_member_and_ends_when_all_stopped():
    data = _data()
    data = dict(data, x_test=data["x_train"], y_test=data["y_train"])  # test = train: a reachable target
    model = common.token_mlp(13, 2, 4, [32], 13, [1.0, 1.0], [0, 1])
    h = common.train(model, data, epochs=300, lr=[3e-2, 0.0], wd=0.0, eval_every=5, stop_at=0.9, quiet=True)
    stop = h["stop_epoch"][0]
    assert stop > 0 and h["stop_epoch"][1] == -1  # member 1 (lr 0) never gets there
    assert h["epochs_run"] == 300  # member 1 keeps the phase going
    after = h["metrics"][h["epochs"] >= stop, 0]
    assert (after == after[0]).all()  # member 0 frozen from its stop epoch on
    assert common.member_summary(h, 0)["stopped_at"] == stop
    # when every member has stopped, the phase ends there
    model = common.token_mlp(13, 2, 4, [32], 13, [1.0, 1.0], [0, 1])
    h = common.train(model, data, epochs=300, lr=3e-2, wd=0.0, eval_every=5, stop_at=0.9, quiet=True)
    assert (h["stop_epoch"] > 0).all() and h["epochs_run"] == h["stop_epoch"].max() < 300


def test_a_stopped_member_stays_frozen_while_others_train():
    data = _data()
    model = common.token_mlp(13, 2, 4, [32], 13, [1.0, 1.0], [0, 1])
    # member 0 gets lr 5e-2 and reaches train acc quickly; stop on *test* acc is hard to predict, so
    # freeze through the optimiser's active mask directly and check the masked update path
    opt = common.AdamW(model.parameters(), lr=[5e-2, 5e-2], wd=[0.0, 0.0])
    opt.active[:] = torch.tensor([False, True])
    opt.all_active = False
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        model.zero_grad()
        common.cross_entropy(model(data["x_train"]), data["y_train"]).sum().backward()
        opt.step()
    for b, p in zip(before, model.parameters()):
        torch.testing.assert_close(b[0], p[0])
        assert not torch.equal(b[1], p[1])


def test_a_nan_member_is_marked_failed_and_does_not_touch_the_others():
    data = _data()
    model = common.token_mlp(13, 2, 4, [16], 13, [1.0, 1.0], [0, 1])
    with torch.no_grad():
        model.layers[0][0, 0, 0] = float("nan")
    h = common.train(model, data, epochs=30, lr=1e-2, wd=0.1, eval_every=10, quiet=True)
    assert h["failed_epoch"].tolist() == [0, -1] and not h["diverged"]
    alone = common.token_mlp(13, 2, 4, [16], 13, [1.0], [1])
    ha = common.train(alone, data, epochs=30, lr=1e-2, wd=0.1, eval_every=10, quiet=True)
    np.testing.assert_allclose(h["metrics"][:, 1], ha["metrics"][:, 0], rtol=1e-4, atol=1e-5)
    s = common.member_summary(h, 0)
    assert s["diverged_at"] == 0 and s["final_train_acc"] is None


def test_plot_reports_nan_instead_of_drawing_it(tmp_path):
    data = _data()
    model = common.token_mlp(13, 2, 4, [16], 13, [1.0], [0])
    h = common.train(model, data, epochs=20, lr=1e-2, wd=0.1, eval_every=5, quiet=True)
    h["metrics"][3:, 0, :] = np.nan  # as if the loss blew up at the 4th evaluation
    write_metrics(tmp_path / "metrics.csv", harness.history_rows("scratch", h))
    d = harness.read_metrics(tmp_path / "metrics.csv")["scratch"]
    note = plots.panel_note(d["epochs"], d["metrics"])
    assert f"NaN/inf from epoch {h['epochs'][3]} (1 of 1 members)" in note
    assert plots.plot_dynamics(tmp_path).is_file()  # draws the finite part without failing


def test_all_members_nan_stops_the_phase():
    data = _data()
    model = common.token_mlp(13, 2, 4, [16], 13, [1.0], [0])
    with torch.no_grad():
        model.embed.weight[0, 0, 0] = float("inf")
    h = common.train(model, data, epochs=100, lr=1e-2, wd=0.1, eval_every=10, quiet=True)
    assert h["diverged"] and h["epochs_run"] == 0


def test_evaluation_schedule():
    data = _data()
    model = common.token_mlp(13, 2, 4, [8], 13, [1.0], [0])
    h = common.train(model, data, epochs=45, lr=1e-3, wd=0.0, eval_every=10, quiet=True)
    assert h["epochs"].tolist() == [0, 1, 2, 4, 8, 10, 20, 30, 40, 45]


# ----------------------------------------------------------------------------- metrics


def test_first_epoch_and_time_gap():
    ep = np.array([0, 10, 20, 30, 40, 50])
    train = np.array([0.0, 0.5, 0.96, 1.0, 1.0, 1.0])
    test = np.array([0.0, 0.0, 0.1, 0.2, 0.95, 1.0])
    assert common.first_epoch(ep, train, 0.95) == 20
    assert common.first_epoch(ep, test, 0.95) == 40  # >= counts
    assert common.time_gap(ep, train, test) == 20
    assert common.inverse_time_gap(20) == 1 / 20


def test_time_gap_edge_cases():
    ep = np.array([0, 10, 20])
    assert common.time_gap(ep, [0, 1, 1], [0, 0.5, 0.9]) is None  # test never reaches 95%
    assert common.time_gap(ep, [0, 0.9, 0.94], [0, 0.96, 1]) is None  # train never reaches 95%
    assert common.inverse_time_gap(None) == 0.0  # the paper's convention
    assert common.time_gap(ep, [0, 1, 1], [0, 1, 1]) == 0  # together, at the evaluation resolution
    assert common.inverse_time_gap(0) == 1.0
    assert common.time_gap(ep, [0, 0.5, 1], [0, 1, 1]) == -10  # test first: the gap is negative
    assert common.first_epoch(ep, [np.nan, np.nan, np.nan], 0.5) is None


def test_summary_and_metrics_round_trip(tmp_path):
    data = _data()
    model = common.token_mlp(13, 2, 4, [16], 13, [1.0, 0.5], [0, 1])
    h = common.train(model, data, epochs=20, lr=1e-2, wd=0.1, eval_every=5, quiet=True)
    rows = harness.history_rows("weak", h)
    write_metrics(tmp_path / "metrics.csv", rows)
    back = harness.read_metrics(tmp_path / "metrics.csv")["weak"]
    np.testing.assert_array_equal(back["epochs"], h["epochs"])
    np.testing.assert_allclose(back["metrics"], h["metrics"], rtol=1e-6)
    s = common.summarize(h)
    assert len(s["members"]) == 2 and s["members"][1]["epochs"] == 20
    accs = [m["final_test_acc"] for m in s["members"]]
    assert s["final_test_acc_mean"] == pytest.approx(np.mean(accs))
    assert s["final_test_acc_std"] == pytest.approx(np.std(accs))
    torch.testing.assert_close(torch.tensor(h["metrics"][-1, :, 4]), common.weight_norm(model),
                               rtol=1e-5, atol=1e-6)
    png = plots.plot_dynamics(tmp_path)
    assert png.stat().st_size > 10_000


def test_summarize_members_gives_the_seed_band_and_counts_never_reached_as_zero_inverse_gap():
    runs = [(10, 1.0, 40, 50), (30, 0.99, 20, 50), (None, 0.2, 30, None), (50, 1.0, 10, 60)]
    members = [dict(time_gap=g, inverse_time_gap=common.inverse_time_gap(g), final_train_acc=1.0,
                    final_test_acc=a,
                    first_epoch_train_95=tr, first_epoch_test_95=te,
                    epochs=100, wall_s=1.0) for g, a, tr, te in runs]
    s = common.summarize_members(members)
    assert s["time_gap_mean"] == 30
    assert s["n_reached_train_and_test_95"] == 3
    assert s["fraction_reached_test_95"] == 0.75
    assert (s["time_gap_median"], s["time_gap_min"], s["time_gap_max"]) == (30, 10, 50)
    # median of an even count
    assert (s["first_epoch_train_95_median"], s["first_epoch_test_95_min"]) == (25, 50)
    assert s["inverse_time_gap_mean"] == pytest.approx((1 / 10 + 1 / 30 + 0 + 1 / 50) / 4)


def test_write_atomic_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "summary.json"
    harness.write_atomic(path, "old")

    with pytest.raises(TypeError):
        harness.write_atomic(path, object())  # fails in the middle of the write
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary left behind


def test_panel_note_lists_each_members_time_gap():
    ep = np.array([0, 10, 20, 30])
    m = np.zeros((4, 2, 5))
    m[:, 0, 1], m[:, 0, 3] = [0, 1, 1, 1], [0, 0, 1, 1]  # gap 10
    m[:, 1, 1], m[:, 1, 3] = [0, 1, 1, 1], [0, 0, 0, 0.5]  # never
    assert plots.panel_note(ep, m[:, :1]) == "Time Gap 10"
    assert plots.panel_note(ep, m) == "Time Gap per member: 10, -"


# ----------------------------------------------------------------------------- list config, grid search


@dataclass
class GridCfg:
    lrs: list[float] = None
    dirs: list[str] = None
    seed: int = 0


def test_list_config_fields_take_yaml_lists_commas_and_several_values(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lrs: [1e-3, 0.5]\ndirs: [a, b]\n")
    assert harness.parse_config(GridCfg(), ["--config", str(f)]).lrs == [1e-3, 0.5]
    cfg = harness.parse_config(GridCfg(), ["--lrs", "1e-4", "2", "--dirs", "x", "y", "z", "--seed", "3"])
    assert cfg.lrs == [1e-4, 2.0] and cfg.dirs == ["x", "y", "z"] and cfg.seed == 3
    assert harness.parse_config(GridCfg(), ["--lrs=1e-2,0.1"]).lrs == [1e-2, 0.1]
    with pytest.raises(ConfigError, match="'lrs' expects float"):
        harness.parse_config(GridCfg(), ["--lrs", "1e-3", "fast"])


def test_grid_points_and_shards():
    points = harness.grid_points(**harness.PAPER_GRID)
    assert len(points) == 16 * 8 * 9 == 1152
    assert [p["point"] for p in points] == list(range(1152))
    assert (points[0]["init_scale"], points[0]["lr"], points[0]["wd"]) == (0.05, 1e-4, 1e-4)
    assert (points[1]["wd"], points[9]["lr"], points[72]["init_scale"]) == (1e-3, 5e-4, 0.1)  # wd fastest
    grid = harness.PAPER_GRID
    assert {(p["init_scale"], p["lr"], p["wd"]) for p in points} == {
        (c, l, w) for c in grid["init_scales"] for l in grid["lrs"] for w in grid["wds"]}
    assert harness.parse_shard("") == (0, 1) and harness.parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "-1/3", "1", "a/b", "1/0"):
        with pytest.raises(ConfigError, match="shard"):
            harness.parse_shard(bad)
    shards = [points[i::3] for i in range(3)]
    assert sorted(p["point"] for s in shards for p in s) == list(range(1152))


def test_compacting_frozen_members_changes_nothing_but_the_cost():
    """train(compact=True) drops members once half have stopped; the history must be the same."""
    data = _data()
    data = dict(data, x_test=data["x_train"], y_test=data["y_train"])  # a reachable stop_at
    lrs = [5e-2, 3e-2, 2e-2, 1e-4]  # the last one never reaches 0.9
    runs = []
    for compact in (False, True):
        model = common.token_mlp(13, 2, 4, [32], 13, 1.0, [0, 1, 2, 3])
        runs.append((model, common.train(model, data, epochs=200, lr=lrs, wd=0.0, eval_every=5, stop_at=0.9,
                                         quiet=True, compact=compact)))
    (full, a), (small, b) = runs
    assert (a["stop_epoch"][:3] > 0).all() and a["stop_epoch"][3] == -1
    np.testing.assert_array_equal(a["stop_epoch"], b["stop_epoch"])
    np.testing.assert_array_equal(a["epochs"], b["epochs"])
    np.testing.assert_allclose(a["metrics"], b["metrics"], rtol=1e-4, atol=1e-5)
    assert common.n_members(full) == 4 and common.n_members(small) == 1  # only the unfinished one is left
    for pf, ps in zip(full.parameters(), small.parameters()):
        torch.testing.assert_close(pf[3:], ps, rtol=1e-4, atol=1e-5)


def _tiny_grid(**kw):
    data = _data()
    data = dict(data, x_test=data["x_train"], y_test=data["y_train"])
    points = harness.grid_points([1.0, 0.5], [3e-2, 1e-4, 1e30], [0.0])  # lr 1e-4: too slow; 1e30: blows up

    def build(scales):
        return common.token_mlp(13, 2, 4, [32], 13, scales, [0] * len(scales))
    return harness.run_grid(points, build, data, epochs=150, threshold=0.9, eval_every=5, quiet=True, **kw)


def test_grid_marks_diverged_points_and_keeps_the_others_running():
    rows, K = _tiny_grid(members=6)
    assert K == 6 and [r["point"] for r in rows] == list(range(6))
    status = {(r["init_scale"], r["lr"]): r["status"] for r in rows}
    assert status[(1.0, 1e30)] == status[(0.5, 1e30)] == "diverged"
    assert status[(1.0, 3e-2)] == "reached" and status[(1.0, 1e-4)] == "not_reached"
    for r in rows:
        if r["status"] == "reached":
            assert r["first_epoch_test_90"] == r["epochs_run"] and r["final_test_acc"] >= 0.9
        if r["status"] == "not_reached":
            assert r["first_epoch_test_90"] is None and r["epochs_run"] == 150
    # the same points trained one at a time give the same table
    alone, _ = _tiny_grid(members=1)
    for r, s in zip(rows, alone):
        assert (r["status"], r["first_epoch_test_90"],
                r["epochs_run"]) == (s["status"], s["first_epoch_test_90"], s["epochs_run"])


def test_best_point_grid_csv_round_trip_and_heatmap(tmp_path):
    rows, _ = _tiny_grid(members=3)
    best = harness.best_point(rows)
    reached = [r for r in rows if r["status"] == "reached"]
    assert best["first_epoch_test_90"] == min(r["first_epoch_test_90"] for r in reached)
    harness.write_grid(tmp_path / "grid.csv", rows)
    back = harness.read_grid(tmp_path / "grid.csv")
    assert back == sorted(rows, key=lambda r: r["point"])
    assert plots.plot_grid(back, tmp_path / "grid.png", "t").stat().st_size > 1000
    none = [dict(r, status="not_reached", first_epoch_test_90=None) for r in rows]
    assert harness.best_point(none) is None
    assert plots.plot_grid(none, tmp_path / "none.png", "t").is_file()  # nothing reached: still a figure


def test_best_point_breaks_ties_by_test_loss_then_point():
    base = dict(init_scale=1.0, lr=1e-3, wd=1.0, first_epoch_test_99=50, first_epoch_train_95=10,
                first_epoch_test_95=40, time_gap=30, final_train_acc=1.0, final_test_acc=0.99, epochs_run=50,
                status="reached")
    rows = [dict(base, point=0, final_test_loss=0.3), dict(base, point=1, final_test_loss=0.1),
            dict(base, point=2, final_test_loss=0.1),
            dict(base, point=3, final_test_loss=0.0, first_epoch_test_99=60)]
    assert harness.best_point(rows)["point"] == 1


def test_exactly_95_percent_counts_the_same_from_memory_and_from_metrics_csv(tmp_path):
    acc = np.array([0.5, 190 / 200, 1.0], dtype=np.float32)  # float32 0.95 is 0.94999998...
    h = dict(epochs=np.array([0, 10, 20]),
             metrics=np.stack([np.stack([[1, a, 1, a, 1]]) for a in acc]).astype(np.float32))
    write_metrics(tmp_path / "metrics.csv", harness.history_rows("x", h))
    back = harness.read_metrics(tmp_path / "metrics.csv")["x"]["metrics"][:, 0, 1]  # float64 from text
    assert common.first_epoch(h["epochs"], acc, 0.95) == common.first_epoch(h["epochs"], back, 0.95) == 10


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_run_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    """Not mkstemp's 0600: a run directory on a shared disk stays readable by the group."""
    import os
    old = os.umask(umask)
    try:
        harness.write_atomic(tmp_path / "metrics.csv", "a,b\n")
        harness.save_json({"x": 1}, tmp_path / "summary.json")
    finally:
        os.umask(old)
    for name in ("metrics.csv", "summary.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode


def test_grid_out_of_memory_halves_the_batch_and_finishes(capsys):
    """A CUDA out-of-memory error in a grid batch halves K and retries that batch; every point ends in the
    table, as trained without the error. The error is raised by `build` for batches above 3 members."""
    sizes = []

    def build(scales):
        sizes.append(len(scales))
        if len(scales) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return common.token_mlp(13, 2, 4, [32], 13, scales, [0] * len(scales))

    data = _data()
    data = dict(data, x_test=data["x_train"], y_test=data["y_train"])
    points = harness.grid_points([1.0, 0.5], [3e-2, 1e-4, 1e30], [0.0])
    rows, K = harness.run_grid(points, build, data, epochs=150, threshold=0.9, eval_every=5, members=6)
    assert sizes == [6, 3, 3] and K == 3 and "retrying with 3 members" in capsys.readouterr().err
    expected, _ = _tiny_grid(members=3)  # the batches it fell back to, run without the error
    assert rows == expected


def test_bf16_phase_trains_like_float32():
    """bf16 autocasts the forward pass of a whole phase. Autocast caches each weight's bf16 copy until
    its region exits, which would freeze the forward pass at the initial weights: the cache is off."""
    data = _data(23)
    final = {}
    for precision in ("float32", "bf16"):
        model = common.token_mlp(23, 2, 8, [32], 23, 1.0, [0])
        h = common.train(model, data, epochs=100, lr=1e-2, wd=0.1, eval_every=10, quiet=True,
                         precision=precision)
        final[precision] = h["metrics"][-1, 0]
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert final["bf16"][common.TRAIN_ACC] > 0.9  # with the cache: 7% (the loss stays near log 23)
    assert final["bf16"][common.TRAIN_LOSS] < 1.5 * final["float32"][common.TRAIN_LOSS]
