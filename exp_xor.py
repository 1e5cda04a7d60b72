"""GrokTransfer on XOR cluster data, two-layer ReLU networks (paper Section 3: Fig 4, 5, 9, 10, 11, Thm 3.2).

Data: x = [x_signal, x_noise] in R^p, x_signal ~ Unif({±1}^2), x_noise ~ Unif({±eps}^(p-2)), y = x1 x2.
Models: f(x) = sum_j a_j relu(<w_j, x>), no biases, full-batch gradient descent with weight decay on
the exponential loss exp(-y f) (Section 3.1).

The default run, in order, on one training set (n = 400, p = 80000, eps = 0.05) and one test sample:
  1. scratch:      width 2048, default PyTorch init, lr 0.1, wd 0.1: grokking (Fig 4a);
  2. weak:         width 3, first layer N(0, 0.01), second N(0, 1e-4): ~75% test acc (Fig 4b), its
                   neurons (Fig 4c: neurons.png) and the data seen through its first layer (Fig 5a:
                   embedding3d.png);
  3. groktransfer: the target sum_j a_j relu(<v_j, U^T x>), U = the weak first layer and a_j = ±1/sqrt(m)
                   fixed, v_j ~ Unif{±0.4}^3, GD on V with lr 2, wd 0 (Theorem 3.2, Fig 9): train and
                   test accuracy after one step, then over training.
Studies (not in the default run; they train many weak models):
  --study norm_ratio   r_W against p (n = 1000) and n (p = 8e4), eps in {1/40, 1/80, 1/160} (Fig 5b, 5c)
  --study weak_width   weak models with 1, 2 (and 3) neurons and the target on each (Fig 10, 11)

The wide scratch model is trained in its exact data-span form: under gradient descent with weight
decay the first layer stays W_t = c_t W_0 + X^T Z_t (every gradient X^T G lies in the span of the
training inputs), so one step costs O(n^2 m) instead of O(n p m) and W (p x m, 655 MB at the paper's
size) is never stored. The same model in plain dense form is `dense_scratch_step`; tests check that both
follow the same trajectory. (The span form holds for plain GD with weight decay, not for AdamW.)

Usage:
  python exp_xor.py                                 # the default run above, the paper's sizes
  python exp_xor.py --study norm_ratio              # Fig 5b, 5c
  python exp_xor.py --study weak_width              # Fig 10, 11
  python exp_xor.py --config configs/smoke/xor.yaml --device cpu   # a tiny run (the tests')
Every config key below is also a flag (--key value).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import common
import harness
import plots
from common import ConfigError

STUDIES = ("none", "norm_ratio", "weak_width")
LOSSES = ("exp", "logistic")
WD_FORMS = ("torch", "literal")


@dataclass
class Config:
    # --- data (Section 3.1, appendix A.3.2)
    p: int = 80_000  # input dimension
    n: int = 400  # training points
    eps: float = 0.05  # noise level: noise coordinates are ±eps
    n_test: int = 2000  # fresh test points (the paper does not say how many)
    data_seed: int = 0  # seed of the training set and the test sample
    # --- optimisation: full-batch GD with weight decay on every trained layer
    loss: str = "exp"  # exp: exp(-y f), Section 3.1; logistic: log(1 + exp(-y f))
    # Section 3.1 writes theta <- (1 - wd) theta - lr grad ("literal": a 10% shrink per step at wd 0.1);
    # "torch" is PyTorch SGD's weight_decay, theta <- theta - lr (grad + wd theta), a shrink of lr*wd.
    # torch reproduces Fig 4a (paper size, seed 0: train 95% at epoch 3, test 95% at 91, loss falling to
    # 0.21). literal also shows a delay (test 98% at 64) but shrinks the network to nothing: weight norm
    # 0.002 by epoch 100, loss stuck at exp(0) = 1, and test acc falling again (96% at 300) as signs are
    # read off a vanishing function (RESULTS.md, "XOR").
    wd_form: str = "torch"  # torch: theta -= lr (grad + wd theta); literal: theta <- (1 - wd) theta - lr grad
    # --- 1. scratch (Fig 4a)
    scratch_width: int = 2048  # m of the wide two-layer network
    scratch_lr: float = 0.1  # GD learning rate of the wide network (Fig 4a)
    scratch_wd: float = 0.1  # its weight decay
    scratch_epochs: int = 300  # Fig 4a: memorised by ~5, generalises at ~80
    # --- 2. weak (Fig 4b, 4c)
    weak_width: int = 3  # three neurons: at most 75% test accuracy (Lemma 3.1)
    weak_w_std: float = 0.1  # first layer N(0, 0.01): 0.01 read as the variance
    weak_a_std: float = 0.01  # second layer N(0, 1e-4): variance
    weak_lr: float = 0.1  # GD learning rate of the weak network
    weak_wd: float = 0.1  # appendix: "0, 1" (garbled); 0.1, as Fig 4a's scratch model
    weak_epochs: int = 1000  # Fig 4b: a phase transition near epoch 100, then converged
    weak_eval_every: int = 10  # each evaluation reads the whole test sample (p x n_test) through W
    # --- 3. target via GrokTransfer (Section 3.3, Fig 9)
    target_width: int = 2048  # m; not stated for Fig 9 (A5 needs m >= 2 log^3 n = 430): the scratch width
    v_init: float = 0.4  # v_j ~ Unif{±v_init}^3
    # ours 10; paper 2.0. With 2.0 at m = 2048 one step fits the training set for 4 of 8 inits (test acc
    # 56-100%); 10 (inside A4: sqrt(m) v_init / C <= lr <= sqrt(m) v_init = 18.1, C = 1.8) does for 8 of 8,
    # test 89-99% after one step (RESULTS.md, "XOR"). Pass --target_lr 2 for the paper's value.
    target_lr: float = 10.0  # ours 10; paper 2.0, which fits the training set in one step for some inits only
    target_wd: float = 0.0  # weight decay of the target (Theorem 3.2: none)
    target_epochs: int = 100  # GD steps of the target
    train_a: bool = False  # Theorem 3.2 keeps a fixed; footnote 2: the result holds if it is trained
    train_U: bool = False  # ... and if U (the transferred weak first layer) is trained
    # --- studies
    study: str = "none"  # none (the default run), norm_ratio (Fig 5b/5c), weak_width (Fig 10/11)
    ratio_ps: list[int] = field(default_factory=lambda: [40_000, 80_000, 160_000])  # Fig 5b, n = ratio_n
    ratio_n: int = 1000  # Fig 5b: training points
    ratio_ns: list[int] = field(default_factory=lambda: [400, 800, 1600, 3200])  # Fig 5c, p = ratio_p
    ratio_p: int = 80_000  # Fig 5c: input dimension
    ratio_eps: list[float] = field(default_factory=lambda: [1 / 40, 1 / 80, 1 / 160])  # Fig 5b/5c's noise
    weak_widths: list[int] = field(default_factory=lambda: [1, 2, 3])  # --study weak_width
    # --- runtime
    eval_every: int = 1  # evaluations are cheap here; Time Gap resolution in epochs
    seed: int = 0  # model init seed
    seeds: int = 1  # train seeds seed .. seed+N-1 as members of one run (mean and min-max band)
    device: str = "auto"
    name: str = ""
    out: str = ""
    quiet: bool = False
    ckpt_every: int = 1000  # checkpoint every N epochs and at each phase's end; 0 = ends only
    resume: bool = False  # continue the run in --out/--name from its checkpoints (finished phases are read)


def check(cfg: Config):
    for key in ("p", "n", "n_test", "scratch_width", "weak_width", "target_width", "scratch_epochs",
                "weak_epochs", "target_epochs", "eval_every", "weak_eval_every", "seeds", "ratio_n",
                "ratio_p"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(cfg, key)}")
    if cfg.p < 3:
        raise ConfigError(f"p must be >= 3 (two signal coordinates and some noise), got {cfg.p}")
    if not 0 < cfg.eps < 1:
        raise ConfigError(f"eps must be in (0, 1), got {cfg.eps}")
    for key in ("scratch_lr", "weak_lr", "target_lr", "weak_w_std", "weak_a_std", "v_init"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(cfg, key)}")
    for key in ("scratch_wd", "weak_wd", "target_wd"):
        wd = getattr(cfg, key)
        if wd < 0 or (cfg.wd_form == "literal" and wd >= 1):
            raise ConfigError(f"{key} must be >= 0 (and < 1 with wd_form literal), got {wd}")
    for key in ("ratio_ps", "ratio_ns", "ratio_eps", "weak_widths"):
        v = getattr(cfg, key)
        if not v or any(x <= 0 for x in v):
            raise ConfigError(f"{key} must be a non-empty list of positive numbers, got {v}")
    if any(p < 3 for p in cfg.ratio_ps):
        raise ConfigError(f"ratio_ps must all be >= 3, got {cfg.ratio_ps}")
    n_points = max(cfg.n, cfg.ratio_n, *cfg.ratio_ns) + cfg.n_test  # data (n, p); the wide network (p, m)
    p_max = max(cfg.p, cfg.ratio_p, *cfg.ratio_ps)
    harness.check_size(f"p = {p_max}, n = {n_points}, width = {cfg.scratch_width}, seeds = {cfg.seeds}",
                       p_max * max(cfg.scratch_width, cfg.target_width, cfg.weak_width, *cfg.weak_widths)
                       * cfg.seeds,
                       n_points * (p_max + 2 * cfg.scratch_width) * cfg.seeds)


# =============================================================================
# EXPERIMENT LOGIC: data, models, gradient descent. Edit here to try an idea.


def make_signs(n: int, p: int, gen: torch.Generator) -> torch.Tensor:
    """(n, p) int8 of ±1: the signs of x. x = signs * scale; y = signs[:, 0] * signs[:, 1]."""
    return (torch.randint(0, 2, (n, p), generator=gen, dtype=torch.int8) * 2 - 1)


def make_data(n: int, p: int, eps: float, n_test: int, seed: int, device) -> dict:
    """Training set as float (n, p); the test sample kept as int8 signs, turned into floats chunk by
    chunk when used (2000 x 80000 floats would be 640 MB)."""
    gen = torch.Generator().manual_seed(seed)
    train, test = make_signs(n, p, gen), make_signs(n_test, p, gen)
    scale = torch.full((p,), eps)
    scale[:2] = 1.0
    return dict(x_train=(train * scale).to(device), y_train=(train[:, 0] * train[:, 1]).float().to(device),
                s_test=test.to(device), y_test=(test[:, 0] * test[:, 1]).float().to(device),
                scale=scale.to(device))


def embed_fresh(n: int, p: int, eps: float, seed: int, W: torch.Tensor, rows: int = 200):
    """n fresh points seen through a first layer W (p, r): (W^T x (n, r), y (n,)), drawn `rows` at a
    time so that a dense (n, p) block never exists (4000 x 80000 floats would be 1.3 GB)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.full((p,), eps)
    scale[:2] = 1.0
    E, y = [], []
    for i in range(0, n, rows):
        s = make_signs(min(rows, n - i), p, gen)
        E.append((s * scale).to(W.device) @ W)
        y.append((s[:, 0] * s[:, 1]).float())
    return torch.cat(E), torch.cat(y)


