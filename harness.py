"""The run machinery of the GrokTransfer experiments: nothing here changes a number, and nothing here
needs reading to follow a run (the research code is common.py). Open it to change how runs are stored.

  1. Config, CLI  parse_config (dataclass < --config FILE.yaml < --key value; --help), config_or_exit, fail
  2. Checks       check_values (by a field's role), check_size, require, phase_list
  3. Run files    pick_device, set_seed, open_run (lock, resume checks), write_atomic, write_csv,
                  read_metrics
  4. Signals      catch_signals, stop_requested, `script` (a script's main: one-line errors, exit
                  130 / 143 / 129 with the command that resumes)
  5. Record       Checkpoint, check_checkpoints, RunRecord (summary.json, metrics.csv, embedding.pt)
  6. Grid search  grid_points, auto_members, run_grid, grid_main
  7. Grid files   best_point, grid.csv, merge (shards of a job array)
The figures drawn from a run's files are in plots.py.

Commands: `python harness.py plot RUN_DIR` (dynamics.png again), `merge DIR ... --out NEW` (grid shards).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
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
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import yaml

import plots

from common import (METRICS, TEST_ACC, TRAIN_ACC, ConfigError, Interrupted, first_epoch, member_summary,
                    summarize, train, transfer_point)

# =============================================================================
# 1. Configuration and CLI: defaults (a dataclass in the script) < --config FILE.yaml < --key value flags

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
        if f.name in choices and not all(str(c) in text for c in choices[f.name]):
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
        elif pending and line.lstrip().startswith("#"):  # a section header of several lines
            pending += " " + line.strip()[1:].strip()
    return comments, sections


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
                j = i + 1  # a list flag takes every value up to the next --flag: --grid_lrs 1e-3 1e-2
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
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"config file {config_file} is not UTF-8 text") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            raise ConfigError(f"config file {config_file} is not valid YAML{where}") from None
        loaded = {} if loaded is None else loaded
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file} must be a mapping of key: value")
        pairs = list(loaded.items()) + pairs  # the file first: flags override it
    for key, raw in pairs:
        if key not in hints:
            raise unknown(key)
        values[key] = _coerce(key, raw, hints[key], choices)
    return type(defaults)(**values)


# =============================================================================
# 2. The value checks every script shares (the script's own check(cfg) adds the task's)

ROLE_NAMES = {  # a field's role from its name; a name of a forker's own is read from its comment instead
    "lr": r"(\w+_)?(lr|lrs|learning_rates?)", "wd": r"(\w+_)?(wd|wds|weight_decays?)",
    "init_scale": r"(\w+_)?init_scales?", "beta": r"(\w+_)?beta[12]", "eps": r"adam_eps|(\w+_)?eps_adam"}
ROLE_COMMENTS = {"lr": "learning rate", "wd": "weight decay"}  # "# AdamW learning rate ..." names the role


def field_role(name: str, comment: str) -> str | None:
    """lr, wd, init_scale, beta, eps or None: by the field's name, else by the first words of its
    --help comment ("learning rate", "GD learning rate", "its weight decay")."""
    for role, pattern in ROLE_NAMES.items():
        if re.fullmatch(pattern, name.lower()):
            return role
    for role, phrase in ROLE_COMMENTS.items():
        if re.match(rf"(\S+ )?(\(\w+\) )?{phrase}\b", comment.lower()):
            return role
    return None


def check_values(cfg):
    """The checks every script shares, by a field's role (field_role) and name: learning rates, init
    scales and eps > 0, weight decays >= 0, betas in [0, 1), accuracy thresholds (*stop_at, transfer_at) in
    (0, 1] (lists: every value); seeds in numpy's range;
    ckpt_every >= 0; eval_every <= its epochs; a device that exists; a run name inside runs/; epochs
    whose metrics one run could hold in memory."""
    comments, _ = _field_comments(type(cfg))
    for f in dataclasses.fields(cfg):
        key, v = f.name, getattr(cfg, f.name)
        role = field_role(key, comments.get(key) or SHARED_HELP.get(key, ""))
        for x in (v if isinstance(v, list) else [v]):
            if not isinstance(x, (int, float)) or isinstance(x, bool):
                continue
            if role in ("lr", "init_scale", "eps") and x <= 0:
                raise ConfigError(f"{key} must be positive, got {x:g}")
            if role == "wd" and x < 0:
                raise ConfigError(f"{key} must be >= 0, got {x:g}")
            if role == "beta" and not 0 <= x < 1:
                raise ConfigError(f"{key} must be in [0, 1), got {x:g}")
            if re.fullmatch(r"(\w+_)?(stop|transfer)_at", key) and not 0 < x <= 1:
                raise ConfigError(f"{key} must be in (0, 1] (an accuracy), got {x:g}")
        if isinstance(v, bool) or not isinstance(v, int):
            continue
        if key == "seed" or key.endswith("_seed"):
            last = v + getattr(cfg, "seeds", 1) - 1 if key == "seed" else v
            if v < 0 or last >= 2 ** 32:
                raise ConfigError(f"{key} must be in 0 .. 2^32 - 1 (numpy's seed range), got {v}"
                                  + (f" with seeds = {cfg.seeds}" if last != v else ""))
        if key == "ckpt_every" and v < 0:
            raise ConfigError(f"ckpt_every must be >= 0 (0: at each phase's end only), got {v}")
        if key.endswith("eval_every") and v > 0 and hasattr(cfg, "resume"):  # a run's, not bench.py's timing
            epochs = getattr(cfg, key[:-len("eval_every")] + "epochs", None)
            if isinstance(epochs, int) and 0 < epochs < v:
                raise ConfigError(f"{key} ({v}) is larger than {key[:-len('eval_every')]}epochs ({epochs}): "
                                  f"nothing would be evaluated between the first and the last epoch")
        if key.endswith("epochs"):
            evals = v // max(1, getattr(cfg, "eval_every", 1))
            members = getattr(cfg, "seeds", 1)  # ~400 bytes a member per evaluation, held in memory
            check_memory(evals * members * 400, f"{key} = {v:g} ({evals:.3g} evaluations of metrics)")
    if isinstance(getattr(cfg, "device", None), str):
        pick_device(cfg.device)  # an unknown device, or CUDA where there is none: before any work
    name = getattr(cfg, "name", "")
    if isinstance(name, str) and name and (Path(name).is_absolute() or ".." in Path(name).parts):
        raise ConfigError(f"name must stay inside runs/<experiment>/ (no '..', not absolute); got {name!r}")


def check_memory(n_bytes: float, what: str):
    """ConfigError when `what` would need more than this machine's memory."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if n_bytes > total:
        raise ConfigError(f"{what} needs about {n_bytes / 2 ** 30:,.0f} GiB of memory; "
                          f"this machine has {total / 2 ** 30:,.0f} GiB")


