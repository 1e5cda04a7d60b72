"""The shared module of the GrokTransfer experiments. Each exp_*.py imports it and nothing else of ours.

Read these three first: `factored_embedding` (the paper's idea: E = A @ B, A = the weak model's
embedding, B random, both trained), `token_mlp` (the FNNs of the modular tasks) and `train` (the loop).

Map, in the order a run uses it (the core first, then the infrastructure):
  1. Models       Embedding, FactoredEmbedding, factored_embedding, MLP, token_mlp, dense_mlp
  2. Transformer  Transformer, transformer (Nanda et al.'s decoder; pre-LN option), transformer_flops
  3. Losses       cross_entropy, accuracy (each script adds its own: MSE, logistic)
  4. Optimizer    AdamW (per-member lr and wd, an optional gradient filter)
  5. Training     train: step -> evaluate / freeze / log when due -> checkpoint when due; Phase, record
  6. Around it    pack / restore (checkpoint state), SIGINT / SIGTERM, precision_context, Log
  7. Metrics      METRICS and their column names (TEST_ACC, ...), first_epoch, time_gap, summarize
  8. Measures     ntk_gram, ntk_change, centered_alignment, Tracker (NTK, alignment, hidden-layer measures)
  9. Config, CLI  parse_config (dataclass < --config FILE.yaml < --key value; --help), config_or_exit, fail
 10. Run files    open_run (lock, resume checks), write_atomic, write_csv, read_metrics
 11. Record       Checkpoint, check_checkpoints, RunRecord (summary.json, metrics.csv, embedding.pt)
 12. Grid search  grid_points, auto_members, run_grid, grid_main
 13. Grid files   best_point, grid.csv, merge_main (shards of a job array), plot_grid
 14. Plots        plot_dynamics, plot_progress; `python common.py plot RUN_DIR` redraws a run

K members at once: every model holds K >= 1 independent members (seeds, init scales, learning rates,
weight decays) as stacked parameters with a leading K dimension, and `train` steps them together with
batched matmuls. K = 1 is the ordinary run; seed bands and the grid search use the same code. Members
never mix: the loss is a sum of per-member losses and each member draws its init from its own seeded
generator, so a member trained among others follows the trajectory it follows alone (to rounding).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import inspect
import io
import itertools
import json
import math
import os
import random
import re
import shlex
import signal
import sys
import tempfile
import time
import tokenize
import types
import typing
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml


class ConfigError(ValueError):
    """Bad user input. Scripts turn it into a one-line message and exit status 2 (`fail`)."""


# =============================================================================
# 1. Models: K members held as stacked parameters (leading dim K). Bias-free FNNs, as in the paper
# ("all FNN models ... are homogeneous and do not have bias terms").


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


def factored_embedding(weak: torch.Tensor, vocab: int, d_target: int, init_scales, seeds):
    """GrokTransfer: A = the weak embedding (not rescaled), B drawn like a default nn.Linear(d_weak,
    d_target) times init_scale; both trainable.

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
    B = stacked(linear_init, member_draws(seeds, init_scales), r, (r, d_target))
    return FactoredEmbedding(weak.detach().clone().float(), B)


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
            return table[:, x].reshape(table.shape[0], x.shape[0], -1)  # (K, n, tokens * d)
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
    elif embed is None:  # B has its own seed stream: the layers draw the same with or without transfer
        embed = factored_embedding(weak, vocab, d_embed, init_scales, [s + 10_000_019 for s in seeds])
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
            embed = factored_embedding(weak, d_in, d_embed, init_scales, [s + 10_000_019 for s in seeds])
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
        embed = factored_embedding(weak, vocab, d_model, init_scales, [s + 10_000_019 for s in seeds])
    pos = stacked(embedding_init, members, (n_ctx, d_model))
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


def transformer_flops(n_tokens: int, n_layers: int, d_model: int, d_mlp: int, n_heads: int, d_head: int,
                      n_ctx: int, n_out: int, n_seqs: int) -> int:
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


