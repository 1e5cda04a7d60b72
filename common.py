"""The research code of the GrokTransfer experiments (the run machinery is harness.py, nothing to read
to follow a run). Read first: `factored_embedding` (the paper's idea: E = A @ B, A = the weak model's
embedding, B random, both trained), `token_mlp` (the FNNs of the modular tasks) and `train` (the loop).

The model contract. A model holds K >= 1 independent members (seeds, init scales, learning rates,
weight decays) as stacked parameters:
  - every parameter has a leading dimension K (the same K for all);
  - forward(x) takes one batch x (n, ...) shared by the members and returns logits (K, n, C);
  - a transferable embedding is a module with table() -> (K, vocab, d) (tokens) and project(x) ->
    (K, n, d) (dense inputs): `Embedding`, `FactoredEmbedding`.
`train` steps the members together (batched matmuls) and checks the first two rules. Members never mix:
the loss is a sum of per-member losses and each member draws its init from its own seeded generator,
so a member among others follows the trajectory it follows alone (to rounding); K = 1 is one run.

Map, in the order a run uses it:
  1. Models       Embedding, FactoredEmbedding, factored_embedding, gather_rows, MLP, token_mlp, dense_mlp
  2. Transformer  Transformer, transformer (Nanda et al.'s decoder; pre-LN option), transformer_flops
  3. Losses       cross_entropy, accuracy (each script adds its own: MSE, logistic)
  4. Optimizer    AdamW (per-member lr and wd, an optional gradient filter)
  5. Training     train: step -> evaluate / freeze / log when due -> checkpoint when due; Phase, observe
  6. Around it    pack / restore (a checkpoint's state), precision_context, Log
  7. Metrics      METRICS and their column names (TEST_ACC, ...), first_epoch, time_gap, summarize
  8. Measures     ntk_gram, ntk_change, centered_alignment, Tracker (NTK, alignment, hidden-layer measures)
"""
from __future__ import annotations

import contextlib
import functools
import math
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class ConfigError(ValueError):
    """Bad input: a setting, a file or a model that breaks the contract above (harness: exit 2)."""


class Interrupted(Exception):
    """`train` stopped at a step boundary because `stop()` asked it to; checkpointed first if `saved`."""

    def __init__(self, signum: int, where: str, saved: bool):
        super().__init__(where)
        self.signum, self.where, self.saved = signum, where, saved


# =============================================================================
# 1. Models: K members held as stacked parameters (leading dim K). Bias-free FNNs, as in the paper
# ("all FNN models ... are homogeneous and do not have bias terms").


def _per_member(value, K: int) -> list[float]:
    """A scalar or a length-K sequence -> list of K floats."""
    value = [float(value)] * K if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(value) != K:
        raise ValueError(f"expected {K} per-member values, got {len(value)}")
    return value


def linear_init(gen: torch.Generator, fan_in: int, shape, scale: float) -> torch.Tensor:
    """PyTorch's default nn.Linear weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), times init_scale
    (kaiming_uniform_ with a=sqrt(5): bound sqrt(6/((1+5) fan_in)) = 1/sqrt(fan_in)); stored (in, out)."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound * scale


def embedding_init(gen: torch.Generator, shape, scale: float) -> torch.Tensor:
    """PyTorch's default nn.Embedding init, N(0, 1), times init_scale."""
    return torch.randn(shape, generator=gen) * scale


def member_draws(seeds, init_scales) -> list[tuple[torch.Generator, float]]:
    """(generator, init scale) of each member: member k draws all its weights from Generator(seeds[k])."""
    scales = _per_member(init_scales, len(seeds))
    return [(torch.Generator().manual_seed(s), c) for s, c in zip(seeds, scales)]


def stacked(init, members, *args) -> torch.Tensor:
    """(K, ...): init(generator, *args, init_scale) of each member (init: linear_init, embedding_init)."""
    return torch.stack([init(gen, *args, scale) for gen, scale in members])


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
            raise ValueError(f"FactoredEmbedding needs A (K, V, r) and B (K, r, d); "
                             f"got {tuple(A.shape)} and {tuple(B.shape)}")
        self.A = nn.Parameter(A)  # (K, V, r)
        self.B = nn.Parameter(B)  # (K, r, d)

    def table(self) -> torch.Tensor:
        return torch.bmm(self.A, self.B)  # (K, V, d)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Dense input x (n, V) -> (K, n, d), i.e. x @ A @ B per member."""
        return torch.matmul(torch.matmul(x, self.A), self.B)


B_SEED_OFFSET = 10_000_019  # B of member k draws from Generator(seeds[k] + this): the layers then draw the
# same numbers with or without transfer, so GrokTransfer and scratch targets differ only in the embedding


