"""Throughput of the project's trainer against a plain training loop, on one workload.

Workload (issue 7): a+b mod p (113), 25% train, the three-layer target FNN (d_embed 128, width 512),
full-batch AdamW, cross-entropy. Measured, each after a warm-up:
  reference   one model written the plain way most public grokking code uses: nn.Embedding and
              nn.Linear, torch.optim.AdamW, and every epoch a step, then an evaluation on the train
              and test sets with .item() on the losses and accuracies (four host syncs per epoch);
  trainer     common.train with K = 1 (float32), and with K in --Ks members at each of --precisions.
              It evaluates every eval_every epochs (10, as the experiments do), and that cost is in
              the time.
For each: ms per model-epoch (wall time / epochs / K), the speed-up over the reference, achieved
TFLOP/s and peak device memory. FLOPs counted: the training step only, 3 x the forward matmuls
(forward, and the backward's input and weight gradients), i.e. 6 * n_train * sum(fan_in * fan_out)
per model-epoch; the embedding gather, elementwise ops, the optimizer and evaluation are not
counted, so the figure understates the work done, the same way for every row.

Usage:
  python bench.py                        # the issue's table, on CUDA if present; writes bench.json
  python bench.py --device cpu --p 23 --d_embed 16 --width 32 --epochs 20 --Ks 2 4 --out /tmp/b.json
  python bench.py --workload transformer8 --Ks 1   # Fig 6's 8-layer transformer: ms/epoch per precision
  python bench.py --workload transformer2           # Fig 8's 2-layer transformer
The transformer workloads (exp_transformer's models on the same a+b mod 113 data, tokens (a, b)) have
no reference row: the trainer rows at each precision, K = 1 first. Their FLOPs per model-epoch are
common.transformer_flops (every matmul, attention scores included, x 3 for the backward).
The numbers that count come from a GPU; the CPU run exists for the tests and for a quick look.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import exp_modular
from common import ConfigError


TRANSFORMERS = {  # exp_transformer's shapes: Fig 6 (8 layers) and Fig 8 (2 layers)
    "transformer8": dict(n_layers=8, d_model=512, d_mlp=512, n_heads=4, d_head=128),
    "transformer2": dict(n_layers=2, d_model=128, d_mlp=512, n_heads=4, d_head=32),
}
WORKLOADS = ("fnn", *TRANSFORMERS)


@dataclass
class Config:
    workload: str = "fnn"  # fnn (issue 7's table), transformer8 or transformer2 (issue 5)
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
    for key in ("p", "d_embed", "width", "epochs", "eval_every"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(cfg, key)}")
    if cfg.warmup < 0:
        raise ConfigError(f"warmup must be >= 0, got {cfg.warmup}")
    if not cfg.Ks or any(k <= 0 for k in cfg.Ks):
        raise ConfigError(f"Ks must be a non-empty list of positive integers, got {cfg.Ks}")
    bad = [p for p in cfg.precisions if p not in common.PRECISIONS]
    if bad or not cfg.precisions:
        raise ConfigError(f"precisions must be a non-empty subset of {', '.join(common.PRECISIONS)}; got {cfg.precisions}")
    parent = Path(cfg.out).resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot write {cfg.out}: {parent} is not a writable directory")
    common.pick_device(cfg.device)


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


def reference_loop(cfg, data, epochs):
    """The plain loop: step, then evaluate train and test and log with .item(), every epoch."""
    model = PlainMLP(cfg.p, cfg.d_embed, cfg.width).to(data["x_train"].device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
    log = []
    for _ in range(epochs):
        loss = F.cross_entropy(model(data["x_train"]), data["y_train"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
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
        model = exp_modular.target_model(cfg, list(range(K)), 1.0, data["x_train"].device)
    else:
        model = common.transformer(cfg.p, 2, cfg.p, **TRANSFORMERS[cfg.workload], init_scales=1.0,
                                   seeds=list(range(K))).to(data["x_train"].device)
    common.train(model, data, epochs=epochs, lr=cfg.lr, wd=cfg.wd, eval_every=cfg.eval_every, quiet=True,
                 precision=precision)


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


def main(argv=None):
    cfg = common.config_or_exit(Config(), argv, {"workload": WORKLOADS}, check)
    device = common.pick_device(cfg.device)
    data = exp_modular.make_data("add", cfg.p, cfg.train_frac, 0, device)
    n_train = len(data["y_train"])
    if cfg.workload == "fnn":
        flops = 6 * n_train * (2 * cfg.d_embed * cfg.width + cfg.width * cfg.width + cfg.width * cfg.p)  # per model-epoch
        model_text = f"FNN {cfg.d_embed}/{cfg.width}"
        runs = [("reference", 1, "float32", lambda e: reference_loop(cfg, data, e)),
                ("trainer", 1, "float32", lambda e: trainer_run(cfg, data, e, 1, "float32"))]
    else:
        shape = TRANSFORMERS[cfg.workload]
        flops = common.transformer_flops(2 * n_train, shape["n_layers"], shape["d_model"], shape["d_mlp"],
                                         shape["n_heads"], shape["d_head"], 2, cfg.p, n_train)
        model_text = f"transformer {shape}"
        runs = [("trainer", 1, prec, lambda e, prec=prec: trainer_run(cfg, data, e, 1, prec)) for prec in cfg.precisions]
    name = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"device {name}  workload: add mod {cfg.p}, {n_train} train, {model_text}, {cfg.epochs} timed epochs")

    runs += [("trainer", K, prec, lambda e, K=K, prec=prec: trainer_run(cfg, data, e, K, prec))
             for K in cfg.Ks for prec in cfg.precisions if cfg.workload == "fnn" or K > 1]
    rows, ref_ms = [], None
    print(f"{'loop':10s} {'K':>4s} {'precision':>9s} {'ms/model-epoch':>15s} {'x ref':>7s} {'TFLOP/s':>8s} {'peak MiB':>9s}")
    for loop, K, prec, fn in runs:
        try:
            wall, peak = measure(fn, cfg, device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"{loop:10s} {K:4d} {prec:>9s}  out of device memory")
            rows.append(dict(loop=loop, K=K, precision=prec, error="out of memory"))
            continue
        ms = 1e3 * wall / cfg.epochs / K
        ref_ms = ref_ms or ms  # the first row: the reference loop (fnn) or the trainer at K = 1, first precision
        row = dict(loop=loop, K=K, precision=prec, ms_per_model_epoch=round(ms, 4),
                   speedup_vs_reference=round(ref_ms / ms, 2), tflops=float(f"{flops * K * cfg.epochs / wall / 1e12:.4g}"),
                   peak_mib=None if peak is None else round(peak, 1))
        rows.append(row)
        print(f"{loop:10s} {K:4d} {prec:>9s} {ms:15.3f} {row['speedup_vs_reference']:7.2f} {row['tflops']:8.3f} "
              f"{'-' if peak is None else f'{peak:9.0f}':>9s}", flush=True)
    common.save_json(dict(device=name, torch=torch.__version__, workload=dict(
        model=cfg.workload, op="add", p=cfg.p, n_train=n_train, epochs=cfg.epochs, eval_every=cfg.eval_every,
        **(TRANSFORMERS.get(cfg.workload) or dict(d_embed=cfg.d_embed, width=cfg.width)),
        flops_per_model_epoch=flops), rows=rows), cfg.out)
    print(f"wrote {cfg.out}")
    return rows


if __name__ == "__main__":
    main()