def train(model, data, *, epochs: int, lr=0.0, wd=0.0, betas=(0.9, 0.999), eps=1e-8, eval_every: int = 10,
          stop_at: float | None = None, loss_fn=None, acc_fn=None, desc: str = "train", quiet: bool = False,
          precision: str = "float32", compact: bool = False, ckpt: Checkpoint | None = None,
          grad_filter=None, tracker: Tracker | None = None,
          step=None, evaluate_fn=None) -> dict:
    """Full-batch AdamW on the K members of `model` for `epochs` epochs; returns the phase's history.

    data: device tensors x_train, y_train, x_test, y_test. lr, wd: a float or one per member.
    Evaluates at epoch 0, every eval_every epochs, at EARLY epochs below eval_every and at the end.
    stop_at: a member whose test accuracy reaches it is frozen; the phase ends when all are. A member
    whose train loss is NaN/inf is frozen and marked failed (history["diverged"]: all failed).
    compact: once at most half the members still train, drop the frozen ones (a grid search); their
    rows then repeat their last values. ckpt: save everything every ckpt.every epochs and at the end;
    with ckpt.resume continue from it. Ctrl-C or SIGTERM: checkpoint at the end of the current step,
    write the metrics so far (ckpt.on_interrupt), exit 130 / 143 with the command that resumes.
    grad_filter: changes every gradient before the AdamW step (AdamW). tracker: progress measures,
    history["tracked"] = {"epochs": (T,), name: (T, K)}.
    step, evaluate_fn: a loop of the script's own (exp_xor's analytic gradient descent): `model` is then
    the dict of tensors that step() updates (what a checkpoint holds), evaluate_fn() -> (K, 5).
    Returns epochs (E,), metrics (E, K, 5), stop_epoch / failed_epoch (K,) (-1 = never), epochs_run,
    wall_s, compute_s (E,): training seconds up to each evaluation, evaluation excluded.
    """
    if tracker is not None and compact:
        raise ValueError("train: a tracker keeps per-member references (Theta_0); it cannot compact")
    opt = None
    if step is None:  # the usual case: AdamW on the model's parameters
        loss_fn, acc_fn = loss_fn or cross_entropy, acc_fn or accuracy
        opt = AdamW(model.parameters(), lr, wd, betas, eps, grad_filter)
        step = functools.partial(adamw_step, model, opt, data["x_train"], data["y_train"], loss_fn)
        evaluate_fn = functools.partial(evaluate, model, data, loss_fn, acc_fn)
    ph = Phase(model, epochs, eval_every, stop_at, compact, tracker, desc)
    saved = ckpt.load() if ckpt is not None and ckpt.resume else None
    if saved is not None:
        restore(ph, saved, model, opt)
        if saved["done"]:
            return ph.history()
    log = Log(desc, epochs, ph.epoch, eval_every, quiet)

    with precision_context(precision, ph.device), stop_signals() as signalled:
        going = record(ph, model, opt, evaluate_fn, log) if saved is None else ph.running().any()
        while going and ph.epoch < epochs:
            ph.epoch += 1
            step()
            # evaluate (the one host sync), freeze members that are done, log: every eval_every epochs
            if ph.due(ph.epoch):
                going = record(ph, model, opt, evaluate_fn, log)
            if ckpt is not None and ckpt.every and ph.epoch % ckpt.every == 0:
                ckpt.save(pack(ph, model, opt, done=False))
            # a signal waits for the end of the step: the checkpoint is then a consistent state
            if signalled():
                log.close()
                interrupted(ph, model, opt, ckpt, signalled())
        if ph.epochs_logged[-1] != ph.epoch:
            record(ph, model, opt, evaluate_fn, log)
    if ckpt is not None:
        ckpt.save(pack(ph, model, opt, done=True))
    log.close()  # the last record() copied to the host, so the device is idle here
    failed = np.flatnonzero(ph.failed_epoch >= 0)
    if len(failed) and not quiet:
        which = "all members" if len(failed) == ph.K else f"members {failed.tolist()}"
        print(f"[{desc}] {which} diverged (NaN/inf loss); first at epoch {ph.failed_epoch[failed].min()}",
              file=sys.stderr)
    return ph.history()


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
                    epochs_run=self.epoch,
                    wall_s=time.perf_counter() - self.t0, compute_s=np.array(self.compute_s),
                    eval_s=self.eval_s, diverged=bool((self.failed_epoch >= 0).all()), **tracked)


def record(ph: Phase, model, opt, evaluate_fn, log) -> bool:
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
    """Drop every member not in `keep` (indices) from the model's parameters and the optimizer state.
    The parameters are replaced by new, smaller ones (resizing .data in place confuses autograd)."""
    new = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                new[id(p)] = module._parameters[name] = nn.Parameter(p.detach()[keep])
        if hasattr(module, "members"):  # a shared table read by every member (exp_modular's FixedEmbedding)
            module.members = len(keep)
    opt.params = [new[id(p)] for p in opt.params]
    opt.m, opt.v = [m[keep] for m in opt.m], [v[keep] for v in opt.v]
    opt.lr, opt.wd, opt.active = opt.lr[keep], opt.wd[keep], opt.active[keep]
    if opt.grad_filter is not None and opt.grad_filter.h is not None:
        opt.grad_filter.h = [h[keep] for h in opt.grad_filter.h]


# =============================================================================
# 6. Around the loop: checkpoint state (pack, restore), signals, precision, the progress log


def pack(ph: Phase, model, opt, done: bool) -> dict:
    """A checkpoint: model (or the step's tensors), optimizer, the phase's record so far, RNG states."""
    weights = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    gf = opt.grad_filter.h if opt is not None and opt.grad_filter is not None else None
    state = None if opt is None else dict(m=opt.m, v=opt.v, step_count=opt.step_count, lr=opt.lr, wd=opt.wd,
                                          active=opt.active, all_active=opt.all_active, grad_filter=gf)
    rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    return dict(done=done, epoch=ph.epoch, model=weights, alive=ph.alive, last_row=ph.last_row, opt=state,
                history=ph.history(), rng=rng)


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


def interrupted(ph: Phase, model, opt, ckpt, signum: int):
    """Ctrl-C (exit 130) or SIGTERM from a scheduler (exit 143): save, write the metrics, print how to
    resume."""
    what, status = ("SIGTERM", 143) if signum == signal.SIGTERM else ("interrupted", 130)
    where = f"{what} at epoch {ph.epoch} of phase '{ph.desc}'"
    if ckpt is None:  # a grid batch: grid.csv already holds every finished batch
        hint = f"; resume: {resume_command(_OPEN_RUNS[-1])}" if _OPEN_RUNS else ""
        fail(f"{where} (not checkpointed){hint}", status=status)
    ckpt.save(pack(ph, model, opt, done=False))
    ckpt.on_interrupt(ph.history())
    fail(f"{where}; checkpoint and metrics saved. Resume: {ckpt.resume_hint}", status=status)


_SIGNALS: list[int] = []  # SIGINT / SIGTERM received and not yet acted on


