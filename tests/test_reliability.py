"""Faults and bad input, run as a user would: kill -9 and resume, Ctrl-C, determinism, and every
script's answer to bad input (exit 2, one line, nothing written)."""
import json
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
    """summary.json minus the wall-clock fields (wall_s, compute_s*) and peak memory, which differ between any two runs."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items()
                    if k not in ("wall_s", "peak_rss_mib", "peak_cuda_mib") and not k.startswith("compute_s")}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj
    return strip(json.loads(Path(path).read_text()))


def start_and_stop(args, run, wait_for, sig):
    """Start a run, wait until `wait_for` (a checkpoint file) exists, then send `sig`; returns the process."""
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    t0 = time.time()
    while not (run / wait_for).exists():
        assert p.poll() is None, f"the run ended before {wait_for} was written: {p.stderr.read()}"
        assert time.time() - t0 < 120
        time.sleep(0.02)
    p.send_signal(sig)
    p.wait(timeout=60)
    return p


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
    assert "[weak] epoch" not in r.stdout and "[groktransfer] epoch" not in r.stdout  # finished phases skipped
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
    r = subprocess.run(cmd("modular", "--out", str(run), "--resume", "--gt_lr", "0.5"), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "config key 'gt_lr'" in r.stderr and r.stderr.count("\n") == 1
    assert (run / "metrics.csv").read_bytes() == before
    r = subprocess.run(cmd("modular", "--out", str(tmp_path / "nothing"), "--resume"), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--resume needs the run's directory" in r.stderr and not (tmp_path / "nothing").exists()


# ----------------------------------------------------------------------------- bad input, every script

BAD = {
    "unknown key": (["--no_such_key", "1"], "unknown config key 'no_such_key'"),
    "wrong type": (["--seed", "zero"], "'seed' expects int"),
    "zero epochs": (["--eval_every", "0"], "eval_every must be positive"),
    "negative seeds": (["--seeds", "-2"], "seeds must be positive"),
    "missing config file": (["--config", "/nonexistent/c.yaml"], "config file not found"),
    "negative ckpt_every": (["--ckpt_every", "-1"], "ckpt_every must be >= 0"),
}
PER_SCRIPT = {
    # (test_modular.py and test_xor.py also try train_frac 1, an unknown op, an unknown study, ...)
    "modular": {"zero width": (["--width", "0"], "width must be positive"), "p": (["--p", "0"], "p must be >= 2"),
                "train frac 0": (["--train_frac", "0"], "train_frac must be in (0, 1)")},
    "xor": {"zero width": (["--scratch_width", "0"], "scratch_width must be positive"), "p": (["--p", "-5"], "p must be positive")},
    "parity": {"zero width": (["--width", "0"], "width must be positive"), "q": (["--q", "0"], "q must be positive")},
}
CASES = [(s, name, a, w) for s in SMOKE for name, (a, w) in {**BAD, **PER_SCRIPT[s]}.items()]


@pytest.mark.parametrize("script, name, args, words", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_every_script_answers_bad_input_with_exit_2(tmp_path, monkeypatch, capsys, script, name, args, words):
    """In-process (the script's main, as `python exp_X.py ...` calls it) to keep the matrix fast; the
    per-script test files run a few of these as subprocesses."""
    import importlib
    module = importlib.import_module(f"exp_{script}")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        module.main(["--config", str(SMOKE[script]), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", list(SMOKE))
def test_every_script_answers_a_yaml_syntax_error_and_an_unwritable_directory(tmp_path, script):
    bad = tmp_path / "bad.yaml"
    bad.write_text("p: [1, 2\nn: 3\n")
    r = subprocess.run([sys.executable, str(ROOT / f"exp_{script}.py"), "--config", str(bad), "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "is not valid YAML" in r.stderr and r.stderr.count("\n") == 1
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    r = subprocess.run(cmd(script, "--out", str(blocker / "run")), capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "is not writable" in r.stderr and r.stderr.count("\n") == 1
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("content, words", [("not a tensor file", "is not a saved tensor"), (None, "vocabulary size 7 but p = 23")])
def test_a_bad_weak_embedding_file_is_refused(tmp_path, content, words):
    import torch
    path = tmp_path / "emb.pt"
    if content is None:
        torch.save({"embedding": torch.zeros(7, 4)}, path)
    else:
        path.write_text(content)
    r = subprocess.run(cmd("modular", "--weak_embedding", str(path), "--phases", "groktransfer", "--out", str(tmp_path / "r")),
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and words in r.stderr and not (tmp_path / "r").exists(), r.stderr