def factored_embedding(weak: torch.Tensor, vocab: int, d_target: int, init_scales, seeds):
    """GrokTransfer: A = the weak embedding (not rescaled), B drawn like a default nn.Linear(d_weak,
    d_target) times init_scale from member k's Generator(seeds[k] + B_SEED_OFFSET); both trainable.

    `weak` is (V, r) (one weak model for every member) or (K, V, r) (one per member).
    """
    K = len(seeds)
    if weak.dim() == 2:
        weak = weak.unsqueeze(0).expand(K, -1, -1)
    if weak.dim() != 3 or weak.shape[0] != K:
        raise ConfigError(f"weak embedding must be (vocab, d) or ({K}, vocab, d); got {tuple(weak.shape)}")
    if weak.shape[1] != vocab:
        raise ConfigError(f"weak embedding has vocabulary {weak.shape[1]} but the task needs {vocab}")
    r = weak.shape[2]
    B = stacked(linear_init, member_draws([s + B_SEED_OFFSET for s in seeds], init_scales), r, (r, d_target))
    return FactoredEmbedding(weak.detach().clone().float(), B)


def gather_rows(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """table[:, x], (K, V, d) and tokens (n, T) -> (K, n, T, d), by index_select: its backward adds a
    repeated token's gradients in input order on any CPU thread count (plain indexing's: in any order)."""
    return torch.index_select(table, 1, x.reshape(-1)).view(table.shape[0], *x.shape, table.shape[2])


class MLP(nn.Module):
    """K ReLU MLPs, f(x) = W_L relu(... relu(W_1 e(x))), weights stacked (K, in, out), bias-free (the
    paper's FNNs "do not have bias terms") unless `biases` (K, 1, out) are given.

    Token inputs x (n, T) (integers, the modular tasks) read their rows of the embedding table,
    concatenated: e(x) = [E x_1; E x_2; ...] (appendix A.3.1). Dense inputs x (n, d_in) (parity, MNIST)
    are multiplied by it, e(x) = x E (x A B when factored; relu(x E) with embed_act, E is then a layer);
    for one-hot x the two are the same model. Without an embedding e(x) = x, and W_1 is the layer a weak
    model hands over as A. A "two-layer FNN" has one hidden layer (widths [16]).
    """

    def __init__(self, embed: nn.Module | None, weights: list[torch.Tensor], embed_act: bool = False,
                 biases: list[torch.Tensor] | None = None):
        super().__init__()
        self.embed, self.embed_act = embed, embed_act
        self.layers = nn.ParameterList([nn.Parameter(w) for w in weights])  # each (K, in, out)
        self.biases = nn.ParameterList([nn.Parameter(b) for b in biases]) if biases else None  # (K, 1, out)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is None:
            return x.expand(self.layers[0].shape[0], -1, -1)  # (K, n, d_in)
        if not x.is_floating_point():  # tokens
            table = self.embed.table()  # (K, V, d)
            return gather_rows(table, x).reshape(table.shape[0], x.shape[0], -1)  # (K, n, tokens * d)
        h = self.embed.project(x)  # (K, n, d)
        return torch.relu(h) if self.embed_act else h

    def layer(self, i: int, h: torch.Tensor) -> torch.Tensor:
        h = torch.bmm(h, self.layers[i])
        return h + self.biases[i] if self.biases is not None else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inputs(x)
        for i in range(len(self.layers)):
            h = self.layer(i, h)
            if i < len(self.layers) - 1:
                h = torch.relu(h)
        return h  # (K, n, n_out) logits

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The first hidden layer's activations, (K, n, width) (progress measures)."""
        return torch.relu(self.layer(0, self.inputs(x)))


def token_mlp(vocab: int, n_tokens: int, d_embed: int, widths: list[int], n_out: int, init_scales, seeds,
              weak: torch.Tensor | None = None, embed: nn.Module | None = None) -> MLP:
    """Build K members. Member k draws all its weights from Generator(seeds[k]): embedding, then layers.

    With `weak` given, the embedding is factored_embedding(A = weak, B random) instead of a plain table.
    With `embed` given (a module whose table() is (K, vocab, d_embed)), it is used as is, nothing drawn.
    """
    members = member_draws(seeds, init_scales)
    if embed is None and weak is None:
        embed = Embedding(stacked(embedding_init, members, (vocab, d_embed)))
    elif embed is None:
        embed = factored_embedding(weak, vocab, d_embed, init_scales, seeds)
    sizes = [n_tokens * d_embed, *widths, n_out]
    return MLP(embed, [stacked(linear_init, members, i, (i, o)) for i, o in zip(sizes[:-1], sizes[1:])])


def dense_mlp(d_in: int, d_embed: int | None, widths: list[int], n_out: int, init_scales, seeds,
              weak: torch.Tensor | None = None, embed_act: bool = False, bias: bool = False) -> MLP:
    """Build K MLP members on dense inputs, member k from Generator(seeds[k]): embedding, then layers.

    d_embed None: no embedding, layers d_in -> widths -> n_out. Otherwise a linear embedding d_in ->
    d_embed, drawn like a default nn.Linear(d_in, d_embed) times init_scale (a dense input needs the
    fan-in scaling that N(0, 1) token tables do not), or, with `weak` (d_in, r) or (K, d_in, r) given,
    FactoredEmbedding(A = weak, B random) as in token_mlp. bias: every layer gets a bias, drawn like
    nn.Linear's, U(+-1/sqrt(fan_in)) times init_scale, after all the weights.
    """
    members = member_draws(seeds, init_scales)
    embed, first = None, d_in
    if d_embed is not None:
        if weak is None:
            embed = Embedding(stacked(linear_init, members, d_in, (d_in, d_embed)))
        else:
            embed = factored_embedding(weak, d_in, d_embed, init_scales, seeds)
        first = d_embed
    shapes = list(zip([first, *widths], [*widths, n_out]))  # (fan_in, fan_out) of each layer
    weights = [stacked(linear_init, members, i, (i, o)) for i, o in shapes]
    biases = [stacked(linear_init, members, i, (1, o)) for i, o in shapes] if bias else None
    return MLP(embed, weights, embed_act, biases)


# =============================================================================
# 2. The transformer of the FNN -> transformer experiments (Fig 6, 8, 13, 16)


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

    def __init__(self, embed: nn.Module, pos: torch.Tensor, blocks: list[dict], unembed: torch.Tensor,
                 n_heads: int, ln_f: dict | None = None):
        super().__init__()
        self.embed, self.n_heads = embed, n_heads
        self.ln_f = nn.ParameterDict({k: nn.Parameter(v) for k, v in ln_f.items()}) if ln_f else None
        self.pos = nn.Parameter(pos)  # (K, n_ctx, d)
        self.blocks = nn.ModuleList(nn.ParameterDict({k: nn.Parameter(v) for k, v in b.items()})
                                    for b in blocks)
        self.unembed = nn.Parameter(unembed)  # (K, d, n_out)

    def forward(self, x: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        """x (n, T) tokens -> logits (K, n, n_out) at the last position, or (K, n, T, n_out)."""
        table = self.embed.table()  # (K, V, d)
        K, d = table.shape[0], table.shape[2]
        n, T = x.shape
        h = (gather_rows(table, x) + self.pos[:, None, :T]).reshape(K, n * T, d)  # (K, n T, d): one bmm each

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
                d_head: int, init_scales, seeds, weak: torch.Tensor | None = None,
                layer_norm: bool = False) -> Transformer:
    """Build K Transformer members, member k from Generator(seeds[k]), with PyTorch's default inits
    times init_scale (the paper's "init scale"): token and position embeddings as nn.Embedding,
    N(0, 1); every weight and bias as nn.Linear, U(+-1/sqrt(fan_in)). With `weak` (vocab, r) or
    (K, vocab, r), the token embedding is FactoredEmbedding(A = weak, B random) as in token_mlp.
    layer_norm: pre-LN blocks; LayerNorm gains start at 1 and biases at 0 (nn.LayerNorm's default,
    not scaled: init scale multiplies weights).
    """
    K, members = len(seeds), member_draws(seeds, init_scales)
    linear = functools.partial(stacked, linear_init, members)  # linear(fan_in, shape) -> (K, *shape)
    if weak is None:
        embed = Embedding(stacked(embedding_init, members, (vocab, d_model)))
    else:
        embed = factored_embedding(weak, vocab, d_model, init_scales, seeds)
    pos = stacked(embedding_init, members, (n_ctx, d_model))
    hd = n_heads * d_head
    blocks = [dict(w_qkv=linear(d_model, (d_model, 3 * hd)), w_o=linear(hd, (hd, d_model)),
                   w_in=linear(d_model, (d_model, d_mlp)), b_in=linear(d_model, (1, d_mlp)),
                   w_out=linear(d_mlp, (d_mlp, d_model)), b_out=linear(d_mlp, (1, d_model)))
              for _ in range(n_layers)]
    unembed = linear(d_model, (d_model, n_out))
    ln_f, ln = None, lambda: (torch.ones(K, 1, d_model), torch.zeros(K, 1, d_model))
    if layer_norm:
        for b in blocks:
            (b["ln1_w"], b["ln1_b"]), (b["ln2_w"], b["ln2_b"]) = ln(), ln()
        ln_f = dict(zip(("w", "b"), ln()))
    return Transformer(embed, pos, blocks, unembed, n_heads, ln_f)


def transformer_flops(n_tokens: int, n_layers: int, d_model: int, d_mlp: int, n_heads: int, d_head: int,
                      n_ctx: int, n_out: int, n_seqs: int) -> int:
    """Training FLOPs of one full-batch epoch (forward + backward = 3 x forward): 2 per multiply-add of every
    matmul over n_tokens positions (attention too), plus the unembedding at each sequence's last position."""
    hd = n_heads * d_head
    per_token = n_layers * (d_model * 3 * hd + hd * d_model + 2 * d_model * d_mlp + 2 * n_ctx * hd)
    return 6 * (n_tokens * per_token + n_seqs * d_model * n_out)


def n_members(model: nn.Module) -> int:
    return next(model.parameters()).shape[0]


def weight_norm(model: nn.Module) -> torch.Tensor:
    """Per-member L2 norm of all parameters, (K,)."""
    return torch.sqrt(sum(p.detach().pow(2).flatten(1).sum(1) for p in model.parameters()))


# =============================================================================
# 3. Losses and accuracy, per member: logits (K, n, C), labels (n,) -> (K,)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    K, n, C = logits.shape
    loss = F.cross_entropy(logits.reshape(K * n, C), y.repeat(K), reduction="none")
    return loss.view(K, n).mean(1)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == y).float().mean(1)