def _note_signal(signum, frame):
    _SIGNALS.append(signum)


def catch_signals():
    """From now on (a run is open), SIGINT and SIGTERM are noted, not fatal: the running phase checkpoints
    at its next step boundary and exits (a signal between phases stops the next phase at its first step)."""
    import threading
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, _note_signal)


@contextlib.contextmanager
def stop_signals():
    """While active, SIGINT and SIGTERM set a flag (read between steps) instead of stopping mid-update.
    Yields a function returning the signal number received, or 0."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield lambda: 0
        return
    previous = {s: signal.signal(s, _note_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: _SIGNALS[0] if _SIGNALS else 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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
    return dict(**band("time_gap"), **band("first_epoch_train_95"), **band("first_epoch_test_95"),
                fraction_reached_95=sum(m["first_epoch_test_95"] is not None for m in members) / len(members),
                **stats("time_gap", gaps), n_reached_95=sum(g is not None for g in gaps),
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


def single(d: dict) -> dict:
    """Per-member lists of length 1 -> their value (summaries of a one-seed run read as scalars)."""
    return {k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in d.items()}


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
    epochs below `every` and every `every` epochs (at evaluation, outside the timed training):
      "ntk": ||Theta_t - Theta_0||_F / ||Theta_0||_F of the empirical NTK (Theta_0 from the model as built,
             so a resumed run has the same reference); "cka": centred alignment of Theta_t with the labels;
      hidden: a function of one member's first hidden layer on the probe points, (s, width) array ->
             {name: float} (exp_modular passes its O-information measures);
    and always "wnorm:<parameter>", the L2 norm of each parameter tensor. Returns {name: (K,) array}."""

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


# =============================================================================
# 9. Configuration and CLI: defaults (a dataclass in the script) < --config FILE.yaml < --key value flags

SHARED_HELP = {  # fields that mean the same in every script, described once
    "phases": "which phases to run, comma-separated, in this order",
    "seed": "model init seed (the data uses data_seed)",
    "seeds": "train seeds seed .. seed+N-1 as the members of one run: median and band per phase",
    "device": "auto (cuda if available, else cpu), cpu, cuda or cuda:N",
    "deterministic": "torch deterministic algorithms (matters on CUDA only)",
    "name": "run directory runs/<experiment>/<name> (default: a timestamp)",
    "out": "run directory (overrides name)", "quiet": "no progress bar or log lines",
    "ckpt_every": "checkpoint every N epochs and at each phase's end (0: ends only)",
    "resume": "continue the run in --out/--name from its checkpoints (finished phases are read back)",
    "beta1": "AdamW beta1 (not stated in the paper: PyTorch's default)",
    "adam_eps": "AdamW eps (PyTorch's default)",
    "beta2": "AdamW beta2 (not stated: PyTorch's default; many grokking codes use 0.98)",
    "eval_every": "evaluate every N epochs: the resolution of Time Gap", "precision": "float32, tf32 or bf16",
    "stop_at": "target phases stop once test acc reaches this (the paper trains all epochs)",
    "grid": "run the grid search over the grid_* lists instead of the phases (grid.csv, grid.json, grid.png)",
    "grid_phase": "the target phase the grid trains",
    "grid_init_scales": "grid: init scales (paper: 0.05, 0.1 .. 1.5)",
    "grid_lrs": "grid: learning rates (paper: 1e-4 .. 1, 8 values)",
    "grid_wds": "grid: weight decays (paper: 1e-4 .. 5, 9 values)",
    "grid_stop_at": "grid: the selection threshold, first to reach this test accuracy",
    "members": "grid points trained at once; 0 = as many as fit in memory",
    "shard": "i/n: run points i, i+n, ... of the grid (one job of an array)",
    "merge": "shard run directories: combine their grid.csv files, then stop",
}
_INVOCATION: list[str] = []  # the script and the arguments config_or_exit parsed (for the resume command)


def config_or_exit(defaults, argv=None, choices=None, check=None):
    """parse_config + the generic checks (check_values) + the script's own `check(cfg)`. --help prints
    every field with its default and comment and exits 0; bad input is one line on stderr and exit 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(config_help(defaults, choices or {}))
        sys.exit(0)
    module = sys.modules.get(type(defaults).__module__)
    script = Path(getattr(module, "__file__", None) or sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(Path.cwd())
    _INVOCATION[:] = [str(script), *argv]
    try:
        cfg = parse_config(defaults, argv, choices)
        check_values(cfg)
        if check is not None:
            check(cfg)
        return cfg
    except ConfigError as e:
        fail(str(e))


def fail(msg: str, status: int = 2):
    """Print a one-line error naming the problem and exit (status 2 = bad input)."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(status)


def config_help(defaults, choices: dict) -> str:
    """The script's docstring, then one line per field: --key, its default, its trailing comment."""
    cls = type(defaults)
    comments, sections = _field_comments(cls)
    doc = (getattr(sys.modules.get(cls.__module__), "__doc__", None) or "").strip()
    lines = [doc, "", "Options (defaults < --config FILE.yaml < --key value; a bool flag alone means true):"]
    for f in dataclasses.fields(defaults):
        if f.name in sections:
            lines.append(f"# {sections[f.name]}")
        value = getattr(defaults, f.name)
        shown = ",".join(map(str, value)) if isinstance(value, list) else "none" if value is None else value
        text = comments.get(f.name) or SHARED_HELP.get(f.name, "")
        if f.name in choices and str(choices[f.name]) not in text:
            text += f" [{', '.join(map(str, choices[f.name]))}]"
        lines.append(f"  --{f.name:<20} {str(shown):<12} {text}".rstrip())
    return "\n".join(lines)


