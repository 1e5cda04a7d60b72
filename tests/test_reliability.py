"""Faults and bad input, run as a user would: kill -9 and resume, Ctrl-C, determinism, and every
script's answer to bad input (exit 2, one line, nothing written)."""
import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = {name: ROOT / "configs" / "smoke" / f"{name}.yaml" for name in ("modular", "xor", "parity")}


def cmd(script, *args):
    return [sys.executable, str(ROOT / f"exp_{script}.py"), "--config", str(SMOKE[script]), *args]


def without_times(path):
    """summary.json minus the wall-clock fields (wall_s, compute_s*) and peak memory, which differ between
    any two runs."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items()
                    if k not in ("wall_s", "peak_rss_mib", "peak_cuda_mib") and not k.startswith("compute_s")}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj
    return strip(json.loads(Path(path).read_text()))


def start_and_stop(args, run, wait_for, sig, cwd=ROOT):
    """Start a run, wait until `wait_for` (a checkpoint file) exists, then send `sig`; returns the process."""
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    wait_for_file(p, run, wait_for)
    p.send_signal(sig)
    p.wait()
    return p


def wait_for_file(p, run, pattern):
    """Poll until a file matching `pattern` exists under `run` (no time limit: the run's own pace)."""
    while not list(Path(run).glob(pattern)):
        assert p.poll() is None, f"the run ended before {pattern} was written: {p.stderr.read()}"
        time.sleep(0.02)
    return next(Path(run).glob(pattern))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Two uninterrupted smoke runs of exp_modular: the reference, and a check of determinism."""
    base = tmp_path_factory.mktemp("plain")
    for name in ("a", "b"):
        r = subprocess.run(cmd("modular", "--ckpt_every", "20", "--quiet", "--out", str(base / name)),
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
    return base / "a", base / "b"


def test_same_config_and_seed_give_identical_metrics_on_the_cpu(uninterrupted):
    a, b = uninterrupted
    assert (a / "metrics.csv").read_bytes() == (b / "metrics.csv").read_bytes()
    assert without_times(a / "summary.json") == without_times(b / "summary.json")


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted):
    """Killed in the third phase: the resumed run skips the two finished phases, continues the third
    from its checkpoint, and ends with the uninterrupted run's metrics.csv and summary.json."""
    run = tmp_path / "run"
    args = cmd("modular", "--ckpt_every", "20", "--out", str(run))
    p = start_and_stop(args, run, "ckpt_scratch.pt", signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL
    r = subprocess.run(args + ["--resume"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "[scratch] resuming from epoch" in r.stdout
    # finished phases skipped
    assert "[weak] epoch" not in r.stdout
    assert "[groktransfer] epoch" not in r.stdout
    ref = uninterrupted[0]
    assert (run / "metrics.csv").read_bytes() == (ref / "metrics.csv").read_bytes()
    assert without_times(run / "summary.json") == without_times(ref / "summary.json")
    assert (run / "embedding.pt").is_file() and (run / "models.pt").is_file()


def test_ctrl_c_saves_and_says_how_to_resume(tmp_path, uninterrupted):
    run = tmp_path / "run"
    args = cmd("modular", "--ckpt_every", "20", "--quiet", "--out", str(run))
    p = start_and_stop(args, run, "ckpt_groktransfer.pt", signal.SIGINT)
    err = p.stderr.read()
    assert p.returncode == 130 and "--resume" in err and err.count("\n") == 1, err
    assert "groktransfer" in (run / "metrics.csv").read_text()  # the metrics so far, this phase included
    r = subprocess.run(args + ["--resume"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert (run / "metrics.csv").read_bytes() == (uninterrupted[0] / "metrics.csv").read_bytes()


def test_xor_kill_9_then_resume(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    base = ["--ckpt_every", "5", "--quiet", "--scratch_epochs", "100"]
    r = subprocess.run(cmd("xor", *base, "--out", str(ref)), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    args = cmd("xor", *base, "--out", str(run))
    start_and_stop(args, run, "ckpt_scratch.pt", signal.SIGKILL)
    r = subprocess.run(args + ["--resume"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert (run / "metrics.csv").read_bytes() == (ref / "metrics.csv").read_bytes()
    assert without_times(run / "summary.json") == without_times(ref / "summary.json")


def test_resume_refuses_a_config_that_changes_results(tmp_path, uninterrupted):
    run = uninterrupted[1]
    before = (run / "metrics.csv").read_bytes()
    r = subprocess.run(cmd("modular", "--out", str(run), "--resume", "--gt_lr", "0.5"), capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and "config key 'gt_lr'" in r.stderr and r.stderr.count("\n") == 1
    assert (run / "metrics.csv").read_bytes() == before
    r = subprocess.run(cmd("modular", "--out", str(tmp_path / "nothing"), "--resume"), capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and "--resume: no run in" in r.stderr and not (tmp_path / "nothing").exists()


@pytest.mark.parametrize("content, words", [("not a tensor file", "is not a saved tensor"),
                                            (None, "vocabulary size 7 but p = 23")])
def test_a_bad_weak_embedding_file_is_refused(tmp_path, content, words):
    import torch
    path = tmp_path / "emb.pt"
    if content is None:
        torch.save({"embedding": torch.zeros(7, 4)}, path)
    else:
        path.write_text(content)
    r = subprocess.run(cmd("modular", "--weak_embedding", str(path), "--phases", "groktransfer", "--out",
                           str(tmp_path / "r")),
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and words in r.stderr and not (tmp_path / "r").exists(), r.stderr


# ----------------------------------------------------------------------------- what must never be lost

def snapshot(run):
    """Every file of a run directory (names and bytes)."""
    return {p.name: p.read_bytes() for p in sorted(Path(run).iterdir()) if p.is_file()}


@pytest.fixture()
def finished(tmp_path, uninterrupted):
    """A copy of a finished smoke run, to damage."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run)
    return run


@pytest.mark.parametrize("damage, words", [
    ("truncate scratch", "checkpoint {run}/ckpt_scratch.pt cannot be read"),
    ("empty groktransfer", "checkpoint {run}/ckpt_groktransfer.pt cannot be read"),
    ("swap phases", "checkpoint {run}/ckpt_groktransfer.pt belongs to another run (it is phase 'scratch'"),
])
def test_a_damaged_checkpoint_stops_resume_and_changes_nothing(finished, damage, words):
    run = finished
    if damage == "truncate scratch":
        data = (run / "ckpt_scratch.pt").read_bytes()
        (run / "ckpt_scratch.pt").write_bytes(data[:len(data) // 2])
    elif damage == "empty groktransfer":
        (run / "ckpt_groktransfer.pt").write_bytes(b"")
    else:
        (run / "ckpt_groktransfer.pt").write_bytes((run / "ckpt_scratch.pt").read_bytes())
    before = snapshot(run)
    r = subprocess.run(cmd("modular", "--ckpt_every", "20", "--out", str(run), "--resume"),
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and words.format(run=run) in r.stderr, r.stderr
    assert snapshot(run) == before


def test_a_checkpoint_of_another_run_stops_resume_and_changes_nothing(tmp_path, finished):
    other = tmp_path / "other"
    r = subprocess.run(cmd("modular", "--ckpt_every", "20", "--quiet", "--epochs", "50", "--out", str(other)),
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    (finished / "ckpt_scratch.pt").write_bytes((other / "ckpt_scratch.pt").read_bytes())
    before = snapshot(finished)
    r = subprocess.run(cmd("modular", "--ckpt_every", "20", "--out", str(finished), "--resume"),
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "ckpt_scratch.pt belongs to another run (config differs in: epochs)" in r.stderr
    assert snapshot(finished) == before


def test_a_second_run_into_an_occupied_directory_is_refused(finished):
    before = snapshot(finished)
    r = subprocess.run(cmd("modular", "--seed", "1", "--out", str(finished)), capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "already holds a run" in r.stderr, r.stderr
    assert "--resume" in r.stderr and snapshot(finished) == before


def test_sigterm_checkpoints_says_how_to_resume_and_the_command_works_as_printed(tmp_path, uninterrupted):
    """The default run directory (a timestamp): SIGTERM in the second phase, exit 143 with the command
    that resumes, which is run as printed and ends with the uninterrupted run's metrics."""
    args = cmd("modular", "--ckpt_every", "20", "--quiet")
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    run = wait_for_file(p, tmp_path / "runs" / "modular", "*/ckpt_groktransfer.pt").parent
    p.send_signal(signal.SIGTERM)
    p.wait()
    err = p.stderr.read()
    if p.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert p.returncode == 143 and err.count("\n") == 1 and "SIGTERM at epoch" in err, err
    assert "groktransfer" in (run / "metrics.csv").read_text()  # the metrics so far, this phase included
    printed = shlex.split(err.split("Resume: ", 1)[1])
    assert printed[0] == "python" and printed[-3:] == ["--out", str(run.relative_to(tmp_path)), "--resume"]
    r = subprocess.run([sys.executable, *printed[1:]], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (run / "metrics.csv").read_bytes() == (uninterrupted[0] / "metrics.csv").read_bytes()


def test_two_processes_never_write_one_run_directory(tmp_path):
    """While a run is in progress, a second process (even with --resume) is refused; the first goes on."""
    run = tmp_path / "run"
    p = subprocess.Popen(cmd("parity", "--epochs", "100000", "--ckpt_every", "20", "--quiet",
                             "--out", str(run)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wait_for_file(p, run, "ckpt_weak.pt")
    second = subprocess.run(cmd("parity", "--epochs", "100000", "--ckpt_every", "20", "--out",
                                str(run), "--resume"),
                            capture_output=True, text=True, cwd=ROOT)
    assert p.poll() is None  # still running: the refusal below is the lock's
    p.send_signal(signal.SIGTERM)
    p.wait()
    assert second.returncode == 2 and "in use by another running process" in second.stderr, second.stderr
    assert second.stderr.count("\n") == 1 and p.returncode == 143


def test_a_log_file_names_the_phases_and_says_where_each_phase_is(tmp_path, monkeypatch, capsys):
    """Without a terminal: a first line naming every phase; with LOG_SECONDS = 0 (a slow machine), a
    line at every evaluation with the epoch out of the phase's total and an ETA."""
    import common
    import harness
    import exp_modular
    monkeypatch.setattr(common, "LOG_SECONDS", 0.0)
    monkeypatch.setattr(harness, "catch_signals", lambda: None)  # keep pytest's own Ctrl-C handler
    monkeypatch.chdir(tmp_path)
    exp_modular.main(["--config", str(SMOKE["modular"]), "--epochs", "40", "--stop_at", "0.05",
                      "--out", str(tmp_path / "r")])
    out = capsys.readouterr().out.splitlines()
    assert "phases weak, groktransfer, scratch" in out[0]
    lines = [ln for ln in out if ln.startswith("[groktransfer] epoch")]
    assert lines and all("/40 (" in ln for ln in lines)
    assert [int(ln.split()[2].split("/")[0]) for ln in lines] == [0, 1, 2, 4, 8, 10, 20, 30, 40][:len(lines)]
    assert all("ETA" in ln for ln in lines[1:])
