"""GrokTransfer FNN -> transformer on modular arithmetic, and the GrokFast baseline (paper Fig 6, 8,
13, 16, Table 1).

Trains, in order, on one fixed data split (the modular tasks: exp_modular's data, 25% of p^2 pairs):
  1. weak:         exp_modular's two-layer FNN (d_embed 4, width 16), stopped when its test accuracy
                   first reaches transfer_at (30%); its p x 4 embedding is A;
  2. groktransfer: a decoder-only transformer (common.Transformer) reading tokens (a, b), with token
                   embedding A @ B, B (4 x d_model) random, both trainable;
  3. scratch:      the same transformer with a plain token embedding;
  4. grokfast:     the same transformer from scratch with Lee et al.'s EMA gradient filter
                   (GrokFast below) before every AdamW step;
  5. random_ab:    (Fig 15(a), not run by default) GrokTransfer's target with A random instead of the
                   weak embedding: is the low-rank A @ B alone the gain?
then prints Table 1: the training time (forward, backward and optimizer steps; evaluation excluded)
of each phase until it first reaches 99% test accuracy (the weak phase: until it reaches transfer_at),
with the device named. Writes runs/transformer/<name>/: config.yaml, metrics.csv, summary.json
(per phase: Time Gap, epochs and seconds to 95% and 99% test accuracy, final accuracies; "table1"),
dynamics.png, embedding.pt, models.pt.

The task `parity` (Fig 13 right) trains the transformer on exp_parity's (q, k)-sparse parity data,
the q bits as q tokens (vocabulary {0, 1}), label at the last position: phases scratch and grokfast
only (the parity weak model is an FNN on dense inputs; it has no token embedding to hand over).

Usage:
  python exp_transformer.py                                   # Fig 6 left: add, 8 layers, d_model 512
  python exp_transformer.py --op mul                          # Fig 6 right / Fig 13 left
  python exp_transformer.py --config configs/transformer/fig8_add.yaml     # Fig 8: GT against GrokFast
  python exp_transformer.py --op parity --phases scratch --n_layers 2 --d_model 128 --d_head 32  # Fig 13
  python exp_transformer.py --config configs/smoke/transformer.yaml --device cpu          # the tests' run
Every config key below is also a flag (--key value).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

import common
import harness
import plots
from common import ConfigError

OPS = ("add", "sub", "mul", "div", "parity")
PHASES = ("weak", "groktransfer", "scratch", "grokfast", "random_ab")

# (init scale, lr, wd) of each target phase when the config leaves them as none.
# modular: appendix A.3.3, Fig 6(a) (8 layers): GT (0.7, 1e-3, 1), scratch (0.4, 5e-4, 1); GrokFast
#   (Fig 8) states (lr, wd) = (0.01, 1) and no init scale: ours 1.0, PyTorch's default init, as in Lee
#   et al.'s code. configs/transformer/fig8_*.yaml set Fig 6(b)'s 2-layer GT (0.6, 5e-3, 0.1).
# parity: not stated in the paper (Fig 13 right names only the depths). Ours: see RESULTS.md, "Transformer".
# weak: the two-layer FNN of exp_modular.py, with its (init, lr, wd) per op (ours; the paper does not state
#   them): add (0.5, 1e-2, 0.3), mul (1.0, 1e-2, 1.0); sub and div take add's.
WEAK_SETTINGS = {"add": (0.5, 1e-2, 0.3), "mul": (1.0, 1e-2, 1.0)}
SETTINGS = {
    "modular": dict(gt=(0.7, 1e-3, 1.0), scratch=(0.4, 5e-4, 1.0), grokfast=(1.0, 1e-2, 1.0)),
    "parity": dict(gt=(1.0, 1e-3, 1.0), scratch=(1.0, 1e-3, 1.0), grokfast=(1.0, 1e-3, 1.0)),
}


@dataclass
class Config:
    # --- task
    op: str = "add"  # add, sub, mul, div (a∘b mod p, tokens (a, b)) or parity (exp_parity's data)
    p: int = 113  # modulus ("all modular tasks set p = 113")
    train_frac: float = 0.25  # fraction of the p^2 pairs that train (as exp_modular)
    data_seed: int = 0  # seed of the split / of the parity sample
    q: int = 40  # parity: input bits = sequence length
    k: int = 3  # parity: order, S = {1..k}
    n: int = 1000  # parity: training points
    n_test: int = 2000  # parity: fresh test points
    # --- weak model: exp_modular's two-layer FNN (Fig 17's weak models, "the same one used in Fig 6(a)")
    weak_d_embed: int = 4  # rank of A
    weak_width: int = 16  # hidden width of the weak FNN
    weak_epochs: int = 10_000  # at most: the phase stops at transfer_at
    transfer_at: float = 0.3  # "we extract the embeddings ... [when] it first reaches 30% test accuracy"
    weak_init_scale: float | None = None  # none: WEAK_SETTINGS for this op (ours; the paper's are not stated)
    weak_lr: float | None = None  # none: WEAK_SETTINGS (1e-2)
    weak_wd: float | None = None  # none: WEAK_SETTINGS (add 0.3, mul 1.0)
    weak_embedding: str = ""  # a saved embedding.pt (e.g. from exp_modular.py): skip the weak phase
    # --- target transformer (appendix A.3.3, Fig 6(a)): 8 layers, d_embed 512, d_mlp 512, 4 heads of 128
    n_layers: int = 8  # transformer blocks (Fig 6: 8; Fig 8: 2)
    d_model: int = 512  # residual width (paper: 512; Fig 8: 128)
    d_mlp: int = 512  # MLP hidden width
    n_heads: int = 4  # attention heads
    d_head: int = 128  # width of each head (paper: 128; Fig 8: 32)
    layer_norm: bool = False  # Nanda et al.'s: none; Fig 8 / 16 "follow Lee et al.", whose model is pre-LN
    epochs: int = 10_000  # every target phase (A.4.1: scratch needs ~1e4 epochs, GrokTransfer ~1e3)
    # (init scale, lr, wd) per target phase; none = SETTINGS above (the paper's for the modular tasks)
    gt_init_scale: float | None = None  # paper: 0.7 (8 layers), 0.6 (2 layers)
    gt_lr: float | None = None  # paper: 1e-3 (8 layers), 5e-3 (2 layers)
    gt_wd: float | None = None  # paper: 1 (8 layers), 0.1 (2 layers)
    scratch_init_scale: float | None = None  # paper: 0.4
    scratch_lr: float | None = None  # paper: 5e-4
    scratch_wd: float | None = None  # paper: 1
    grokfast_init_scale: float | None = None  # not stated; ours 1.0 (PyTorch default, as Lee et al.)
    grokfast_lr: float | None = None  # paper: 0.01
    grokfast_wd: float | None = None  # paper: 1.0
    grokfast_alpha: float = 0.98  # EMA momentum (Lee et al.'s default)
    grokfast_lamb: float = 2.0  # amplification of the slow gradient (Lee et al.'s default)
    grokfast_beta2: float | None = None  # AdamW beta2 of the grokfast phase; none = beta2 (Lee et al.: 0.98)
    # --- optimisation (AdamW, full batch, cross-entropy; betas and eps not stated: PyTorch defaults)
    beta1: float = 0.9
    beta2: float = 0.999  # Lee et al. and Nanda et al. use 0.98; the paper does not say
    adam_eps: float = 1e-8
    eval_every: int = 10  # evaluate every N epochs: the resolution of Time Gap and of the Table 1 times
    stop_at: float | None = None  # target phases stop once test acc reaches this (Table 1 alone: 0.99)
    precision: str = "float32"  # float32 (the paper's), tf32 (TF32 matmuls on CUDA), bf16 (autocast)
    # --- progress measures of the target phases (common.Tracker) on the first probe_size training points
    track: list[str] = field(default_factory=list)  # ntk and/or cka (oinfo needs an FNN's hidden layer)
    track_every: int = 100  # a multiple of eval_every
    probe_size: int = 64  # one backward pass per probe point and measurement
    # --- runtime
    phases: str = "weak,groktransfer,scratch"  # in order, of weak, groktransfer, scratch, grokfast, random_ab
    seed: int = 0
    seeds: int = 1  # seeds as members of one run: mean and min-max band per phase
    device: str = "auto"
    deterministic: bool = False
    name: str = ""
    out: str = ""
    quiet: bool = False
    ckpt_every: int = 500  # checkpoint every N epochs (and at the end of each phase); 0 = ends only
    resume: bool = False  # continue the run in --out/--name from its checkpoints


def check(cfg: Config):
    sizes = ("p", "weak_d_embed", "weak_width", "weak_epochs", "n_layers", "d_model", "d_mlp", "n_heads",
             "d_head", "epochs", "eval_every", "seeds", "q", "k", "n", "n_test")
    harness.require(cfg, positive=sizes, fractions=("transfer_at", "stop_at"))
    phases = harness.phase_list(cfg.phases, PHASES)
    if cfg.k > cfg.q:  # checked for every op: a parity setting in a config is never silently wrong
        raise ConfigError(f"k must be <= q, got k = {cfg.k}, q = {cfg.q}")
    if cfg.op == "parity":
        if set(phases) & {"weak", "groktransfer", "random_ab"}:
            raise ConfigError("op 'parity' runs the phases scratch and grokfast only (no token embedding to "
                              "transfer)")
    else:
        check_task(cfg.op, cfg.p, cfg.train_frac)
        if "groktransfer" in phases and "weak" not in phases and not cfg.weak_embedding:
            raise ConfigError("phase 'groktransfer' needs the 'weak' phase or --weak_embedding PATH")
    if not 0 <= cfg.grokfast_alpha < 1 or cfg.grokfast_lamb < 0:
        raise ConfigError(f"grokfast_alpha must be in [0, 1) and grokfast_lamb >= 0; "
                          f"got {cfg.grokfast_alpha}, {cfg.grokfast_lamb}")
    harness.require(cfg, positive=("track_every", "probe_size"))
    if any(t not in ("ntk", "cka") for t in cfg.track):
        raise ConfigError(f"track must be a subset of ntk, cka for a transformer; got {','.join(cfg.track)}")
    if cfg.track and cfg.track_every % cfg.eval_every:
        raise ConfigError(f"track_every ({cfg.track_every}) must be a multiple of eval_every "
                          f"({cfg.eval_every})")
    harness.check_memory(8 * (cfg.n + cfg.n_test) * cfg.q,
                         f"parity data, q = {cfg.q}, n = {cfg.n} + {cfg.n_test}")
    weak = cfg.p * cfg.weak_d_embed + 2 * cfg.weak_d_embed * cfg.weak_width + cfg.weak_width * cfg.p
    harness.check_size(f"weak_d_embed = {cfg.weak_d_embed}, weak_width = {cfg.weak_width}, "
                       f"seeds = {cfg.seeds}",
                       weak * cfg.seeds, cfg.p * cfg.p * (cfg.weak_width + cfg.p) * cfg.seeds)
    n_seqs = cfg.n + cfg.n_test if cfg.op == "parity" else cfg.p * cfg.p
    d = cfg.d_model
    blocks = cfg.n_layers * (4 * d * cfg.n_heads * cfg.d_head + 2 * d * cfg.d_mlp)
    harness.check_size(f"d_model = {d}, n_layers = {cfg.n_layers}, seeds = {cfg.seeds}",
                       (blocks + (cfg.p + 2) * d + d * cfg.p) * cfg.seeds,
                       n_seqs * 2 * cfg.n_layers * (4 * d + cfg.d_mlp) * cfg.seeds)


def resolve(cfg: Config) -> Config:
    """Fill the (init, lr, wd) left as none: targets from SETTINGS, the weak model from WEAK_SETTINGS."""
    fill = {}
    table = dict(SETTINGS["parity" if cfg.op == "parity" else "modular"],
                 weak=WEAK_SETTINGS.get(cfg.op, WEAK_SETTINGS["add"]))
    for phase, values in table.items():
        for key, value in zip(("init_scale", "lr", "wd"), values):
            if getattr(cfg, f"{phase}_{key}") is None:
                fill[f"{phase}_{key}"] = value
    return dataclasses.replace(cfg, **fill)


def phase_setting(cfg, phase: str) -> tuple:
    """(init scale, lr, wd) of a phase; random_ab uses GrokTransfer's."""
    prefix = "gt" if phase in ("groktransfer", "random_ab") else phase
    return tuple(getattr(cfg, f"{prefix}_{key}") for key in ("init_scale", "lr", "wd"))