def _field_comments(cls) -> tuple[dict, dict]:
    """{field: its trailing comment} and {field: the `# --- section` comment above it}, from the source."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}, {}
    comments, sections, pending = {}, {}, None
    tokens = tokenize.generate_tokens(io.StringIO(src).readline)
    by_line = {t.start[0]: t.string for t in tokens if t.type == tokenize.COMMENT}
    for i, line in enumerate(src.splitlines(), 1):
        m = re.match(r"\s+(\w+)\s*:", line)
        if m and not line.lstrip().startswith("#"):
            if i in by_line:
                comments[m.group(1)] = by_line[i].lstrip("# ")
            if pending:
                sections[m.group(1)], pending = pending, None
        elif line.lstrip().startswith("# ---"):
            pending = line.strip()[5:].strip()
    return comments, sections


def check_values(cfg):
    """Checks by field name, the same in every script: learning rates, init scales and adam_eps > 0,
    weight decays >= 0, betas in [0, 1), epochs that the metrics of one run could hold in memory."""
    for f in dataclasses.fields(cfg):
        key, v = f.name, getattr(cfg, f.name)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if (key == "lr" or key.endswith("_lr") or key.endswith("init_scale") or key == "adam_eps") and v <= 0:
            raise ConfigError(f"{key} must be positive, got {v}")
        if (key == "wd" or key.endswith("_wd")) and v < 0:
            raise ConfigError(f"{key} must be >= 0, got {v}")
        if re.fullmatch(r"(\w+_)?beta[12]", key) and not 0 <= v < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {v}")
        if key.endswith("epochs") and isinstance(v, int):
            evals = v // max(1, getattr(cfg, "eval_every", 1))
            members = getattr(cfg, "seeds", 1)  # ~400 bytes a member per evaluation, held in memory
            check_memory(evals * members * 400, f"{key} = {v:g} ({evals:.3g} evaluations of metrics)")


def check_memory(n_bytes: float, what: str):
    """ConfigError when `what` would need more than this machine's memory."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if n_bytes > total:
        raise ConfigError(f"{what} needs about {n_bytes / 2 ** 30:,.0f} GiB of memory; "
                          f"this machine has {total / 2 ** 30:,.0f} GiB")


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


def _base_type(tp):
    """(type, optional) for a field annotation such as `float`, `float | None`, `Optional[str]`."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


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
            out = value if isinstance(value, bool) else _BOOLS[value.lower()]
        elif base in (int, float):
            if isinstance(value, bool):
                raise ValueError
            out = float(value)  # "1e4" and "1e-3" too (YAML 1.1 reads 1e-3 as a string)
            if base is int and not out.is_integer():
                raise ValueError
            out = int(out) if base is int else out
        elif base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            out = str(value)
        else:
            raise ConfigError(f"config key '{key}' has an unsupported type {tp}")
    except (ValueError, TypeError, KeyError, AttributeError):
        raise ConfigError(f"config key '{key}' expects {want}{' or none' if optional else ''}, "
                          f"got {value!r}") from None
    if isinstance(out, float) and not math.isfinite(out):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
    if key in choices and out not in choices[key]:
        allowed = ", ".join(map(str, choices[key]))
        raise ConfigError(f"config key '{key}' must be one of {allowed}; got {out!r}")
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


# =============================================================================
# 10. Run directory and files: device and seeds, the run's lock, atomic files, metrics.csv, checkpoints


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
    if deterministic:  # CPU kernels are deterministic already; this makes CUDA ones so too (or raise)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


RESUME_FREE = ("name", "out", "quiet", "resume", "ckpt_every")  # keys a resumed run may change
_LOCKS: dict[Path, object] = {}  # run directories this process holds (their lock files, kept open)
_OPEN_RUNS: list[Path] = []  # run directories opened by open_run, for the resume command of a grid


def results_config(cfg) -> dict:
    """The config as written to config.yaml, without the keys that do not change results."""
    d = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    return {k: v for k, v in d.items() if k not in RESUME_FREE}


def open_run(cfg, experiment: str) -> Path:
    """Claim the run directory of cfg and write its config.yaml. Without --resume the directory must not
    hold a run; with it, it must hold one whose config.yaml agrees with cfg on every key that changes
    results, and every checkpoint in it must be readable and this run's (check_checkpoints). Nothing in
    the directory is written before these checks pass (ConfigError naming the problem)."""
    resume = getattr(cfg, "resume", False)
    if resume and not (cfg.out or cfg.name):
        raise ConfigError("--resume needs the run's directory: --out DIR or --name NAME")
    name = cfg.name or time.strftime("%Y%m%d-%H%M%S")
    path = Path(cfg.out) if cfg.out else Path("runs") / experiment / name
    if resume and not (path / "config.yaml").is_file():
        raise ConfigError(f"--resume: no run in {path} (no config.yaml)")
    run = claim_dir(path, unique=not (cfg.out or cfg.name))
    held = (run / "config.yaml").is_file()
    if not resume:
        if held:
            raise ConfigError(f"{run} already holds a run; add --resume to continue it, or choose another "
                              f"--out")
        write_atomic(run / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        catch_signals()
        _OPEN_RUNS.append(run)
        return run
    try:
        old = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"--resume: {run / 'config.yaml'} is not valid YAML") from None
    for key, value in results_config(cfg).items():
        if old.get(key) != value:
            raise ConfigError(f"--resume: config key '{key}' is {value!r} but the run used {old.get(key)!r}; "
                              f"resuming would change its results")
    check_checkpoints(run, cfg)
    catch_signals()
    _OPEN_RUNS.append(run)
    return run


def claim_dir(path: Path, unique: bool = False) -> Path:
    """Create `path` and hold its lock (.lock, flock: released by the OS when the process ends, so a
    crashed run leaves nothing stuck). unique: a default (timestamp) name taken already gets a suffix."""
    import fcntl
    if unique:
        base, i = path, 1
        while (path / "config.yaml").is_file():
            path, i = base.with_name(f"{base.name}-{i}"), i + 1
    if path.resolve() in _LOCKS:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = open(path / ".lock", "a")
    except OSError as e:
        raise ConfigError(f"output directory {path} is not writable ({e.strerror})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise ConfigError(f"{path} is in use by another running process; wait for it or choose another --out")
    _LOCKS[path.resolve()] = lock
    return path


def resume_command(run: Path) -> str:
    """The command that resumes this run: the one given, with --out RUN --resume."""
    script, *argv = _INVOCATION or ["<script>"]
    keep, i = [], 0
    while i < len(argv):
        key, eq, _ = argv[i][2:].partition("=") if argv[i].startswith("--") else ("", "", "")
        if key.replace("-", "_") in ("out", "name", "resume"):
            nxt = argv[i + 1] if i + 1 < len(argv) else "--"
            bare = eq or nxt.startswith("--") or (key == "resume" and nxt.lower() not in ("true", "false"))
            i += 1 if bare else 2  # skip the flag and, unless it stands alone, its value
            continue
        keep.append(argv[i])
        i += 1
    return shlex.join(["python", script, *keep, "--out", str(run), "--resume"])


def write_atomic(path: Path, data: bytes | str):
    """Write to a temporary file beside `path`, fsync, rename: a crash never leaves half a file. The file
    gets the mode the user's umask gives (mkstemp's 0600 would hide it from the group)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0o022)  # read it (os.umask sets and returns the old value), then put it back
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(obj, path: Path):
    """torch.save through write_atomic."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())


def save_json(obj, path: Path):
    write_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_csv(path: Path, rows: list[dict], fields: list[str]):
    """Every row so far, atomically (metrics.csv, progress.csv, grid.csv); None is written empty."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    write_atomic(path, buf.getvalue())


