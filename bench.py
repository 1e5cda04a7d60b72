"""Throughput of the project's trainer against plain training loops, on one workload.

Workload: a+b mod p (113), 25% train, the three-layer target FNN (d_embed 128, width 512), full-batch
AdamW, cross-entropy. Measured, each after a warm-up:
  plain       the fair anchor: one model written the plain way (nn.Embedding, bias-free nn.Linear,
              torch.optim.AdamW), evaluated on the train and test sets every eval_every epochs, as
              the trainer is, with .item() on the four numbers;
  plain/ep    the same loop evaluating every epoch, as much public grokking code does (more work:
              its speed-up says as much about evaluation cadence as about the trainer);
  trainer     common.train with K = 1 (float32), and with K in --Ks members at each of --precisions.
For each: ms per model-epoch (wall time / epochs / K), the speed-up over the fair anchor `plain`,
TFLOP/s and peak device memory. FLOPs counted: every matmul the row does, training (3 x forward:
forward, the backward's input and weight gradients) and evaluation (1 x forward over train and test
sets, at that row's cadence); the embedding gather, elementwise ops and the optimizer are not counted.

Usage:
  python bench.py                        # the FNN table, on CUDA if present; writes bench.json
  python bench.py --device cpu --p 23 --d_embed 16 --width 32 --epochs 20 --Ks 2 4 --out /tmp/b.json
  python bench.py --workload transformer8 --Ks 1   # Fig 6's 8-layer transformer: ms/epoch per precision
  python bench.py --workload transformer2           # Fig 8's 2-layer transformer
  python bench.py --workload attention              # the attention op alone: fused SDPA vs written out
The transformer workloads (exp_transformer's models on the same a+b mod 113 data, tokens (a, b)) have
no plain row: the trainer rows at each precision, K = 1 first. Their forward FLOPs per point come from
common.transformer_flops (every matmul, attention scores included).
The attention workload times only the causal self-attention of those two models on their 2-token
sequences, n_layers x (forward + backward) over the K x n_train sequences of one training epoch: the
fused kernel (F.scaled_dot_product_attention, what common.Transformer calls) against the same
softmax(q k^T / sqrt(d_head) + causal mask) v written out as two matmuls (a 2 x 2 score matrix per head).
The numbers that count come from a GPU; the CPU run exists for the tests and for a quick look.
"""
from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import harness
from common import ConfigError


TRANSFORMERS = {  # exp_transformer's shapes: Fig 6 (8 layers) and Fig 8 (2 layers)
    "transformer8": dict(n_layers=8, d_model=512, d_mlp=512, n_heads=4, d_head=128),
    "transformer2": dict(n_layers=2, d_model=128, d_mlp=512, n_heads=4, d_head=32),
}
WORKLOADS = ("fnn", *TRANSFORMERS, "attention")


@dataclass
class Config:
    workload: str = "fnn"  # fnn (the plain-loop table), transformer8 (Fig 6), transformer2 (Fig 8), attention
    p: int = 113  # modulus of the workload (the paper's)
    train_frac: float = 0.25  # 25% of the p^2 pairs train
    d_embed: int = 128  # target embedding dimension
    width: int = 512  # target hidden width (two hidden layers)
    lr: float = 1e-3  # AdamW lr (GrokTransfer's add setting; the value does not change the speed)
    wd: float = 1.0  # AdamW weight decay
    epochs: int = 200  # timed epochs per row
    warmup: int = 20  # untimed epochs first (allocator, cuBLAS handles, autocast caches)
    eval_every: int = 10  # the trainer's evaluation interval, as in the experiments
    Ks: list[int] = field(default_factory=lambda: [16, 64, 256])  # members per model for the batched rows
    precisions: list[str] = field(default_factory=lambda: ["float32", "tf32", "bf16"])  # for the batched rows
    device: str = "auto"  # auto = cuda if available
    out: str = "bench.json"  # where the table goes (atomic write)


def check(cfg: Config):
    for key in ("d_embed", "width", "epochs", "eval_every"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(cfg, key)}")
    if cfg.p < 2:
        raise ConfigError(f"p must be >= 2, got {cfg.p}")
    harness.check_memory(cfg.p * cfg.p * 100, f"p = {cfg.p} ({cfg.p ** 2:.3g} pairs)")
    if not 0 < cfg.train_frac < 1 or round(cfg.train_frac * cfg.p ** 2) in (0, cfg.p ** 2):
        raise ConfigError(f"train_frac must leave non-empty train and test sets of the {cfg.p ** 2} pairs, "
                          f"got {cfg.train_frac}")
    if Path(cfg.out).is_dir():
        raise ConfigError(f"out must be a file path for the table (bench.json); {cfg.out} is a directory")
    if not 0 <= cfg.warmup <= 10 ** 6:
        raise ConfigError(f"warmup must be in 0 .. 10^6 untimed epochs, got {cfg.warmup}")
    if not cfg.Ks or any(k <= 0 for k in cfg.Ks):
        raise ConfigError(f"Ks must be a non-empty list of positive integers, got {cfg.Ks}")
    bad = [p for p in cfg.precisions if p not in common.PRECISIONS]
    if bad or not cfg.precisions:
        raise ConfigError(f"precisions must be a non-empty subset of {', '.join(common.PRECISIONS)}; "
                          f"got {cfg.precisions}")
    n_params = cfg.p * cfg.d_embed + 2 * cfg.d_embed * cfg.width + cfg.width * cfg.width + cfg.width * cfg.p
    K = max(cfg.Ks)
    harness.check_size(f"width = {cfg.width}, d_embed = {cfg.d_embed}, K = {K}", n_params * K,
                       cfg.p * cfg.p * (2 * cfg.width + cfg.p) * K)
    parent = Path(cfg.out).resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot write {cfg.out}: {parent} is not a writable directory")
    harness.pick_device(cfg.device)