# =============================================================================
# EXPERIMENT LOGIC: data, weak model, transfer, target (and main's phases). Edit here to try an idea.


def make_data(cfg, device) -> dict:
    """Modular (as exp_modular.py): all pairs (a, b), label a∘b mod p, split by a generator of its own.
    Parity (as exp_parity.py): x uniform on {0, 1}^q, label the XOR of the first k bits; a training set,
    then a fresh test sample."""
    gen = torch.Generator().manual_seed(cfg.data_seed)
    if cfg.op == "parity":
        x = torch.randint(0, 2, (cfg.n + cfg.n_test, cfg.q), generator=gen).float() * 2 - 1  # ±1 bits
        y = x[:, :cfg.k].prod(1)
        x, y = (x > 0).long(), (y > 0).long()  # tokens {0, 1}; classes {0, 1}
        split = dict(x_train=x[:cfg.n], y_train=y[:cfg.n], x_test=x[cfg.n:], y_test=y[cfg.n:])
        return {k: v.to(device) for k, v in split.items()}
    p = cfg.p
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).T  # (p^2,), (p^2,)
    if cfg.op == "div":
        keep = b != 0
        a, b = a[keep], b[keep]
        inv = torch.tensor([pow(int(v), -1, p) for v in range(1, p)])  # b^-1 mod p for b = 1..p-1
        y = a * inv[b - 1] % p
    else:
        y = {"add": a + b, "sub": a - b, "mul": a * b}[cfg.op] % p
    x = torch.stack([a, b], 1)  # (N, 2) tokens
    perm = torch.randperm(len(y), generator=gen)
    tr, te = perm[:round(cfg.train_frac * len(y))], perm[round(cfg.train_frac * len(y)):]
    split = dict(x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te])
    return {k: v.to(device) for k, v in split.items()}