# =============================================================================
# 4. Optimizer: AdamW on stacked parameters with per-member lr and weight decay. Same arithmetic as
# torch.optim.AdamW (single-tensor path):
# p *= 1 - lr*wd; m, v moments; p -= lr/bc1 * m/(sqrt(v)/sqrt(bc2)+eps)


class AdamW:
    """grad_filter: changes the gradients in place before every step (exp_transformer's GrokFast); its
    per-member state is the list of tensors `grad_filter.h` (leading dimension K; None before step 1)."""

    def __init__(self, params, lr, wd, betas=(0.9, 0.999), eps=1e-8, grad_filter=None):
        self.params = [p for p in params]
        self.grad_filter = grad_filter
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
        if self.grad_filter is not None:
            self.grad_filter.apply(self.params)
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


# =============================================================================
# 5. Training: one plain function, called once per phase. Full batch; no host sync between evaluations.

METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "weight_norm")  # a history's last axis
TRAIN_LOSS, TRAIN_ACC, TEST_LOSS, TEST_ACC, WEIGHT_NORM = range(len(METRICS))  # read metrics by name
PRECISIONS = ("float32", "tf32", "bf16")
EARLY = (1, 2, 4, 8, 16, 32, 64)  # also evaluated when below eval_every: log-x plots get early points
LOG_SECONDS = 60.0  # without a terminal, a log line at least this often (at the next evaluation)