class PlainMLP(nn.Module):
    """The target FNN written the ordinary way: one model, nn.Embedding, bias-free nn.Linear."""

    def __init__(self, p, d_embed, width):
        super().__init__()
        self.embed = nn.Embedding(p, d_embed)
        self.l1 = nn.Linear(2 * d_embed, width, bias=False)
        self.l2 = nn.Linear(width, width, bias=False)
        self.l3 = nn.Linear(width, p, bias=False)

    def forward(self, x):
        h = self.embed(x).flatten(1)
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(h)))))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_data(p: int, train_frac: float, device) -> dict:
    """a + b mod p over all pairs, split by a generator of its own (seed 0), as exp_modular.py."""
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).T
    x, y = torch.stack([a, b], 1), (a + b) % p
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:round(train_frac * len(y))], perm[round(train_frac * len(y)):]
    split = dict(x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te])
    return {k: v.to(device) for k, v in split.items()}


def plain_loop(cfg, data, epochs, eval_every):
    """The plain loop: a step every epoch; every eval_every epochs, train and test metrics with .item()."""
    model = PlainMLP(cfg.p, cfg.d_embed, cfg.width).to(data["x_train"].device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
    log = []
    for epoch in range(1, epochs + 1):
        loss = F.cross_entropy(model(data["x_train"]), data["y_train"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if epoch % eval_every:
            continue
        with torch.no_grad():
            row = []
            for split in ("train", "test"):
                logits = model(data[f"x_{split}"])
                row += [F.cross_entropy(logits, data[f"y_{split}"]).item(),
                        (logits.argmax(-1) == data[f"y_{split}"]).float().mean().item()]
            log.append(row)
    return log


def trainer_run(cfg, data, epochs, K, precision):
    if cfg.workload == "fnn":
        model = common.token_mlp(cfg.p, 2, cfg.d_embed, [cfg.width, cfg.width], cfg.p, 1.0,
                                 list(range(K))).to(data["x_train"].device)
    else:
        model = common.transformer(cfg.p, 2, cfg.p, **TRANSFORMERS[cfg.workload], init_scales=1.0,
                                   seeds=list(range(K))).to(data["x_train"].device)
    common.train(model, data, epochs=epochs, lr=cfg.lr, wd=cfg.wd, eval_every=cfg.eval_every, quiet=True,
                 precision=precision)


def written_attention(q, k, v):
    """Causal attention written out, softmax(q k^T / sqrt(d_head) + mask) v; q, k, v (B, H, T, d_head)."""
    T = q.shape[-2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1) @ v


ATTENTION = {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
             "written": written_attention}


def attention_run(shape: dict, impl: str, n_seqs: int, precision: str, device, epochs: int):
    """n_layers x (forward + backward) of one attention implementation per epoch, on n_seqs sequences
    of 2 tokens: the attention work of one full-batch epoch of the transformer `shape`."""
    gen, size = torch.Generator().manual_seed(0), (n_seqs, shape["n_heads"], 2, shape["d_head"])
    q, k, v = (torch.randn(size, generator=gen).to(device).requires_grad_() for _ in range(3))
    grad = torch.randn(size, generator=gen).to(device)
    with common.precision_context(precision, device):
        for _ in range(epochs * shape["n_layers"]):
            ATTENTION[impl](q, k, v).backward(grad)


def attention_table(cfg, device, n_train: int, name: str) -> list[dict]:
    """Rows per model shape, K and precision: ms per model-epoch of the fused kernel and written out."""
    rows = []
    print(f"device {name}  attention of the transformer workloads: {n_train} x K sequences, "
          f"{cfg.epochs} epochs")
    print(f"{'model':13s} {'K':>4s} {'precision':>9s} {'sdpa ms':>9s} {'written ms':>10s} "
          f"{'sdpa/written':>12s}")
    for model, shape in TRANSFORMERS.items():
        for K in cfg.Ks:
            for prec in cfg.precisions:
                ms = {}
                for impl in ATTENTION:
                    run = functools.partial(attention_run, shape, impl, K * n_train, prec, device)
                    wall, _ = measure(run, cfg, device)
                    ms[impl] = 1e3 * wall / cfg.epochs / K
                rows.append(dict(model=model, K=K, precision=prec, sdpa_ms=round(ms["sdpa"], 4),
                                 written_ms=round(ms["written"], 4),
                                 sdpa_over_written=float(f"{ms['sdpa'] / ms['written']:.3g}")))
                print(f"{model:13s} {K:4d} {prec:>9s} {ms['sdpa']:9.3f} {ms['written']:10.3f} "
                      f"{ms['sdpa'] / ms['written']:12.2f}", flush=True)
    return rows


def measure(fn, cfg, device):
    """(seconds for cfg.epochs epochs, peak device memory in MiB or None on the CPU)."""
    fn(cfg.warmup)
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    fn(cfg.epochs)
    sync(device)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return wall, peak


@harness.script
def main(argv=None):
    cfg = harness.config_or_exit(Config(), argv, {"workload": WORKLOADS}, check)
    device = harness.pick_device(cfg.device)
    data = make_data(cfg.p, cfg.train_frac, device)
    n_train, n_all = len(data["y_train"]), cfg.p ** 2
    name = harness.device_name(device)
    if cfg.workload == "attention":
        rows = attention_table(cfg, device, n_train, name)
        workload = dict(model="attention", p=cfg.p, n_train=n_train, epochs=cfg.epochs, shapes=TRANSFORMERS)
        harness.save_json(dict(device=name, torch=torch.__version__, workload=workload, rows=rows), cfg.out)
        print(f"wrote {cfg.out}")
        return rows
    if cfg.workload == "fnn":
        forward = 2 * (2 * cfg.d_embed * cfg.width + cfg.width * cfg.width + cfg.width * cfg.p)  # per point
        model_text = f"FNN {cfg.d_embed}/{cfg.width}"
        runs = [("plain", 1, "float32", cfg.eval_every, lambda e: plain_loop(cfg, data, e, cfg.eval_every)),
                ("plain/ep", 1, "float32", 1, lambda e: plain_loop(cfg, data, e, 1)),
                ("trainer", 1, "float32", cfg.eval_every, lambda e: trainer_run(cfg, data, e, 1, "float32"))]
    else:
        shape = TRANSFORMERS[cfg.workload]
        forward = common.transformer_flops(2, shape["n_layers"], shape["d_model"], shape["d_mlp"],
                                           shape["n_heads"], shape["d_head"], 2, cfg.p, 1) / 3  # per point
        model_text = f"transformer {shape}"
        runs = [("trainer", 1, prec, cfg.eval_every, lambda e, prec=prec: trainer_run(cfg, data, e, 1, prec))
                for prec in cfg.precisions]
    print(f"device {name}  workload: add mod {cfg.p}, {n_train} train, {model_text}, "
          f"{cfg.epochs} timed epochs")

    runs += [("trainer", K, prec, cfg.eval_every, functools.partial(trainer_run, cfg, data, K=K,
                                                                    precision=prec))
             for K in cfg.Ks for prec in cfg.precisions if cfg.workload == "fnn" or K > 1]
    rows, ref_ms = [], None
    print(f"{'loop':10s} {'K':>4s} {'precision':>9s} {'ms/model-epoch':>15s} {'x plain':>7s} {'TFLOP/s':>8s} "
          f"{'peak MiB':>9s}")
    for loop, K, prec, every, fn in runs:
        flops = 3 * forward * n_train + forward * n_all / every  # per model-epoch: training + evaluation
        try:
            wall, peak = measure(fn, cfg, device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"{loop:10s} {K:4d} {prec:>9s}  out of device memory")
            rows.append(dict(loop=loop, K=K, precision=prec, error="out of memory"))
            continue
        ms = 1e3 * wall / cfg.epochs / K
        ref_ms = ref_ms or ms  # the first row: the plain loop (fnn) or the trainer at K = 1, first precision
        row = dict(loop=loop, K=K, precision=prec, eval_every=every, ms_per_model_epoch=round(ms, 4),
                   speedup_vs_plain=round(ref_ms / ms, 2),
                   tflops=float(f"{flops * K * cfg.epochs / wall / 1e12:.4g}"),
                   peak_mib=None if peak is None else round(peak, 1))
        rows.append(row)
        print(f"{loop:10s} {K:4d} {prec:>9s} {ms:15.3f} {row['speedup_vs_plain']:7.2f} {row['tflops']:8.3f} "
              f"{'-' if peak is None else f'{peak:9.0f}':>9s}", flush=True)
    harness.save_json(dict(device=name, torch=torch.__version__, workload=dict(
        model=cfg.workload, op="add", p=cfg.p, n_train=n_train, epochs=cfg.epochs, eval_every=cfg.eval_every,
        **(TRANSFORMERS.get(cfg.workload) or dict(d_embed=cfg.d_embed, width=cfg.width)),
        forward_flops_per_point=forward), rows=rows), cfg.out)
    print(f"wrote {cfg.out}")
    return rows


if __name__ == "__main__":
    main()