def check_task(op: str, p: int, train_frac: float):
    """The modular task's constraints (as exp_modular.py)."""
    if p < 2:
        raise ConfigError(f"p must be >= 2, got {p}")
    harness.check_memory(p * p * 100, f"p = {p} ({p * p:.3g} pairs)")
    if op == "div" and any(p % q == 0 for q in range(2, int(p ** 0.5) + 1)):
        raise ConfigError(f"op 'div' needs a prime p (every b != 0 invertible), got p = {p}")
    if not 0 < train_frac < 1:
        raise ConfigError(f"train_frac must be in (0, 1), got {train_frac}")
    n = p * (p - 1 if op == "div" else p)
    if round(train_frac * n) in (0, n):
        raise ConfigError(f"train_frac {train_frac} leaves an empty train or test set for {n} pairs")


def weak_model(cfg, seeds, device):
    """exp_modular.py's weak model, a two-layer FNN: W2 relu(W1 [E a; E b]), E (p x d_W)."""
    return common.token_mlp(cfg.p, 2, cfg.weak_d_embed, [cfg.weak_width], cfg.p, cfg.weak_init_scale,
                            seeds).to(device)


def transfer(weak_model) -> torch.Tensor:
    """GrokTransfer's step: the weak FNN's token embedding (K, p, d_W) becomes A in the target's A @ B."""
    return weak_model.embed.weight.detach().cpu()