def chunks_of_test(data: dict, rows: int = 0):
    """Yield (row slice, float test inputs) in chunks of at most ~64 MB."""
    s, p = data["s_test"], data["s_test"].shape[1]
    rows = rows or max(1, (16 * 2 ** 20) // p)
    for i in range(0, len(s), rows):
        yield slice(i, i + rows), s[i:i + rows].float() * data["scale"]


def loss_and_grad(f: torch.Tensor, y: torch.Tensor, kind: str):
    """Mean loss per member (K,) and dL/df (K, n) for margins y f."""
    margin = y * f
    if kind == "exp":
        e = torch.exp(-margin)
        return e.mean(-1), -y * e / f.shape[-1]
    return torch.nn.functional.softplus(-margin).mean(-1), -y * torch.sigmoid(-margin) / f.shape[-1]


def shrink(lr: float, wd: float, form: str) -> float:
    """The factor weight decay multiplies the weights by each step."""
    return 1.0 - (wd if form == "literal" else lr * wd)


def two_layer_grads(H: torch.Tensor, a: torch.Tensor, y: torch.Tensor, kind: str):
    """f = relu(H) a for pre-activations H (K, n, m): loss (K,), f (K, n), dL/da (K, m), dL/dH (K, n, m)."""
    R = torch.relu(H)
    f = torch.einsum("knm,km->kn", R, a)
    loss, g = loss_and_grad(f, y, kind)
    return loss, f, torch.einsum("knm,kn->km", R, g), g[..., None] * a[:, None, :] * (H > 0)


def metrics_row(train_loss, f_train, y_train, test_loss, f_test, y_test, norm) -> torch.Tensor:
    """(K, 5) in common.METRICS order; accuracy = sign(f) == y (f = 0 counts as wrong)."""
    acc = lambda f, y: (torch.sign(f) == y).float().mean(-1)
    return torch.stack([train_loss, acc(f_train, y_train), test_loss, acc(f_test, y_test), norm], 1)


def default_init_chunks(gen: torch.Generator, p: int, m: int, chunk: int):
    """PyTorch's default nn.Linear(p, m) weight, U(±1/sqrt(p)), drawn as (p, m) row blocks."""
    for r0 in range(0, p, chunk):
        r1 = min(p, r0 + chunk)
        yield r0, r1, (torch.rand((r1 - r0, m), generator=gen) * 2 - 1) / math.sqrt(p)


def scratch_init(data, seeds, m, device):
    """Precomputations of the span form for K members: P0 = X W0 (K, n, m), Q0 = X_test W0 (K, n_test, m),
    ||W0||^2 (K,), and a0 ~ U(±1/sqrt(m)) (nn.Linear(m, 1)). W0 is drawn in row blocks and dropped."""
    X, p = data["x_train"], data["x_train"].shape[1]
    K, n, n_test = len(seeds), len(X), len(data["y_test"])
    P0 = torch.zeros(K, n, m, device=device)
    Q0 = torch.zeros(K, n_test, m, device=device)
    norm0 = torch.zeros(K, device=device)
    a0 = []
    chunk = max(1, (32 * 2 ** 20) // m)  # rows of W0 per block: ~128 MB
    for k, s in enumerate(seeds):
        gen = torch.Generator().manual_seed(s)
        for r0, r1, w in default_init_chunks(gen, p, m, chunk):
            w = w.to(device)
            P0[k] += X[:, r0:r1] @ w
            norm0[k] += w.pow(2).sum()
            xs = data["s_test"][:, r0:r1].float() * data["scale"][r0:r1]
            Q0[k] += xs @ w
        a0.append((torch.rand(m, generator=gen) * 2 - 1) / math.sqrt(m))
    return P0, Q0, norm0, torch.stack(a0).to(device)


def train_scratch(cfg, data, seeds, device, ckpt=None):
    """Fig 4a in the span form: W = c W0 + X^T Z, Z (K, n, m) starting at 0, c = 1; a trained directly."""
    m = cfg.scratch_width
    P0, Q0, norm0, a = scratch_init(data, seeds, m, device)
    X, y = data["x_train"], data["y_train"]
    G = X @ X.T  # (n, n) Gram matrix of the training inputs
    Gt = torch.cat([xs @ X.T for _, xs in chunks_of_test(data)])  # (n_test, n)
    Z = torch.zeros_like(P0)
    state = dict(c=1.0, a=a, Z=Z)
    s = shrink(cfg.scratch_lr, cfg.scratch_wd, cfg.wd_form)

    def step():
        H = state["c"] * P0 + torch.matmul(G, state["Z"])
        _, _, ga, gH = two_layer_grads(H, state["a"], y, cfg.loss)
        # W <- s W - lr X^T gH  <=>  c <- s c, Z <- s Z - lr gH
        state["c"] *= s
        state["Z"] = s * state["Z"] - cfg.scratch_lr * gH
        state["a"] = s * state["a"] - cfg.scratch_lr * ga

    def evaluate():
        c, Z, a = state["c"], state["Z"], state["a"]
        H = c * P0 + torch.matmul(G, Z)
        loss, f, _, _ = two_layer_grads(H, a, y, cfg.loss)
        Ht = c * Q0 + torch.matmul(Gt, Z)
        f_t = torch.einsum("knm,km->kn", torch.relu(Ht), a)
        # ||W||^2 = c^2 ||W0||^2 + 2c <X W0, Z> + <Z, G Z>
        w2 = c * c * norm0 + 2 * c * (P0 * Z).sum((1, 2)) + (Z * torch.matmul(G, Z)).sum((1, 2))
        return metrics_row(loss, f, y, loss_and_grad(f_t, data["y_test"], cfg.loss)[0], f_t, data["y_test"],
                           torch.sqrt(w2.clamp_min(0) + a.pow(2).sum(1)))

    return common.train(state, data, epochs=cfg.scratch_epochs, eval_every=cfg.eval_every, desc="scratch",
                        quiet=cfg.quiet, ckpt=ckpt, step=step, evaluate_fn=evaluate)


def dense_scratch_step(W, a, X, y, lr, wd, form, loss):
    """The wide model in plain form, one GD step (for the tests and for copying): the new W (K, p, m), a."""
    H = torch.matmul(X, W)
    _, _, ga, gH = two_layer_grads(H, a, y, loss)
    s = shrink(lr, wd, form)
    return s * W - lr * torch.matmul(X.T, gH), s * a - lr * ga


def forward_on_test(data, W, a):
    """f on the test sample for dense first layers W (K, p, m), chunked."""
    return torch.cat([torch.einsum("knm,km->kn", torch.relu(torch.matmul(xs, W)), a)
                      for _, xs in chunks_of_test(data)], 1)


def train_weak(cfg, data, seeds, width, device, quiet=None, ckpt=None):
    """Fig 4b: the narrow network, dense (W is only p x width), W ~ N(0, w_std^2), a ~ N(0, a_std^2)."""
    X, y = data["x_train"], data["y_train"]
    p = X.shape[1]
    W, a = [], []
    for s in seeds:
        gen = torch.Generator().manual_seed(s)
        W.append(torch.randn(p, width, generator=gen) * cfg.weak_w_std)
        a.append(torch.randn(width, generator=gen) * cfg.weak_a_std)
    state = dict(W=torch.stack(W).to(device), a=torch.stack(a).to(device))
    s = shrink(cfg.weak_lr, cfg.weak_wd, cfg.wd_form)

    def step():
        H = torch.matmul(X, state["W"])
        _, _, ga, gH = two_layer_grads(H, state["a"], y, cfg.loss)
        state["W"] = s * state["W"] - cfg.weak_lr * torch.matmul(X.T, gH)
        state["a"] = s * state["a"] - cfg.weak_lr * ga

    def evaluate():
        W, a = state["W"], state["a"]
        loss, f, _, _ = two_layer_grads(torch.matmul(X, W), a, y, cfg.loss)
        f_t = forward_on_test(data, W, a)
        return metrics_row(loss, f, y, loss_and_grad(f_t, data["y_test"], cfg.loss)[0], f_t, data["y_test"],
                           torch.sqrt(W.pow(2).sum((1, 2)) + a.pow(2).sum(1)))

    hist = common.train(state, data, epochs=cfg.weak_epochs, eval_every=cfg.weak_eval_every,
                        desc=f"weak-{width}", quiet=cfg.quiet if quiet is None else quiet, ckpt=ckpt,
                        step=step, evaluate_fn=evaluate)
    return hist, state["W"], state["a"]


def transfer(W: torch.Tensor) -> torch.Tensor:
    """GrokTransfer's step here: the weak first layer W (K, p, r) becomes the target's embedding U,
    the target reading U^T x (Section 3.3)."""
    return W.detach().clone()


def target_init(cfg, seeds, r, device):
    """a_j ~ Unif{±1/sqrt(m)}, v_j ~ Unif{±v_init}^r (Section 3.3); V stored (K, r, m)."""
    m = cfg.target_width
    a, V = [], []
    for s in seeds:
        gen = torch.Generator().manual_seed(s + common.B_SEED_OFFSET)
        a.append((torch.randint(0, 2, (m,), generator=gen) * 2 - 1) / math.sqrt(m))
        V.append((torch.randint(0, 2, (r, m), generator=gen) * 2 - 1) * cfg.v_init)
    return torch.stack(a).float().to(device), torch.stack(V).float().to(device)


def train_target(cfg, data, U, seeds, device, ckpt=None):
    """Theorem 3.2 / Fig 9: f_L(x) = sum_j a_j relu(<v_j, U^T x>), U (K, p, r) the weak first layer.
    GD on V; a and U fixed unless train_a / train_U."""
    X, y = data["x_train"], data["y_train"]
    a, V = target_init(cfg, seeds, U.shape[-1], device)
    state = dict(a=a, V=V, U=U.clone())
    s = shrink(cfg.target_lr, cfg.target_wd, cfg.wd_form)
    fixed = dict(E=torch.matmul(X, U), Et=None)  # the embedded training set U^T x, (K, n, r)

    def embedded_test():
        if fixed["Et"] is None or cfg.train_U:
            fixed["Et"] = torch.cat([torch.matmul(xs, state["U"]) for _, xs in chunks_of_test(data)], 1)
        return fixed["Et"]

    def step():
        E = torch.matmul(X, state["U"]) if cfg.train_U else fixed["E"]
        H = torch.matmul(E, state["V"])
        _, _, ga, gH = two_layer_grads(H, state["a"], y, cfg.loss)
        gV = torch.matmul(E.transpose(1, 2), gH)
        if cfg.train_U:  # dL/dU = X^T (gH V^T)
            gU = torch.matmul(X.T, torch.matmul(gH, state["V"].transpose(1, 2)))
            state["U"] = s * state["U"] - cfg.target_lr * gU
        if cfg.train_a:
            state["a"] = s * state["a"] - cfg.target_lr * ga
        state["V"] = s * state["V"] - cfg.target_lr * gV

    def evaluate():
        E = torch.matmul(X, state["U"]) if cfg.train_U else fixed["E"]
        loss, f, _, _ = two_layer_grads(torch.matmul(E, state["V"]), state["a"], y, cfg.loss)
        f_t = torch.einsum("knm,km->kn", torch.relu(torch.matmul(embedded_test(), state["V"])), state["a"])
        norm = state["V"].pow(2).sum((1, 2)) + state["a"].pow(2).sum(1)
        if cfg.train_U:
            norm = norm + state["U"].pow(2).sum((1, 2))
        test_loss = loss_and_grad(f_t, data["y_test"], cfg.loss)[0]
        return metrics_row(loss, f, y, test_loss, f_t, data["y_test"], norm.sqrt())

    return common.train(state, data, epochs=cfg.target_epochs, eval_every=cfg.eval_every, desc="groktransfer",
                        quiet=cfg.quiet, ckpt=ckpt, step=step, evaluate_fn=evaluate)


FEATURES = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])  # the four cluster directions


