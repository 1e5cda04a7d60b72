"""Progress measures (common.py) against cases with a known answer: empirical NTK, kernel-task alignment,
Gaussian-copula entropy and O-information, neuron bins, the 2-D PCA view; and train(tracker=...)."""
import functools
import math

import numpy as np
import pytest
import torch

import common
import exp_modular as em
import exp_modular_studies as ems


def test_ntk_of_a_linear_model_is_x_x_transpose():
    """f(x) = x W with one output: d f / d W = x, so Theta = X X^T."""
    model = common.dense_mlp(5, None, [], 1, 1.0, [0])
    x = torch.randn(7, 5)
    theta = common.ntk_gram(model, x)
    assert theta.shape == (1, 7, 7)
    torch.testing.assert_close(theta[0], (x @ x.T).double(), rtol=1e-5, atol=1e-6)


def test_ntk_sums_the_logits_and_keeps_members_apart():
    """With C outputs the sum of logits has gradient x per output column: Theta = C X X^T, the same
    for each member of a K = 2 model, and each member's kernel is its own (a second layer differs)."""
    x = torch.randn(6, 4)
    linear = common.dense_mlp(4, None, [], 3, 1.0, [0, 1])
    theta = common.ntk_gram(linear, x)
    for k in range(2):
        torch.testing.assert_close(theta[k], 3 * (x @ x.T).double(), rtol=1e-5, atol=1e-6)
    deep = common.dense_mlp(4, None, [8], 3, 1.0, [0, 1])
    theta = common.ntk_gram(deep, x)
    alone = common.ntk_gram(common.dense_mlp(4, None, [8], 3, 1.0, [1]), x)
    torch.testing.assert_close(theta[1], alone[0])
    assert not torch.allclose(theta[0], theta[1])
    assert torch.allclose(common.ntk_change(theta, theta), torch.zeros(2, dtype=theta.dtype))


def test_alignment_of_the_label_kernel_with_itself_is_one():
    y = torch.tensor([0, 1, 2, 1, 0, 2, 2, 0])
    Y = torch.nn.functional.one_hot(y, 3).double()
    assert common.centered_alignment(Y @ Y.T, y, 3).item() == pytest.approx(1.0)
    # scale and an added constant kernel (removed by centring) do not change it
    assert common.centered_alignment(5 * Y @ Y.T + 2.0, y, 3).item() == pytest.approx(1.0)
    noise = torch.randn(8, 20, dtype=torch.float64)
    a = common.centered_alignment(noise @ noise.T, y, 3).item()
    assert -1 < a < 0.9


def test_gaussian_entropy_closed_form():
    # in bits: the closed form in nats over ln 2
    expected = 0.5 * math.log2(2 * math.pi * math.e * 4.0)
    assert ems.gaussian_entropy(np.array([[4.0]])) == pytest.approx(expected)
    cov = np.diag([1.0, 2.0, 3.0])
    parts = sum(ems.gaussian_entropy(np.array([[v]])) for v in (1, 2, 3))
    assert ems.gaussian_entropy(cov) == pytest.approx(parts)


def mutual_info(rho):
    """Of two standard Gaussians with correlation rho, in bits."""
    return -0.5 * math.log2(1 - rho ** 2)


def test_o_information_of_gaussians_against_the_closed_form():
    """For three variables Omega = I(X1; X2) - I(X1; X2 | X3) (the co-information)."""
    assert ems.o_information(np.eye(4)) == pytest.approx(0.0, abs=1e-12)  # independent
    # redundancy: three noisy copies of one source, pairwise correlation 0.9
    cov = np.full((3, 3), 0.9) + 0.1 * np.eye(3)
    partial = (0.9 - 0.81) / (1 - 0.81)
    assert ems.o_information(cov) == pytest.approx(mutual_info(0.9) - mutual_info(partial))
    assert ems.o_information(cov) > 0
    # synergy: X3 = X1 + X2 + noise, X1 and X2 independent: Omega = -I(X1; X2 | X3)
    s2 = 0.1
    cov = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 2 + s2]], dtype=float)
    assert ems.o_information(cov) == pytest.approx(-mutual_info(1 / (1 + s2)))
    assert ems.o_information(cov) < 0


def test_copula_estimate_matches_the_closed_form_and_keeps_order():
    rng = np.random.default_rng(0)
    x1, x2, e = rng.standard_normal((3, 20000))
    x3 = x1 + x2 + math.sqrt(0.1) * e
    z = ems.copula_normalize(np.stack([x1, np.exp(x2), x3 ** 3], 1))  # monotone maps change nothing
    assert np.all(np.diff(z[np.argsort(x1), 0]) > 0)  # ranks kept
    assert np.abs(z.mean(0)).max() < 0.01 and np.abs(z.std(0) - 1).max() < 0.02
    est = ems.o_information(np.cov(z, rowvar=False))
    assert est == pytest.approx(-mutual_info(1 / 1.1), abs=0.03)
    z = ems.copula_normalize(rng.standard_normal((20000, 3)))
    assert abs(ems.o_information(np.cov(z, rowvar=False))) < 0.01
    constant = ems.copula_normalize(np.zeros((500, 2)))  # a dead unit: finite, not degenerate
    assert np.isfinite(constant).all() and constant.std(0).min() > 0.9


def test_multiplet_extremes_find_the_synergistic_and_the_redundant_triples():
    """Six variables: a synergistic triple (0, 1, 2) and a redundant one (3, 4, 5), independent."""
    cov = np.zeros((6, 6))
    cov[:3, :3] = [[1, 0, 1], [0, 1, 1], [1, 1, 2.1]]
    cov[3:, 3:] = np.full((3, 3), 0.9) + 0.1 * np.eye(3)
    best = ems.multiplet_extremes(cov, range(3, 7))
    assert best["synergy"] == pytest.approx(ems.o_information(cov[:3, :3]))
    assert best["redundancy"] == pytest.approx(ems.o_information(cov[3:, 3:]))
    assert best["synergy_size"] == 3 and best["redundancy_size"] == 3


