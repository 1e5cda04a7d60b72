"""Shared pieces of the GrokTransfer experiments: config, runtime, models, training loop, metrics, plots.

Every experiment script (exp_*.py) imports this one module and nothing else from the project.
The pieces here are the stable, tested ones; the experiment logic (data, which models, the transfer)
lives in the scripts, where a researcher who copies a script will edit it.

K members at once
-----------------
Every model here holds K >= 1 independent members (seeds, init scales, learning rates, weight
decays) as stacked parameters with a leading K dimension, and the training function steps them
together with batched matmuls. K = 1 is the ordinary run; multi-seed bands and the paper's grid
search use the same code. Members never mix: the loss is a sum of per-member losses, and each
member's init is drawn from its own seeded generator, so a member trained among K others follows
the same trajectory (to float32 rounding) as when it is trained alone (tests/test_common.py).

Re-plot a finished run:  python common.py plot runs/modular/<name>
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import itertools
import io
import json
import math
import os
import random
import sys
import tempfile
import time
import types
import typing
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

# -----------------------------------------------------------------------------
# Configuration: defaults (a dataclass in the script) < --config FILE.yaml < --key value flags


class ConfigError(ValueError):
    """Bad user input. Scripts turn it into a one-line message and exit status 2."""


def _base_type(tp):
    """(type, optional) for a field annotation such as `float`, `float | None`, `Optional[str]`."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _coerce(key, value, tp, choices):
    """Convert one raw value (from YAML or the command line) to the field's type, or raise."""
    base, optional = _base_type(tp)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    if typing.get_origin(base) is list:  # list[float], list[str]: a YAML list, or "a,b,c" / several args
        item = typing.get_args(base)[0]
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(key, v.strip() if isinstance(v, str) else v, item, choices) for v in value]
    want = getattr(base, "__name__", str(base))
    try:
        if base is bool:
            if isinstance(value, bool):
                out = value
            elif isinstance(value, str) and value.lower() in ("true", "1", "yes"):
                out = True
            elif isinstance(value, str) and value.lower() in ("false", "0", "no"):
                out = False
            else:
                raise ValueError
        elif base is int:
            if isinstance(value, bool):
                raise ValueError
            f = float(value)  # accepts "10000" and "1e4"
            if not f.is_integer():
                raise ValueError
            out = int(f)
        elif base is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)  # YAML 1.1 reads 1e-3 as a string; float() takes it
        elif base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            out = str(value)
        else:
            raise ConfigError(f"config key '{key}' has an unsupported type {tp}")
    except (ValueError, TypeError):
        raise ConfigError(f"config key '{key}' expects {want}{' or none' if optional else ''}, got {value!r}") from None
    if key in choices and out not in choices[key]:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, choices[key]))}; got {out!r}")
    return out