def norm_ratio(W: torch.Tensor) -> torch.Tensor:
    """r_W = (||W[2:]||_F / sqrt(p-2)) / (||W[:2]||_F / sqrt(2)) for first layers W (K, p, r) -> (K,)."""
    p = W.shape[-2]
    rest, signal = W[..., 2:, :].norm(dim=(-2, -1)), W[..., :2, :].norm(dim=(-2, -1))
    return (rest / math.sqrt(p - 2)) / (signal / math.sqrt(2))


def neuron_features(W: torch.Tensor) -> list[dict]:
    """For each neuron of one first layer W (p, r): the feature [±1, ±1] its first two coordinates point
    to (cosine), the cosine of the whole neuron with [feature, 0, ..., 0], and ||w[2:]|| / ||w[:2]||."""
    out = []
    for j in range(W.shape[1]):
        w = W[:, j].double().cpu()
        cos2 = (FEATURES.double() @ w[:2]) / (math.sqrt(2) * w[:2].norm())
        best = int(cos2.argmax())
        out.append(dict(feature=[int(v) for v in FEATURES[best]],
                        cosine_first_two=round(float(cos2[best]), 4),
                        cosine_full=round(float(cos2[best] * w[:2].norm() / w.norm()), 4),
                        rest_over_signal_norm=round(float(w[2:].norm() / w[:2].norm()), 4)))
    return out