def check_size(what: str, n_params: float, n_activations: float):
    """ConfigError when a model of n_params parameters (all members) trained full batch with
    n_activations activation values would not fit in this machine's memory: 4 bytes a value; weights,
    gradient, two AdamW moments and a checkpoint copy (5x), activations kept for backward (3x)."""
    check_memory(4 * (5 * n_params + 3 * n_activations), what)


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


# =============================================================================
# 3. Run directory and files: device and seeds, the run's lock, atomic files, metrics.csv


def pick_device(name: str) -> torch.device:
    """auto, cpu, cuda or cuda:N -> the device; ConfigError for any other name, or cuda without CUDA."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available; use --device cpu")
    return torch.device(name if name != "auto" else "cuda" if torch.cuda.is_available() else "cpu")


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
    if not resume and (run / "config.yaml").is_file():
        raise ConfigError(f"{run} already holds a run; add --resume to continue it, or choose another --out")
    if not resume:
        write_atomic(run / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    else:
        check_resume(run, cfg)
    catch_signals()
    _OPEN_RUNS.append(run)
    return run


def check_resume(run: Path, cfg):
    """The run in `run` is cfg's (config.yaml agrees on every key that changes results) and every
    checkpoint in it is readable and its own; ConfigError naming the problem otherwise."""
    try:
        old = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ConfigError(f"--resume: {run / 'config.yaml'} is not valid YAML") from None
    if not isinstance(old, dict):
        raise ConfigError(f"--resume: {run / 'config.yaml'} is not a mapping of key: value")
    for key, value in results_config(cfg).items():
        if old.get(key) != value:
            raise ConfigError(f"--resume: config key '{key}' is {value!r} but the run used {old.get(key)!r}; "
                              f"resuming would change its results")
    check_checkpoints(run, cfg)


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
    path, data = Path(path), data.encode() if isinstance(data, str) else data
    with contextlib.suppress(OSError):
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return  # unchanged: a resumed run that has nothing new to say touches no file
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0o022)  # read it (os.umask sets and returns the old value), then put it back
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
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


def write_csv(path: Path, rows: list[dict], fields: list[str], tail: str = ""):
    """Every row so far, then `tail` (lines already in CSV form), atomically (metrics.csv, progress.csv,
    grid.csv); None is written empty."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    write_atomic(path, buf.getvalue() + tail)


