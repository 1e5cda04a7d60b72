"""gpu_check.py on the CPU with --smoke: each stage's commands run, the table is read back from the files
the stages wrote, the same command again resumes the runs it finds, and bad input is refused."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_stages_run_resume_and_report_what_they_wrote(tmp_path):
    out = tmp_path / "g"
    argv = [sys.executable, "gpu_check.py", "--smoke", "--device", "cpu", "--out", str(out),
            "--stages", "attention,table1_add,grid"]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((out / "gpu_check.json").read_text())["rows"]
    assert [(row["stage"], row["status"]) for row in rows] == [
        ("attention", "ok"), ("table1_add", "ok"), ("grid", "ok")]
    attention = json.loads((out / "attention" / "attention.json").read_text())["rows"]
    ratios = [a["sdpa_over_written"] for a in attention]
    assert rows[0]["result"] == f"sdpa/written {min(ratios):.2f}-{max(ratios):.2f}"
    table1 = json.loads((out / "table1_add" / "run" / "summary.json").read_text())["table1"]
    assert table1[0]["phase"] == "weak" and f"weak {table1[0]['ms'] / 1e3:.1f}s" in rows[1]["result"]
    grid = json.loads((out / "grid" / "run" / "grid.json").read_text())
    assert grid["shard"] == "0/8" and rows[2]["result"].startswith(f"{grid['n_points_run']} points")
    assert (out / "gpu_check.md").read_text().count("| ok |") == 3

    metrics = (out / "table1_add" / "run" / "metrics.csv").read_bytes()
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    commands = [ln for ln in (out / "table1_add.log").read_text().splitlines() if ln.startswith("$ python")]
    assert len(commands) == 2 and not commands[0].endswith("--resume") and commands[1].endswith("--resume")
    assert (out / "table1_add" / "run" / "metrics.csv").read_bytes() == metrics  # read back, not retrained
    again = json.loads((out / "gpu_check.json").read_text())["rows"]
    assert [row["result"] for row in again][1:] == [row["result"] for row in rows][1:]


@pytest.mark.parametrize("args, words", [
    (["--stages", "tests,plots"], "stages must be a non-empty subset of"),
    (["--budget_s", "60"], "budget_s must exceed"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_bad_input_exits_2_before_anything_is_written(tmp_path, capsys, args, words):
    out = tmp_path / "g"
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--out", str(out), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and words in err, err
    assert not out.exists()
