"""The figures of a run, drawn from its saved files (metrics.csv, progress.csv, grid.csv), so any
finished run can be redrawn: dynamics.png (the paper's accuracy panels), progress.png (progress
measures beside the losses) and grid.png (the grid search's heatmap). Machinery like harness.py:
nothing here is needed to follow a run. `python harness.py plot RUN_DIR` redraws dynamics.png.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

import harness
from common import TEST_ACC, TEST_LOSS, TRAIN_ACC, TRAIN_LOSS, WEIGHT_NORM, first_epoch, time_gap

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
    harness.write_atomic(Path(out), buf.getvalue())
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
    phases = harness.read_metrics(run / "metrics.csv")
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
    prog, metrics = harness.read_progress(run / "progress.csv"), harness.read_metrics(run / "metrics.csv")
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


def plot_grid(rows: list[dict], out: Path, title: str = "") -> Path:
    """Heatmap over lr (rows) x wd (columns): the first epoch at the selection threshold, best over
    init scale, with that init scale written in the cell; grey = no init scale reached it, the best
    point boxed."""
    plt = pyplot()
    import matplotlib.ticker
    from matplotlib.colors import LogNorm

    sel = harness.selection_key(rows)
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
    best = harness.best_point(rows)
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