def test_neuron_bins_recover_groups_of_similar_neurons():
    rng = np.random.default_rng(1)
    sources = rng.standard_normal((300, 3)) * np.array([1.0, 5.0, 10.0])
    groups = np.repeat(np.arange(3), [4, 6, 10])  # 20 neurons: noisy copies of 3 sources
    h = sources[:, groups] + 0.01 * rng.standard_normal((300, 20))
    bins = ems.neuron_bins(h, 3)
    corr = np.abs(np.corrcoef(bins.T, sources.T)[:3, 3:])
    assert sorted(corr.argmax(1).tolist()) == [0, 1, 2] and corr.max(1).min() > 0.99


def test_pca_view_shape_and_a_circle():
    angle = 2 * math.pi * torch.arange(40) / 40
    E = torch.stack([angle.cos(), angle.sin(), torch.zeros(40),
                     torch.zeros(40)], 1) @ torch.linalg.qr(torch.randn(4, 4))[0]
    coords, explained = ems.pca_2d(E)
    assert coords.shape == (40, 2) and explained.sum() == pytest.approx(1.0)
    assert np.allclose(np.linalg.norm(coords, axis=1), 1.0, atol=1e-6)  # the circle, whatever its rotation


def test_fixed_embeddings_have_unit_rows_and_the_papers_sizes():
    p = 113
    onehot, binary, fourier = (ems.fixed_embedding(k, p) for k in ("onehot", "binary", "fourier"))
    assert torch.equal(onehot, torch.eye(p))
    assert binary.shape == (p, 8)  # ceil(log2(112)) + 1
    assert torch.equal(binary[5] > 0, torch.tensor([1, 0, 1, 0, 0, 0, 0, 0]) > 0)
    assert fourier.shape == (p, 14)
    torch.testing.assert_close(fourier[1, :2] * math.sqrt(7),
                               torch.tensor([math.cos(4 * math.pi / p), math.sin(4 * math.pi / p)]))
    for E in (onehot, binary[1:], fourier):
        torch.testing.assert_close(E.norm(dim=1), torch.ones(len(E)))
    assert binary[0].abs().sum() == 0  # 0 has no bits set: its row stays zero


def test_train_with_a_tracker_records_measures_at_its_epochs():
    data = em.make_data("add", 11, 0.5, 0, "cpu")
    model = common.token_mlp(11, 2, 8, [32], 11, 1.0, [0, 1])
    oinfo = functools.partial(ems.oinfo_measures, n_bins=4)  # exp_modular's hidden-layer measure
    tracker = common.Tracker(model, data["x_train"][:20], data["y_train"][:20], ["ntk", "cka"], 20, 11,
                             hidden=oinfo)
    hist = common.train(model, data, epochs=60, lr=1e-2, wd=0.0, eval_every=10, quiet=True, tracker=tracker)
    t = hist["tracked"]
    assert t["epochs"].tolist() == [0, 1, 2, 4, 8, 16, 20, 40, 60]  # powers of two below every, then every 20
    layers = {f"wnorm:{n}" for n, _ in model.named_parameters()}
    assert set(t) == {"epochs", "ntk_change", "kernel_alignment", "synergy", "redundancy",
                      "synergy_size"} | layers
    np.testing.assert_allclose(t["wnorm:layers.0"][-1],
                               model.layers[0].detach().flatten(1).norm(dim=1).numpy(), rtol=1e-6)
    assert t["ntk_change"].shape == (9, 2)
    assert np.all(t["ntk_change"][0] == 0)
    assert np.all(t["ntk_change"][-1] > 0)
    assert np.all(t["synergy"] <= t["redundancy"])
    assert np.all((t["synergy_size"] >= 3) & (t["synergy_size"] <= 4))
    with pytest.raises(ValueError, match="cannot compact"):  # Theta_0 is per member
        common.train(model, data, epochs=1, lr=1e-2, wd=0.0, quiet=True, tracker=tracker, compact=True)
    with pytest.raises(common.ConfigError, match="track must be"):
        common.Tracker(model, data["x_train"][:4], data["y_train"][:4], ["cka", "loss"], 10, 11)


def test_join_histories_shifts_the_second_part():
    data = em.make_data("add", 11, 0.5, 0, "cpu")
    model = common.token_mlp(11, 2, 8, [32], 11, 1.0, [0])
    a = common.train(model, data, epochs=20, lr=1e-2, wd=0.0, eval_every=10, quiet=True)
    b = common.train(model, data, epochs=30, lr=1e-2, wd=0.0, eval_every=10, quiet=True)
    j = ems.join_histories(a, b)
    assert j["epochs"].tolist() == [0, 1, 2, 4, 8, 10, 20, 21, 22, 24,
                                    28, 30, 40, 50] and j["epochs_run"] == 50
    assert j["metrics"].shape == (14, 1, 5) and np.all(np.diff(j["compute_s"]) >= 0)
    np.testing.assert_array_equal(j["metrics"][-1], b["metrics"][-1])


@pytest.mark.skipif(not ems.text_available(), reason="optional extra not installed (requirements-text.txt)")
def test_text_embedding_rows_are_unit_norm_and_near_numbers_are_close():
    E = ems.fixed_embedding("text", 30, 16)
    assert E.shape == (30, 16)
    torch.testing.assert_close(E.norm(dim=1), torch.ones(30))
    assert torch.equal(E, ems.fixed_embedding("text", 30, 16))  # the projection is fixed