METRIC_FIELDS = ["phase", "member", "epoch", *METRICS]  # metrics.csv, long format
PROGRESS_FIELDS = ["phase", "member", "epoch", "measure", "value"]  # progress.csv


def history_rows(phase: str, history: dict) -> list[dict]:
    """Rows of metrics.csv: phase, member, epoch, METRICS."""
    return [dict(phase=phase, member=k, epoch=int(epoch), **{n: float(v) for n, v in zip(METRICS, row)})
            for i, epoch in enumerate(history["epochs"]) for k, row in enumerate(history["metrics"][i])]


def progress_rows(phase: str, tracked: dict) -> list[dict]:
    """Rows of progress.csv (long format): phase, member, epoch, measure, value."""
    return [dict(phase=phase, member=k, epoch=int(epoch), measure=name, value=float(v))
            for name, values in tracked.items() if name != "epochs"
            for i, epoch in enumerate(tracked["epochs"]) for k, v in enumerate(values[i])]


def read_metrics(path: Path) -> dict[str, dict]:
    """metrics.csv -> {phase: {"epochs": (E,), "metrics": (E, K, 5)}} in file order of phases."""
    out = {}
    for phase, d in _read_long(path, lambda r: [float(r[n]) for n in METRICS]).items():
        K = max(len(v) for v in d.values())
        epochs = sorted(d)
        metrics = np.array([[d[e][k] for k in range(K)] for e in epochs])
        out[phase] = dict(epochs=np.array(epochs), metrics=metrics)
    return out


def read_progress(path: Path) -> dict[str, dict]:
    """progress.csv -> {phase: {measure: (epochs (T,), values (T, K))}}."""
    out = {}
    for key, d in _read_long(path, lambda r: float(r["value"]), by=("phase", "measure")).items():
        K = max(len(v) for v in d.values())
        values = np.array([[d[e].get(k, np.nan) for k in range(K)] for e in sorted(d)])
        out.setdefault(key[0], {})[key[1]] = (np.array(sorted(d)), values)
    return out


def _read_long(path: Path, value, by=("phase",)) -> dict:
    """A long-format CSV -> {key: {epoch: {member: value(row)}}}, key = the `by` columns in file order."""
    out: dict = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            key = r[by[0]] if len(by) == 1 else tuple(r[b] for b in by)
            out.setdefault(key, {}).setdefault(int(r["epoch"]), {})[int(r["member"])] = value(r)
    return out


# =============================================================================
# 11. Checkpoints and the run record (summary.json, metrics.csv, models.pt, embedding.pt)


class Checkpoint:
    """One phase's checkpoint file: where, how often it is written, whether to resume from it, what an
    interrupt writes besides (on_interrupt(history)), whose it is (owner: the run's results config and
    the phase) and the command that resumes the run (resume_hint)."""

    def __init__(self, path: Path, every: int = 0, resume: bool = False, on_interrupt=None, owner=None,
                 resume_hint: str = "the same command with --resume"):
        self.path, self.every, self.resume, self.owner = Path(path), every, resume, owner
        self.on_interrupt = on_interrupt or (lambda history: None)
        self.resume_hint = resume_hint

    def save(self, state: dict):
        save_atomic(dict(state, owner=self.owner), self.path)

    def load(self) -> dict | None:
        return read_checkpoint(self.path, self.owner) if self.path.is_file() else None


