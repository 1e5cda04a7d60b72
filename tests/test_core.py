"""The research core and the harness apart: what common.py imports, the model contract, train's two
modes, one summary schema for any K, the shared value checks and the harness's own commands."""
import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import harness
from common import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MACHINERY = {"csv", "fcntl", "shlex", "tempfile", "tokenize", "yaml"}


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_common_imports_nothing_of_ours_and_none_of_the_machinery():
    ours = {p.stem for p in ROOT.glob("*.py")}
    names = imported(ROOT / "common.py")
    assert not names & ours and not names & MACHINERY, names & (ours | MACHINERY)


def data(n=40, p=7):
    x = torch.randint(0, p, (n, 2), generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] + x[:, 1]) % p
    return dict(x_train=x, y_train=y, x_test=x, y_test=y)


@pytest.mark.parametrize("model, words", [
    (nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(8, 5)), "same leading dimension K"),
    (nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(8, 7)), r"must return logits \(K, n, C\)"),
    (nn.Linear(2, 7), "fails on one input point"),
])
def test_a_plain_module_is_named_as_breaking_the_contract(model, words):
    with pytest.raises(ConfigError, match=words) as e:
        common.train(model, data(), epochs=2, lr=1e-2, quiet=True)
    assert "\n" not in str(e.value) and "model contract" in str(e.value)


def test_a_model_returning_two_dimensional_logits_is_refused():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1, 14, 7))

        def forward(self, x):
            return nn.functional.one_hot(x, 7).float().reshape(len(x), -1) @ self.w[0]  # (n, C)

    with pytest.raises(ConfigError, match=r"must return logits \(K, n, C\) = \(1, 1, C\)"):
        common.train(Flat(), data(), epochs=2, lr=1e-2, quiet=True)


def test_a_step_of_its_own_refuses_the_adamw_arguments_it_would_ignore():
    model = common.token_mlp(7, 2, 4, [8], 7, 1.0, [0])
    kw = dict(step=lambda: None, evaluate_fn=lambda: common.evaluate(model, data()))
    for extra in (dict(lr=1e-2), dict(wd=0.1), dict(betas=(0.9, 0.98)), dict(loss_fn=common.cross_entropy)):
        with pytest.raises(ValueError, match=f"no AdamW arguments; got {next(iter(extra))}"):
            common.train(model, data(), epochs=2, quiet=True, **kw, **extra)
    assert common.train(model, data(), epochs=2, quiet=True, **kw)["epochs_run"] == 2
    with pytest.raises(ValueError, match="lr is needed"):
        common.train(model, data(), epochs=2, quiet=True)


@pytest.mark.parametrize("K", [1, 3])
def test_one_summary_schema_for_any_number_of_members(K):
    model = common.token_mlp(7, 2, 4, [16], 7, 1.0, list(range(K)))
    s = common.summarize(common.train(model, data(), epochs=30, lr=3e-2, eval_every=5, quiet=True))
    assert len(s["members"]) == K and {"time_gap_median", "fraction_reached_test_95",
                                       "n_reached_train_and_test_95", "final_test_acc_mean"} <= set(s)
    firsts = [m["first_epoch_test_95"] for m in s["members"] if m["first_epoch_test_95"] is not None]
    assert s["first_epoch_test_95_median"] == (float(np.median(firsts)) if firsts else None)


def test_an_interrupt_saves_through_the_checkpoint_and_raises():
    saved = []

    class Ckpt:
        every, resume = 0, False
        load = staticmethod(lambda: None)
        save = staticmethod(saved.append)
        on_interrupt = staticmethod(lambda history: saved.append("metrics"))
        stop_requested = staticmethod(lambda: 15)  # SIGTERM

    model = common.token_mlp(7, 2, 4, [8], 7, 1.0, [0])
    with pytest.raises(common.Interrupted) as e:
        common.train(model, data(), epochs=50, lr=1e-2, quiet=True, ckpt=Ckpt())
    assert e.value.signum == 15 and e.value.saved and "epoch 1 of phase 'train'" in e.value.where
    assert saved[0]["epoch"] == 1 and not saved[0]["done"] and saved[1] == "metrics"