def parse_config(defaults, argv: list[str], choices: dict | None = None):
    """Return a copy of the dataclass `defaults` overridden by `--config FILE` and then `--key value`.

    Types follow the dataclass annotations; an unknown key, a wrong type or a value outside
    `choices[key]` raises ConfigError with a one-line message naming the key.
    A bool field may be given as a bare flag (`--deterministic`). A list field takes a YAML list,
    a comma-separated value, or several values (`--grid_lrs 1e-3 1e-2`).
    """
    choices = choices or {}
    hints = typing.get_type_hints(type(defaults))
    names = [f.name for f in dataclasses.fields(defaults)]
    values = dataclasses.asdict(defaults)

    def unknown(key):
        return ConfigError(f"unknown config key '{key}'; valid keys: {', '.join(names)}")

    # split argv into (key, raw value) pairs; --config is handled first wherever it appears
    pairs, config_file, i = [], None, 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ConfigError(f"unexpected argument '{tok}'; use --key value")
        key, eq, raw = tok[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if key in hints and _base_type(hints[key])[0] is bool and (nxt is None or nxt.startswith("--")):
                raw = "true"  # bare boolean flag
            elif key in hints and typing.get_origin(_base_type(hints[key])[0]) is list and nxt is not None:
                j = i + 1  # a list flag takes every value up to the next --flag: --merge DIR1 DIR2
                while j < len(argv) and not argv[j].startswith("--"):
                    j += 1
                raw, i = ",".join(argv[i + 1:j]), j - 1
            elif nxt is None:
                raise ConfigError(f"config key '{key}' needs a value")
            else:
                raw, i = nxt, i + 1
        i += 1
        if key == "config":
            config_file = raw
        else:
            pairs.append((key, raw))

    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {config_file}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            raise ConfigError(f"config file {config_file} is not valid YAML{where}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file} must be a mapping of key: value")
        for key, raw in loaded.items():
            if key not in hints:
                raise unknown(key)
            values[key] = _coerce(key, raw, hints[key], choices)
    for key, raw in pairs:
        if key not in hints:
            raise unknown(key)
        values[key] = _coerce(key, raw, hints[key], choices)
    return type(defaults)(**values)


def config_or_exit(defaults, argv=None, choices=None, check=None):
    """parse_config + the script's own `check(cfg)`; any ConfigError -> one line on stderr, exit 2."""
    try:
        cfg = parse_config(defaults, sys.argv[1:] if argv is None else argv, choices)
        if check is not None:
            check(cfg)
        return cfg
    except ConfigError as e:
        fail(str(e))


def fail(msg: str, status: int = 2):
    """Print a one-line error naming the problem and exit (status 2 = bad input)."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(status)


# -----------------------------------------------------------------------------
# Runtime: device, seeding, run directory, atomic files


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None


def set_seed(seed: int, deterministic: bool = False):
    """Seed python, numpy and torch (all devices). Model init draws from its own generators anyway."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # CPU kernels are deterministic already; this makes CUDA ones so too (or raise if impossible)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


RESUME_FREE = ("name", "out", "quiet", "resume", "ckpt_every")  # keys a resumed run may change


def open_run(cfg, experiment: str) -> Path:
    """The run directory of cfg (created), with config.yaml written. With cfg.resume the directory must
    hold a run whose config.yaml agrees with cfg on every key that changes results (ConfigError naming
    the first that does not); nothing is created or written before that check."""
    if getattr(cfg, "resume", False):
        path = Path(cfg.out) if cfg.out else Path("runs") / experiment / cfg.name if cfg.name else None
        if path is None or not (path / "config.yaml").is_file():
            raise ConfigError(f"--resume needs the run's directory (--out DIR or --name NAME) holding its "
                              f"config.yaml; none found{f' in {path}' if path else ''}")
        try:
            old = yaml.safe_load((path / "config.yaml").read_text()) or {}
        except yaml.YAMLError:
            raise ConfigError(f"--resume: {path / 'config.yaml'} is not valid YAML") from None
        new = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        for key, value in new.items():
            if key not in RESUME_FREE and old.get(key) != value:
                raise ConfigError(f"--resume: config key '{key}' is {value!r} but the run used {old.get(key)!r}; "
                                  f"resuming would change its results")
    run = run_dir(experiment, cfg.name, cfg.out)
    save_config(cfg, run / "config.yaml")
    return run


def run_dir(experiment: str, name: str, out: str) -> Path:
    """runs/<experiment>/<name or timestamp>/, or `out` if given. Fails (exit 2) if not writable."""
    path = Path(out) if out else Path("runs") / experiment / (name or time.strftime("%Y%m%d-%H%M%S"))
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe", delete=True)
        probe.close()
    except OSError as e:
        raise ConfigError(f"output directory {path} is not writable ({e.strerror})") from None
    return path


def write_atomic(path: Path, data: bytes | str):
    """Write to a temporary file beside `path`, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(obj, path: Path):
    """torch.save through write_atomic."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())


def save_config(cfg, path: Path):
    write_atomic(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def save_json(obj, path: Path):
    write_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


# -----------------------------------------------------------------------------
# Models: K members held as stacked parameters (leading dim K). Bias-free throughout, as in the
# paper ("all FNN models ... are homogeneous and do not have bias terms").


def _per_member(value, K: int) -> list[float]:
    """A scalar or a length-K sequence -> list of K floats."""
    if isinstance(value, (int, float)):
        return [float(value)] * K
    value = [float(v) for v in value]
    if len(value) != K:
        raise ValueError(f"expected {K} per-member values, got {len(value)}")
    return value


def linear_init(gen: torch.Generator, fan_in: int, shape, scale: float) -> torch.Tensor:
    """PyTorch's default nn.Linear weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), times init_scale.

    (kaiming_uniform_ with a=sqrt(5) has bound sqrt(6/((1+5) fan_in)) = 1/sqrt(fan_in).)
    Stored as (in, out) so that a forward pass is x @ W.
    """
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound * scale


def embedding_init(gen: torch.Generator, shape, scale: float) -> torch.Tensor:
    """PyTorch's default nn.Embedding init, N(0, 1), times init_scale."""
    return torch.randn(shape, generator=gen) * scale


class Embedding(nn.Module):
    """A plain trainable embedding table per member: weight (K, vocab, d)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)  # (K, V, d)

    def table(self) -> torch.Tensor:
        return self.weight  # (K, V, d)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Dense input x (n, V) -> (K, n, d): the embedding as a bias-free linear first layer."""
        return torch.matmul(x, self.weight)


class FactoredEmbedding(nn.Module):
    """GrokTransfer's embedding E = A @ B (paper Section 2.2), both factors trainable.

    A (K, vocab, d_weak) starts as the weak model's embedding; B (K, d_weak, d_target) is random.
    For dense inputs (parity, MNIST) the same module is the first layer: x @ A @ B (`project`).
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        super().__init__()
        if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0] or A.shape[2] != B.shape[1]:
            raise ValueError(f"FactoredEmbedding needs A (K, V, r) and B (K, r, d); got {tuple(A.shape)} and {tuple(B.shape)}")
        self.A = nn.Parameter(A)  # (K, V, r)
        self.B = nn.Parameter(B)  # (K, r, d)

    def table(self) -> torch.Tensor:
        return torch.bmm(self.A, self.B)  # (K, V, d)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Dense input x (n, V) -> (K, n, d), i.e. x @ A @ B per member."""
        return torch.matmul(torch.matmul(x, self.A), self.B)


class FixedEmbedding(nn.Module):
    """A fixed, non-trainable input embedding (paper Fig 2): one table (V, d), a buffer, read by all K
    members (table() has the (K, V, d) shape of the trainable embeddings)."""

    def __init__(self, table: torch.Tensor, members: int):
        super().__init__()
        self.register_buffer("fixed", table)
        self.members = members

    def table(self) -> torch.Tensor:
        return self.fixed.expand(self.members, -1, -1)


def factored_embedding(weak: torch.Tensor, vocab: int, d_target: int, init_scales, seeds) -> FactoredEmbedding:
    """A = the weak embedding (not rescaled), B drawn like a default nn.Linear(d_weak, d_target) times init_scale.

    `weak` is (V, r) (one weak model for every member) or (K, V, r) (one per member).
    """
    K = len(seeds)
    if weak.dim() == 2:
        weak = weak.unsqueeze(0).expand(K, -1, -1)
    if weak.dim() != 3 or weak.shape[0] != K:
        raise ConfigError(f"weak embedding must be (vocab, d) or ({K}, vocab, d); got shape {tuple(weak.shape)}")
    if weak.shape[1] != vocab:
        raise ConfigError(f"weak embedding has vocabulary size {weak.shape[1]} but the task needs {vocab}")
    r = weak.shape[2]
    scales = _per_member(init_scales, K)
    B = torch.stack([linear_init(torch.Generator().manual_seed(s), r, (r, d_target), c) for s, c in zip(seeds, scales)])
    return FactoredEmbedding(weak.detach().clone().float(), B)


class TokenMLP(nn.Module):
    """K bias-free ReLU MLPs reading a sequence of tokens through an embedding, tokens concatenated.

    f(x) = W_L relu(... relu(W_1 [E x_1; E x_2; ...])), as in appendix A.3.1. A "two-layer FNN" has
    one hidden layer (widths=[16]); a "three-layer FNN" two (widths=[512, 512]).
    """

    def __init__(self, embed: nn.Module, weights: list[torch.Tensor]):
        super().__init__()
        self.embed = embed
        self.layers = nn.ParameterList([nn.Parameter(w) for w in weights])  # each (K, in, out)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        table = self.embed.table()  # (K, V, d)
        return table[:, x].reshape(table.shape[0], x.shape[0], -1)  # (K, n, tokens * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inputs(x)
        for i, w in enumerate(self.layers):
            h = torch.bmm(h, w)  # (K, n, out)
            if i < len(self.layers) - 1:
                h = torch.relu(h)
        return h  # (K, n, n_out) logits

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The first hidden layer's activations, (K, n, width) (progress measures)."""
        return torch.relu(torch.bmm(self.inputs(x), self.layers[0]))


def token_mlp(vocab: int, n_tokens: int, d_embed: int, widths: list[int], n_out: int, init_scales, seeds,
              weak: torch.Tensor | None = None, fixed: torch.Tensor | None = None) -> TokenMLP:
    """Build K members. Member k draws all its weights from Generator(seeds[k]): embedding, then layers.

    With `weak` given, the embedding is FactoredEmbedding(A=weak, B random) instead of a plain table.
    With `fixed` (vocab, d_embed) given, it is that table, not trained (FixedEmbedding).
    """
    K = len(seeds)
    scales = _per_member(init_scales, K)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    if fixed is not None:
        if fixed.shape != (vocab, d_embed):
            raise ConfigError(f"fixed embedding must be ({vocab}, {d_embed}); got {tuple(fixed.shape)}")
        embed = FixedEmbedding(fixed.float(), K)
    elif weak is None:
        embed = Embedding(torch.stack([embedding_init(g, (vocab, d_embed), c) for g, c in zip(gens, scales)]))
    else:
        # B uses a seed stream of its own so the layers below get the same draws with or without transfer
        embed = factored_embedding(weak, vocab, d_embed, scales, [s + 10_000_019 for s in seeds])
    sizes = [n_tokens * d_embed, *widths, n_out]
    weights = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        weights.append(torch.stack([linear_init(g, fan_in, (fan_in, fan_out), c) for g, c in zip(gens, scales)]))
    return TokenMLP(embed, weights)


class DenseMLP(nn.Module):
    """K bias-free ReLU MLPs on dense inputs x (n, d_in) (parity, MNIST).

    With an embedding: f(x) = W_L relu(... relu(W_1 (x E))), E (d_in x d_embed) linear, as the token
    embedding of TokenMLP (for one-hot x the two are the same model); E may be FactoredEmbedding
    (x A B). Without one, f(x) = W_L relu(... relu(W_1 x)) and W_1 is the first layer that a weak
    model hands over as A.
    """

    def __init__(self, embed: nn.Module | None, weights: list[torch.Tensor], embed_act: bool = False,
                 biases: list[torch.Tensor] | None = None):
        super().__init__()
        self.embed, self.embed_act = embed, embed_act  # embed_act: ReLU after x E (E is then a layer)
        self.layers = nn.ParameterList([nn.Parameter(w) for w in weights])  # each (K, in, out)
        self.biases = nn.ParameterList([nn.Parameter(b) for b in biases]) if biases else None  # each (K, 1, out)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        K = self.layers[0].shape[0]
        h = self.embed.project(x) if self.embed is not None else x.expand(K, -1, -1)  # (K, n, d)
        return torch.relu(h) if self.embed is not None and self.embed_act else h

    def layer(self, i: int, h: torch.Tensor) -> torch.Tensor:
        h = torch.bmm(h, self.layers[i])
        return h + self.biases[i] if self.biases is not None else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inputs(x)
        for i in range(len(self.layers)):
            h = self.layer(i, h)
            if i < len(self.layers) - 1:
                h = torch.relu(h)
        return h  # (K, n, n_out)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The first hidden layer's activations, (K, n, width) (progress measures)."""
        return torch.relu(self.layer(0, self.inputs(x)))


def dense_mlp(d_in: int, d_embed: int | None, widths: list[int], n_out: int, init_scales, seeds,
              weak: torch.Tensor | None = None, embed_act: bool = False, bias: bool = False) -> DenseMLP:
    """Build K DenseMLP members, member k from Generator(seeds[k]) (embedding first, then layers).

    d_embed None: no embedding, layers d_in -> widths -> n_out. Otherwise a linear embedding d_in ->
    d_embed, drawn like a default nn.Linear(d_in, d_embed) times init_scale (a dense input needs the
    fan-in scaling that N(0, 1) token tables do not), or, with `weak` (d_in, r) or (K, d_in, r) given,
    FactoredEmbedding(A = weak, B random) as in token_mlp. bias: every layer gets a bias, drawn like
    nn.Linear's, U(+-1/sqrt(fan_in)) times init_scale, after all the weights.
    """
    K = len(seeds)
    scales = _per_member(init_scales, K)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    embed, first = None, d_in
    if d_embed is not None:
        if weak is None:
            embed = Embedding(torch.stack([linear_init(g, d_in, (d_in, d_embed), c) for g, c in zip(gens, scales)]))
        else:
            embed = factored_embedding(weak, d_in, d_embed, scales, [s + 10_000_019 for s in seeds])
        first = d_embed
    sizes = [first, *widths, n_out]
    weights = [torch.stack([linear_init(g, i, (i, o), c) for g, c in zip(gens, scales)]) for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [torch.stack([linear_init(g, i, (1, o), c) for g, c in zip(gens, scales)])
              for i, o in zip(sizes[:-1], sizes[1:])] if bias else None
    return DenseMLP(embed, weights, embed_act, biases)


class Transformer(nn.Module):
    """K decoder-only transformers laid out as in Nanda et al. (2023): learned token and position
    embeddings, then n_layers residual blocks h += Attn(h); h += MLP(h), no LayerNorm, and logits
    read at the last position, W_U h[-1]. Attention is causal multi-head, softmax(q k^T / sqrt(d_head)),
    through torch's scaled_dot_product_attention; Q, K, V, O have no biases and the MLP is
    W_out relu(W_in h + b_in) + b_out (Nanda's). Weights are stacked per member: (K, in, out).

    embed: Embedding or FactoredEmbedding (its table() is (K, vocab, d_model)); pos: (K, n_ctx, d_model).
    layer_norm: pre-LayerNorm blocks instead, h += Attn(LN(h)); h += MLP(LN(h)), and LN before the
    unembedding (the GPT-2-style model of Lee et al. (2024)'s GrokFast code, which Fig 8 "follows");
    each LN has a per-member gain and bias (blocks' ln1_w, ln1_b, ln2_w, ln2_b; ln_f).
    """

    def __init__(self, embed: nn.Module, pos: torch.Tensor, blocks: list[dict], unembed: torch.Tensor, n_heads: int,
                 ln_f: dict | None = None):
        super().__init__()
        self.embed, self.n_heads = embed, n_heads
        self.ln_f = nn.ParameterDict({k: nn.Parameter(v) for k, v in ln_f.items()}) if ln_f else None
        self.pos = nn.Parameter(pos)  # (K, n_ctx, d)
        self.blocks = nn.ModuleList(nn.ParameterDict({k: nn.Parameter(v) for k, v in b.items()}) for b in blocks)
        self.unembed = nn.Parameter(unembed)  # (K, d, n_out)

    def forward(self, x: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        """x (n, T) tokens -> logits (K, n, n_out) at the last position, or (K, n, T, n_out)."""
        table = self.embed.table()  # (K, V, d)
        K, d = table.shape[0], table.shape[2]
        n, T = x.shape
        h = (table[:, x] + self.pos[:, None, :T]).reshape(K, n * T, d)  # (K, n T, d): one bmm per weight

        def norm(h, w, b):  # LayerNorm with a per-member gain and bias
            return F.layer_norm(h, h.shape[-1:]) * w + b

        for b in self.blocks:
            a = norm(h, b["ln1_w"], b["ln1_b"]) if self.ln_f is not None else h
            qkv = torch.bmm(a, b["w_qkv"]).view(K * n, T, 3, self.n_heads, -1)  # (K n, T, 3, H, d_head)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (K n, H, T, d_head)
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (K n, H, T, d_head)
            h = h + torch.bmm(z.transpose(1, 2).reshape(K, n * T, -1), b["w_o"])
            a = norm(h, b["ln2_w"], b["ln2_b"]) if self.ln_f is not None else h
            h = h + torch.bmm(torch.relu(torch.bmm(a, b["w_in"]) + b["b_in"]), b["w_out"]) + b["b_out"]
        if self.ln_f is not None:
            h = norm(h, self.ln_f["w"], self.ln_f["b"])
        if all_positions:
            return torch.bmm(h, self.unembed).view(K, n, T, -1)
        last = h.view(K, n, T, d)[:, :, -1]  # (K, n, d)
        return torch.bmm(last, self.unembed)  # (K, n, n_out) logits


def transformer(vocab: int, n_ctx: int, n_out: int, *, n_layers: int, d_model: int, d_mlp: int, n_heads: int,
                d_head: int, init_scales, seeds, weak: torch.Tensor | None = None, layer_norm: bool = False) -> Transformer:
    """Build K Transformer members, member k from Generator(seeds[k]), with PyTorch's default inits
    times init_scale (the paper's "init scale"): token and position embeddings as nn.Embedding,
    N(0, 1); every weight and bias as nn.Linear, U(+-1/sqrt(fan_in)). With `weak` (vocab, r) or
    (K, vocab, r), the token embedding is FactoredEmbedding(A = weak, B random) as in token_mlp.
    layer_norm: pre-LN blocks; LayerNorm gains start at 1 and biases at 0 (nn.LayerNorm's default,
    not scaled: init scale multiplies weights).
    """
    K = len(seeds)
    scales = _per_member(init_scales, K)
    gens = [torch.Generator().manual_seed(s) for s in seeds]

    def linear(fan_in, shape):
        return torch.stack([linear_init(g, fan_in, shape, c) for g, c in zip(gens, scales)])

    if weak is None:
        embed = Embedding(torch.stack([embedding_init(g, (vocab, d_model), c) for g, c in zip(gens, scales)]))
    else:
        embed = factored_embedding(weak, vocab, d_model, scales, [s + 10_000_019 for s in seeds])
    pos = torch.stack([embedding_init(g, (n_ctx, d_model), c) for g, c in zip(gens, scales)])
    hd = n_heads * d_head
    blocks = [dict(w_qkv=linear(d_model, (d_model, 3 * hd)), w_o=linear(hd, (hd, d_model)),
                   w_in=linear(d_model, (d_model, d_mlp)), b_in=linear(d_model, (1, d_mlp)),
                   w_out=linear(d_mlp, (d_mlp, d_model)), b_out=linear(d_mlp, (1, d_model)))
              for _ in range(n_layers)]
    unembed = linear(d_model, (d_model, n_out))
    ln_f = None
    if layer_norm:
        def ln():
            return torch.ones(K, 1, d_model), torch.zeros(K, 1, d_model)
        for b in blocks:
            (b["ln1_w"], b["ln1_b"]), (b["ln2_w"], b["ln2_b"]) = ln(), ln()
        ln_f = dict(zip(("w", "b"), ln()))
    return Transformer(embed, pos, blocks, unembed, n_heads, ln_f)


def transformer_flops(n_tokens: int, n_layers: int, d_model: int, d_mlp: int, n_heads: int, d_head: int, n_ctx: int,
                      n_out: int, n_seqs: int) -> int:
    """Training FLOPs of one full-batch epoch (forward + backward = 3 x forward): 2 per multiply-add of
    every matmul over n_tokens token positions, attention scores and mixing included, plus the
    unembedding at the last position of each of n_seqs sequences."""
    hd = n_heads * d_head
    per_token = n_layers * (d_model * 3 * hd + hd * d_model + 2 * d_model * d_mlp + 2 * n_ctx * hd)
    return 6 * (n_tokens * per_token + n_seqs * d_model * n_out)


def n_members(model: nn.Module) -> int:
    return next(model.parameters()).shape[0]


def weight_norm(model: nn.Module) -> torch.Tensor:
    """Per-member L2 norm of all parameters, (K,)."""
    return torch.sqrt(sum(p.detach().pow(2).flatten(1).sum(1) for p in model.parameters()))


# -----------------------------------------------------------------------------
# Losses and accuracy, per member: logits (K, n, C), labels (n,) -> (K,)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    K, n, C = logits.shape
    loss = F.cross_entropy(logits.reshape(K * n, C), y.repeat(K), reduction="none")
    return loss.view(K, n).mean(1)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == y).float().mean(1)


def mse_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared error against one-hot labels, mean over points and classes (Liu et al.'s MNIST loss)."""
    target = F.one_hot(y, logits.shape[-1]).to(logits.dtype)
    return (logits.float() - target).pow(2).mean((1, 2))


def logistic_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Binary labels y = ±1 (n,), one logit per point (K, n, 1): mean log(1 + exp(-y f)) per member."""
    return F.softplus(-y * logits.squeeze(-1).float()).mean(1)


def sign_accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction with sign(f) == y (f = 0 counts as wrong)."""
    return (torch.sign(logits.squeeze(-1)) == y).float().mean(1)


# -----------------------------------------------------------------------------
# AdamW on stacked parameters with per-member lr and weight decay. Same arithmetic as
# torch.optim.AdamW (single-tensor path): p *= 1 - lr*wd; m, v moments; p -= lr/bc1 * m/(sqrt(v)/sqrt(bc2)+eps)


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


class AdamW:
    def __init__(self, params, lr, wd, betas=(0.9, 0.999), eps=1e-8, grokfast: GrokFast | None = None):
        self.params = [p for p in params]
        self.grokfast = grokfast  # filters the gradients at the start of every step
        K = self.params[0].shape[0]
        dev = self.params[0].device
        self.lr = torch.tensor(_per_member(lr, K), device=dev)  # (K,)
        self.wd = torch.tensor(_per_member(wd, K), device=dev)  # (K,)
        self.betas, self.eps, self.step_count = betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.active = torch.ones(K, dtype=torch.bool, device=dev)  # frozen members keep their state
        self.all_active = True  # host-side copy, refreshed by the caller at evaluation time

    @torch.no_grad()
    def step(self):
        self.step_count += 1
        b1, b2 = self.betas
        bc1, bc2_sqrt = 1 - b1 ** self.step_count, math.sqrt(1 - b2 ** self.step_count)
        if self.grokfast is not None:
            self.grokfast.apply(self.params)
        for p, m, v in zip(self.params, self.m, self.v):
            shape = (-1,) + (1,) * (p.dim() - 1)
            lr, wd = self.lr.view(shape), self.wd.view(shape)
            g = p.grad
            if self.all_active:
                p.mul_(1 - lr * wd)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p.sub_(lr / bc1 * m / (v.sqrt() / bc2_sqrt + self.eps))
            else:
                keep = self.active.view(shape)
                new_m = torch.lerp(m, g, 1 - b1)
                new_v = v * b2 + (1 - b2) * g * g
                new_p = p * (1 - lr * wd) - lr / bc1 * new_m / (new_v.sqrt() / bc2_sqrt + self.eps)
                m.copy_(torch.where(keep, new_m, m))
                v.copy_(torch.where(keep, new_v, v))
                p.copy_(torch.where(keep, new_p, p))


# -----------------------------------------------------------------------------
# Progress measures on a fixed probe set (issue 8): empirical NTK, kernel-task alignment, O-information


def ntk_gram(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Empirical NTK of every member on probe inputs x (n, ...), in the "sum of logits" form of
    Mohamadi et al. (2023): Theta[k, i, j] = <d S_k(x_i)/d theta_k, d S_k(x_j)/d theta_k>, with
    S_k(x) = sum over classes of member k's logits and theta_k all its trainable parameters.
    One backward pass per probe point (members share it: their parameters are separate slices).
    Returns (K, n, n), float64."""
    params = [p for p in model.parameters() if p.requires_grad]
    K = n_members(model)
    rows = []
    for i in range(len(x)):
        grads = torch.autograd.grad(model(x[i:i + 1]).sum(), params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(K, -1)
                               for g, p in zip(grads, params)], 1))  # (K, P)
    J = torch.stack(rows, 1).double()  # (K, n, P)
    return torch.bmm(J, J.transpose(1, 2))


def ntk_change(theta: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
    """||Theta_t - Theta_0||_F / ||Theta_0||_F per member (paper Fig 3), (K,)."""
    return (theta - theta0).flatten(1).norm(dim=1) / theta0.flatten(1).norm(dim=1)


def centered_alignment(kernel: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Centred kernel-task alignment (Kumar et al., Section 5; Cortes et al. 2012):
    <H K H, H Y Y^T H>_F / (||H K H||_F ||H Y Y^T H||_F), H = I - 11^T/n, Y the one-hot labels.
    kernel (K, n, n) or (n, n) -> (K,) or scalar; 1 for a kernel proportional to the label kernel."""
    n = labels.shape[0]
    Y = F.one_hot(labels.long(), n_classes).to(kernel.dtype)
    H = torch.eye(n, dtype=kernel.dtype, device=kernel.device) - 1.0 / n
    target = H @ (Y @ Y.T) @ H
    centred = H @ kernel @ H
    inner = (centred * target).sum((-2, -1))
    return inner / (centred.flatten(-2).norm(dim=-1) * target.norm())


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
    """Differential entropy (nats) of a Gaussian with covariance cov (d, d): (d log(2 pi e) + log det) / 2."""
    d = cov.shape[0]
    return 0.5 * (d * math.log(2 * math.pi * math.e) + np.linalg.slogdet(cov)[1])


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
            if omega < best["synergy"] - 1e-9:  # a tie (e.g. an independent variable added) keeps the smaller multiplet
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
    return dict(synergy=best["synergy"], redundancy=best["redundancy"], synergy_size=float(best["synergy_size"]))


TRACKABLE = ("ntk", "cka", "oinfo")


class Tracker:
    """Progress measures of every member on a fixed probe subset, computed at epoch 0, at powers of two
    below `every` and every `every` epochs by common.train (at evaluation, outside the timed training):
      ntk:   ||Theta_t - Theta_0||_F / ||Theta_0||_F of the empirical NTK (Theta_0 from the model as
             built, so a resumed run gets the same reference);
      cka:   centred alignment of Theta_t with the label kernel (Kumar et al.);
      oinfo: synergy, redundancy and synergy_size of the first hidden layer (model.hidden(x));
    and always wnorm:<parameter>, the L2 norm of each parameter tensor (the weight norm per layer).
    Calling it returns {measure: (K,) array}."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str], every: int,
                 n_classes: int, n_bins: int = 10):
        bad = [n for n in names if n not in TRACKABLE]
        if bad:
            raise ConfigError(f"track must be a subset of {', '.join(TRACKABLE)}; got {','.join(names)}")
        if "oinfo" in names and not hasattr(model, "hidden"):
            raise ConfigError(f"track 'oinfo' needs a model with a first hidden layer (model.hidden); "
                              f"{type(model).__name__} has none")
        self.x, self.y, self.names, self.every = x, y, list(names), every
        self.n_classes, self.n_bins = n_classes, n_bins
        self.theta0 = ntk_gram(model, x) if {"ntk", "cka"} & set(names) else None

    def __call__(self, model: nn.Module, epoch: int | None = None) -> dict[str, np.ndarray]:
        out = {}
        if self.theta0 is not None:
            theta = ntk_gram(model, self.x)
            if "ntk" in self.names:
                out["ntk_change"] = ntk_change(theta, self.theta0).cpu().numpy()
            if "cka" in self.names:
                out["kernel_alignment"] = centered_alignment(theta, self.y, self.n_classes).cpu().numpy()
        if "oinfo" in self.names:
            with torch.no_grad():
                h = model.hidden(self.x).float().cpu().numpy()  # (K, s, width)
            per = [oinfo_measures(hk, self.n_bins) for hk in h]
            for key in ("synergy", "redundancy", "synergy_size"):
                out[key] = np.array([m[key] for m in per])
        for name, p in model.named_parameters():  # weight norm per layer, beside the measures
            out[f"wnorm:{name}"] = p.detach().flatten(1).norm(dim=1).cpu().numpy()
        return out

# -----------------------------------------------------------------------------
# Training: one plain function, called once per phase. Full batch; no host sync between evaluations.

METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "weight_norm")


@torch.no_grad()
def evaluate(model, data, loss_fn, acc_fn, chunk: int = 16384) -> torch.Tensor:
    """(K, 5) tensor of METRICS for every member; the test set is evaluated in chunks."""
    out = []
    for x, y in ((data["x_train"], data["y_train"]), (data["x_test"], data["y_test"])):
        loss_sum = acc_sum = 0
        for i in range(0, len(y), chunk):
            logits = model(x[i:i + chunk])
            n = len(y[i:i + chunk])
            loss_sum = loss_sum + loss_fn(logits, y[i:i + chunk]) * n
            acc_sum = acc_sum + acc_fn(logits, y[i:i + chunk]) * n
        out += [loss_sum / len(y), acc_sum / len(y)]
    out.append(weight_norm(model))
    return torch.stack(out, 1)  # (K, 5)


class Checkpoint:
    """Where one phase keeps its checkpoint, how often it writes it, and whether to resume from it.
    on_interrupt(history) is called after Ctrl-C has saved the checkpoint (to write metrics so far)."""

    def __init__(self, path: Path, every: int = 0, resume: bool = False, on_interrupt=None):
        self.path, self.every, self.resume = Path(path), every, resume
        self.on_interrupt = on_interrupt or (lambda history: None)

    def save(self, state: dict):
        save_atomic(state, self.path)

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=False)


def rng_state() -> dict:
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _sigint_flag():
    """While active, Ctrl-C sets a flag (checked between steps) instead of raising mid-update."""
    import signal
    import threading
    hit = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: hit.append(signum))
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, previous)


PRECISIONS = ("float32", "tf32", "bf16")


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device):
    """float32: plain float32 (TF32 off); tf32: float32 storage, TF32 matmuls on CUDA (no-op on the
    CPU); bf16: autocast of the forward pass to bfloat16, float32 weights and optimizer state."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _keep_members(model, opt, keep: torch.Tensor):
    """Drop every member not in `keep` (indices) from the model's parameters and the optimizer state.
    The parameters are replaced by new, smaller ones (resizing .data in place confuses autograd)."""
    new = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                new[id(p)] = module._parameters[name] = nn.Parameter(p.detach()[keep])
    opt.params = [new[id(p)] for p in opt.params]
    for module in model.modules():
        if isinstance(module, FixedEmbedding):
            module.members = len(keep)
    opt.m, opt.v = [m[keep] for m in opt.m], [v[keep] for v in opt.v]
    opt.lr, opt.wd, opt.active = opt.lr[keep], opt.wd[keep], opt.active[keep]
    if opt.grokfast is not None and opt.grokfast.h is not None:
        opt.grokfast.h = [h[keep] for h in opt.grokfast.h]


def train(model, data, *, epochs: int, lr, wd, betas=(0.9, 0.999), eps=1e-8, eval_every: int = 10,
          stop_at: float | None = None, loss_fn=cross_entropy, acc_fn=accuracy, desc: str = "train",
          quiet: bool = False, precision: str = "float32", compact: bool = False,
          ckpt: "Checkpoint | None" = None, grokfast: tuple[float, float] | None = None,
          tracker: "Tracker | None" = None) -> dict:
    """Full-batch AdamW on all K members of `model` for `epochs` epochs; returns the history.

    data: dict of device tensors x_train, y_train, x_test, y_test.
    lr, wd: a float or one value per member.
    Evaluates at epoch 0, at every multiple of eval_every, at powers of two below eval_every (so log-x
    plots have early points) and at the last epoch. Between evaluations nothing waits on the device.
    stop_at: a member whose test accuracy reaches it stops updating (frozen); training ends when all have.
    A member whose train loss becomes NaN/inf is frozen and marked failed at that epoch; if all members
    fail the phase stops and history["diverged"] is True.
    precision: float32 | tf32 | bf16 (precision_context).
    compact: once at most half the members still train, drop the frozen ones from the model so they
    cost nothing (a grid search, where most points stop early). The model then holds only the members
    still training when it ended; their metrics rows keep every member (a dropped one repeats its last).
    ckpt: a Checkpoint: save the whole state every ckpt.every epochs and at the end (atomically); with
    ckpt.resume, continue from the saved state (a finished phase returns its saved history at once).
    Ctrl-C (SIGINT) saves a checkpoint at the end of the current step, calls ckpt.on_interrupt(history
    so far) and exits with status 130.
    grokfast: (alpha, lamb): filter every gradient with GrokFast before the AdamW step.
    tracker: a Tracker (or any object with .every and __call__(model, epoch) -> {name: (K,) array}),
    called at epoch 0, at powers of two below tracker.every and every tracker.every epochs (outside
    compute_s); its values are history["tracked"]: {"epochs": (T,), measure: (T, K)} (NaN for dropped members).
    Returns dict: epochs (E,), metrics (E, K, 5) numpy, stop_epoch / failed_epoch (K,) (-1 = never),
    epochs_run, wall_s, compute_s (E,): seconds spent training (forward, backward, optimizer) up to
    each logged epoch, evaluation excluded (the device is synchronised around every evaluation).
    """
    K = n_members(model)
    device = next(model.parameters()).device
    opt = AdamW(model.parameters(), lr, wd, betas, eps, GrokFast(*grokfast) if grokfast else None)
    x, y = data["x_train"], data["y_train"]
    stop_epoch = np.full(K, -1)
    failed_epoch = np.full(K, -1)
    alive = np.arange(K)  # the original index of each member the model still holds
    last_row = np.full((K, len(METRICS)), np.nan, dtype=np.float32)
    rows, epochs_logged, compute_s = [], [], []
    tracked: dict[str, list] = {"epochs": []}
    eval_s = 0.0  # seconds spent evaluating (excluded from compute_s)
    eval_at = set(range(0, epochs + 1, eval_every)) | {e for e in (1, 2, 4, 8, 16, 32, 64) if e < eval_every} | {epochs}
    track_at = set()
    if tracker is not None and compact:
        raise ValueError("train: a tracker keeps per-member references (Theta_0), so it cannot be used with compact=True")
    if tracker is not None:  # every `every` epochs, and at powers of two below it (early dynamics on log-x plots)
        track_at = set(range(0, epochs + 1, tracker.every)) | {e for e in (1, 2, 4, 8, 16, 32, 64) if e < tracker.every}
        eval_at |= track_at
    bar = _progress(epochs, desc, quiet)
    log_every = max(eval_every, (epochs // 10) // eval_every * eval_every)
    t0, epoch = time.perf_counter(), 0

    def record(epoch):
        """Evaluate; the one host sync per evaluation. Returns False when no member is left training."""
        nonlocal alive, eval_s
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_eval = time.perf_counter()
        compute_s.append(t_eval - t0 - eval_s)
        last_row[alive] = evaluate(model, data, loss_fn, acc_fn).cpu().numpy()  # (K held, 5)
        if epoch in track_at:
            tracked["epochs"].append(epoch)
            for name, values in tracker(model, epoch).items():
                full = np.full(K, np.nan)
                full[alive] = values
                tracked.setdefault(name, []).append(full)
        eval_s += time.perf_counter() - t_eval
        row = last_row.copy()  # (K, 5); members dropped by `compact` repeat their last values
        rows.append(row)
        epochs_logged.append(epoch)
        newly_failed = ~np.isfinite(row[:, 0]) & (failed_epoch < 0) & (stop_epoch < 0)
        failed_epoch[newly_failed] = epoch
        if stop_at is not None:
            reached = (row[:, 3] >= stop_at) & (stop_epoch < 0) & (failed_epoch < 0)
            stop_epoch[reached] = epoch
        running = (stop_epoch < 0) & (failed_epoch < 0)
        if compact and running.any() and running[alive].sum() <= len(alive) // 2:
            keep = np.flatnonzero(running[alive])  # positions within the members still held
            _keep_members(model, opt, torch.as_tensor(keep, device=device))
            alive = alive[keep]
        opt.all_active = bool(running[alive].all())
        if not opt.all_active:
            opt.active.copy_(torch.as_tensor(running[alive], device=device))
        bar.set_postfix_str(f"train {np.nanmean(row[:, 1]):.3f} test {np.nanmean(row[:, 3]):.3f}")
        bar.update(epoch - bar.n)
        if bar.disable and not quiet and (epoch % log_every == 0 or epoch == epochs):
            print(f"[{desc}] epoch {epoch:6d}  train_acc {np.nanmean(row[:, 1]):.4f}  test_acc {np.nanmean(row[:, 3]):.4f}"
                  f"  train_loss {np.nanmean(row[:, 0]):.4g}  {time.perf_counter() - t0:.1f}s", flush=True)
        return running.any()

    def history(done=False):
        return dict(epochs=np.array(epochs_logged), metrics=np.stack(rows), stop_epoch=stop_epoch.copy(),
                    failed_epoch=failed_epoch.copy(), epochs_run=epoch, wall_s=time.perf_counter() - t0,
                    compute_s=np.array(compute_s), eval_s=eval_s, diverged=bool((failed_epoch >= 0).all()),
                    **({"tracked": {k: np.array(v) for k, v in tracked.items()}} if tracker is not None else {}))

    def save(done):
        ckpt.save(dict(done=done, epoch=epoch, model=model.state_dict(), alive=alive, last_row=last_row,
                       opt=dict(m=opt.m, v=opt.v, step_count=opt.step_count, lr=opt.lr, wd=opt.wd,
                                active=opt.active, all_active=opt.all_active,
                                grokfast=opt.grokfast.h if opt.grokfast is not None else None),
                       history=history(), rng=rng_state()))

    state = ckpt.load() if ckpt is not None and ckpt.resume else None
    if state is not None:  # continue where the checkpoint left off
        saved = state["history"]
        if saved["metrics"].shape[1] != K:
            raise ConfigError(f"checkpoint {ckpt.path} holds {saved['metrics'].shape[1]} members, the run has {K}")
        alive = state["alive"]
        if len(alive) < K:
            _keep_members(model, opt, torch.as_tensor(alive, device=device))
        model.load_state_dict(state["model"])
        o = state["opt"]
        opt.m = [t.to(device) for t in o["m"]]
        opt.v = [t.to(device) for t in o["v"]]
        opt.step_count, opt.all_active = o["step_count"], o["all_active"]
        opt.lr, opt.wd, opt.active = o["lr"].to(device), o["wd"].to(device), o["active"].to(device)
        if opt.grokfast is not None and o.get("grokfast") is not None:
            opt.grokfast.h = [t.to(device) for t in o["grokfast"]]
        last_row[:] = state["last_row"]
        rows, epochs_logged = list(saved["metrics"]), list(saved["epochs"])
        compute_s, eval_s = list(saved.get("compute_s", [])), saved.get("eval_s", 0.0)
        tracked = {k: list(v) for k, v in saved.get("tracked", {"epochs": []}).items()}
        stop_epoch[:], failed_epoch[:] = saved["stop_epoch"], saved["failed_epoch"]
        epoch, t0 = state["epoch"], time.perf_counter() - saved["wall_s"]
        set_rng_state(state["rng"])
        if state["done"]:
            bar.close()
            return history()
        bar.update(epoch)
        if not quiet:
            print(f"[{desc}] resuming from epoch {epoch}", flush=True)

    with precision_context(precision, device), _sigint_flag() as interrupted:
        going = record(0) if state is None else bool(((stop_epoch < 0) & (failed_epoch < 0)).any())
        while going and epoch < epochs:
            epoch += 1
            loss = loss_fn(model(x), y)  # (K,)
            model.zero_grad(set_to_none=True)
            loss.float().sum().backward()  # members are independent: d(sum)/d(member k) = d(loss_k)
            opt.step()
            if epoch in eval_at:
                going = record(epoch)
            if ckpt is not None and ckpt.every and epoch % ckpt.every == 0:
                save(done=False)
            if interrupted():
                bar.close()
                if ckpt is None:
                    fail(f"interrupted at epoch {epoch} of phase '{desc}' (no checkpoint)", status=130)
                save(done=False)
                ckpt.on_interrupt(history())
                fail(f"interrupted at epoch {epoch} of phase '{desc}'; checkpoint and metrics saved. "
                     f"Resume: the same command with --resume", status=130)
        if epoch not in epochs_logged:
            record(epoch)
    if ckpt is not None:
        save(done=True)
    bar.close()  # the last record() copied to the host, so the device is idle here
    diverged = bool((failed_epoch >= 0).all())
    if diverged and not quiet:
        print(f"[{desc}] all members diverged (NaN/inf loss); first at epoch {failed_epoch.min()}", file=sys.stderr)
    elif (failed_epoch >= 0).any() and not quiet:
        print(f"[{desc}] members {np.flatnonzero(failed_epoch >= 0).tolist()} diverged (NaN/inf loss)", file=sys.stderr)
    return history()


def _progress(total: int, desc: str, quiet: bool):
    """tqdm bar on a terminal; disabled (and replaced by log lines) when output is not a terminal."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, disable=True if quiet else None, leave=False, dynamic_ncols=True)


# -----------------------------------------------------------------------------
# Metrics over a history


def first_epoch(epochs, values, threshold: float) -> int | None:
    """First logged epoch with value >= threshold, or None if never. Compared in float32, the precision
    accuracies are computed in, so 190/200 counts as 95% whether read from memory or from metrics.csv."""
    hit = np.flatnonzero(np.asarray(values, dtype=np.float32) >= np.float32(threshold))
    return int(np.asarray(epochs)[hit[0]]) if len(hit) else None


def time_gap(epochs, train_acc, test_acc, threshold: float = 0.95) -> int | None:
    """The paper's Time Gap (Section 4.1): first epoch test acc >= 95% minus first epoch train acc >= 95%.
    None when either is never reached (the paper then sets 1/TimeGap = 0)."""
    tr, te = first_epoch(epochs, train_acc, threshold), first_epoch(epochs, test_acc, threshold)
    return None if tr is None or te is None else te - tr


def inverse_time_gap(gap: int | None) -> float:
    """1/TimeGap, 0 when the model never reaches 95%. A gap of 0 or less (test reached no later than
    train, at the evaluation resolution) counts as 1 epoch."""
    return 0.0 if gap is None else 1.0 / max(gap, 1)


def summarize(history: dict, member: int | None = None) -> dict:
    """Per-phase summary fields for one member (or for member 0 when K == 1)."""
    K = history["metrics"].shape[1]
    if member is None:
        if K != 1:
            return summarize_members([summarize(history, k) for k in range(K)])
        member = 0
    ep, m = history["epochs"], history["metrics"][:, member]
    finite = np.isfinite(m).all(1)
    last = m[np.flatnonzero(finite)[-1]] if finite.any() else np.full(len(METRICS), np.nan)
    gap = time_gap(ep, m[:, 1], m[:, 3])
    test_95, test_99 = first_epoch(ep, m[:, 3], 0.95), first_epoch(ep, m[:, 3], 0.99)
    secs = history.get("compute_s")  # training time up to each logged epoch (common.train's histories)

    def clean(v):
        return None if v is None or not np.isfinite(v) else float(v)

    def compute_to(e):
        return None if secs is None or e is None else round(float(secs[list(ep).index(e)]), 3)

    return dict(
        first_epoch_train_95=first_epoch(ep, m[:, 1], 0.95),
        first_epoch_test_95=test_95,
        first_epoch_test_99=test_99,
        time_gap=gap,
        inverse_time_gap=inverse_time_gap(gap),
        final_train_acc=clean(last[1]),
        final_test_acc=clean(last[3]),
        final_train_loss=clean(last[0]),
        final_test_loss=clean(last[2]),
        max_test_acc=clean(np.nanmax(m[:, 3])) if finite.any() else None,
        epochs=int(history["epochs_run"]),
        stopped_at=int(history["stop_epoch"][member]) if history["stop_epoch"][member] >= 0 else None,
        diverged_at=int(history["failed_epoch"][member]) if history["failed_epoch"][member] >= 0 else None,
        wall_s=round(float(history["wall_s"]), 3),
        compute_s=compute_to(int(ep[-1])) if len(ep) else None,  # forward + backward + optimizer, no evaluation
        compute_s_to_test_95=compute_to(test_95),
        compute_s_to_test_99=compute_to(test_99),
    )


def summarize_members(members: list[dict]) -> dict:
    """Across K members (seeds): mean and standard deviation of Time Gap (over members that reach 95%),
    of 1/TimeGap (0 for those that never do, as the paper counts them), and of the final accuracies."""
    def stats(name, values):
        v = np.array([x for x in values if x is not None], dtype=float)
        return {f"{name}_mean": float(v.mean()) if len(v) else None, f"{name}_std": float(v.std()) if len(v) else None}

    gaps = [m["time_gap"] for m in members]
    return dict(**stats("time_gap", gaps), n_reached_95=sum(g is not None for g in gaps),
                **stats("inverse_time_gap", [m["inverse_time_gap"] for m in members]),
                **stats("final_train_acc", [m["final_train_acc"] for m in members]),
                **stats("final_test_acc", [m["final_test_acc"] for m in members]),
                epochs=members[0]["epochs"], wall_s=members[0]["wall_s"], members=members)


def history_rows(phase: str, history: dict) -> list[dict]:
    """Rows of metrics.csv: phase, member, epoch, METRICS."""
    rows = []
    for i, epoch in enumerate(history["epochs"]):
        for k, row in enumerate(history["metrics"][i]):
            rows.append(dict(phase=phase, member=k, epoch=int(epoch), **{n: float(v) for n, v in zip(METRICS, row)}))
    return rows


def write_metrics(path: Path, rows: list[dict]):
    """Write every row so far to metrics.csv atomically (called after each phase)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["phase", "member", "epoch", *METRICS])
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buf.getvalue())


def read_metrics(path: Path) -> dict[str, dict]:
    """metrics.csv -> {phase: {"epochs": (E,), "metrics": (E, K, 5)}} in file order of phases."""
    by_phase: dict[str, dict] = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            d = by_phase.setdefault(r["phase"], {})
            d.setdefault(int(r["epoch"]), {})[int(r["member"])] = [float(r[n]) for n in METRICS]
    out = {}
    for phase, d in by_phase.items():
        epochs = sorted(d)
        K = max(len(v) for v in d.values())
        out[phase] = dict(epochs=np.array(epochs), metrics=np.array([[d[e][k] for k in range(K)] for e in epochs]))
    return out


def progress_rows(phase: str, tracked: dict) -> list[dict]:
    """Rows of progress.csv (long format): phase, member, epoch, measure, value."""
    rows = []
    for name, values in tracked.items():
        if name == "epochs":
            continue
        for i, epoch in enumerate(tracked["epochs"]):
            for k, v in enumerate(values[i]):
                rows.append(dict(phase=phase, member=k, epoch=int(epoch), measure=name, value=float(v)))
    return rows


def write_progress(path: Path, rows: list[dict]):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["phase", "member", "epoch", "measure", "value"])
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buf.getvalue())


def read_progress(path: Path) -> dict[str, dict]:
    """progress.csv -> {phase: {measure: (epochs (T,), values (T, K))}}."""
    raw: dict = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            raw.setdefault(r["phase"], {}).setdefault(r["measure"], {}).setdefault(int(r["epoch"]), {})[int(r["member"])] = float(r["value"])
    out = {}
    for phase, measures in raw.items():
        out[phase] = {}
        for name, d in measures.items():
            epochs = sorted(d)
            K = max(len(v) for v in d.values())
            out[phase][name] = (np.array(epochs), np.array([[d[e].get(k, np.nan) for k in range(K)] for e in epochs]))
    return out


# -----------------------------------------------------------------------------
# A run's record: metrics.csv, summary.json and models.pt, rewritten after every phase


def device_name(device: torch.device) -> str:
    return str(device) if device.type != "cuda" else torch.cuda.get_device_name(device)


class RunRecord:
    """What a script writes as its phases finish. summary.json holds `header` (task, sizes, device)
    and one entry per phase (common.summarize + the script's extras); metrics.csv every evaluation of
    every phase so far; models.pt the final parameters (save_models)."""

    def __init__(self, run: Path, header: dict, title: str = "", ckpt_every: int = 0, resume: bool = False):
        self.run, self.title = Path(run), title
        self.summary = dict(header, phases={})
        self.rows, self.models, self.progress = [], {}, []
        self.ckpt_every, self.resume = ckpt_every, resume

    def checkpoint(self, phase: str) -> Checkpoint:
        """The checkpoint of one phase, ckpt_<phase>.pt in the run directory; Ctrl-C writes metrics.csv
        with the phase's rows so far."""
        def partial(history):
            write_metrics(self.run / "metrics.csv", self.rows + history_rows(phase, history))
        return Checkpoint(self.run / f"ckpt_{phase}.pt", self.ckpt_every, self.resume, partial)

    def phase_done(self, phase: str, hist: dict, model: nn.Module | None = None, extra: dict | None = None) -> dict:
        """Record a finished phase; print one line; if every member diverged, draw what there is and
        exit with status 1."""
        self.rows.extend(history_rows(phase, hist))
        write_metrics(self.run / "metrics.csv", self.rows)
        if "tracked" in hist:
            self.progress.extend(progress_rows(phase, hist["tracked"]))
            write_progress(self.run / "progress.csv", self.progress)
        s = self.summary["phases"][phase] = {**summarize(hist), **(extra or {})}
        if model is not None:
            self.models[phase] = {k: v.cpu() for k, v in model.state_dict().items()}
        save_json(self.summary, self.run / "summary.json")
        gaps = [m["time_gap"] for m in s["members"]] if "members" in s else s["time_gap"]
        final = hist["metrics"][-1]  # (K, 5)
        print(f"[{phase}] done: epochs {hist['epochs_run']}  final train acc {np.nanmean(final[:, 1]):.4f}  "
              f"test acc {np.nanmean(final[:, 3]):.4f}  Time Gap {gaps}  {hist['wall_s']:.1f}s")
        if hist["diverged"]:
            plot_dynamics(self.run, title=self.title)
            fail(f"phase '{phase}' diverged (NaN/inf loss) at epoch {hist['failed_epoch'].min()}; "
                 f"metrics so far are in {self.run}", status=1)
        return s

    def save_models(self):
        save_atomic(self.models, self.run / "models.pt")


def transfer_point(hist: dict, transfer_at: float | None) -> dict:
    """Where each member of a weak phase stopped (stop_at = transfer_at) or ended: transfer_epoch,
    transfer_test_acc (lists over members), transfer_target_reached (all members got there)."""
    epochs = list(hist["epochs"])
    epoch_k = [int(e) if e >= 0 else hist["epochs_run"] for e in hist["stop_epoch"]]
    return dict(transfer_epoch=epoch_k,
                transfer_test_acc=[float(hist["metrics"][epochs.index(e), k, 3]) for k, e in enumerate(epoch_k)],
                transfer_target_reached=transfer_at is None or bool((hist["stop_epoch"] >= 0).all()))


def weak_phase_done(record: RunRecord, hist: dict, model: nn.Module, weak: torch.Tensor, transfer_at: float | None,
                    **meta) -> torch.Tensor:
    """After a weak phase: where each member stopped (transfer_point), a warning when transfer_at was
    never reached, embedding.pt ({'embedding', transfer fields, meta}) and the record's phase entry.
    weak: the transferred matrix per member (K, V, r); returned as (V, r) for a one-member run."""
    transfer = transfer_point(hist, transfer_at)
    if weak.shape[0] == 1:
        weak, transfer = weak[0], single(transfer)
    if not transfer["transfer_target_reached"]:
        print(f"[weak] warning: test accuracy never reached transfer_at = {transfer_at} in {hist['epochs_run']} "
              f"epochs; transferring the final weights", file=sys.stderr)
    save_atomic(dict(embedding=weak, **transfer, **meta), record.run / "embedding.pt")
    record.phase_done("weak", hist, model, transfer)
    return weak


def require(cfg, positive=(), fractions=()):
    """ConfigError unless every key in `positive` is > 0 and every key in `fractions` is none or in (0, 1]."""
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(cfg, key)}")
    for key in fractions:
        v = getattr(cfg, key)
        if v is not None and not 0 < v <= 1:
            raise ConfigError(f"{key} must be in (0, 1], got {v}")


def phase_list(text: str, allowed: tuple[str, ...]) -> list[str]:
    """'weak,groktransfer' -> ['weak', 'groktransfer']; ConfigError on an empty list or an unknown phase."""
    phases = [s.strip() for s in text.split(",") if s.strip()]
    if not phases or any(s not in allowed for s in phases):
        raise ConfigError(f"phases must be a comma-separated subset of {', '.join(allowed)}; got '{text}'")
    return phases


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
    shift = lambda e: np.where(e >= 0, e + off, e)  # -1 (never) stays -1
    return dict(epochs=np.concatenate([first["epochs"], second["epochs"][keep] + off]),
                metrics=np.concatenate([first["metrics"], second["metrics"][keep]]),
                stop_epoch=np.where(first["stop_epoch"] >= 0, first["stop_epoch"], shift(second["stop_epoch"])),
                failed_epoch=np.where(first["failed_epoch"] >= 0, first["failed_epoch"], shift(second["failed_epoch"])),
                epochs_run=off + second["epochs_run"], wall_s=first["wall_s"] + second["wall_s"],
                compute_s=np.concatenate([first["compute_s"], second["compute_s"][keep] + first["compute_s"][-1]]),
                eval_s=first["eval_s"] + second["eval_s"], diverged=second["diverged"])


def single(d: dict) -> dict:
    """Per-member lists of length 1 -> their value (summaries of a one-seed run read as scalars)."""
    return {k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in d.items()}


# -----------------------------------------------------------------------------
# Grid search (appendix A.3: "grid search over init scale x lr x wd; the best is the first to reach
# 99% test accuracy"): grid points are trained as the members of K-member models, batch after batch.

PAPER_GRID = dict(  # DESIGN.md, "Selection of hyperparameters": 16 x 8 x 9 = 1152 points
    init_scales=[0.05] + [round(0.1 * i, 1) for i in range(1, 16)],
    lrs=[1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 1e-1, 0.5, 1.0],
    wds=[1e-4, 1e-3, 1e-2, 1e-1, 1.0, 2.0, 3.0, 4.0, 5.0],
)
GRID_KEYS = ("point", "init_scale", "lr", "wd")


def grid_points(init_scales, lrs, wds) -> list[dict]:
    """Every (init scale, lr, wd), numbered in a fixed order (init scale slowest, wd fastest)."""
    return [dict(point=i, init_scale=c, lr=l, wd=w)
            for i, (c, l, w) in enumerate(itertools.product(init_scales, lrs, wds))]


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n; '' -> (0, 1). Shard i runs points i, i+n, i+2n, ..."""
    if not text:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ConfigError(f"shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def auto_members(build, data, n_points: int, cap: int = 256, headroom: float = 0.8, **train_kw) -> int:
    """How many grid points to train at once. CUDA: measure the peak memory of a short run with 1 and
    2 members, and fit as many as `headroom` of the free memory holds (at most `cap`). CPU: 1 (batched
    members are slower per member than one model on a CPU). Batches are then balanced: 1152 points at K <= 256 run
    as 5 batches of 231 or 230, not 4 x 256 + 128."""
    device = data["x_train"].device
    if device.type == "cuda":
        peaks = []
        for k in (1, 2):
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            model = build([1.0] * k)
            train(model, data, epochs=2, lr=0.0, wd=0.0, quiet=True, **{**train_kw, "eval_every": 1})
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
            del model
        per = max(peaks[1] - peaks[0], 1)
        free, _ = torch.cuda.mem_get_info(device)
        K = int((headroom * free - (peaks[0] - per)) // per)
    else:  # bench.py on a 2-core CPU, add target: 78 ms per model-epoch at K = 1, 98 at K = 4, 112 at K = 16
        K = 1
    K = max(1, min(K, cap, n_points))
    batches = math.ceil(n_points / K)
    return math.ceil(n_points / batches)


def grid_rows(batch: list[dict], history: dict, threshold: float) -> list[dict]:
    """One grid.csv row per point of a trained batch (member k = batch[k])."""
    sel = f"first_epoch_test_{threshold * 100:g}"
    rows = []
    for k, point in enumerate(batch):
        s = summarize(history, k)
        first = first_epoch(history["epochs"], history["metrics"][:, k, 3], threshold)
        status = "diverged" if s["diverged_at"] is not None else ("reached" if first is not None else "not_reached")
        rows.append({**point, sel: first, "first_epoch_train_95": s["first_epoch_train_95"],
                     "first_epoch_test_95": s["first_epoch_test_95"], "time_gap": s["time_gap"],
                     "final_train_acc": s["final_train_acc"], "final_test_acc": s["final_test_acc"],
                     "final_test_loss": s["final_test_loss"],
                     "epochs_run": next(e for e in (s["stopped_at"], s["diverged_at"], s["epochs"]) if e is not None),
                     "status": status})
    return rows


def run_grid(points: list[dict], build, data, *, epochs: int, threshold: float, members: int = 0,
             on_batch=None, quiet: bool = False, **train_kw) -> tuple[list[dict], int]:
    """Train every point of `points` to `threshold` test accuracy (or `epochs`), K at a time.

    build(init_scales) -> a model with len(init_scales) members; lr and wd per member come from the
    points. A member stops once it reaches the threshold, or is marked diverged on NaN/inf; frozen
    members are dropped from the batch once half have stopped (train(compact=True)). A CUDA
    out-of-memory error halves K and retries the batch. on_batch(rows) is called after every batch
    (to write grid.csv as it grows). Returns (rows, K used at the end).
    """
    K = members or auto_members(build, data, len(points), **train_kw)
    rows, start, t0 = [], 0, time.perf_counter()
    while start < len(points):
        batch = points[start:start + K]
        try:
            model = build([p["init_scale"] for p in batch])
            hist = train(model, data, epochs=epochs, lr=[p["lr"] for p in batch], wd=[p["wd"] for p in batch],
                         stop_at=threshold, compact=True, quiet=True, **train_kw)
        except torch.cuda.OutOfMemoryError:
            model = None
            torch.cuda.empty_cache()
            if K == 1:
                raise
            K = max(1, K // 2)
            print(f"[grid] out of device memory; retrying with {K} members per batch", file=sys.stderr)
            continue
        rows += grid_rows(batch, hist, threshold)
        start += len(batch)
        if on_batch is not None:
            on_batch(rows)
        if not quiet:
            n_reached = sum(r["status"] == "reached" for r in rows)
            print(f"[grid] {start}/{len(points)} points ({K} per batch)  {n_reached} reached {threshold:.0%}"
                  f"  batch {hist['wall_s']:.1f}s  total {time.perf_counter() - t0:.1f}s", flush=True)
    return rows, K


def selection_key(rows: list[dict]) -> str:
    """The grid.csv column of the selection threshold: first_epoch_test_99 for 99%."""
    keys = [k for k in rows[0] if k.startswith("first_epoch_test_")]
    return next((k for k in keys if k != "first_epoch_test_95"), "first_epoch_test_95")


def best_point(rows: list[dict]) -> dict | None:
    """The point that first reaches the selection threshold; ties (same evaluation epoch) go to the
    lower final test loss, then the lower point number. None when no point reached it."""
    sel = selection_key(rows) if rows else None
    reached = [r for r in rows if r["status"] == "reached"]
    if not reached:
        return None
    return min(reached, key=lambda r: (r[sel], r["final_test_loss"] if r["final_test_loss"] is not None else math.inf, r["point"]))


def write_grid(path: Path, rows: list[dict]):
    """grid.csv, sorted by point number, atomically; empty values for never / not available."""
    rows = sorted(rows, key=lambda r: r["point"])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    write_atomic(path, buf.getvalue())


def read_grid(path: Path) -> list[dict]:
    """grid.csv -> rows with numbers parsed back (empty -> None)."""
    def parse(key, v):
        if v == "" or key == "status":
            return None if v == "" else v
        return int(v) if key in ("point", "epochs_run", "time_gap") or key.startswith("first_epoch") else float(v)

    with open(path) as f:
        return [{k: parse(k, v) for k, v in r.items()} for r in csv.DictReader(f)]


def merge_grids(dirs: list[str]) -> tuple[list[dict], dict]:
    """Combine the grid.csv / grid.json of shard runs. Every shard must come from the same grid
    (same points, threshold, phase and settings); a point found twice or a missing shard is an error.
    Returns (rows, the shared grid.json content)."""
    rows, meta, seen = [], None, {}
    for d in dirs:
        path, info = Path(d) / "grid.csv", Path(d) / "grid.json"
        if not path.is_file() or not info.is_file():
            raise ConfigError(f"no grid.csv and grid.json in {d}")
        m = json.loads(info.read_text())
        same = {k: v for k, v in m.items() if k not in ("shard", "members", "wall_s", "best", "n_points_run", "device")}
        if meta is None:
            meta = same
        elif same != meta:
            diff = sorted(k for k in set(same) | set(meta) if same.get(k) != meta.get(k))
            raise ConfigError(f"{d} is from a different grid than {dirs[0]} (differs in: {', '.join(diff)})")
        for r in read_grid(path):
            if r["point"] in seen:
                raise ConfigError(f"grid point {r['point']} is in both {seen[r['point']]} and {d}")
            seen[r["point"]] = d
            rows.append(r)
    missing = meta["n_points"] - len(rows)
    if missing:
        raise ConfigError(f"the shards hold {len(rows)} of {meta['n_points']} grid points; {missing} missing")
    return sorted(rows, key=lambda r: r["point"]), meta


GRID_PHASES = ("groktransfer", "scratch")


def check_grid(cfg):
    """Validate the grid keys every exp_*.py with --grid shares (ConfigError on bad input)."""
    if cfg.grid or cfg.merge:
        if cfg.grid and cfg.merge:
            raise ConfigError("--grid runs a grid and --merge combines finished shards; give one of them")
        if cfg.seeds != 1:
            raise ConfigError("a grid trains one seed per point; leave seeds at 1 (use seed to pick it)")
        for key in ("grid_init_scales", "grid_lrs", "grid_wds"):
            values = getattr(cfg, key)
            if not values or any(v < 0 if key == "grid_wds" else v <= 0 for v in values):
                kind = "non-negative" if key == "grid_wds" else "positive"
                raise ConfigError(f"{key} must be a non-empty list of {kind} numbers, got {values}")
        if not 0 < cfg.grid_stop_at <= 1:
            raise ConfigError(f"grid_stop_at must be in (0, 1], got {cfg.grid_stop_at}")
    elif cfg.shard:
        raise ConfigError("shard needs --grid")
    if cfg.members < 0:
        raise ConfigError(f"members must be >= 0 (0 = automatic), got {cfg.members}")
    parse_shard(cfg.shard)


def grid_main(cfg, run: Path, data: dict, build, meta: dict, default=None, title: str = "", **train_kw) -> Path:
    """--grid in a script: every (init scale, lr, wd) of cfg's grid lists (this shard's share) for the
    phase cfg.grid_phase, built by build(init_scales), trained to cfg.grid_stop_at test accuracy or
    cfg.epochs with the script's AdamW settings; writes grid.csv (after every batch), grid.json, grid.png.
    meta: what else the grid depends on (task, sizes, weak model), recorded in grid.json and compared
    by --merge. default: the script's own (init, lr, wd) for this phase, printed beside the best point.
    train_kw: passed to train (loss_fn, acc_fn)."""
    points = grid_points(cfg.grid_init_scales, cfg.grid_lrs, cfg.grid_wds)
    i, n = parse_shard(cfg.shard)
    mine = points[i::n]
    done = read_grid(run / "grid.csv") if getattr(cfg, "resume", False) and (run / "grid.csv").is_file() else []
    if done:  # --resume: grid.csv holds every finished batch; train the rest
        finished = {r["point"] for r in done}
        print(f"[grid] resuming: {len(finished)} points already in {run / 'grid.csv'}")
    meta = dict(meta, phase=cfg.grid_phase, threshold=cfg.grid_stop_at, epochs=cfg.epochs, eval_every=cfg.eval_every,
                betas=[cfg.beta1, cfg.beta2], adam_eps=cfg.adam_eps, precision=cfg.precision, seed=cfg.seed,
                init_scales=cfg.grid_init_scales, lrs=cfg.grid_lrs, wds=cfg.grid_wds, n_points=len(points))
    print(f"[grid] {cfg.grid_phase}: {len(mine)} of {len(points)} points (shard {i}/{n}), "
          f"stop at {cfg.grid_stop_at:.0%} test acc or {cfg.epochs} epochs")
    todo = [p for p in mine if p["point"] not in {r["point"] for r in done}]
    rows, K = run_grid(todo, build, data, epochs=cfg.epochs, threshold=cfg.grid_stop_at, members=cfg.members,
                       on_batch=lambda rows: write_grid(run / "grid.csv", done + rows), quiet=cfg.quiet,
                       betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, eval_every=cfg.eval_every,
                       precision=cfg.precision, **train_kw) if todo else ([], cfg.members)
    return finish_grid(run, done + rows, dict(meta, shard=f"{i}/{n}", members=K, n_points_run=len(mine)), default, title)


def merge_main(cfg, experiment: str, title=None) -> Path:
    """--merge DIR ...: combine shard outputs into cfg's run directory; exits 2 on bad shards.
    title(meta) -> the heatmap's title, from the shards' own settings."""
    try:
        rows, meta = merge_grids(cfg.merge)
        run = run_dir(experiment, cfg.name, cfg.out)
    except ConfigError as e:
        fail(str(e))
    print(f"merging {len(cfg.merge)} shards: {len(rows)} points")
    return finish_grid(run, rows, dict(meta, merged_from=[str(d) for d in cfg.merge]),
                       title=title(meta) if title else "")


def finish_grid(run: Path, rows: list[dict], meta: dict, default=None, title: str = "") -> Path:
    """grid.csv, grid.json (the settings and the best point) and the heatmap grid.png."""
    best = best_point(rows)
    write_grid(run / "grid.csv", rows)
    save_json(dict(meta, best=best), run / "grid.json")
    png = plot_grid(rows, run / "grid.png", title=f"{meta['phase']} grid{', ' + title if title else ''}")
    if best is None:
        print(f"[grid] no point reached {meta['threshold']:.0%} test accuracy")
    else:
        print(f"[grid] best point: init {best['init_scale']:g}  lr {best['lr']:g}  wd {best['wd']:g}  reaches "
              f"{meta['threshold']:.0%} at epoch {best[selection_key(rows)]}"
              + (f"  (the script's default: {default})" if default is not None else ""))
    print(f"wrote {run / 'grid.csv'}, {run / 'grid.json'} and {png}")
    return run


def plot_grid(rows: list[dict], out: Path, title: str = "") -> Path:
    """Heatmap over lr (rows) x wd (columns): the first epoch at the selection threshold, best over
    init scale, with that init scale written in the cell; grey = no init scale reached it, the best
    point boxed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from matplotlib.colors import LogNorm

    sel = selection_key(rows)
    lrs, wds = sorted({r["lr"] for r in rows}), sorted({r["wd"] for r in rows})
    value = np.full((len(lrs), len(wds)), np.nan)
    scale = np.full((len(lrs), len(wds)), np.nan)
    for r in rows:
        i, j = lrs.index(r["lr"]), wds.index(r["wd"])
        if r["status"] == "reached" and not (value[i, j] <= r[sel]):  # NaN compares False: first hit wins
            value[i, j], scale[i, j] = max(r[sel], 1), r["init_scale"]
    fig, ax = plt.subplots(figsize=(max(5.5, 2.5 + 0.8 * len(wds)), max(3.6, 1.6 + 0.5 * len(lrs))))
    ax.set_facecolor("0.85")
    finite = value[np.isfinite(value)]
    norm = LogNorm(vmin=finite.min(), vmax=max(finite.max(), finite.min() * 1.01)) if len(finite) else None
    if norm is not None:
        im = ax.imshow(np.ma.masked_invalid(value), cmap="viridis_r", aspect="auto", norm=norm)
        bar = fig.colorbar(im, ax=ax)
        bar.set_label(f"first epoch with test acc >= {sel.rsplit('_', 1)[1]}%", fontsize=8)
        bar.ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        bar.set_ticks(np.unique(np.round(np.geomspace(norm.vmin, norm.vmax, 5))), labels=None)
        bar.ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    for i in range(len(lrs)):
        for j in range(len(wds)):
            if np.isfinite(value[i, j]):  # dark text on the light (early) end of the colour map
                dark = norm(value[i, j]) < 0.5
                ax.text(j, i, f"{value[i, j]:.0f}\ninit {scale[i, j]:g}", ha="center", va="center",
                        fontsize=6.5, color="black" if dark else "white")
            else:
                ax.text(j, i, "-", ha="center", va="center", fontsize=7, color="0.4")
    best = best_point(rows)
    if best is not None:
        i, j = lrs.index(best["lr"]), wds.index(best["wd"])
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2))
    ax.set_xticks(range(len(wds)), [f"{w:g}" for w in wds])
    ax.set_yticks(range(len(lrs)), [f"{l:g}" for l in lrs])
    ax.set_xlim(-0.5, len(wds) - 0.5)
    ax.set_ylim(len(lrs) - 0.5, -0.5)
    ax.set_xlabel("weight decay")
    ax.set_ylabel("learning rate")
    n_reached = sum(r["status"] == "reached" for r in rows)
    ax.set_title(f"{title}: {n_reached} of {len(rows)} points reached\n"
                 f"cell = best over init scale; red box = best point; - = none reached", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out)