# =============================================================================
# Figures particular to this experiment (the dynamics panels come from plots.plot_dynamics)


def plot_neurons(W: torch.Tensor, test_acc: float, path: Path):
    """Fig 4c: each weak neuron's first two coordinates (arrows) and the norm of the rest (bars)."""
    plt = plots.pyplot()
    W = W.cpu()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(8, 3.8))
    lim = 1.15 * float(W[:2].abs().max())
    for f in FEATURES:
        ax.plot(*(f * lim / 1.15 * 0.95), "x", color="0.6")
    for j in range(W.shape[1]):
        ax.annotate("", W[:2, j].tolist(), (0, 0), arrowprops=dict(arrowstyle="->", color=f"C{j}", lw=2))
        ax.text(*(W[:2, j] * 1.08).tolist(), f"w{j + 1}", color=f"C{j}")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.axhline(0, color="0.8", lw=0.8)
    ax.axvline(0, color="0.8", lw=0.8)
    ax.set_xlabel("coordinate 1")
    ax.set_ylabel("coordinate 2")
    ax.set_title(f"weak neurons, first two coordinates\n"
                 f"(x = the features [±1, ±1]; test acc {test_acc:.3f})", fontsize=9)
    first, rest = W[:2].norm(dim=0), W[2:].norm(dim=0)
    idx = np.arange(W.shape[1])
    bx.bar(idx - 0.2, first, 0.4, label="||w[1:2]||")
    bx.bar(idx + 0.2, rest, 0.4, label=f"||w[3:p]|| (p-2 = {W.shape[0] - 2})")
    bx.set_xticks(idx, [f"w{j + 1}" for j in idx])
    bx.set_title("norm of the signal and the noise coordinates", fontsize=9)
    bx.set_ylim(0, 1.35 * float(max(first.max(), rest.max())))  # room for the legend
    bx.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    return plots.save_figure(fig, path)


