"""Bad input, every script and bench.py (gpu_check.py's: test_gpu_check.py): exit 2, one line naming the
problem, nothing written. The matrix runs in-process (main(argv) is what `python exp_X.py ...` runs); one
subprocess per script checks the __main__ wiring. Also: --help everywhere, and every shipped config is
accepted by its script."""
import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import harness

from conftest import fake_digits, write_idx

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("modular", "modular_studies", "xor", "parity", "transformer", "mnist")
SMOKE = {s: ROOT / "configs" / "smoke" / f"{s}.yaml" for s in SCRIPTS}
# per script: a learning rate, a weight decay and an epoch count of its config
KEYS = {"modular": ("gt_lr", "scratch_wd", "epochs"), "modular_studies": ("oinfo_lr", "weak_wd", "epochs"),
        "xor": ("target_lr", "scratch_wd", "scratch_epochs"),
        "parity": ("gt_lr", "scratch_wd", "epochs"), "transformer": ("gt_lr", "scratch_wd", "epochs"),
        "mnist": ("gt_lr", "scratch_wd", "epochs")}


def generic(script):
    lr, wd, epochs = KEYS[script]
    cases = {
        "unknown key": (["--no_such_key", "1"], "unknown config key 'no_such_key'"),
        "wrong type": (["--seed", "zero"], "'seed' expects int"),
        "zero eval_every": (["--eval_every", "0"], "eval_every must be positive"),
        "negative seeds": (["--seeds", "-2"], "seeds must be positive"),
        "missing config file": (["--config", "/nonexistent/c.yaml"], "config file not found"),
        "negative ckpt_every": (["--ckpt_every", "-1"], "ckpt_every must be >= 0"),
        "nan lr": ([f"--{lr}", "nan"], f"'{lr}' must be a finite number"),
        "inf lr": ([f"--{lr}", "inf"], f"'{lr}' must be a finite number"),
        "zero lr": ([f"--{lr}", "0"], f"{lr} must be positive"),
        "negative wd": ([f"--{wd}", "-1"], f"{wd} must be >= 0"),
        "epochs beyond memory": ([f"--{epochs}", "1e12"], "GiB of memory"),
        "bad device": (["--device", "tpu"], "unknown device 'tpu'"),
        "device mps": (["--device", "mps"], "unknown device 'mps'"),
        "device meta": (["--device", "meta"], "unknown device 'meta'"),
        "seed -1": (["--seed", "-1"], "numpy's seed range"),
        "seed 1e30": (["--seed", "1e30"], "numpy's seed range"),
        "seeds past the range": (["--seed", str(2 ** 32 - 1), "--seeds", "2"], "numpy's seed range"),
        "name outside runs": (["--name", "../../x"], "name must stay inside runs/"),
    }
    if not __import__("torch").cuda.is_available():  # refused before the run directory is made
        cases["cuda without CUDA"] = (["--device", "cuda"], "CUDA is not available")
    if script in ("modular", "modular_studies", "parity", "transformer", "mnist"):
        cases["eval_every above epochs"] = (["--eval_every", "100000"], "is larger than epochs")
    if script != "xor":  # xor is plain gradient descent: no AdamW betas
        cases["beta1 2"] = (["--beta1", "2"], "beta1 must be in [0, 1)")
        cases["adam_eps 0"] = (["--adam_eps", "0"], "adam_eps must be positive")
    return cases


