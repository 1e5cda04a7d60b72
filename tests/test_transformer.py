"""common.Transformer, exp_transformer.GrokFast and exp_transformer.py: shapes, the causal mask,
attention against a hand-written one, the GrokFast filter against a hand computation, resume with
GrokFast state, and a smoke run as a user would run it."""
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
import exp_modular
import exp_transformer as et

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke" / "transformer.yaml"


def tiny(K=1, weak=None, seeds=None, **kw):
    shape = dict(n_layers=2, d_model=16, d_mlp=24, n_heads=2, d_head=8)
    shape.update(kw)
    return common.transformer(11, 5, 7, **shape, init_scales=1.0, seeds=seeds or list(range(K)), weak=weak)


def test_shapes_and_members_are_independent_models():
    x = torch.randint(0, 11, (6, 5))
    two = tiny(K=2, seeds=[3, 4])
    assert two(x).shape == (2, 6, 7) and two(x, all_positions=True).shape == (2, 6, 5, 7)
    for k, seed in enumerate([3, 4]):  # member k of a K = 2 model is the one-member model of its seed
        torch.testing.assert_close(two(x)[k], tiny(seeds=[seed])(x)[0])
    torch.testing.assert_close(two(x, all_positions=True)[:, :, -1], two(x))


def test_causal_mask_position_t_sees_only_tokens_up_to_t():
    model = tiny()
    x = torch.randint(0, 11, (4, 5))
    base = model(x, all_positions=True)
    for t in range(5):
        changed = x.clone()
        changed[:, t] = (changed[:, t] + 1) % 11
        out = model(changed, all_positions=True)
        torch.testing.assert_close(out[:, :, :t], base[:, :, :t])  # earlier positions cannot see token t
        assert not torch.allclose(out[:, :, t:], base[:, :, t:])  # position t and later do


@pytest.mark.parametrize("layer_norm", [False, True])
def test_forward_matches_a_hand_written_transformer(layer_norm):
    """Token + position embedding, then per layer h += softmax(q k^T / sqrt(d_head), causal) v W_O
    (heads concatenated) and h += W_out relu(W_in h + b_in) + b_out; logits W_U h[-1]. With
    layer_norm, attention and MLP read LN(h) (pre-LN) and the unembedding reads LN(h)."""
    model = tiny(n_layers=2, n_heads=2, d_head=8, layer_norm=layer_norm)
    if layer_norm:  # gains and biases away from 1 and 0, so that a wrong use would show
        with torch.no_grad():
            for name, prm in model.named_parameters():
                if "ln" in name:
                    prm.add_(0.3 * torch.randn_like(prm))
    x = torch.randint(0, 11, (3, 5))
    H, dh = 2, 8

    def ln(h, w, b):
        centred = h - h.mean(-1, keepdim=True)
        return centred / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5) * w[0] + b[0]

    for i in range(3):
        h = model.embed.weight[0, x[i]] + model.pos[0]  # (T, d)
        for b in model.blocks:
            w_qkv = b["w_qkv"][0]
            a = ln(h, b["ln1_w"], b["ln1_b"]) if layer_norm else h
            heads = []
            for j in range(H):  # columns of w_qkv: [q | k | v], each H * d_head, head-major
                q = a @ w_qkv[:, j * dh:(j + 1) * dh]
                k = a @ w_qkv[:, H * dh + j * dh:H * dh + (j + 1) * dh]
                v = a @ w_qkv[:, 2 * H * dh + j * dh:2 * H * dh + (j + 1) * dh]
                scores = q @ k.T / math.sqrt(dh) + torch.triu(torch.full((5, 5), -math.inf), 1)
                heads.append(torch.softmax(scores, -1) @ v)
            h = h + torch.cat(heads, -1) @ b["w_o"][0]
            a = ln(h, b["ln2_w"], b["ln2_b"]) if layer_norm else h
            h = h + torch.relu(a @ b["w_in"][0] + b["b_in"][0]) @ b["w_out"][0] + b["b_out"][0]
        if layer_norm:
            h = ln(h, model.ln_f["w"], model.ln_f["b"])
        torch.testing.assert_close(model(x)[0, i], h[-1] @ model.unembed[0], rtol=1e-4, atol=1e-4)


def test_init_scale_scales_every_parameter_and_factored_embedding_trains_A():
    one = common.transformer(11, 5, 7, n_layers=1, d_model=16, d_mlp=24, n_heads=2, d_head=8,
                             init_scales=1.0, seeds=[0])
    half = common.transformer(11, 5, 7, n_layers=1, d_model=16, d_mlp=24, n_heads=2, d_head=8,
                              init_scales=0.5, seeds=[0])
    for a, b in zip(one.parameters(), half.parameters()):
        torch.testing.assert_close(b, 0.5 * a)
    bound = 1 / math.sqrt(16)
    assert one.blocks[0]["w_in"].abs().max() <= bound and one.blocks[0]["w_in"].abs().max() > 0.9 * bound
    A = torch.randn(11, 3)
    gt = tiny(weak=A)
    assert isinstance(gt.embed, common.FactoredEmbedding)
    torch.testing.assert_close(gt.embed.table()[0], A @ gt.embed.B[0])
    gt(torch.randint(0, 11, (4, 5))).sum().backward()
    assert gt.embed.A.grad.abs().sum() > 0 and gt.embed.B.grad.abs().sum() > 0