class GrokFast:
    """Lee et al. (2024)'s EMA gradient filter ("Grokfast-EMA"), applied after backward and before
    the optimizer step: h <- alpha h + (1 - alpha) g, then g <- g + lamb h, per parameter tensor.
    h starts as the first gradient (as in Lee et al.'s code), so step 1 gives g + lamb g.
    The state h is per member like every parameter (leading dimension K)."""

    def __init__(self, alpha: float = 0.98, lamb: float = 2.0):
        if not 0 <= alpha < 1 or lamb < 0:
            raise ConfigError(f"GrokFast needs 0 <= alpha < 1 and lamb >= 0; got alpha {alpha}, lamb {lamb}")
        self.alpha, self.lamb = alpha, lamb
        self.h: list[torch.Tensor] | None = None

    @torch.no_grad()
    def apply(self, params: list[torch.Tensor]):
        grads = [p.grad for p in params]
        if self.h is None:
            self.h = [g.detach().clone() for g in grads]
        else:
            for h, g in zip(self.h, grads):
                h.lerp_(g, 1 - self.alpha)  # alpha h + (1 - alpha) g
        for h, g in zip(self.h, grads):
            g.add_(h, alpha=self.lamb)


def random_a(cfg, seeds) -> torch.Tensor:
    """Fig 15(a)'s control: A random instead of the weak embedding, drawn like a d_W-dim nn.Embedding,
    N(0, 1), times GrokTransfer's init scale (as exp_modular.py's low_rank study), one per member."""
    return torch.stack([common.embedding_init(torch.Generator().manual_seed(s + 7), (cfg.p, cfg.weak_d_embed),
                                              cfg.gt_init_scale) for s in seeds])