PER_SCRIPT = {
    "modular": {"op": (["--op", "pow"], "'op' must be one of add, sub, mul, div"),
                "typo": (["--widht", "3"], "unknown config key 'widht'"),
                "train_frac 1": (["--train_frac", "1"], "train_frac must be in (0, 1)"),
                "p 0": (["--p", "0"], "p must be >= 2"), "p too large": (["--p", "400000"], "GiB of memory"),
                "width 0": (["--width", "0"], "width must be positive"),
                "track": (["--track", "ntk,loss"], "track must be a subset of"),
                "track_every": (["--track", "ntk", "--track_every", "15"],
                                "must be a multiple of eval_every"),
                "study": (["--study", "embeddings"], "unknown config key 'study'"),
                "track oinfo": (["--track", "oinfo"], "track must be a subset of ntk, cka"),
                "shard": (["--grid", "--shard", "3/2"], "shard i/n needs 0 <= i < n")},
    "modular_studies": {"study": (["--study", "everything"], "'study' must be one of"),
                        "embeddings": (["--study", "embeddings", "--embeddings", "onehot,gpt"],
                                       "embeddings must be"),
                        "merge_at": (["--study", "low_rank", "--merge_at", "500"],
                                     "merge_at (500) must be below"),
                        "snapshots": (["--study", "weak_epochs", "--weak_snapshots", "0,100"],
                                      "weak_snapshots must be"),
                        "track oinfo": (["--track", "oinfo"], "track 'oinfo' is for --study oinfo"),
                        "p too large": (["--p", "400000"], "GiB of memory")},
    "xor": {"eps": (["--eps", "1.5"], "eps must be in (0, 1)"), "p": (["--p", "2"], "p must be >= 3"),
            "wd_form": (["--wd_form", "adamw"], "'wd_form' must be one of torch, literal"),
            "literal wd": (["--wd_form", "literal", "--weak_wd", "1"], "weak_wd must be >= 0"),
            "study": (["--study", "ntk"], "'study' must be one of"),
            "ratio_ns": (["--ratio_ns", "100", "0"], "ratio_ns must be"),
            "width 0": (["--scratch_width", "0"], "scratch_width must be positive")},
    "parity": {"k": (["--k", "12"], "k must be <= q"),
               "support": (["--support", "1", "11"], "support must be 2 distinct coordinates in 1..10"),
               "transfer_at": (["--transfer_at", "0"], "transfer_at must be in (0, 1]"),
               "phases": (["--phases", "groktransfer"], "needs the 'weak' phase"),
               "n": (["--n", "0"], "n must be positive")},
    "transformer": {"parity phases": (["--op", "parity", "--phases", "weak,groktransfer"],
                                      "scratch and grokfast only"),
                    "phases": (["--phases", "groktransfer"], "needs the 'weak' phase"),
                    "grokfast_alpha": (["--grokfast_alpha", "1.5"], "grokfast_alpha must be in [0, 1)"),
                    "grokfast_beta2": (["--grokfast_beta2", "1.0"], "grokfast_beta2 must be in [0, 1)"),
                    "n_heads": (["--n_heads", "0"], "n_heads must be positive"),
                    "track": (["--track", "oinfo"], "track must be a subset of ntk, cka"),
                    "p too large": (["--p", "400000"], "GiB of memory")},
    "mnist": {"no data": (["--data_dir", "/nonexistent"], "MNIST not found in /nonexistent"),
              "too many images": (["--n_train", "100000"], "asked for 100000/40 images"),
              "alpha": (["--alpha", "0"], "alpha must be positive"),
              "study": (["--study", "width"], "'study' must be one of")},
}
CASES = [(s, name, a, w) for s in SCRIPTS for name, (a, w) in {**generic(s), **PER_SCRIPT[s]}.items()]


def module_name(script: str) -> str:
    return script if script in ("bench", "gpu_check") else f"exp_{script}"


def run_main(script, argv, tmp_path, monkeypatch, capsys):
    """main(argv) in-process from an empty working directory; returns (exit status, stderr)."""
    module = importlib.import_module(module_name(script))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    return exit_.value.code, capsys.readouterr()


@pytest.mark.parametrize("script, name, args, words", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, idx_dir,
                                                             script, name, args, words):
    out = tmp_path / "run"
    data = ["--data_dir", str(idx_dir)] if script == "mnist" and "--data_dir" not in args else []
    status, captured = run_main(script, ["--config", str(SMOKE[script]), *data, "--out", str(out), *args],
                                tmp_path, monkeypatch, capsys)
    err = captured.err
    assert status == 2, err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name, make", [
    ("label 12", lambda x, y: (x, np.where(np.arange(len(y)) == 3, 12, y).astype(np.uint8))),
    ("counts differ", lambda x, y: (x, y[:-1])),
])
def test_mnist_files_whose_labels_do_not_fit_are_refused(tmp_path, monkeypatch, capsys, name, make):
    for prefix, n, seed in (("train", 300, 0), ("t10k", 120, 1)):
        x, y = fake_digits(n, seed)
        write_idx(tmp_path, prefix, *(make(x, y) if prefix == "train" else (x, y)))
    status, captured = run_main("mnist", ["--config", str(SMOKE["mnist"]), "--data_dir", str(tmp_path),
                                          "--out", str(tmp_path / "run")], tmp_path, monkeypatch, capsys)
    assert status == 2 and captured.err.count("\n") == 1, captured.err
    assert ("must be 0..9; found 12" if name == "label 12" else "disagree") in captured.err
    assert not (tmp_path / "run").exists()