# -----------------------------------------------------------------------------
# Plots: drawn from metrics.csv, so they can be redrawn for any finished run


def save_figure(fig, out, dpi: int = 120) -> Path:
    """Write a matplotlib figure to `out` as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    write_atomic(Path(out), buf.getvalue())
    return Path(out)


PHASE_TITLES = {"weak": "weak model", "groktransfer": "target via GrokTransfer", "scratch": "target from scratch",
                "grokfast": "target via GrokFast"}


def panel_note(epochs, metrics) -> str:
    """The text in a dynamics panel: the Time Gap (one member) or each member's (K > 1; "-" = never
    reached 95%), and where values are NaN/inf."""
    bad = ~np.isfinite(metrics[..., :4]).all(-1)  # (E, K)
    acc = np.where(bad[..., None], np.nan, metrics)  # NaN never counts as reaching 95%
    gaps = [time_gap(epochs, acc[:, k, 1], acc[:, k, 3]) for k in range(metrics.shape[1])]
    if len(gaps) == 1:
        note = f"Time Gap {gaps[0]}" if gaps[0] is not None else "Time Gap: 95% not reached"
    else:  # the mean curve's gap would hide a lagging member: list every member's
        note = "Time Gap per member: " + ", ".join("-" if g is None else str(g) for g in gaps)
    if bad.any():
        note += f"\nNaN/inf from epoch {epochs[bad.any(1)][0]} ({bad.any(0).sum()} of {bad.shape[1]} members)"
    return note


def plot_dynamics(run: Path, out: Path | None = None, title: str = "") -> Path:
    """Train/test accuracy against epoch (log x), one panel per phase, as in the paper's Fig 1b / 17.

    With K > 1 members: the mean, and a min-max band. Dotted lines mark the first epochs at 95%
    train and 95% test accuracy (member mean), whose distance is the Time Gap. Non-finite values are
    reported on the panel, never drawn as if they were numbers.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    phases = read_metrics(run / "metrics.csv")
    fig, axes = plt.subplots(1, len(phases), figsize=(4.2 * len(phases), 3.7), squeeze=False)
    last = max(int(d["epochs"].max()) for d in phases.values())  # one x range: phases compare by eye
    for ax, (phase, d) in zip(axes[0], phases.items()):
        ep, m = d["epochs"], d["metrics"]
        keep = ep > 0  # log axis
        ep, m = ep[keep], m[keep]
        bad = ~np.isfinite(m[..., :4]).all(-1)  # (E, K)
        for j, (name, color) in enumerate([("train", "tab:blue"), ("test", "tab:red")]):
            acc = np.where(bad, np.nan, m[..., 1 + 2 * j])  # (E, K)
            with warnings.catch_warnings():  # rows where every member is NaN stay NaN (a gap in the line)
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, lo, hi = np.nanmean(acc, 1), np.nanmin(acc, 1), np.nanmax(acc, 1)
            ax.plot(ep, mean, color=color, lw=1.4, label=name)
            if m.shape[1] > 1:
                ax.fill_between(ep, lo, hi, color=color, alpha=0.2, lw=0)
            first = first_epoch(ep, mean, 0.95)
            if first is not None:
                ax.axvline(first, color=color, ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlim(1, max(last, 2) * 1.1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("epoch")
        ax.set_title(f"{PHASE_TITLES.get(phase, phase)}\n{panel_note(ep, m)}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(loc="center left", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out or run / "dynamics.png")


MEASURE_LABELS = {"ntk_change": "||Θt - Θ0|| / ||Θ0||", "kernel_alignment": "kernel-task alignment",
                  "synergy": "synergy (min O-info, nats)", "redundancy": "redundancy (max O-info, nats)",
                  "synergy_size": "size of most synergistic multiplet"}


def plot_progress(run: Path, out: Path | None = None, title: str = "") -> Path:
    """Progress measures beside the loss curves: one column per tracked phase; the top row train and
    test loss (log y) and weight norm, then one row per measure (member mean and min-max band). A
    dotted red line marks the first epoch with test accuracy >= 95% (member mean)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    prog, metrics = read_progress(run / "progress.csv"), read_metrics(run / "metrics.csv")
    names = list(dict.fromkeys(n for p in prog.values() for n in p if not n.startswith("wnorm:")))
    if any(n.startswith("wnorm:") for p in prog.values() for n in p):
        names.append("wnorm")  # one panel: every layer's weight norm
    fig, axes = plt.subplots(1 + len(names), len(prog), figsize=(4.6 * len(prog), 2.5 * (1 + len(names))),
                             squeeze=False, sharex="col")
    for col, (phase, measures) in enumerate(prog.items()):
        ep, m = metrics[phase]["epochs"], metrics[phase]["metrics"]
        keep = ep > 0
        ax = axes[0][col]
        for j, (label, color) in enumerate([("train loss", "tab:blue"), ("test loss", "tab:red")]):
            ax.plot(ep[keep], np.nanmean(m[keep, :, 2 * j], 1), color=color, label=label)
        ax.set_yscale("log")
        ax.set_title(PHASE_TITLES.get(phase, phase), fontsize=9)
        twin = ax.twinx()
        twin.plot(ep[keep], np.nanmean(m[keep, :, 4], 1), color="gray", ls="--", lw=1, label="weight norm")
        twin.set_ylabel("weight norm", fontsize=8, color="gray")
        if col == 0:
            ax.legend(loc="upper right", fontsize=7)
        for row, name in enumerate(names, start=1):
            ax = axes[row][col]
            if name == "wnorm":
                for key, (e, v) in measures.items():
                    if key.startswith("wnorm:"):
                        ax.plot(e[e > 0], np.nanmean(v[e > 0], 1), lw=1, label=key[6:])
                ax.set_ylabel("weight norm per layer", fontsize=8)
                ax.legend(fontsize=6)
                ax.grid(alpha=0.3)
                continue
            if name not in measures:
                ax.set_visible(False)
                continue
            e, v = measures[name]
            keep_t = e > 0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                ax.plot(e[keep_t], np.nanmean(v[keep_t], 1), color="tab:green")
                if v.shape[1] > 1:
                    ax.fill_between(e[keep_t], np.nanmin(v[keep_t], 1), np.nanmax(v[keep_t], 1), color="tab:green", alpha=0.2)
            bad = ~np.isfinite(v).all()
            ax.set_ylabel(MEASURE_LABELS.get(name, name) + (" (NaN!)" if bad else ""), fontsize=8)
            ax.grid(alpha=0.3)
        first = first_epoch(ep[keep], np.nanmean(m[keep, :, 3], 1), 0.95)  # where test accuracy reaches 95%
        for row in range(1 + len(names)):
            axes[row][col].set_xscale("log")
            if first is not None:
                axes[row][col].axvline(first, color="tab:red", ls=":", lw=1)
        axes[-1][col].set_xlabel("epoch")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out or run / "progress.png", dpi=110)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "plot":
        if not (Path(sys.argv[2]) / "metrics.csv").is_file():
            fail(f"no metrics.csv in {sys.argv[2]}")
        print(plot_dynamics(Path(sys.argv[2])))
    else:
        fail("usage: python common.py plot RUN_DIR")