def vocab_ctx_out(cfg) -> tuple[int, int, int]:
    return (2, cfg.q, 2) if cfg.op == "parity" else (cfg.p, 2, cfg.p)


def target_model(cfg, seeds, init_scale, device, weak=None):
    """The decoder-only transformer; token embedding A @ B when `weak` (A, p x d_W) is given."""
    vocab, n_ctx, n_out = vocab_ctx_out(cfg)
    return common.transformer(vocab, n_ctx, n_out, n_layers=cfg.n_layers, d_model=cfg.d_model,
                              d_mlp=cfg.d_mlp, n_heads=cfg.n_heads, d_head=cfg.d_head, init_scales=init_scale,
                              seeds=seeds, weak=weak, layer_norm=cfg.layer_norm).to(device)


# =============================================================================


def table1(summary: dict, device: str) -> list[dict]:
    """Table 1: per phase, the training time and epochs until 99% test accuracy (weak: until it
    reached transfer_at, where its embedding was taken); the mean over members when there are several
    (they share one model, so the times are the run's). GrokTransfer's total adds the weak phase."""
    rows = []
    for phase, s in summary["phases"].items():
        members = s["members"]
        if phase == "weak":
            secs = [m["compute_s"] for m in members]
            epochs = [m["stopped_at"] if m["stopped_at"] is not None else m["epochs"] for m in members]
            until = "transfer_at"
        else:
            secs = [m["compute_s_to_test_99"] for m in members]
            epochs = [m["first_epoch_test_99"] for m in members]
            until = "99% test"
        reached = [i for i, e in enumerate(epochs) if e is not None and secs[i] is not None]
        rows.append(dict(phase=phase, until=until, reached=len(reached) == len(members),
                         ms=round(1e3 * float(np.mean([secs[i] for i in reached])), 1) if reached else None,
                         epochs=float(np.mean([epochs[i] for i in reached])) if reached else None))
    by = {r["phase"]: r for r in rows}
    if all(ph in by and by[ph]["ms"] is not None for ph in ("weak", "groktransfer")):
        rows.append(dict(phase="weak + groktransfer", until="99% test", reached=by["groktransfer"]["reached"],
                         ms=round(by["weak"]["ms"] + by["groktransfer"]["ms"], 1), epochs=None))
    print(f"Table 1 (device: {device}; training time = forward + backward + AdamW, evaluation excluded)")
    print(f"{'phase':22s} {'until':12s} {'ms':>12s} {'epochs':>8s}")
    for r in rows:
        ms = f"{r['ms']:.0f}" if r["ms"] is not None else "not reached"
        ep = f"{r['epochs']:.0f}" if r["epochs"] is not None else "-"
        print(f"{r['phase']:22s} {r['until']:12s} {ms:>12s} {ep:>8s}")
    return rows