BENCH = {"precision": (["--precisions", "fp8"], "precisions must be"),
         "p 1": (["--p", "1"], "p must be >= 2"),
         "train_frac 0": (["--train_frac", "0"], "train_frac must leave non-empty"),
         "lr nan": (["--lr", "nan"], "'lr' must be a finite number"),
         "out is a directory": (None, "is a directory"),
         "workload": (["--workload", "cnn"], "'workload' must be one of")}


@pytest.mark.parametrize("name", list(BENCH))
def test_bench_bad_input_exits_2(tmp_path, monkeypatch, capsys, name):
    args, words = BENCH[name]
    out = tmp_path / "b.json"
    argv = ["--device", "cpu", "--out", str(tmp_path if args is None else out), *(args or [])]
    status, captured = run_main("bench", argv, tmp_path, monkeypatch, capsys)
    assert status == 2 and captured.err.count("\n") == 1 and words in captured.err, captured.err
    assert not out.exists()


@pytest.mark.parametrize("script", [*SCRIPTS, "bench", "gpu_check"])
def test_help_lists_every_field_with_its_default_and_comment(tmp_path, monkeypatch, capsys, script):
    module = importlib.import_module(module_name(script))
    status, captured = run_main(script, ["--help"], tmp_path, monkeypatch, capsys)
    assert status == 0 and captured.err == ""
    import dataclasses
    lines = captured.out.splitlines()
    for f in dataclasses.fields(module.Config):
        line = next((ln for ln in lines if ln.split()[:1] == [f"--{f.name}"]), None)
        assert line is not None, f.name
        assert len(line.split()) >= 3 or f.name in ("weak_embedding", "shard", "merge", "name", "out",
                                                    "support",
                                                   "track"), line  # a default (or empty) and a text
    assert "--seed" in captured.out or script in ("bench", "gpu_check")
    assert "Usage" in captured.out  # the script's docstring comes first


@pytest.mark.parametrize("script", SCRIPTS)
def test_main_wiring_yaml_error_and_unwritable_directory(tmp_path, idx_dir, script):
    """As a subprocess: `python exp_X.py` answers bad YAML and an unwritable --out with exit 2, one line."""
    data = ["--data_dir", str(idx_dir)] if script == "mnist" else []
    bad = tmp_path / "bad.yaml"
    bad.write_text("p: [1, 2\nn: 3\n")
    r = subprocess.run([sys.executable, str(ROOT / f"exp_{script}.py"), "--config", str(bad)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "is not valid YAML" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    r = subprocess.run([sys.executable, str(ROOT / f"exp_{script}.py"), "--config", str(SMOKE[script]), *data,
                        "--out", str(blocker / "run")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "is not writable" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert blocker.read_text() == "keep me" and not (tmp_path / "runs").exists()


CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_config_is_accepted_by_its_script(path):
    """Each config parses with its script's types and passes the script's checks (nothing is run)."""
    import common
    modular = "modular_studies" if path.stem.startswith("study_") else "modular"
    script = {"smoke": path.stem, "modular": modular, "transformer": "transformer"}[path.parent.name]
    module = importlib.import_module(f"exp_{script}")
    choices = {"precision": common.PRECISIONS, **({"op": module.OPS} if hasattr(module, "OPS") else {})}
    cfg = harness.parse_config(module.Config(), ["--config", str(path), "--device", "cpu"], choices)
    harness.check_values(cfg)
    if script == "mnist":
        cfg = type(cfg)(**{**cfg.__dict__, "data_dir": "."})  # the check does not read the data
    module.check(getattr(module, "resolve", lambda c: c)(cfg))