def train(model, data, *, epochs: int, lr=None, wd=None, betas=None, eps=None, eval_every: int = 10,
          stop_at: float | None = None, loss_fn=None, acc_fn=None, desc: str = "train", quiet: bool = False,
          precision: str = "float32", compact: bool = False, ckpt=None, stop=None, grad_filter=None,
          tracker: Tracker | None = None, step=None, evaluate_fn=None) -> dict:
    """Full-batch AdamW on the K members of `model` for `epochs` epochs; returns the phase's history.

    data: device tensors x_train, y_train, x_test, y_test. lr (needed), wd (default 0): a float or one
    per member; betas, eps: PyTorch's. Evaluates at epoch 0, every eval_every, at EARLY epochs and the end.
    stop_at: a member whose test accuracy reaches it is frozen; the phase ends when all are. A member
    whose train loss is NaN/inf is frozen and marked failed (history["diverged"]: all failed).
    compact: once at most half the members still train, drop the frozen ones (their rows repeat).
    ckpt: the phase's checkpoint (harness.Checkpoint: every, resume, load(), save(state),
    on_interrupt(history), stop_requested()), saved every ckpt.every epochs and at the end, resumed
    from with ckpt.resume. stop (default ckpt.stop_requested), read at every step boundary: a signal
    number checkpoints the phase and raises Interrupted; the caller prints and exits.
    grad_filter: changes every gradient before the AdamW step (AdamW). tracker: progress measures,
    history["tracked"] = {"epochs": (T,), name: (T, K)}.
    step, evaluate_fn: a loop of the script's own (exp_xor's gradient descent): `model` is then what
    step() updates (tensors or a module), evaluate_fn() -> (K, 5), and AdamW's arguments are refused.
    Returns epochs (E,), metrics (E, K, 5), stop_epoch / failed_epoch (K,) (-1 = never), epochs_run,
    wall_s, compute_s (E,): training seconds up to each evaluation, evaluation excluded.
    """
    if tracker is not None and compact:
        raise ValueError("train: a tracker keeps per-member references (Theta_0); it cannot compact")
    opt = None
    if step is None:  # the usual case: AdamW on the model's parameters
        if lr is None:
            raise ValueError("train: lr is needed (AdamW)")
        check_contract(model, data["x_train"])
        loss_fn, acc_fn = loss_fn or cross_entropy, acc_fn or accuracy
        opt = AdamW(model.parameters(), lr, 0.0 if wd is None else wd, betas or (0.9, 0.999),
                    1e-8 if eps is None else eps, grad_filter)
        step = functools.partial(adamw_step, model, opt, data["x_train"], data["y_train"], loss_fn)
        evaluate_fn = functools.partial(evaluate, model, data, loss_fn, acc_fn)
    else:
        given = dict(lr=lr, wd=wd, betas=betas, eps=eps, loss_fn=loss_fn, acc_fn=acc_fn,
                     grad_filter=grad_filter, compact=compact or None)
        ignored = [k for k, v in given.items() if v is not None]
        if ignored or evaluate_fn is None:
            raise ValueError(f"train with a step of its own takes evaluate_fn and no AdamW arguments; got "
                             f"{', '.join(ignored) or 'no evaluate_fn'}")
    stop = stop or (ckpt.stop_requested if ckpt is not None else None)
    ph = Phase(model, epochs, eval_every, stop_at, compact, tracker, desc)
    saved = ckpt.load() if ckpt is not None and ckpt.resume else None
    if saved is not None:
        try:
            restore(ph, saved, model, opt)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:  # another version's, or another model's
            first = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            raise ConfigError(f"checkpoint {getattr(ckpt, 'path', '')} does not fit this model ({first}); "
                              f"delete it to redo its phase") from None
        if saved["done"]:
            return saved["history"]  # as recorded: a finished phase read back is the same, to the byte
    log = Log(desc, epochs, ph.epoch, eval_every, quiet)

    with precision_context(precision, ph.device):
        going = observe(ph, model, opt, evaluate_fn, log) if saved is None else ph.running().any()
        while going and ph.epoch < epochs:
            ph.epoch += 1
            step()
            # evaluate (the one host sync), freeze members that are done, log: every eval_every epochs
            if ph.due(ph.epoch):
                going = observe(ph, model, opt, evaluate_fn, log)
            if ckpt is not None and ckpt.every and ph.epoch % ckpt.every == 0:
                ckpt.save(pack(ph, model, opt, done=False))
            # a stop waits for the end of the step: the checkpoint is then a consistent state
            signum = stop() if stop is not None else 0
            if signum:
                log.close()
                if ckpt is not None:
                    ckpt.save(pack(ph, model, opt, done=False))
                    ckpt.on_interrupt(ph.history())
                raise Interrupted(signum, f"epoch {ph.epoch} of phase '{desc}'", saved=ckpt is not None)
        if ph.epochs_logged[-1] != ph.epoch:
            observe(ph, model, opt, evaluate_fn, log)
    history = ph.history()  # the one a finished checkpoint keeps, so a resume reads back the same
    if ckpt is not None:
        ckpt.save(pack(ph, model, opt, done=True, history=history))
    log.close()  # the last observe() copied to the host, so the device is idle here
    failed = np.flatnonzero(ph.failed_epoch >= 0)
    if len(failed) and not quiet:
        which = "all members" if len(failed) == ph.K else f"members {failed.tolist()}"
        print(f"[{desc}] {which} diverged (NaN/inf loss); first at epoch {ph.failed_epoch[failed].min()}",
              file=sys.stderr)
    return history