def lines_by_phase(path: Path, read: bool = True) -> dict[str, str]:
    """A long-format CSV's data lines grouped by their first column (the phase), in file order."""
    out: dict[str, str] = {}
    for line in path.read_bytes().decode().splitlines(keepends=True)[1:] if read and path.is_file() else []:
        out[line.split(",", 1)[0]] = out.get(line.split(",", 1)[0], "") + line  # keeps csv's \r\n
    return out


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
# 4. Signals and a script's entry point: SIGINT, SIGTERM, SIGHUP become a checkpoint and one line

_SIGNALS: list[int] = []  # signals received and not yet acted on
EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}  # 128 + the signal number
SIGNAL_NAMES = {signal.SIGINT: "interrupted", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


def stop_requested() -> int:
    """The first signal received since the run opened, or 0: what common.train reads between steps."""
    return _SIGNALS[0] if _SIGNALS else 0


def catch_signals():
    """From now on (a run is open), SIGINT, SIGTERM and SIGHUP (a closed terminal) are noted, not fatal:
    the running phase checkpoints at its next step boundary and raises common.Interrupted (a signal
    between phases stops the next phase at its first step)."""
    import threading
    if threading.current_thread() is threading.main_thread():
        for s in EXIT_STATUS:
            signal.signal(s, lambda signum, frame: _SIGNALS.append(signum))


def script(main):
    """Decorate a script's main(argv): bad input (ConfigError) anywhere in the run is one line and exit 2;
    common.Interrupted is the line that says where it stopped and the command that resumes, exit 130
    (SIGINT), 143 (SIGTERM) or 129 (SIGHUP)."""
    @functools.wraps(main)
    def run(argv=None):
        try:
            out = main(argv)
        except ConfigError as e:
            fail(str(e))
        except OSError as e:  # a full disk, a read-only or immutable file: what was written before stays
            hint = f"; resume: {resume_command(_OPEN_RUNS[-1])}" if _OPEN_RUNS else ""
            fail(f"I/O error on {e.filename or 'a file'} ({e.strerror or type(e).__name__}); every file "
                 f"written before is intact{hint}")
        except Interrupted as e:
            what, status = SIGNAL_NAMES.get(e.signum, "stopped"), EXIT_STATUS.get(e.signum, 130)
            resume = resume_command(_OPEN_RUNS[-1]) if _OPEN_RUNS else "the same command with --resume"
            saved = "; checkpoint and metrics saved. Resume: " if e.saved else " (not checkpointed); resume: "
            fail(f"{what} at {e.where}{saved}{resume}", status=status)
        signum = stop_requested()
        if signum:  # arrived after the last step: nothing to checkpoint, every file is written
            fail(f"{SIGNAL_NAMES.get(signum, 'stopped')} as the run finished; its files are complete",
                 status=EXIT_STATUS.get(signum, 130))
        return out
    return run


# =============================================================================
# 5. Checkpoints and the run record (summary.json, metrics.csv, models.pt, embedding.pt)


class Checkpoint:
    """One phase's checkpoint file, what common.train is given as `ckpt`: where, how often it is written,
    whether to resume from it, what an interrupt writes besides (on_interrupt(history)), whose it is
    (owner: the run's results config and the phase), and whether a signal asks the phase to stop."""

    def __init__(self, path: Path, every: int = 0, resume: bool = False, on_interrupt=None, owner=None):
        self.path, self.every, self.resume, self.owner = Path(path), every, resume, owner
        self.on_interrupt = on_interrupt or (lambda history: None)

    stop_requested = staticmethod(stop_requested)  # the signal flag, read by common.train between steps

    def save(self, state: dict):
        """The state, serialised, inside an envelope that carries its SHA-256 (checked by read_checkpoint)."""
        buf = io.BytesIO()
        torch.save(dict(state, owner=self.owner), buf)
        payload = buf.getvalue()
        digest = hashlib.sha256(payload).hexdigest()
        save_atomic(dict(format=CHECKPOINT_FORMAT, sha256=digest, payload=payload), self.path)

    def load(self) -> dict | None:
        return read_checkpoint(self.path, self.owner) if self.path.is_file() else None


CHECKPOINT_FORMAT = "groktransfer-checkpoint-2"  # the envelope: format, sha256, payload
CHECKPOINT_KEYS = {"done", "epoch", "model", "alive", "last_row", "opt", "history", "rng", "owner"}  # pack's


def read_checkpoint(path: Path, owner) -> dict:
    """A checkpoint, read whole, its checksum and keys checked, and checked to be `owner`'s; ConfigError
    naming the file otherwise."""
    redo = "delete it to redo its phase"
    try:
        outer = torch.load(path, map_location="cpu", weights_only=False)
        sealed = isinstance(outer, dict) and outer.get("format") == CHECKPOINT_FORMAT
        intact = sealed and hashlib.sha256(outer["payload"]).hexdigest() == outer["sha256"]
        state = torch.load(io.BytesIO(outer["payload"]), map_location="cpu", weights_only=False) if intact \
            else {}
    except Exception as e:  # truncated, empty, not a torch file: whatever torch.load raises
        raise ConfigError(f"checkpoint {path} cannot be read ({type(e).__name__}); {redo}") from None
    if not sealed:
        raise ConfigError(f"checkpoint {path} is not a checkpoint of this program (or of an older version of "
                          f"it); {redo}")
    if not intact:
        raise ConfigError(f"checkpoint {path} fails its checksum (its bytes changed since it was written); "
                          f"{redo}")
    missing = CHECKPOINT_KEYS - set(state) if isinstance(state, dict) else CHECKPOINT_KEYS
    if missing:
        raise ConfigError(f"checkpoint {path} lacks {', '.join(sorted(missing))} (written by another version "
                          f"of the program); {redo}")
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


def load_weak_embedding(path: str, p: int, seeds: int = 1, task: dict | None = None) -> torch.Tensor:
    """--weak_embedding PATH: embedding.pt (a dict with 'embedding') or a bare tensor, (p, d) for any
    number of seeds (every member gets it) or (seeds, p, d) (one per member). task: what the file must
    have been saved for, where it says (embedding.pt records op and p)."""
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
    if emb.shape[-1] == 0:
        raise ConfigError(f"weak_embedding {path} has width 0; it needs d >= 1")
    if not torch.isfinite(emb).all():
        raise ConfigError(f"weak_embedding {path} contains NaN/inf")
    saved_for = {k: obj[k] for k in (task or {}) if isinstance(obj, dict) and k in obj}
    wrong = [f"{k} {v!r} (this run: {task[k]!r})" for k, v in saved_for.items() if v != task[k]]
    if wrong:
        raise ConfigError(f"weak_embedding {path} was saved for another task: {', '.join(wrong)}")
    return emb.float()


def device_name(device: torch.device) -> str:
    return str(device) if device.type != "cuda" else torch.cuda.get_device_name(device)


class RunRecord:
    """What a script writes as its phases finish: summary.json (`header`, the CPU thread count and one
    entry per phase: summarize + the script's extras), metrics.csv (every evaluation of every phase so
    far), progress.csv (tracked measures), models.pt (the final parameters, save_models)."""

    def __init__(self, run: Path, cfg, header: dict, title: str = ""):
        self.run, self.cfg, self.title = Path(run), cfg, title
        self.summary = dict(header, threads=torch.get_num_threads(), torch=torch.__version__,  # what a rerun
                            cpu_capability=torch.backends.cpu.get_cpu_capability(), phases={})  # must match
        self.rows, self.models, self.progress = [], {}, []
        # a resume writes nothing shorter than it found: the phases not yet read back keep their lines
        summary = self.run / "summary.json"
        found = json.loads(summary.read_text()).get("phases", {}) if cfg.resume and summary.is_file() else {}
        self.found = dict(phases=found, **{kind: lines_by_phase(self.run / f"{kind}.csv", cfg.resume)
                                           for kind in ("metrics", "progress")})

    def _tail(self, kind: str, rows: list[dict]) -> str:
        """The lines of `kind`.csv found at the start for the phases `rows` do not hold yet."""
        done = {r["phase"] for r in rows}
        return "".join(lines for phase, lines in self.found[kind].items() if phase not in done)

    def write_metrics(self, extra: list[dict] = ()):
        rows = self.rows + list(extra)
        write_csv(self.run / "metrics.csv", rows, METRIC_FIELDS, self._tail("metrics", rows))

    def write_summary(self):
        later = {k: v for k, v in self.found["phases"].items() if k not in self.summary["phases"]}
        save_json(dict(self.summary, phases={**self.summary["phases"], **later}), self.run / "summary.json")

    def checkpoint(self, phase: str) -> Checkpoint:
        """ckpt_<phase>.pt in the run directory; an interrupt writes metrics.csv with the phase so far."""
        def partial(history):
            self.write_metrics(history_rows(phase, history))
        return Checkpoint(self.run / f"ckpt_{phase}.pt", self.cfg.ckpt_every, self.cfg.resume, partial,
                          owner=dict(config=results_config(self.cfg), phase=phase))

    def phase_done(self, phase: str, hist: dict, model: nn.Module | None = None, extra: dict | None = None):
        """Record a finished phase; print one line; if every member diverged, draw what there is and
        exit with status 1."""
        self.rows.extend(history_rows(phase, hist))
        self.write_metrics()
        if "tracked" in hist:
            self.progress.extend(progress_rows(phase, hist["tracked"]))
            tail = self._tail("progress", self.progress)
            write_csv(self.run / "progress.csv", self.progress, PROGRESS_FIELDS, tail)
        s = self.summary["phases"][phase] = {**summarize(hist), **(extra or {})}
        if model is not None:
            self.models[phase] = {k: v.cpu() for k, v in model.state_dict().items()}
        self.write_summary()
        gaps = [m["time_gap"] for m in s["members"]]
        final = hist["metrics"][-1]  # (K, 5)
        print(f"[{phase}] done: epochs {hist['epochs_run']}  "
              f"final train acc {np.nanmean(final[:, TRAIN_ACC]):.4f}  "
              f"test acc {np.nanmean(final[:, TEST_ACC]):.4f}  "
              f"Time Gap {gaps}  {hist['wall_s']:.1f}s")
        if hist["diverged"]:
            plots.plot_dynamics(self.run, title=self.title)
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
            weak = weak[0]
        if not transfer["transfer_target_reached"]:
            print(f"[weak] warning: test accuracy never reached transfer_at = {transfer_at} in "
                  f"{hist['epochs_run']} epochs; transferring the final weights", file=sys.stderr)
        save_atomic(dict(embedding=weak, **transfer, **meta), self.run / "embedding.pt")
        self.phase_done("weak", hist, model, transfer)
        return weak


# =============================================================================
# 6. Grid search (appendix A.3: "grid search over init scale x lr x wd"; the best point is the first to
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
        s = member_summary(history, k)
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
    K = min(members, len(points)) or auto_members(build, data, len(points), **train_kw)
    rows, start, t0 = [], 0, time.perf_counter()
    while start < len(points):
        batch = points[start:start + K]
        try:
            model = build([p["init_scale"] for p in batch])
            hist = train(model, data, epochs=epochs, lr=[p["lr"] for p in batch], wd=[p["wd"] for p in batch],
                         stop_at=threshold, compact=True, quiet=True, desc="grid batch", stop=stop_requested,
                         **train_kw)
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
# 7. Grid results: selection, grid.csv, merging shards (the heatmap: plots.plot_grid)


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
    if cfg.grid:
        if cfg.seeds != 1:
            raise ConfigError("a grid trains one seed per point; leave seeds at 1 (use seed to pick it)")
        empty = [key for key in ("grid_init_scales", "grid_lrs", "grid_wds") if not getattr(cfg, key)]
        if empty:  # their values are checked by role (check_values): lr, wd, init scale
            raise ConfigError(f"{empty[0]} must be a non-empty list")
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
    by merge. default: the script's own (init, lr, wd) for this phase, printed beside the best point.
    train_kw: passed to train (loss_fn, acc_fn)."""
    points = grid_points(cfg.grid_init_scales, cfg.grid_lrs, cfg.grid_wds)
    i, n = parse_shard(cfg.shard)
    mine = points[i::n]
    done = read_grid(run / "grid.csv") if cfg.resume and (run / "grid.csv").is_file() else []
    if done:  # --resume: grid.csv holds every finished batch; train the rest
        finished = {r["point"] for r in done}
        print(f"[grid] resuming: {len(finished)} points already in {run / 'grid.csv'}")
    meta = dict(meta, title=title, phase=cfg.grid_phase, threshold=cfg.grid_stop_at, epochs=cfg.epochs,
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


def merge(dirs: list[str], out: str) -> Path:
    """`python harness.py merge DIR ... --out DIR`: combine shard outputs into a new directory (or an
    empty one), never into a shard or another run; exits 2 on bad shards."""
    rows, meta = merge_grids(dirs)
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(p.name != ".lock" for p in target.iterdir())):
        raise ConfigError(f"--out {out} already holds files; merge into a new directory")
    run = claim_dir(target)
    print(f"merging {len(dirs)} shards: {len(rows)} points")
    return finish_grid(run, rows, dict(meta, merged_from=[str(d) for d in dirs]), title=meta.get("title", ""))


def finish_grid(run: Path, rows: list[dict], meta: dict, default=None, title: str = "") -> Path:
    """grid.csv, grid.json (the settings and the best point) and the heatmap grid.png."""
    best = best_point(rows)
    write_grid(run / "grid.csv", rows)
    save_json(dict(meta, best=best), run / "grid.json")
    full = f"{meta['phase']} grid" + (f", {title}" if title else "")
    png = plots.plot_grid(rows, run / "grid.png", title=full)
    if best is None:
        print(f"[grid] no point reached {meta['threshold']:.0%} test accuracy")
    else:
        print(f"[grid] best point: init {best['init_scale']:g}  lr {best['lr']:g}  wd {best['wd']:g}  "
              f"reaches "
              f"{meta['threshold']:.0%} at epoch {best[selection_key(rows)]}"
              + (f"  (the script's default: {default})" if default is not None else ""))
    print(f"wrote {run / 'grid.csv'}, {run / 'grid.json'} and {png}")
    return run


@script
def main(argv=None):
    """python harness.py plot RUN_DIR | merge DIR [DIR ...] --out DIR"""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plot"] and len(argv) == 2:
        if not (Path(argv[1]) / "metrics.csv").is_file():
            raise ConfigError(f"no metrics.csv in {argv[1]}")
        print(plots.plot_dynamics(Path(argv[1])))
    elif argv[:1] == ["merge"] and "--out" in argv[:-1]:
        i = argv.index("--out")
        dirs, out = argv[1:i] + argv[i + 2:], argv[i + 1]
        if not dirs:
            raise ConfigError("merge needs the shard directories: merge DIR [DIR ...] --out DIR")
        merge(dirs, out)
    else:
        raise ConfigError("usage: python harness.py plot RUN_DIR | merge DIR [DIR ...] --out DIR")


if __name__ == "__main__":
    main()