def read_checkpoint(path: Path, owner) -> dict:
    """A checkpoint, read whole and checked to be `owner`'s; ConfigError naming the file otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, empty, not a torch file: whatever torch.load raises
        raise ConfigError(f"checkpoint {path} cannot be read ({type(e).__name__}); delete it to redo its "
                          f"phase") from None
    if not isinstance(state, dict) or not {"done", "model", "history", "owner"} <= set(state):
        raise ConfigError(f"checkpoint {path} is not a checkpoint of this program; delete it to redo its "
                          f"phase")
    if owner is not None and state["owner"] != owner:
        theirs, ours = state["owner"] or {}, owner
        diff = sorted(k for k in set(theirs.get("config", {})) | set(ours["config"])
                      if theirs.get("config", {}).get(k) != ours["config"].get(k))
        what = f"config differs in: {', '.join(diff)}" if diff else f"it is phase {theirs.get('phase')!r}'s"
        raise ConfigError(f"checkpoint {path} belongs to another run ({what}); delete it to redo its phase")
    return state


def check_checkpoints(run: Path, cfg):
    """Read every ckpt_<phase>.pt of a run before anything is written, so a damaged or foreign one stops
    the resume (exit 2) with the run directory untouched."""
    config = results_config(cfg)
    for path in sorted(run.glob("ckpt_*.pt")):
        read_checkpoint(path, dict(config=config, phase=path.stem[len("ckpt_"):]))


def load_weak_embedding(path: str, p: int, seeds: int = 1) -> torch.Tensor:
    """--weak_embedding PATH: embedding.pt (a dict with 'embedding') or a bare tensor, (p, d) for any
    number of seeds (every member gets it) or (seeds, p, d) (one per member)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"weak_embedding file not found: {path}") from None
    except Exception as e:  # not a torch file, or unpickling refused
        raise ConfigError(f"weak_embedding {path} is not a saved tensor ({type(e).__name__})") from None
    emb = obj.get("embedding") if isinstance(obj, dict) else obj
    if not isinstance(emb, torch.Tensor) or emb.dim() not in (2, 3) or not emb.is_floating_point():
        raise ConfigError(f"weak_embedding {path} must hold a float tensor of shape (p, d) or (seeds, p, d)")
    if emb.dim() == 3 and emb.shape[0] != seeds:
        raise ConfigError(f"weak_embedding {path} holds {emb.shape[0]} seeds' embeddings but seeds = {seeds}")
    if emb.shape[-2] != p:
        raise ConfigError(f"weak_embedding {path} has vocabulary size {emb.shape[-2]} but p = {p}")
    if not torch.isfinite(emb).all():
        raise ConfigError(f"weak_embedding {path} contains NaN/inf")
    return emb.float()


def device_name(device: torch.device) -> str:
    return str(device) if device.type != "cuda" else torch.cuda.get_device_name(device)


class RunRecord:
    """What a script writes as its phases finish: summary.json (`header`, the CPU thread count and one
    entry per phase: summarize + the script's extras), metrics.csv (every evaluation of every phase so
    far), progress.csv (tracked measures), models.pt (the final parameters, save_models)."""

    def __init__(self, run: Path, cfg, header: dict, title: str = ""):
        self.run, self.cfg, self.title = Path(run), cfg, title
        self.summary = dict(header, threads=torch.get_num_threads(), phases={})
        self.rows, self.models, self.progress = [], {}, []

    def checkpoint(self, phase: str) -> Checkpoint:
        """ckpt_<phase>.pt in the run directory; an interrupt writes metrics.csv with the phase so far."""
        def partial(history):
            write_csv(self.run / "metrics.csv", self.rows + history_rows(phase, history), METRIC_FIELDS)
        return Checkpoint(self.run / f"ckpt_{phase}.pt", self.cfg.ckpt_every, self.cfg.resume, partial,
                          owner=dict(config=results_config(self.cfg), phase=phase),
                          resume_hint=resume_command(self.run))

    def phase_done(self, phase: str, hist: dict, model: nn.Module | None = None, extra: dict | None = None):
        """Record a finished phase; print one line; if every member diverged, draw what there is and
        exit with status 1."""
        self.rows.extend(history_rows(phase, hist))
        write_csv(self.run / "metrics.csv", self.rows, METRIC_FIELDS)
        if "tracked" in hist:
            self.progress.extend(progress_rows(phase, hist["tracked"]))
            write_csv(self.run / "progress.csv", self.progress, PROGRESS_FIELDS)
        s = self.summary["phases"][phase] = {**summarize(hist), **(extra or {})}
        if model is not None:
            self.models[phase] = {k: v.cpu() for k, v in model.state_dict().items()}
        save_json(self.summary, self.run / "summary.json")
        gaps = [m["time_gap"] for m in s["members"]] if "members" in s else s["time_gap"]
        final = hist["metrics"][-1]  # (K, 5)
        print(f"[{phase}] done: epochs {hist['epochs_run']}  "
              f"final train acc {np.nanmean(final[:, TRAIN_ACC]):.4f}  "
              f"test acc {np.nanmean(final[:, TEST_ACC]):.4f}  "
              f"Time Gap {gaps}  {hist['wall_s']:.1f}s")
        if hist["diverged"]:
            plot_dynamics(self.run, title=self.title)
            fail(f"phase '{phase}' diverged (NaN/inf loss) at epoch {hist['failed_epoch'].min()}; "
                 f"metrics so far are in {self.run}", status=1)
        return s

    def save_models(self):
        save_atomic(self.models, self.run / "models.pt")

    def weak_done(self, hist: dict, model: nn.Module, weak: torch.Tensor, transfer_at: float | None,
                  **meta) -> torch.Tensor:
        """After a weak phase: where each member stopped (transfer_point), a warning when transfer_at was
        never reached, embedding.pt ({'embedding', transfer fields, meta}) and the phase's entry.
        weak: the transferred matrix per member (K, V, r); returned as (V, r) for a one-member run."""
        transfer = transfer_point(hist, transfer_at)
        if weak.shape[0] == 1:
            weak, transfer = weak[0], single(transfer)
        if not transfer["transfer_target_reached"]:
            print(f"[weak] warning: test accuracy never reached transfer_at = {transfer_at} in "
                  f"{hist['epochs_run']} epochs; transferring the final weights", file=sys.stderr)
        save_atomic(dict(embedding=weak, **transfer, **meta), self.run / "embedding.pt")
        self.phase_done("weak", hist, model, transfer)
        return weak