def check_contract(model, x: torch.Tensor):
    """The model contract (top of this file) on one input point; ConfigError naming the broken rule."""
    name = type(model).__name__
    lead = {n: p.shape[0] if p.dim() else None for n, p in model.named_parameters()}
    if len(set(lead.values())) != 1 or None in lead.values():
        shown = ", ".join(f"{n} {v}" for n, v in list(lead.items())[:4]) or "no parameters"
        raise ConfigError(f"model contract: every parameter of {name} needs the same leading dimension K "
                          f"(the members); got {shown} (see the top of common.py)")
    K = next(iter(lead.values()))
    try:
        with torch.no_grad():
            out = model(x[:1])
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"model contract: {name}(x) fails on one input point ({first})") from None
    if not torch.is_tensor(out) or out.dim() != 3 or tuple(out.shape[:2]) != (K, 1):
        raise ConfigError(f"model contract: {name}(x) must return logits (K, n, C) = ({K}, 1, C) for one "
                          f"input point; got {tuple(getattr(out, 'shape', ()))} (see the top of common.py)")


def adamw_step(model, opt, x, y, loss_fn):
    """One full-batch step of every member."""
    loss = loss_fn(model(x), y)  # (K,)
    model.zero_grad(set_to_none=True)
    loss.float().sum().backward()  # members are independent: d(sum)/d(member k) = d(loss_k)
    opt.step()


@torch.no_grad()
def evaluate(model, data, loss_fn=None, acc_fn=None, chunk: int = 16384) -> torch.Tensor:
    """(K, 5) tensor of METRICS for every member; each set evaluated in chunks of `chunk` points."""
    loss_fn, acc_fn = loss_fn or cross_entropy, acc_fn or accuracy
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


class Phase:
    """What one call of `train` keeps between evaluations; with the model and optimizer, a checkpoint."""

    def __init__(self, model, epochs, eval_every, stop_at, compact, tracker, desc):
        first = next(iter(model.parameters() if isinstance(model, nn.Module) else
                          (v for v in model.values() if torch.is_tensor(v))))
        self.K, self.device = first.shape[0], first.device
        self.epochs, self.eval_every, self.stop_at, self.compact = epochs, eval_every, stop_at, compact
        self.tracker, self.desc = tracker, desc
        self.epoch, self.t0, self.eval_s = 0, time.perf_counter(), 0.0  # eval_s: excluded from compute_s
        self.epochs_logged, self.rows, self.compute_s, self.tracked = [], [], [], {"epochs": []}
        self.stop_epoch, self.failed_epoch = np.full(self.K, -1), np.full(self.K, -1)
        self.alive = np.arange(self.K)  # the original index of each member the model still holds
        self.last_row = np.full((self.K, len(METRICS)), np.nan, dtype=np.float32)

    def due(self, epoch: int) -> bool:
        return (epoch % self.eval_every == 0 or epoch == self.epochs
                or (epoch < self.eval_every and epoch in EARLY) or self.track_due(epoch))

    def track_due(self, epoch: int) -> bool:
        every = self.tracker.every if self.tracker is not None else 0
        return bool(every) and (epoch % every == 0 or (epoch < every and epoch in EARLY))

    def running(self) -> np.ndarray:
        return (self.stop_epoch < 0) & (self.failed_epoch < 0)

    def history(self) -> dict:
        tracked = {"tracked": {k: np.array(v) for k, v in self.tracked.items()}} if self.tracker else {}
        return dict(epochs=np.array(self.epochs_logged), metrics=np.stack(self.rows),
                    stop_epoch=self.stop_epoch.copy(), failed_epoch=self.failed_epoch.copy(),
                    epochs_run=self.epoch, wall_s=time.perf_counter() - self.t0,
                    compute_s=np.array(self.compute_s),
                    eval_s=self.eval_s, diverged=bool((self.failed_epoch >= 0).all()), **tracked)


