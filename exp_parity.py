"""GrokTransfer on (q, k)-sparse parity, FNN -> FNN (paper Fig 17c).

Inputs x in {±1}^q, label y = prod_{i in S} x_i, |S| = k (default (40, 3), S = {1, 2, 3}); n = 1000
training points and a fresh test sample; logistic loss on labels ±1, accuracy from the sign.
Trains, in order, on one training set:
  1. weak:         a three-layer FNN of width 16 (q -> 16 -> 16 -> 1), stopped when its test accuracy
                   first reaches 70%; its first layer (q x 16) is the transferred "embedding";
  2. groktransfer: the target, a three-layer FNN of width 512 on a 128-dim embedding x A B, with
                   A = the weak first layer and B (16 x 128) random, both trainable;
  3. scratch:      the same target with a plain q x 128 embedding.
and writes runs/parity/<name>/: config.yaml, metrics.csv, summary.json, dynamics.png, embedding.pt, models.pt.

Usage:
  python exp_parity.py                     # the paper's Fig 17c setting
  python exp_parity.py --seeds 5           # five seeds as members of one run
  python exp_parity.py --grid --grid_phase scratch   # the appendix's grid for one target phase
  python exp_parity.py --config configs/smoke/parity.yaml --device cpu   # a tiny run (the tests')
Every config key below is also a flag (--key value).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import common
import harness
import plots
from common import ConfigError

PHASES = ("weak", "groktransfer", "scratch")


@dataclass
class Config:
    # --- task (appendix A.3.3: "(40, 3)-parity ... sample size n = 1000")
    q: int = 40  # input dimension
    k: int = 3  # parity order |S|
    support: list[int] = field(default_factory=list)  # S, 1-based coordinates; empty = the first k (1, 2, 3)
    n: int = 1000  # training points
    n_test: int = 2000  # fresh test points (not stated in the paper)
    data_seed: int = 0  # seed of the training set and the test sample
    # --- weak model: three-layer FNN, width 16 (appendix A.3.3); its first layer is the embedding
    weak_width: int = 16  # hidden width of the weak three-layer FNN
    weak_epochs: int = 10_000  # at most; the weak phase stops at transfer_at
    transfer_at: float = 0.7  # take the weak first layer when test acc first reaches this ("trained to 70%")
    # (init scale, lr, wd) of the weak model: not stated in the paper. Ours, from a search over init
    # {0.5, 1} x lr {1e-2, 5e-2, 0.1} x wd {0.1, 0.3, 1, 3}, seeds 0-3, 1e4 epochs (RESULTS.md, "Fig 17c"):
    # with the default init (1.0), the setting where every seed reaches 70% test, after memorising by epoch
    # 30-40 (the weak model's delay of Fig 17c's first panel): 70% at epochs 380, 530, 120, 270.
    weak_init_scale: float = 1.0  # not stated in the paper; ours, searched (RESULTS.md, Fig 17c)
    weak_lr: float = 5e-2  # not stated in the paper; ours, searched (RESULTS.md, Fig 17c)
    weak_wd: float = 0.3  # not stated in the paper; ours, searched (RESULTS.md, Fig 17c)
    # --- target: three-layer FNN, width 512, d_embed 128 (appendix A.3.3)
    d_embed: int = 128  # d_T: the target's first-layer width (x E)
    width: int = 512  # hidden width of the target's two hidden layers
    epochs: int = 10_000  # target epochs, both phases
    gt_init_scale: float = 1.0  # not stated; ours: PyTorch's default, and it trains (99% test at epoch 30)
    gt_lr: float = 1e-3  # paper
    gt_wd: float = 1e-3  # paper
    # not stated; ours 0.1. At 1.0 (and 0.2) scratch memorises and stays at chance for all 1e4 epochs;
    # at 0.1 it groks (seeds 0-2: Time Gap 440, 40, and not within 3000 epochs) (RESULTS.md, "Fig 17c")
    scratch_init_scale: float = 0.1  # not stated in the paper; ours, searched (RESULTS.md, Fig 17c)
    scratch_lr: float = 1e-2  # paper
    scratch_wd: float = 1.0  # paper
    # --- optimisation (AdamW, full batch; betas and eps not stated: PyTorch defaults)
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    eval_every: int = 10  # evaluate every N epochs: the resolution of Time Gap
    stop_at: float | None = None  # target phases stop once test acc reaches this (paper: train all epochs)
    precision: str = "float32"  # float32, tf32 (CUDA matmuls), bf16 (autocast)
    # --- grid search (appendix A.3; README, "Many runs at once")
    grid: bool = False
    grid_phase: str = "groktransfer"
    grid_init_scales: list[float] = field(default_factory=lambda: list(harness.PAPER_GRID["init_scales"]))
    grid_lrs: list[float] = field(default_factory=lambda: list(harness.PAPER_GRID["lrs"]))
    grid_wds: list[float] = field(default_factory=lambda: list(harness.PAPER_GRID["wds"]))
    grid_stop_at: float = 0.99
    members: int = 0  # grid points trained at once; 0 = as many as fit in memory
    shard: str = ""  # i/n
    # --- runtime
    phases: str = "weak,groktransfer,scratch"  # which phases to run, in this order
    seed: int = 0  # model init seed
    seeds: int = 1  # seeds seed .. seed+N-1 as members of one run
    device: str = "auto"
    deterministic: bool = False
    name: str = ""
    out: str = ""
    quiet: bool = False
    ckpt_every: int = 1000  # checkpoint every N epochs and at each phase's end; 0 = ends only
    resume: bool = False  # continue the run in --out/--name from its checkpoints (finished phases are read)


def check(cfg: Config):
    sizes = ("q", "k", "n", "n_test", "weak_width", "weak_epochs", "d_embed", "width", "epochs", "eval_every",
             "seeds")
    harness.require(cfg, positive=sizes, fractions=("transfer_at", "stop_at"))
    if cfg.k > cfg.q:
        raise ConfigError(f"k must be <= q, got k = {cfg.k}, q = {cfg.q}")
    if cfg.support:
        inside = all(1 <= i <= cfg.q for i in cfg.support)
        if len(cfg.support) != cfg.k or len(set(cfg.support)) != cfg.k or not inside:
            raise ConfigError(f"support must be {cfg.k} distinct coordinates in 1..{cfg.q}, "
                              f"got {cfg.support}")
    phases = harness.phase_list(cfg.phases, PHASES)
    if "groktransfer" in phases and "weak" not in phases:
        raise ConfigError("phase 'groktransfer' needs the 'weak' phase")
    harness.check_grid(cfg)
    n_params = cfg.q * (cfg.weak_width + cfg.d_embed) + cfg.d_embed * cfg.width + cfg.width * (cfg.width + 1)
    n_values = (cfg.n + cfg.n_test) * (cfg.q + cfg.d_embed + 2 * cfg.width)  # inputs and activations
    harness.check_size(f"q = {cfg.q}, n = {cfg.n}, width = {cfg.width}, seeds = {cfg.seeds}",
                       n_params * cfg.seeds, n_values * cfg.seeds)


# =============================================================================
# EXPERIMENT LOGIC: data, weak model, transfer, target. Edit here to try an idea.


def make_data(q: int, support: list[int], n: int, n_test: int, seed: int, device) -> dict:
    """x uniform on {±1}^q, y = prod of x over the (1-based) support; a training set, then a test set."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 2, (n + n_test, q), generator=gen).float() * 2 - 1
    y = x[:, [i - 1 for i in support]].prod(1)
    split = dict(x_train=x[:n], y_train=y[:n], x_test=x[n:], y_test=y[n:])
    return {k: v.to(device) for k, v in split.items()}