@dataclasses.dataclass
class Forked:
    learning_rate: float = 1e-3  # a forker's name for it
    slow_rate: float = 0.1  # learning rate of the slow weights
    decay: float = 0.0  # its weight decay
    alpha_lr_power: float = 0.0  # the exponent q in lr / alpha^q (not a learning rate)
    ckpt_every: int = 0
    resume: bool = False


@pytest.mark.parametrize("key, value, words", [
    ("learning_rate", 0.0, "learning_rate must be positive"),
    ("slow_rate", -1.0, "slow_rate must be positive"),
    ("decay", -0.5, "decay must be >= 0"), ("ckpt_every", -1, "ckpt_every must be >= 0"),
])
def test_value_checks_follow_the_field_role_not_only_its_name(key, value, words):
    with pytest.raises(ConfigError, match=words):
        harness.check_values(dataclasses.replace(Forked(), **{key: value}))
    # named like a learning rate by neither name nor comment
    harness.check_values(Forked(alpha_lr_power=-1.0))


def test_help_keeps_a_section_header_whole_and_lists_choices_once(monkeypatch, capsys):
    import exp_modular
    with pytest.raises(SystemExit):
        exp_modular.main(["--help"])
    out = capsys.readouterr().out
    assert "below for one target phase and picks the point that first reaches grid_stop_at" in out
    op = next(ln for ln in out.splitlines() if ln.split()[:1] == ["--op"])
    assert op.count("add, sub, mul, div") == 1 and "[" not in op, op


def test_harness_plot_redraws_a_run_and_refuses_a_directory_without_metrics(tmp_path):
    import exp_modular
    run = tmp_path / "run"
    exp_modular.main(["--config", str(ROOT / "configs/smoke/modular.yaml"), "--phases", "scratch",
                      "--epochs", "20",
                      "--quiet", "--out", str(run)])
    (run / "dynamics.png").unlink()
    r = subprocess.run([sys.executable, str(ROOT / "harness.py"), "plot", str(run)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and (run / "dynamics.png").stat().st_size > 10_000, r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "harness.py"), "plot", str(tmp_path)], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no metrics.csv" in r.stderr


def test_files_a_run_reads_are_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """A config that is not UTF-8, a resumed config.yaml that is not a mapping, a weak embedding of width 0
    or saved for another op: exit 2, one line, nothing written."""
    import exp_modular
    monkeypatch.chdir(tmp_path)
    smoke = str(ROOT / "configs/smoke/modular.yaml")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("op: add  # caf\xe9\n".encode("latin-1"))
    run = tmp_path / "listrun"
    run.mkdir()
    (run / "config.yaml").write_text("- 1\n- 2\n")
    torch.save(dict(embedding=torch.zeros(23, 0)), tmp_path / "zero.pt")
    torch.save(dict(embedding=torch.randn(23, 4), op="add", p=23), tmp_path / "add.pt")
    cases = [(["--config", str(latin)], "is not UTF-8 text"),
             (["--config", smoke, "--out", str(run), "--resume"], "is not a mapping"),
             (["--config", smoke, "--weak_embedding", str(tmp_path / "zero.pt"), "--phases", "groktransfer"],
              "has width 0"),
             (["--config", smoke, "--op", "mul", "--weak_embedding", str(tmp_path / "add.pt"), "--phases",
               "groktransfer"], "saved for another task: op 'add' (this run: 'mul')")]
    for argv, words in cases:
        with pytest.raises(SystemExit) as e:
            exp_modular.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "runs").exists()
    assert sorted(p.name for p in run.iterdir()) == [".lock", "config.yaml"]


def test_every_line_of_the_code_and_tests_fits_in_110_characters():
    long = [f"{p.relative_to(ROOT)}:{i}" for p in [*ROOT.glob("*.py"), *ROOT.glob("tests/*.py")]
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 110]
    assert not long, long