def observe(ph: Phase, model, opt, evaluate_fn, log) -> bool:
    """Evaluate every member, mark the ones that diverged or reached stop_at, freeze (or, compacting,
    drop) them, log. Returns False when no member is left training."""
    if ph.device.type == "cuda":
        torch.cuda.synchronize(ph.device)
    t_eval = time.perf_counter()
    ph.compute_s.append(t_eval - ph.t0 - ph.eval_s)
    ph.last_row[ph.alive] = evaluate_fn().cpu().numpy()  # (K held, 5)
    if ph.track_due(ph.epoch):
        ph.tracked["epochs"].append(ph.epoch)
        for name, values in ph.tracker(model, ph.epoch).items():
            ph.tracked.setdefault(name, []).append(np.full(ph.K, np.nan))
            ph.tracked[name][-1][ph.alive] = values
    ph.eval_s += time.perf_counter() - t_eval
    row = ph.last_row.copy()  # (K, 5); members dropped by `compact` repeat their last values
    ph.rows.append(row)
    ph.epochs_logged.append(ph.epoch)
    ph.failed_epoch[~np.isfinite(row[:, TRAIN_LOSS]) & ph.running()] = ph.epoch
    if ph.stop_at is not None:
        ph.stop_epoch[(row[:, TEST_ACC] >= ph.stop_at) & ph.running()] = ph.epoch
    running = ph.running()
    if opt is not None:
        if ph.compact and running.any() and running[ph.alive].sum() <= len(ph.alive) // 2:
            keep = np.flatnonzero(running[ph.alive])  # positions within the members still held
            keep_members(model, opt, torch.as_tensor(keep, device=ph.device))
            ph.alive = ph.alive[keep]
        opt.all_active = bool(running[ph.alive].all())
        if not opt.all_active:
            opt.active.copy_(torch.as_tensor(running[ph.alive], device=ph.device))
    log.update(ph.epoch, row)
    return bool(running.any())


def keep_members(model, opt, keep: torch.Tensor):
    """Drop the members not in `keep` from the model (new, smaller parameters: resizing .data in place
    confuses autograd) and from the optimizer state."""
    new = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                new[id(p)] = module._parameters[name] = nn.Parameter(p.detach()[keep])
        if hasattr(module, "members"):  # a module that keeps its member count (a table shared by all)
            module.members = len(keep)
    opt.params = [new[id(p)] for p in opt.params]
    opt.m, opt.v = [m[keep] for m in opt.m], [v[keep] for v in opt.v]
    opt.lr, opt.wd, opt.active = opt.lr[keep], opt.wd[keep], opt.active[keep]
    if opt.grad_filter is not None and opt.grad_filter.h is not None:
        opt.grad_filter.h = [h[keep] for h in opt.grad_filter.h]


# =============================================================================
# 6. Around the loop: checkpoint state (pack, restore), precision, the progress log


def pack(ph: Phase, model, opt, done: bool, history: dict | None = None) -> dict:
    """A checkpoint: model (or the step's tensors), optimizer, the phase's record so far, RNG states."""
    weights = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    gf = opt.grad_filter.h if opt is not None and opt.grad_filter is not None else None
    state = None if opt is None else dict(m=opt.m, v=opt.v, step_count=opt.step_count, lr=opt.lr, wd=opt.wd,
                                          active=opt.active, all_active=opt.all_active, grad_filter=gf)
    rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    return dict(done=done, epoch=ph.epoch, model=weights, alive=ph.alive, last_row=ph.last_row, opt=state,
                history=history or ph.history(), rng=rng)