# =============================================================================
# 12. Grid search (appendix A.3: "grid search over init scale x lr x wd"; the best point is the first to
# reach the threshold): grid points are trained as the members of K-member models, batch after batch.

PAPER_GRID = dict(  # init scale x lr x wd = 16 x 8 x 9 = 1152 points
    init_scales=[0.05] + [round(0.1 * i, 1) for i in range(1, 16)],
    lrs=[1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 1e-1, 0.5, 1.0],
    wds=[1e-4, 1e-3, 1e-2, 1e-1, 1.0, 2.0, 3.0, 4.0, 5.0],
)
GRID_PHASES = ("groktransfer", "scratch")


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
    members are slower per member than one model on a CPU). Batches are then balanced: 1152 points at
    K <= 256 run as 5 batches of 231 or 230, not 4 x 256 + 128."""
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
        first = first_epoch(history["epochs"], history["metrics"][:, k, TEST_ACC], threshold)
        status = ("diverged" if s["diverged_at"] is not None else "reached" if first is not None
                  else "not_reached")
        rows.append({**point, sel: first, "first_epoch_train_95": s["first_epoch_train_95"],
                     "first_epoch_test_95": s["first_epoch_test_95"], "time_gap": s["time_gap"],
                     "final_train_acc": s["final_train_acc"], "final_test_acc": s["final_test_acc"],
                     "final_test_loss": s["final_test_loss"],
                     "epochs_run": next(e for e in (s["stopped_at"], s["diverged_at"], s["epochs"])
                                        if e is not None),
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
                         stop_at=threshold, compact=True, quiet=True, desc="grid batch", **train_kw)
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


# =============================================================================
# 13. Grid results: selection, grid.csv, merging shards, the heatmap


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
    loss = lambda r: r["final_test_loss"] if r["final_test_loss"] is not None else math.inf
    return min(reached, key=lambda r: (r[sel], loss(r), r["point"]))


def write_grid(path: Path, rows: list[dict]):
    """grid.csv, sorted by point number; empty values for never / not available."""
    rows = sorted(rows, key=lambda r: r["point"])
    write_csv(path, rows, list(rows[0]))


def read_grid(path: Path) -> list[dict]:
    """grid.csv -> rows with numbers parsed back (empty -> None)."""
    def parse(key, v):
        if v == "" or key == "status":
            return None if v == "" else v
        return int(v) if key in ("point", "epochs_run", "time_gap") or key.startswith("first_epoch") \
            else float(v)

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
        same = {k: v for k, v in m.items()
                if k not in ("shard", "members", "wall_s", "best", "n_points_run", "device")}
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


def grid_main(cfg, run: Path, data: dict, build, meta: dict, default=None, title: str = "",
              **train_kw) -> Path:
    """--grid in a script: every (init scale, lr, wd) of cfg's grid lists (this shard's share) for the
    phase cfg.grid_phase, built by build(init_scales), trained to cfg.grid_stop_at test accuracy or
    cfg.epochs with the script's AdamW settings; writes grid.csv (after every batch), grid.json, grid.png.
    meta: what else the grid depends on (task, sizes, weak model), recorded in grid.json and compared
    by --merge. default: the script's own (init, lr, wd) for this phase, printed beside the best point.
    train_kw: passed to train (loss_fn, acc_fn)."""
    points = grid_points(cfg.grid_init_scales, cfg.grid_lrs, cfg.grid_wds)
    i, n = parse_shard(cfg.shard)
    mine = points[i::n]
    done = read_grid(run / "grid.csv") if cfg.resume and (run / "grid.csv").is_file() else []
    if done:  # --resume: grid.csv holds every finished batch; train the rest
        finished = {r["point"] for r in done}
        print(f"[grid] resuming: {len(finished)} points already in {run / 'grid.csv'}")
    meta = dict(meta, phase=cfg.grid_phase, threshold=cfg.grid_stop_at, epochs=cfg.epochs,
                eval_every=cfg.eval_every, betas=[cfg.beta1, cfg.beta2], adam_eps=cfg.adam_eps,
                precision=cfg.precision, seed=cfg.seed,
                init_scales=cfg.grid_init_scales, lrs=cfg.grid_lrs, wds=cfg.grid_wds, n_points=len(points))
    print(f"[grid] {cfg.grid_phase}: {len(mine)} of {len(points)} points (shard {i}/{n}), "
          f"stop at {cfg.grid_stop_at:.0%} test acc or {cfg.epochs} epochs")
    todo = [p for p in mine if p["point"] not in {r["point"] for r in done}]
    rows, K = run_grid(todo, build, data, epochs=cfg.epochs, threshold=cfg.grid_stop_at, members=cfg.members,
                       on_batch=lambda rows: write_grid(run / "grid.csv", done + rows), quiet=cfg.quiet,
                       betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, eval_every=cfg.eval_every,
                       precision=cfg.precision, **train_kw) if todo else ([], cfg.members)
    meta = dict(meta, shard=f"{i}/{n}", members=K, n_points_run=len(mine))
    return finish_grid(run, done + rows, meta, default, title)


def merge_main(cfg, experiment: str, title=None) -> Path:
    """--merge DIR ...: combine shard outputs into cfg's run directory; exits 2 on bad shards.
    title(meta) -> the heatmap's title, from the shards' own settings."""
    try:
        rows, meta = merge_grids(cfg.merge)
        run = claim_dir(Path(cfg.out) if cfg.out else Path("runs") / experiment / (cfg.name or "merged"))
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
        print(f"[grid] best point: init {best['init_scale']:g}  lr {best['lr']:g}  wd {best['wd']:g}  "
              f"reaches "
              f"{meta['threshold']:.0%} at epoch {best[selection_key(rows)]}"
              + (f"  (the script's default: {default})" if default is not None else ""))
    print(f"wrote {run / 'grid.csv'}, {run / 'grid.json'} and {png}")
    return run


def plot_grid(rows: list[dict], out: Path, title: str = "") -> Path:
    """Heatmap over lr (rows) x wd (columns): the first epoch at the selection threshold, best over
    init scale, with that init scale written in the cell; grey = no init scale reached it, the best
    point boxed."""
    plt = pyplot()
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


# =============================================================================
# 14. Plots: drawn from the saved CSV files, so they can be redrawn for any finished run


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, out, dpi: int = 120) -> Path:
    """Write a matplotlib figure to `out` as PNG, atomically, and close it."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    write_atomic(Path(out), buf.getvalue())
    return Path(out)