def weak_model(cfg, seeds, device):
    """Three-layer FNN, width 16: W3 relu(W2 relu(W1 x)); W1 (q x 16) is what the target inherits."""
    widths = [cfg.weak_width, cfg.weak_width]
    return common.dense_mlp(cfg.q, None, widths, 1, cfg.weak_init_scale, seeds).to(device)


def target_model(cfg, seeds, init_scale, device, weak=None):
    """Three-layer FNN, width 512, on the embedding x E (q x 128); E = A @ B when `weak` (A) is given."""
    widths = [cfg.width, cfg.width]
    return common.dense_mlp(cfg.q, cfg.d_embed, widths, 1, init_scale, seeds, weak=weak).to(device)


def transfer(weak_model) -> torch.Tensor:
    """GrokTransfer's step: the weak model's first layer (K, q, 16), to become A in the target's x A B."""
    return weak_model.layers[0].detach().cpu()


def logistic_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Binary labels y = ±1 (n,), one logit per point (K, n, 1): mean log(1 + exp(-y f)) per member."""
    return F.softplus(-y * logits.squeeze(-1).float()).mean(1)


def sign_accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction with sign(f) == y (f = 0 counts as wrong)."""
    return (torch.sign(logits.squeeze(-1)) == y).float().mean(1)


LOSS = dict(loss_fn=logistic_loss, acc_fn=sign_accuracy)


# =============================================================================