def restore(ph: Phase, saved: dict, model, opt):
    """The inverse of pack: continue exactly where the checkpoint left off."""
    h, dev = saved["history"], ph.device
    ph.alive = saved["alive"]
    if opt is not None and len(ph.alive) < ph.K:
        keep_members(model, opt, torch.as_tensor(ph.alive, device=dev))
    if isinstance(model, nn.Module):
        model.load_state_dict(saved["model"])
    else:
        model.update({k: v.to(dev) if torch.is_tensor(v) else v for k, v in saved["model"].items()})
    if opt is not None:
        o = saved["opt"]
        opt.m, opt.v = [t.to(dev) for t in o["m"]], [t.to(dev) for t in o["v"]]
        opt.step_count, opt.all_active = o["step_count"], o["all_active"]
        opt.lr, opt.wd, opt.active = o["lr"].to(dev), o["wd"].to(dev), o["active"].to(dev)
        if opt.grad_filter is not None and o["grad_filter"] is not None:
            opt.grad_filter.h = [t.to(dev) for t in o["grad_filter"]]
    ph.last_row[:] = saved["last_row"]
    ph.rows, ph.epochs_logged, ph.compute_s = list(h["metrics"]), list(h["epochs"]), list(h["compute_s"])
    ph.tracked = {k: list(v) for k, v in h.get("tracked", {"epochs": []}).items()}
    ph.stop_epoch[:], ph.failed_epoch[:] = h["stop_epoch"], h["failed_epoch"]
    ph.epoch, ph.t0, ph.eval_s = saved["epoch"], time.perf_counter() - h["wall_s"], h["eval_s"]
    rng = saved["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device):
    """float32: plain float32 (TF32 off); tf32: float32 storage, TF32 matmuls on CUDA (no-op on the
    CPU); bf16: autocast of the forward pass to bfloat16, float32 weights and optimizer state."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        # cache_enabled=False: autocast keeps the bf16 copy of each weight until its region exits, and this
        # region spans the whole phase; with the cache every step would compute with the initial weights
        bf16 = precision == "bf16"
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class Log:
    """A phase's progress: a tqdm bar on a terminal. Without one (a log file, a batch job): a line every
    10% of the phase and at least every LOG_SECONDS, with the epoch out of the total and an ETA."""

    def __init__(self, desc: str, total: int, start: int, eval_every: int, quiet: bool):
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=start, desc=desc, disable=True if quiet else None, leave=False,
                        dynamic_ncols=True)
        self.desc, self.total, self.start, self.lines = desc, total, start, not quiet and self.bar.disable
        self.every = max(eval_every, (total // 10) // eval_every * eval_every)
        self.t0 = self.last = time.perf_counter()
        if start and not quiet:
            print(f"[{desc}] resuming from epoch {start}", flush=True)

    def update(self, epoch: int, row: np.ndarray):
        train, test = np.nanmean(row[:, TRAIN_ACC]), np.nanmean(row[:, TEST_ACC])
        self.bar.set_postfix_str(f"train {train:.3f} test {test:.3f}")
        self.bar.update(epoch - self.bar.n)
        now = time.perf_counter()
        if self.lines and (epoch % self.every == 0 or epoch == self.total or now - self.last >= LOG_SECONDS):
            self.last, done = now, epoch - self.start
            eta = f"  ETA {(now - self.t0) / done * (self.total - epoch):.0f}s" if done > 0 else ""
            print(f"[{self.desc}] epoch {epoch}/{self.total} ({epoch / self.total:.0%})  "
                  f"train_acc {train:.4f}  test_acc {test:.4f}  "
                  f"train_loss {np.nanmean(row[:, TRAIN_LOSS]):.4g}  "
                  f"{now - self.t0:.1f}s{eta}", flush=True)

    def close(self):
        self.bar.close()


# =============================================================================
# 7. Metrics over a history


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


def summarize(history: dict) -> dict:
    """A phase's summary, the same fields for any K: the band over its members (summarize_members) and
    `members`, one member_summary each (K = 1: a band of one)."""
    return summarize_members([member_summary(history, k) for k in range(history["metrics"].shape[1])])


def member_summary(history: dict, member: int) -> dict:
    """One member's summary fields: first epochs at 95% / 99%, Time Gap, final values, seconds."""
    ep, m = history["epochs"], history["metrics"][:, member]
    finite = np.isfinite(m).all(1)
    last = m[np.flatnonzero(finite)[-1]] if finite.any() else np.full(len(METRICS), np.nan)
    gap = time_gap(ep, m[:, TRAIN_ACC], m[:, TEST_ACC])
    test_95, test_99 = first_epoch(ep, m[:, TEST_ACC], 0.95), first_epoch(ep, m[:, TEST_ACC], 0.99)
    secs = history.get("compute_s")  # training time up to each logged epoch (common.train's histories)

    def clean(v):
        return None if v is None or not np.isfinite(v) else float(v)

    def compute_to(e):
        return None if secs is None or e is None else round(float(secs[list(ep).index(e)]), 3)

    return dict(
        first_epoch_train_95=first_epoch(ep, m[:, TRAIN_ACC], 0.95),
        first_epoch_test_95=test_95,
        first_epoch_test_99=test_99,
        time_gap=gap,
        inverse_time_gap=inverse_time_gap(gap),
        final_train_acc=clean(last[TRAIN_ACC]),
        final_test_acc=clean(last[TEST_ACC]),
        final_train_loss=clean(last[TRAIN_LOSS]),
        final_test_loss=clean(last[TEST_LOSS]),
        max_test_acc=clean(np.nanmax(m[:, TEST_ACC])) if finite.any() else None,
        epochs=int(history["epochs_run"]),
        stopped_at=int(history["stop_epoch"][member]) if history["stop_epoch"][member] >= 0 else None,
        diverged_at=int(history["failed_epoch"][member]) if history["failed_epoch"][member] >= 0 else None,
        wall_s=round(float(history["wall_s"]), 3),
        compute_s=compute_to(int(ep[-1])) if len(ep) else None,  # forward + backward + optimizer only
        compute_s_to_test_95=compute_to(test_95),
        compute_s_to_test_99=compute_to(test_99),
    )


def summarize_members(members: list[dict]) -> dict:
    """Across K members (seeds): the band of the Time Gap and of the first epochs at 95% train and
    test (median, min, max over the members that got there), the fraction that reached 95% test, and
    the mean and standard deviation of Time Gap, 1/TimeGap (0 for a member that never reaches 95%, as
    the paper counts it) and the final accuracies."""
    def stats(name, values):
        v = np.array([x for x in values if x is not None], dtype=float)
        return {f"{name}_mean": float(v.mean()) if len(v) else None,
                f"{name}_std": float(v.std()) if len(v) else None}

    def band(name):
        v = [m[name] for m in members if m[name] is not None]
        return {f"{name}_median": float(np.median(v)) if v else None, f"{name}_min": min(v, default=None),
                f"{name}_max": max(v, default=None)}

    gaps = [m["time_gap"] for m in members]
    reached = sum(m["first_epoch_test_95"] is not None for m in members)
    return dict(**band("time_gap"), **band("first_epoch_train_95"), **band("first_epoch_test_95"),
                fraction_reached_test_95=reached / len(members), **stats("time_gap", gaps),
                n_reached_train_and_test_95=sum(g is not None for g in gaps),
                **stats("inverse_time_gap", [m["inverse_time_gap"] for m in members]),
                **stats("final_train_acc", [m["final_train_acc"] for m in members]),
                **stats("final_test_acc", [m["final_test_acc"] for m in members]),
                epochs=members[0]["epochs"], wall_s=members[0]["wall_s"], members=members)


def transfer_point(hist: dict, transfer_at: float | None) -> dict:
    """Where each member of a weak phase stopped (stop_at = transfer_at) or ended: transfer_epoch,
    transfer_test_acc (lists over members), transfer_target_reached (all members got there)."""
    epochs = list(hist["epochs"])
    epoch_k = [int(e) if e >= 0 else hist["epochs_run"] for e in hist["stop_epoch"]]
    return dict(transfer_epoch=epoch_k,
                transfer_test_acc=[float(hist["metrics"][epochs.index(e), k, TEST_ACC])
                                   for k, e in enumerate(epoch_k)],
                transfer_target_reached=transfer_at is None or bool((hist["stop_epoch"] >= 0).all()))


# =============================================================================
# 8. Progress measures on a fixed probe set: empirical NTK, kernel-task alignment, hidden-layer measures

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


class Tracker:
    """Progress measures of every member on fixed probe points, taken by `train` at epoch 0, at EARLY
    epochs below `every` and every `every` epochs (at evaluation, outside the timed training): "ntk",
    ||Theta_t - Theta_0||_F / ||Theta_0||_F of the empirical NTK (Theta_0 from the model as built, so a
    resumed run has the same reference); "cka", centred alignment of Theta_t with the labels; hidden, a
    function of one member's first hidden layer on the probes, (s, width) -> {name: float} (the
    O-information study's); always "wnorm:<parameter>", each tensor's L2 norm. -> {name: (K,) array}."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str], every: int,
                 n_classes: int, hidden=None):
        if any(n not in ("ntk", "cka") for n in names):
            raise ConfigError(f"track must be a subset of ntk, cka; got {','.join(names)}")
        if hidden is not None and not hasattr(model, "hidden"):
            raise ConfigError(f"{type(model).__name__} has no first hidden layer (model.hidden) to measure")
        self.x, self.y, self.names, self.every = x, y, list(names), every
        self.n_classes, self.hidden = n_classes, hidden
        self.theta0 = ntk_gram(model, x) if names else None

    def __call__(self, model: nn.Module, epoch: int | None = None) -> dict[str, np.ndarray]:
        out = {}
        if self.theta0 is not None:
            theta = ntk_gram(model, self.x)
            if "ntk" in self.names:
                out["ntk_change"] = ntk_change(theta, self.theta0).cpu().numpy()
            if "cka" in self.names:
                out["kernel_alignment"] = centered_alignment(theta, self.y, self.n_classes).cpu().numpy()
        if self.hidden is not None:
            with torch.no_grad():
                h = model.hidden(self.x).float().cpu().numpy()  # (K, s, width)
            per = [self.hidden(hk) for hk in h]
            out.update({key: np.array([m[key] for m in per]) for key in per[0]})
        for name, p in model.named_parameters():  # weight norm per layer, beside the measures
            out[f"wnorm:{name}"] = p.detach().flatten(1).norm(dim=1).cpu().numpy()
        return out