PHASE_TITLES = {"weak": "weak model", "groktransfer": "target via GrokTransfer",
                "scratch": "target from scratch", "grokfast": "target via GrokFast",
                "random_ab": "target, A and B both random"}


def panel_note(epochs, metrics) -> str:
    """The text in a dynamics panel: the Time Gap (one member) or each member's (K > 1; "-" = never
    reached 95%), and where values are NaN/inf."""
    bad = ~np.isfinite(metrics[..., :WEIGHT_NORM]).all(-1)  # (E, K)
    acc = np.where(bad[..., None], np.nan, metrics)  # NaN never counts as reaching 95%
    gaps = [time_gap(epochs, acc[:, k, TRAIN_ACC], acc[:, k, TEST_ACC]) for k in range(metrics.shape[1])]
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
    plt = pyplot()
    run = Path(run)
    phases = read_metrics(run / "metrics.csv")
    fig, axes = plt.subplots(1, len(phases), figsize=(4.2 * len(phases), 3.7), squeeze=False)
    last = max(int(d["epochs"].max()) for d in phases.values())  # one x range: phases compare by eye
    for ax, (phase, d) in zip(axes[0], phases.items()):
        ep, m = d["epochs"], d["metrics"]
        keep = ep > 0  # log axis
        ep, m = ep[keep], m[keep]
        bad = ~np.isfinite(m[..., :WEIGHT_NORM]).all(-1)  # (E, K)
        for column, name, color in ((TRAIN_ACC, "train", "tab:blue"), (TEST_ACC, "test", "tab:red")):
            acc = np.where(bad, np.nan, m[..., column])  # (E, K)
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
                  "synergy": "synergy (min O-info, bits)", "redundancy": "redundancy (max O-info, bits)",
                  "synergy_size": "size of most synergistic multiplet"}


def plot_progress(run: Path, out: Path | None = None, title: str = "") -> Path:
    """Progress measures beside the loss curves: one column per tracked phase; the top row train and
    test loss (log y) and weight norm, then one row per measure (member mean and min-max band). A
    dotted red line marks the first epoch with test accuracy >= 95% (member mean)."""
    plt = pyplot()
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
        for column, label, color in ((TRAIN_LOSS, "train loss", "tab:blue"),
                                     (TEST_LOSS, "test loss", "tab:red")):
            ax.plot(ep[keep], np.nanmean(m[keep, :, column], 1), color=color, label=label)
        ax.set_yscale("log")
        ax.set_title(PHASE_TITLES.get(phase, phase), fontsize=9)
        twin = ax.twinx()
        twin.plot(ep[keep], np.nanmean(m[keep, :, WEIGHT_NORM], 1), color="gray", ls="--", lw=1)
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
                    ax.fill_between(e[keep_t], np.nanmin(v[keep_t], 1), np.nanmax(v[keep_t], 1),
                                    color="tab:green", alpha=0.2)
            bad = ~np.isfinite(v).all()
            ax.set_ylabel(MEASURE_LABELS.get(name, name) + (" (NaN!)" if bad else ""), fontsize=8)
            ax.grid(alpha=0.3)
        first = first_epoch(ep[keep], np.nanmean(m[keep, :, TEST_ACC], 1), 0.95)  # test accuracy at 95%
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