@harness.script
def main(argv=None):
    cfg = resolve(harness.config_or_exit(Config(), argv, {"op": OPS, "precision": common.PRECISIONS}, check))
    weak_loaded = (harness.load_weak_embedding(cfg.weak_embedding, cfg.p, cfg.seeds, dict(op=cfg.op, p=cfg.p))
                   if cfg.weak_embedding and cfg.op != "parity" else None)
    run = harness.open_run(cfg, "transformer")
    device = harness.pick_device(cfg.device)
    harness.set_seed(cfg.seed, cfg.deterministic)
    phases = harness.phase_list(cfg.phases, PHASES)
    symbol = "+-*/"[OPS.index(cfg.op)] if cfg.op != "parity" else ""
    task = f"({cfg.q}, {cfg.k})-parity" if cfg.op == "parity" else f"a {symbol} b mod {cfg.p}"
    title = f"{task}, {cfg.n_layers}-layer transformer (d_model {cfg.d_model})"
    print(f"run directory {run}  device {device}  {title}  phases {', '.join(phases)}  (init, lr, wd): "
          + "  ".join(f"{ph} {phase_setting(cfg, ph)}" for ph in phases))

    data = make_data(cfg, device)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    train_kw = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, eval_every=cfg.eval_every,
                    quiet=cfg.quiet, precision=cfg.precision)
    vocab, n_ctx, n_out = vocab_ctx_out(cfg)
    n_train = len(data["y_train"])
    flops = common.transformer_flops(n_train * n_ctx, cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.n_heads,
                                     cfg.d_head, n_ctx, n_out, n_train)
    header = dict(device=harness.device_name(device), op=cfg.op, n_train=n_train, n_test=len(data["y_test"]),
                  flops_per_epoch=flops)
    record = harness.RunRecord(run, cfg, header, title=title)

    # 1. weak FNN (exp_modular's), stopped at transfer_at test accuracy; its embedding is A
    weak = weak_loaded
    if "weak" in phases:
        model = weak_model(cfg, seeds, device)
        hist = common.train(model, data, epochs=cfg.weak_epochs, lr=cfg.weak_lr, wd=cfg.weak_wd,
                            stop_at=cfg.transfer_at, desc="weak", ckpt=record.checkpoint("weak"), **train_kw)
        weak = record.weak_done(hist, model, transfer(model), cfg.transfer_at, op=cfg.op, p=cfg.p)
    elif weak is not None:
        record.summary["weak_embedding"] = cfg.weak_embedding

    # 2-4. the transformer: GrokTransfer (token embedding A @ B), from scratch, and with GrokFast
    for phase in [ph for ph in phases if ph != "weak"]:
        init, lr, wd = phase_setting(cfg, phase)
        A = weak if phase == "groktransfer" else random_a(cfg, seeds) if phase == "random_ab" else None
        model = target_model(cfg, seeds, init, device, weak=A)
        n = min(cfg.probe_size, n_train)
        tracker = common.Tracker(model, data["x_train"][:n], data["y_train"][:n], cfg.track, cfg.track_every,
                                 n_out) if cfg.track else None
        grokfast = phase == "grokfast"
        beta2 = cfg.grokfast_beta2 if grokfast and cfg.grokfast_beta2 is not None else cfg.beta2
        hist = common.train(model, data, epochs=cfg.epochs, lr=lr, wd=wd, stop_at=cfg.stop_at, desc=phase,
                            ckpt=record.checkpoint(phase), tracker=tracker,
                            **dict(train_kw, betas=(cfg.beta1, beta2)),
                            grad_filter=GrokFast(cfg.grokfast_alpha, cfg.grokfast_lamb) if grokfast else None)
        record.phase_done(phase, hist, model)

    record.summary["table1"] = table1(record.summary, header["device"])
    harness.save_json(record.summary, run / "summary.json")
    record.save_models()
    png = plots.plot_dynamics(run, title=title)
    if cfg.track:
        print(f"wrote {plots.plot_progress(run, title=title)}")
    print(f"wrote {run / 'summary.json'} and {png}")
    return run


if __name__ == "__main__":
    main()
