"""Nothing a user ran is lost: a resume writes nothing shorter than it found and a finished run resumed
changes no file; checkpoints carry a checksum; a full disk, a signal at exit and a resumed edited script
each end in one line. Run as a user would, on copies of one finished smoke run."""
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import harness

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke" / "modular.yaml"


def cmd(*args, script=ROOT / "exp_modular.py"):
    return [sys.executable, str(script), "--config", str(SMOKE), "--ckpt_every", "50", "--quiet", *args]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    run = tmp_path_factory.mktemp("done") / "run"
    r = subprocess.run(cmd("--out", str(run)), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return run


@pytest.fixture()
def run(tmp_path, done):
    shutil.copytree(done, tmp_path / "run")
    return tmp_path / "run"


def files(run):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.iterdir()) if p.is_file()}


def resume(run, **kw):
    return subprocess.run(cmd("--out", str(run), "--resume", **kw), capture_output=True, text=True, cwd=ROOT)


def test_a_finished_run_resumed_changes_no_file(run):
    before = files(run)
    r = resume(run)
    assert r.returncode == 0, r.stderr
    assert files(run) == before  # bytes and modification times


def rewrite_checkpoint(path, change):
    """Open a checkpoint's envelope, change its state, and seal it again with a valid checksum."""
    import hashlib
    import io
    outer = torch.load(path, weights_only=False)
    state = torch.load(io.BytesIO(outer["payload"]), weights_only=False)
    change(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    outer.update(payload=buf.getvalue(), sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    torch.save(outer, path)


def test_a_checkpoint_lacking_a_key_is_named_before_anything_is_written(run):
    rewrite_checkpoint(run / "ckpt_scratch.pt", lambda state: state.pop("rng"))
    before = files(run)
    r = resume(run)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "ckpt_scratch.pt lacks rng" in r.stderr and files(run) == before


def test_a_flipped_byte_inside_the_weights_fails_the_checksum(run):
    path = run / "ckpt_groktransfer.pt"
    outer = torch.load(path, weights_only=False)
    payload = bytearray(outer["payload"])
    payload[len(payload) // 2] ^= 0x01  # inside the weights: the payload is mostly tensor bytes
    outer["payload"] = bytes(payload)
    torch.save(outer, path)
    before = files(run)
    r = resume(run)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "fails its checksum" in r.stderr, r.stderr
    assert files(run) == before


def test_a_resume_by_an_edited_script_that_does_not_fit_shortens_nothing(run, tmp_path):
    """A copy of the script whose target has three hidden layers: the first checkpoint that does not fit
    is named in one line, and metrics.csv and summary.json keep every phase."""
    src = (ROOT / "exp_modular.py").read_text()
    edited = src.replace("[cfg.width, cfg.width], cfg.p,", "[cfg.width, cfg.width, cfg.width], cfg.p,")
    assert edited != src
    copy = tmp_path / "exp_modular.py"
    copy.write_text(edited)
    before = files(run)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd("--out", str(run), "--resume", script=copy), capture_output=True, text=True,
                       cwd=ROOT,
                       env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "ckpt_groktransfer.pt does not fit this model" in r.stderr
    assert files(run) == before


def test_a_full_disk_is_one_line_and_keeps_what_was_written(tmp_path, monkeypatch, capsys):
    """ENOSPC from the filesystem at the first checkpoint of the second phase: one line naming the file,
    exit 2, every file written before it whole."""
    import exp_modular
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(harness, "catch_signals", lambda: None)  # keep pytest's own Ctrl-C handler
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == "ckpt_groktransfer.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SystemExit) as e:
        exp_modular.main(["--config", str(SMOKE), "--ckpt_every", "50", "--quiet", "--out",
                          str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "No space left on device" in err, err
    assert "I/O error on " + str(tmp_path / "r" / "ckpt_groktransfer.pt") in err and "resume:" in err
    assert not list((tmp_path / "r").glob(".*.*"))  # no temporary file left behind
    assert list(harness.read_metrics(tmp_path / "r" / "metrics.csv")) == ["weak"]  # written before: whole


def test_a_signal_as_the_run_finishes_gets_its_line_and_code(tmp_path, monkeypatch, capsys):
    import signal
    import exp_modular
    import plots
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(harness, "catch_signals", lambda: None)
    draw = plots.plot_dynamics

    def draw_then_sigterm(*args, **kw):  # the signal arrives after the last phase, while the figure is drawn
        harness._SIGNALS.append(signal.SIGTERM)
        return draw(*args, **kw)

    monkeypatch.setattr(plots, "plot_dynamics", draw_then_sigterm)
    try:
        with pytest.raises(SystemExit) as e:
            exp_modular.main(["--config", str(SMOKE), "--phases", "scratch", "--epochs", "20", "--quiet",
                              "--out", str(tmp_path / "r")])
    finally:
        harness._SIGNALS.clear()
    err = capsys.readouterr().err
    assert e.value.code == 143 and err.count("\n") == 1 and "SIGTERM as the run finished" in err, err
    assert (tmp_path / "r" / "dynamics.png").is_file()


def test_sighup_saves_and_exits_like_sigterm(tmp_path):
    import signal
    import time
    run = tmp_path / "run"
    p = subprocess.Popen(cmd("--epochs", "100000", "--phases", "scratch", "--out", str(run)),
                         stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT)
    while not (run / "ckpt_scratch.pt").exists():
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.02)
    p.send_signal(signal.SIGHUP)
    _, err = p.communicate()
    assert p.returncode == 129 and err.count("\n") == 1 and "SIGHUP at epoch" in err and "Resume:" in err, err
    assert "scratch" in (run / "metrics.csv").read_text()