def test_grokfast_filter_two_steps_by_hand():
    """h starts as the first gradient; then h = alpha h + (1 - alpha) g; the step uses g + lamb h."""
    p = torch.nn.Parameter(torch.zeros(1, 2))
    f = et.GrokFast(alpha=0.9, lamb=2.0)
    p.grad = torch.tensor([[1.0, -2.0]])
    f.apply([p])
    torch.testing.assert_close(p.grad, torch.tensor([[3.0, -6.0]]))  # g1 + 2 g1
    p.grad = torch.tensor([[4.0, 0.0]])
    f.apply([p])
    h2 = torch.tensor([[0.9 * 1 + 0.1 * 4, 0.9 * -2 + 0.1 * 0]])  # [1.3, -1.8]
    torch.testing.assert_close(f.h[0], h2)
    torch.testing.assert_close(p.grad, torch.tensor([[4.0, 0.0]]) + 2 * h2)  # [6.6, -3.6]
    with pytest.raises(common.ConfigError):
        et.GrokFast(alpha=1.0)


def test_train_with_grokfast_changes_the_path_and_lamb_0_does_not():
    data = exp_modular.make_data("add", 11, 0.5, 0, "cpu")
    runs = {}
    for name, gf in [("plain", None), ("lamb0", (0.98, 0.0)), ("grokfast", (0.98, 2.0))]:
        model = common.transformer(11, 2, 11, n_layers=1, d_model=16, d_mlp=32, n_heads=2, d_head=8,
                                   init_scales=1.0, seeds=[0])
        runs[name] = common.train(model, data, epochs=30, lr=1e-3, wd=0.1, eval_every=10, quiet=True,
                                  grad_filter=et.GrokFast(*gf) if gf else None)
    np.testing.assert_allclose(runs["plain"]["metrics"], runs["lamb0"]["metrics"], rtol=1e-5)
    assert not np.allclose(runs["plain"]["metrics"][-1], runs["grokfast"]["metrics"][-1])


def test_resume_with_grokfast_equals_one_straight_run(tmp_path):
    """The EMA state is part of the checkpoint: 20 epochs = 10 epochs + resume to 20."""
    data = exp_modular.make_data("add", 11, 0.5, 0, "cpu")

    def model():
        return common.transformer(11, 2, 11, n_layers=1, d_model=16, d_mlp=32, n_heads=2, d_head=8,
                                  init_scales=1.0, seeds=[0, 1])
    kw = dict(lr=3e-3, wd=0.1, eval_every=5, quiet=True)
    straight = common.train(model(), data, epochs=20, grad_filter=et.GrokFast(0.9, 2.0), **kw)
    class FirstOnly(harness.Checkpoint):  # keeps the epoch-10 checkpoint, as if the run died after it
        def save(self, state):
            if not self.path.exists():
                super().save(state)
    common.train(model(), data, epochs=20, ckpt=FirstOnly(tmp_path / "ck.pt", every=10),
                 grad_filter=et.GrokFast(0.9, 2.0), **kw)
    ck = harness.Checkpoint(tmp_path / "ck.pt", every=10, resume=True)
    assert ck.load()["epoch"] == 10 and ck.load()["opt"]["grad_filter"] is not None
    resumed = common.train(model(), data, epochs=20, ckpt=ck, grad_filter=et.GrokFast(0.9, 2.0), **kw)
    np.testing.assert_array_equal(straight["epochs"], resumed["epochs"])
    np.testing.assert_allclose(straight["metrics"], resumed["metrics"], rtol=1e-6)
    assert len(resumed["compute_s"]) == len(resumed["epochs"]) and np.all(np.diff(resumed["compute_s"]) >= 0)


def test_compute_time_excludes_evaluation_and_feeds_the_summary():
    data = exp_modular.make_data("add", 11, 0.5, 0, "cpu")
    data = dict(data, x_test=data["x_train"], y_test=data["y_train"])  # reachable 99%
    model = common.token_mlp(11, 2, 8, [64], 11, 1.0, [0])
    hist = common.train(model, data, epochs=300, lr=3e-2, wd=0.0, eval_every=10, quiet=True)
    s = common.summarize(hist)["members"][0]
    assert s["first_epoch_test_99"] is not None
    i = list(hist["epochs"]).index(s["first_epoch_test_99"])
    assert s["compute_s_to_test_99"] == round(float(hist["compute_s"][i]), 3)
    assert 0 < hist["compute_s"][-1] < hist["wall_s"] and hist["eval_s"] > 0