def plot_embedding3d(E: torch.Tensor, y: torch.Tensor, path: Path):
    """Fig 5a: fresh points seen through the weak first layer, U^T x in R^3, coloured by label."""
    plt = plots.pyplot()
    E, y = E.cpu().numpy(), y.cpu().numpy()
    fig = plt.figure(figsize=(5, 4.5))
    ax = fig.add_subplot(projection="3d")
    for label, color in ((1, "tab:red"), (-1, "tab:blue")):
        sel = y == label
        ax.scatter(E[sel, 0], E[sel, 1], E[sel, 2], s=3, alpha=0.5, color=color, label=f"y = {label:+d}")
    ax.set_xlabel("<w1, x>")
    ax.set_ylabel("<w2, x>")
    ax.set_zlabel("<w3, x>")
    ax.legend(fontsize=8)
    ax.set_title(f"{len(y)} fresh points through the weak first layer", fontsize=9)
    fig.tight_layout()
    return plots.save_figure(fig, path)


# =============================================================================


def peak_memory(device) -> dict:
    """Peak resident memory of this process (MiB) and, on CUDA, peak allocated device memory."""
    import resource
    out = dict(peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    if device.type == "cuda":
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return out


def new_summary(cfg, device):
    return dict(device=harness.device_name(device), p=cfg.p, n=cfg.n, eps=cfg.eps, n_test=cfg.n_test,
                wd_form=cfg.wd_form, loss=cfg.loss)


@harness.script
def main(argv=None):
    choices = {"study": STUDIES, "loss": LOSSES, "wd_form": WD_FORMS}
    cfg = harness.config_or_exit(Config(), argv, choices, check)
    run = harness.open_run(cfg, "xor")
    device = harness.pick_device(cfg.device)
    harness.set_seed(cfg.seed)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    print(f"run directory {run}  device {device}  XOR p={cfg.p} n={cfg.n} eps={cfg.eps}  study {cfg.study}")
    if cfg.study == "norm_ratio":
        return study_norm_ratio(cfg, run, seeds, device)
    if cfg.study == "weak_width":
        return study_weak_width(cfg, run, seeds, device)

    data = make_data(cfg.n, cfg.p, cfg.eps, cfg.n_test, cfg.data_seed, device)
    record = harness.RunRecord(run, cfg, new_summary(cfg, device), title="XOR cluster data")

    # 1. the wide network from scratch: grokking (Fig 4a)
    record.phase_done("scratch", train_scratch(cfg, data, seeds, device, record.checkpoint("scratch")))

    # 2. the weak network with three neurons (Fig 4b); its neurons (Fig 4c); its embedding (Fig 5a)
    hist, W, _ = train_weak(cfg, data, seeds, cfg.weak_width, device, ckpt=record.checkpoint("weak"))
    feats = [neuron_features(W[k]) for k in range(len(seeds))]
    record.phase_done("weak", hist, extra=dict(weak_neuron_features=feats,  # one list per member
                                               norm_ratio=[round(float(r), 6) for r in norm_ratio(W)]))
    harness.save_atomic(dict(U=W.cpu(), p=cfg.p, n=cfg.n, eps=cfg.eps), run / "embedding.pt")
    plot_neurons(W[0], float(hist["metrics"][-1, 0, common.TEST_ACC]), run / "neurons.png")
    plot_embedding3d(*embed_fresh(4000, cfg.p, cfg.eps, cfg.data_seed + 1, W[0]), run / "embedding3d.png")

    # 3. the target on the transferred embedding U = W (Theorem 3.2, Fig 9)
    hist = train_target(cfg, data, transfer(W), seeds, device, record.checkpoint("groktransfer"))
    at1 = list(hist["epochs"]).index(1)
    one = dict(one_step_train_acc=[float(v) for v in hist["metrics"][at1, :, common.TRAIN_ACC]],
               one_step_test_acc=[float(v) for v in hist["metrics"][at1, :, common.TEST_ACC]])
    record.phase_done("groktransfer", hist, extra=one)
    print(f"[groktransfer] after one GD step: train acc {one['one_step_train_acc']}  "
          f"test acc {one['one_step_test_acc']}")

    record.summary.update(peak_memory(device))
    harness.save_json(record.summary, run / "summary.json")
    png = plots.plot_dynamics(run, title=f"XOR cluster data, p = {cfg.p}, n = {cfg.n}, eps = {cfg.eps}")
    print(f"wrote {run / 'summary.json'}, {png}, neurons.png, embedding3d.png")
    return run


def study_norm_ratio(cfg, run, seeds, device):
    """Fig 5b, 5c: r_W of trained weak models against p (n fixed) and n (p fixed), per eps."""
    plt = plots.pyplot()
    results = dict(vs_p=[], vs_n=[])
    settings = [("vs_p", p, cfg.ratio_n, e) for e in cfg.ratio_eps for p in cfg.ratio_ps]
    settings += [("vs_n", cfg.ratio_p, n, e) for e in cfg.ratio_eps for n in cfg.ratio_ns]
    for i, (which, p, n, eps) in enumerate(settings):
        data = make_data(n, p, eps, cfg.n_test, cfg.data_seed, device)
        rarely = dataclasses.replace(cfg, weak_eval_every=max(1, cfg.weak_epochs // 10))  # r_W: final W only
        hist, W, _ = train_weak(rarely, data, seeds, cfg.weak_width, device, quiet=True)
        r = norm_ratio(W).cpu().numpy()
        row = dict(p=p, n=n, eps=eps, r_W=float(r.mean()), r_W_members=r.tolist(),
                   test_acc=float(hist["metrics"][-1, :, common.TEST_ACC].mean()))
        results[which].append(row)
        print(f"[norm_ratio {i + 1}/{len(settings)}] p {p}  n {n}  eps {eps:.5f}  r_W {row['r_W']:.4g}  "
              f"weak test acc {row['test_acc']:.3f}", flush=True)
        harness.save_json(dict(results=results), run / "summary.json")
    slopes = {}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, which, key in ((axes[0], "vs_p", "p"), (axes[1], "vs_n", "n")):
        for j, eps in enumerate(cfg.ratio_eps):
            pts = [r for r in results[which] if r["eps"] == eps]
            x, yv = np.array([r[key] for r in pts], float), np.array([r["r_W"] for r in pts])
            slope = float(np.polyfit(np.log(x), np.log(yv), 1)[0]) if len(x) > 1 else None
            slopes[f"{which}_eps_{eps:.6g}"] = slope
            label = f"eps = 1/{1 / eps:.0f}, slope {slope:.2f}" if slope is not None else f"eps {eps}"
            ax.plot(x, yv, "o-", color=f"C{j}", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("r_W")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title(f"r_W against p (n = {cfg.ratio_n}); paper: flat", fontsize=9)
    axes[1].set_title(f"r_W against n (p = {cfg.ratio_p}); paper: slope about -1/2", fontsize=9)
    fig.tight_layout()
    plots.save_figure(fig, run / "norm_ratio.png")
    harness.save_json(dict(results=results, slopes=slopes), run / "summary.json")
    print("fitted log-log slopes: " + ", ".join(f"{k} {v:.3f}" for k, v in slopes.items() if v is not None))
    print(f"wrote {run / 'summary.json'} and {run / 'norm_ratio.png'}")
    return run


def study_weak_width(cfg, run, seeds, device):
    """Fig 10, 11: weak models of each width in cfg.weak_widths, and the target trained on each embedding."""
    data = make_data(cfg.n, cfg.p, cfg.eps, cfg.n_test, cfg.data_seed, device)
    record = harness.RunRecord(run, cfg, new_summary(cfg, device), title="XOR, weak widths")
    for width in cfg.weak_widths:
        hist, W, _ = train_weak(cfg, data, seeds, width, device, ckpt=record.checkpoint(f"weak-{width}"))
        record.phase_done(f"weak-{width}", hist, extra=dict(weak_neuron_features=neuron_features(W[0])))
        plot_neurons(W[0], float(hist["metrics"][-1, 0, common.TEST_ACC]), run / f"neurons_{width}.png")
        record.phase_done(f"target-{width}", train_target(cfg, data, transfer(W), seeds, device,
                                                        record.checkpoint(f"target-{width}")))
    title = f"weak widths {cfg.weak_widths}: weak model, then the target on its embedding"
    png = plots.plot_dynamics(run, title=title)
    print(f"wrote {run / 'summary.json'} and {png}")
    return run


if __name__ == "__main__":
    main()