@harness.script
def main(argv=None):
    choices = {"grid_phase": harness.GRID_PHASES, "precision": common.PRECISIONS}
    cfg = harness.config_or_exit(Config(), argv, choices, check)
    run = harness.open_run(cfg, "parity")
    device = harness.pick_device(cfg.device)
    harness.set_seed(cfg.seed, cfg.deterministic)
    support = cfg.support or list(range(1, cfg.k + 1))
    phases = harness.phase_list(cfg.phases, PHASES)
    if cfg.grid:  # the weak phase only when the grid is over GrokTransfer targets
        phases = ["weak"] if cfg.grid_phase == "groktransfer" else []
    prefix = dict(weak="weak", groktransfer="gt", scratch="scratch")
    settings = {ph: tuple(getattr(cfg, f"{prefix[ph]}_{x}") for x in ("init_scale", "lr", "wd"))
                for ph in phases}
    print(f"run directory {run}  device {device}  ({cfg.q}, {cfg.k})-parity on S = {support}  "
          + (f"grid over {cfg.grid_phase}" if cfg.grid else f"phases {', '.join(phases)}")
          + "  (init, lr, wd): " + "  ".join(f"{ph} {v}" for ph, v in settings.items()))

    data = make_data(cfg.q, support, cfg.n, cfg.n_test, cfg.data_seed, device)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    train_kw = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, eval_every=cfg.eval_every,
                    quiet=cfg.quiet, precision=cfg.precision, **LOSS)
    header = dict(device=harness.device_name(device), q=cfg.q, k=cfg.k, support=support, n_train=cfg.n,
                  n_test=cfg.n_test)
    record = harness.RunRecord(run, cfg, header, title=f"({cfg.q}, {cfg.k})-parity")

    # 1. weak model, stopped when its test accuracy first reaches transfer_at; its first layer is A
    weak = None
    if "weak" in phases:
        model = weak_model(cfg, seeds, device)
        hist = common.train(model, data, epochs=cfg.weak_epochs, lr=cfg.weak_lr, wd=cfg.weak_wd,
                            stop_at=cfg.transfer_at, desc="weak", ckpt=record.checkpoint("weak"), **train_kw)
        weak = record.weak_done(hist, model, transfer(model), cfg.transfer_at)  # A: q x 16

    if cfg.grid:
        meta = dict(experiment="parity", q=cfg.q, k=cfg.k, support=support, n=cfg.n, n_test=cfg.n_test,
                    data_seed=cfg.data_seed, d_embed=cfg.d_embed, width=cfg.width,
                    weak=dict(width=cfg.weak_width, transfer_at=cfg.transfer_at,
                              init_scale=cfg.weak_init_scale, lr=cfg.weak_lr, wd=cfg.weak_wd)
                    if cfg.grid_phase == "groktransfer" else None)
        default = ((cfg.gt_init_scale, cfg.gt_lr, cfg.gt_wd) if cfg.grid_phase == "groktransfer"
                   else (cfg.scratch_init_scale, cfg.scratch_lr, cfg.scratch_wd))
        A = weak if cfg.grid_phase == "groktransfer" else None
        return harness.grid_main(cfg, run, data, lambda scales: target_model(
            cfg, [cfg.seed] * len(scales), scales, device, weak=A),
            meta, default=default, title=f"({cfg.q}, {cfg.k})-parity", **LOSS)

    # 2. target via GrokTransfer: first layer x A B, A = weak first layer, B random; both trainable
    if "groktransfer" in phases:
        model = target_model(cfg, seeds, cfg.gt_init_scale, device, weak=weak)
        hist = common.train(model, data, epochs=cfg.epochs, lr=cfg.gt_lr, wd=cfg.gt_wd, stop_at=cfg.stop_at,
                            desc="groktransfer", ckpt=record.checkpoint("groktransfer"), **train_kw)
        record.phase_done("groktransfer", hist, model)

    # 3. the same target from scratch
    if "scratch" in phases:
        model = target_model(cfg, seeds, cfg.scratch_init_scale, device)
        hist = common.train(model, data, epochs=cfg.epochs, lr=cfg.scratch_lr, wd=cfg.scratch_wd,
                            stop_at=cfg.stop_at, desc="scratch", ckpt=record.checkpoint("scratch"),
                            **train_kw)
        record.phase_done("scratch", hist, model)

    record.save_models()
    png = plots.plot_dynamics(run, title=f"({cfg.q}, {cfg.k})-parity, S = {set(support)}, n = {cfg.n}")
    print(f"wrote {run / 'summary.json'} and {png}")
    return run


if __name__ == "__main__":
    main()