def test_flops_count_of_the_paper_model():
    """Without the attention-score terms, our count per token is 6 N, Kaplan et al.'s
    N = 2 d_model n_layer (2 d_attn + d_mlp) with d_attn = n_heads d_head = 512 (Fig 6's model)."""
    N = 2 * 512 * 8 * (2 * 512 + 512)
    assert common.transformer_flops(1, 8, 512, 512, 4, 128, 0, 0, 0) == 6 * N
    # scores and mixing: 2 n_ctx d_attn multiply-adds per token and layer; unembedding per sequence
    flops = common.transformer_flops(10, 1, 4, 8, 1, 4, 2, 3, 5)
    assert flops == 6 * (10 * (4 * 12 + 16 + 64 + 16) + 5 * 4 * 3)


def test_smoke_run_writes_every_phase_and_table1(tmp_path):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "exp_transformer.py"), "--config", str(SMOKE),
                        "--out", str(run)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads((run / "summary.json").read_text())
    assert list(s["phases"]) == ["weak", "groktransfer", "scratch", "grokfast"]
    assert s["device"] == "cpu" and s["flops_per_epoch"] > 0
    assert [row["phase"] for row in s["table1"]][:4] == ["weak", "groktransfer", "scratch", "grokfast"]
    weak = s["table1"][0]
    member = s["phases"]["weak"]["members"][0]
    assert weak["ms"] == pytest.approx(1e3 * member["compute_s"], abs=0.2)
    assert weak["epochs"] == (member["stopped_at"] or member["epochs"])
    metrics = harness.read_metrics(run / "metrics.csv")
    assert list(metrics) == ["weak", "groktransfer", "scratch", "grokfast"]
    for phase in ("groktransfer", "scratch", "grokfast"):
        m = metrics[phase]["metrics"][:, 0]  # (E, 5)
        assert metrics[phase]["epochs"][-1] == 100 and m[-1, 0] < m[0, 0]  # trained: train loss fell
    emb = torch.load(run / "embedding.pt")["embedding"]
    assert emb.shape == (23, 4)
    models = torch.load(run / "models.pt")
    assert models["groktransfer"]["embed.A"].shape == (1, 23, 4)
    assert (run / "dynamics.png").stat().st_size > 10_000 and "Table 1" in r.stdout


def test_random_ab_control_draws_its_own_a_per_seed_and_trains_it(tmp_path):
    """Fig 15(a)'s control: A is N(0, 1) times GrokTransfer's init scale, one draw per seed, not the weak
    embedding; the phase runs without a weak model and trains both factors."""
    cfg = et.resolve(et.Config(p=113, gt_init_scale=0.6))
    A = et.random_a(cfg, [0, 1])
    assert A.shape == (2, 113, 4) and not torch.equal(A[0], A[1])
    assert torch.equal(et.random_a(cfg, [0])[0], A[0])  # member 0's draw does not depend on the others
    assert float(A.std()) == pytest.approx(0.6, rel=0.1)
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "exp_transformer.py"), "--config", str(SMOKE), "--out",
                        str(run),
                        "--phases", "random_ab", "--epochs", "20"], capture_output=True, text=True,
                        cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert list(json.loads((run / "summary.json").read_text())["phases"]) == ["random_ab"]
    final = torch.load(run / "models.pt")["random_ab"]
    smoke = et.resolve(et.Config(p=23, gt_init_scale=1.0))
    assert final["embed.A"].shape == (1, 23, 4) and not torch.equal(final["embed.A"], et.random_a(smoke, [0]))


def test_parity_task_runs_the_transformer_on_bit_tokens(tmp_path):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "exp_transformer.py"), "--config", str(SMOKE), "--op",
                        "parity",
                        "--q", "6", "--k", "2", "--n", "64", "--n_test", "64", "--epochs", "20",
                        "--phases", "scratch", "--track", "cka", "--track_every", "10", "--probe_size", "8",
                        "--out", str(run)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads((run / "summary.json").read_text())
    assert s["n_train"] == 64 and list(s["phases"]) == ["scratch"]
    epochs, align = harness.read_progress(run / "progress.csv")["scratch"]["kernel_alignment"]
    assert epochs.tolist() == [0, 1, 2, 4, 8, 10, 20] and np.all(np.abs(align) <= 1)
    cfg = et.Config(op="parity", q=6, k=2, n=64, n_test=64)
    d = et.make_data(cfg, "cpu")
    assert d["x_train"].shape == (64, 6) and set(d["x_train"].unique().tolist()) <= {0, 1}
    parity = (d["x_train"][:, :2].sum(1) % 2 == 0).long()  # a product of ±1 bits is +1 iff -1s are even
    assert torch.equal(d["y_train"], parity)
