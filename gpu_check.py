"""The GPU measurements in one command: the checks and runs that need CUDA, in priority order, each a
subprocess with a time limit, every output under --out, and a short table at the end.

Stages (--stages, comma-separated, run in the order given):
  tests       python -m pytest -q -rs: the CPU tests and the CUDA-only ones (tests/test_cuda.py); with
              pytest-xdist installed, on up to 8 workers
  bench       bench.py: the FNN table (K = 1, 16, 64, 256 at float32 / tf32 / bf16 against the plain
              loop), then the 2-layer (K = 1, 16) and 8-layer (K = 1) transformers per precision
  attention   bench.py --workload attention: the transformers' attention, fused SDPA vs written out
  table1_add  exp_transformer.py --op add --stop_at 0.99: Fig 6 left and Table 1 (the script's defaults)
  table1_mul  the same for a*b: Fig 6 right
  grid        exp_modular.py --grid --shard 0/8: one eighth of the paper's 1152-point grid (GrokTransfer,
              add); its wall time x 8 estimates the whole grid on this device
  fig13       exp_transformer.py --op parity with 2 and 4 layers (Fig 13 right; scratch)
  fig5        exp_xor.py --study norm_ratio: r_W against p and n (Fig 5b, 5c)

A stage stops at its own limit or when --budget_s runs out: it gets SIGTERM, the training scripts then
checkpoint and exit 143, and the same command again resumes every run it finds in --out (their
run directories hold config.yaml). Stage outputs: OUT/<stage>/ (run directories, bench JSON files) and
OUT/<stage>.log; the table goes to stdout, OUT/gpu_check.md and OUT/gpu_check.json.

Usage:
  python gpu_check.py --out runs/gpu --stages tests,bench,attention      # limits 420 + 300 + 120 s
  python gpu_check.py --out runs/gpu --stages table1_add                 # then each long stage alone
  python gpu_check.py --smoke --device cpu --out /tmp/g --stages attention,table1_add   # tiny (the tests')
--smoke swaps every stage for a tiny version of the same command, to check the wiring on a CPU.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import harness
from common import ConfigError

ROOT = Path(__file__).resolve().parent
GRACE_S = 60  # after SIGTERM: time to write the checkpoint and the metrics before SIGKILL


@dataclass
class Config:
    stages: list[str] = field(default_factory=lambda: list(STAGES))  # which stages, in this order
    out: str = "runs/gpu"  # every stage's output and the table
    device: str = "auto"  # passed to every script (tests use CUDA when present)
    budget_s: float = 540.0  # stop the last stage in time for this total (one device command: 10 minutes)
    smoke: bool = False  # tiny versions of every stage (CPU-sized), to check the wiring


STAGES = {  # stage: (time limit in s, its runs as (script and arguments, what it writes under OUT/<stage>))
    "tests": (420, [("-m pytest -q -rs -p no:cacheprovider", None)]),
    "bench": (300, [("bench.py --Ks 1 16 64 256", "fnn.json"),
                    ("bench.py --workload transformer2 --Ks 1 16", "transformer2.json"),
                    ("bench.py --workload transformer8 --Ks 1", "transformer8.json")]),
    "attention": (120, [("bench.py --workload attention --Ks 1 16", "attention.json")]),
    "table1_add": (560, [("exp_transformer.py --op add --stop_at 0.99 --ckpt_every 500", "run")]),
    "table1_mul": (560, [("exp_transformer.py --op mul --stop_at 0.99 --ckpt_every 500", "run")]),
    "grid": (560, [("exp_modular.py --grid --shard 0/8", "run")]),
    "fig13": (400, [(f"exp_transformer.py --op parity --phases scratch --n_layers {n} --d_model 128 "
                     f"--d_head 32 --ckpt_every 500", f"layers{n}") for n in (2, 4)]),
    "fig5": (560, [("exp_xor.py --study norm_ratio", "run")]),
}  # a stage stops at its own limit or when the budget runs out, whichever comes first
SMOKE = {  # --smoke: a tiny base for each script, put before the stage's own arguments (which win)
    "-m": "tests/test_common.py -k members_train_like",
    "bench.py": "--p 11 --epochs 2 --warmup 1 --d_embed 8 --width 16",
    "exp_transformer.py": "--config configs/smoke/transformer.yaml --phases weak,groktransfer,scratch "
                          "--q 10 --k 2 --n 200 --n_test 200",
    "exp_modular.py": "--config configs/smoke/modular.yaml --grid_init_scales 0.5 1 --grid_lrs 0.01 "
                      "--grid_wds 0.1 1",
    "exp_xor.py": "--config configs/smoke/xor.yaml",
}


def commands(stage: str, out: Path, device: str, smoke: bool) -> list[tuple[list[str], Path | None]]:
    """The (argv, run directory or bench JSON) of each run of a stage."""
    runs = []
    for command, writes in STAGES[stage][1]:
        script, *args = command.split()
        small = SMOKE[script].split() if smoke else []
        if script == "-m":  # pytest: no device, no output of its own; spread over the cores where xdist is
            xdist = not smoke and importlib.util.find_spec("xdist") is not None
            workers = ["-n", str(min(8, os.cpu_count() or 1))] if xdist else []
            runs.append(([script, *args, *workers, *small], None))
            continue
        target = out / writes
        where = ["--out", str(target)] + (["--quiet"] if script != "bench.py" else [])
        runs.append(([script, "--device", device, *small, *args, *where], target))
    return runs


def run_stage(argv: list[str], log, limit: float) -> tuple[int | None, float]:
    """Run one command (cwd: the repository) until it ends or `limit` seconds pass; then SIGTERM, and
    SIGKILL after GRACE_S. Returns (exit status or None if killed at the limit, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        return proc.wait(timeout=max(limit, 1)), time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return None, time.perf_counter() - t0


def result(stage: str, target: Path | None, log_path: Path) -> str:
    """The stage's headline, read back from what it wrote."""
    if stage == "tests":
        lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
        return lines[-1].strip("= ") if lines else ""
    if target is None:
        return ""
    if target.suffix == ".json":
        if not target.is_file():
            return f"{target.name}: none"
        rows = json.loads(target.read_text())["rows"]
        if "sdpa_over_written" in rows[0]:
            ratios = [r["sdpa_over_written"] for r in rows]
            return f"sdpa/written {min(ratios):.2f}-{max(ratios):.2f}"
        best = max((r for r in rows if "speedup_vs_plain" in r), key=lambda r: r["speedup_vs_plain"])
        return (f"{target.stem}: {len(rows)} rows, best x{best['speedup_vs_plain']} "
                f"(K {best['K']} {best['precision']})")
    if (target / "grid.json").is_file():
        grid = json.loads((target / "grid.json").read_text())
        best = grid["best"]
        where = "none reached" if best is None else f"best (init, lr, wd) = ({best['init_scale']:g}, " \
                                                    f"{best['lr']:g}, {best['wd']:g})"
        return f"{grid['n_points_run']} points, {where}"
    if (target / "summary.json").is_file():
        summary = json.loads((target / "summary.json").read_text())
        if "slopes" in summary:  # exp_xor's norm_ratio study: log-log slopes of r_W
            return "slopes " + ", ".join(f"{k} {v:.2f}" for k, v in summary["slopes"].items())
        if "table1" in summary and stage.startswith("table1"):
            return "; ".join(r["phase"] + (" not reached" if r["ms"] is None else f" {r['ms'] / 1e3:.1f}s")
                             for r in summary["table1"])
        return "; ".join(f"{phase} final test acc {s['final_test_acc_mean']:.3f}"
                         for phase, s in summary["phases"].items()
                         if s.get("final_test_acc_mean") is not None)
    return "no results yet"


@harness.script
def main(argv=None):
    cfg = harness.config_or_exit(Config(), argv, check=check)
    stages = cfg.stages
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = harness.pick_device(cfg.device)
    name = harness.device_name(device)
    t_start, rows = time.perf_counter(), []
    print(f"device {name}, torch {torch.__version__}; stages {', '.join(stages)}; budget {cfg.budget_s:.0f}s")
    for stage in stages:
        left = cfg.budget_s - (time.perf_counter() - t_start) - GRACE_S
        if left < 30:
            rows.append(dict(stage=stage, status="not started (budget)", seconds=0.0, result=""))
            continue
        (out / stage).mkdir(exist_ok=True)
        status, seconds, headline = "ok", 0.0, []
        with open(out / f"{stage}.log", "a") as log:
            runs = commands(stage, out / stage, cfg.device, cfg.smoke)
            for argv, target in runs:
                if target is not None and (target / "config.yaml").is_file():
                    argv = [*argv, "--resume"]  # a run stopped at a limit (or finished) continues
                limit = min(STAGES[stage][0], cfg.budget_s - (time.perf_counter() - t_start) - GRACE_S)
                print(f"[{stage}] python {' '.join(argv)}", flush=True)
                log.write(f"$ python {' '.join(argv)}\n")
                log.flush()
                rc, secs = run_stage(argv, log, limit)
                seconds += secs
                if rc is None:
                    status = "stopped at limit (run again to resume)"
                elif rc != 0 and status == "ok":
                    status = f"failed (exit {rc})"
                text = result(stage, target, out / f"{stage}.log")
                several = len(runs) > 1 and target is not None and target.suffix != ".json"
                headline.append(f"{target.name}: {text}" if several else text)
                if rc is None:
                    break
        rows.append(dict(stage=stage, status=status, seconds=round(seconds, 1),
                         result=" / ".join(h for h in headline if h)))
        print(f"[{stage}] {status} in {seconds:.0f}s: {rows[-1]['result']}", flush=True)
    table = [f"device: {name}; torch {torch.__version__}", "", "| stage | status | seconds | result |",
             "|---|---|---|---|"] + [f"| {r['stage']} | {r['status']} | {r['seconds']} | {r['result']} |"
                                     for r in rows]
    harness.write_atomic(out / "gpu_check.md", "\n".join(table) + "\n")
    harness.save_json(dict(device=name, torch=torch.__version__, rows=rows), out / "gpu_check.json")
    print("\n".join(table))
    return rows


def check(cfg: Config):
    if not cfg.stages or any(s not in STAGES for s in cfg.stages):
        raise ConfigError(f"stages must be a non-empty subset of {', '.join(STAGES)}; "
                          f"got {','.join(cfg.stages)}")
    if not cfg.budget_s > GRACE_S + 30:
        raise ConfigError(f"budget_s must exceed {GRACE_S + 30} s (the stop grace and a start), "
                          f"got {cfg.budget_s}")
    if Path(cfg.out).is_file():
        raise ConfigError(f"out must be a directory; {cfg.out} is a file")
    out = Path(cfg.out).resolve()
    existing = next((d for d in [out, *out.parents] if d.exists()), None)  # where the first mkdir happens
    if existing is None or not os.access(existing, os.W_OK):
        raise ConfigError(f"out {cfg.out} cannot be written ({existing} is not writable)")
    harness.pick_device(cfg.device)


if __name__ == "__main__":
    main()
