"""The generated bad-input matrix: every field of every script's Config, given values chosen by the
field's type (a wrong type; nan, inf, -1, 0 and 1e30 for numbers; an unknown or empty string), run
in-process through main(argv) with the smoke config. Each value is either refused (exit 2, one line,
no run directory) or listed in ACCEPTED with the reason it is a legal setting; an accepted value must
then pass every check and reach the point where the run directory would be made (open_run, or
bench.py's data), so the list cannot go stale in either direction."""
import dataclasses
import importlib
import typing
from pathlib import Path

import pytest

import harness

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("modular", "modular_studies", "xor", "parity", "transformer", "mnist", "bench")

# (field, value) pairs that are legal settings, by field name in every script; the reason beside
BIG_FLOATS = {"lr", "wd", "init_scale", "adam_eps", "std", "v_init", "alpha", "lamb", "power", "gd_lr"}
ACCEPTED_ANYWHERE = {
    ("seed", "0"), ("data_seed", "0"),  # seeds: any in numpy's range
    ("ckpt_every", "0"),  # 0 = a checkpoint at each phase's end only
    ("ckpt_every", "1e30"),  # never periodic: the same as 0
    ("members", "0"),  # 0 = as many grid points at once as fit in memory
    ("members", "1e30"),  # clipped to the number of grid points
    ("probe_size", "1e30"),  # clipped to the training set
    ("track_every", "1e30"),  # a sparse schedule (a multiple of eval_every); allocates nothing
    ("merge_at", "1e30"),  # read by --study low_rank only, which checks it against epochs
    ("beta1", "0"), ("beta2", "0"),  # AdamW betas in [0, 1)
    ("grokfast_alpha", "0"), ("grokfast_lamb", "0"), ("grokfast_beta2", "0"),  # GrokFast off / no momentum
    ("alpha_lr_power", "-1"), ("alpha_lr_power", "0"),  # lr = lr / alpha^power: any real power
    ("name", "no_such_thing"), ("name", ""), ("out", "no_such_thing"), ("out", ""),  # paths to be made
    ("weak_embedding", ""), ("shard", ""),  # empty = not given
}


ACCEPTED_IN = {("xor", "eval_every", "1e30"),  # xor's phases end with an evaluation whatever eval_every is
               ("bench", "eval_every", "1e30"),  # timing without evaluations
               ("bench", "warmup", "0")}  # no untimed epochs


def accepted(script: str, field: str, value: str) -> bool:
    if (field, value) == ("grokfast_alpha", "1e30") or (script, field, value) == ("bench", "out", ""):
        return False  # a fraction, [0, 1); bench.py's table needs a file name
    if (field, value) in ACCEPTED_ANYWHERE or (script, field, value) in ACCEPTED_IN:
        return True
    if value == "0" and field.endswith("wd"):
        return True  # no weight decay
    # a finite large float is a legal (absurd) setting: a run that diverges reports NaN, it does not crash
    return value == "1e30" and any(field.endswith(s) for s in BIG_FLOATS)


def values_for(tp) -> list[str]:
    base, _ = harness._base_type(tp)
    if typing.get_origin(base) is list:
        return ["no_such_thing"] if typing.get_args(base)[0] is str else ["abc"]
    return {bool: ["maybe"], int: ["1.5", "abc", "-1", "0", "1e30"],
            float: ["abc", "nan", "inf", "-inf", "-1", "0", "1e30"], str: ["no_such_thing", ""]}.get(base, [])


def module_of(script):
    return importlib.import_module(script if script == "bench" else f"exp_{script}")


def cases():
    out = []
    for script in SCRIPTS:
        cls = module_of(script).Config
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            for v in values_for(hints[f.name]):
                out.append((script, f.name, v))
    return out


CASES = cases()


class Accepted(Exception):
    """Raised where the run directory would be made: every check passed."""


def test_the_matrix_is_wide():
    assert len(CASES) >= 900 and len({(s, f) for s, f, _ in CASES}) >= 300


@pytest.mark.parametrize("script, key, value", CASES, ids=[f"{s}-{k}={v!r}" for s, k, v in CASES])
def test_every_field_refuses_what_it_cannot_mean(tmp_path, monkeypatch, capsys, idx_dir, script, key, value):
    module = module_of(script)

    def reached(*args, **kwargs):
        raise Accepted

    monkeypatch.setattr(harness, "open_run", reached)
    if script == "bench":
        monkeypatch.setattr(module, "make_data", reached)
    monkeypatch.chdir(tmp_path)
    smoke = ROOT / "configs" / "smoke" / f"{script}.yaml"
    argv = ["--config", str(smoke)] if smoke.exists() else []
    argv += ["--data_dir", str(idx_dir)] if script == "mnist" else []
    argv += ["--Ks", "1", "2", "--width", "64"] if script == "bench" else []  # sizes any machine holds
    argv += ["--out", str(tmp_path / ("b.json" if script == "bench" else "run")), "--device", "cpu"]
    argv += [f"--{key}", value] if value else [f"--{key}="]
    if accepted(script, key, value):
        with pytest.raises(Accepted):
            module.main(argv)
        return
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert key in err or "GiB" in err or "expects" in err, err
    assert list(tmp_path.iterdir()) == []
