"""benchmarks/rl_step.py --smoke: both runs through Session on local-cpu, the table and the JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "rl_step.py"


@pytest.mark.slow  # two Sessions on the local-cpu mesh, one after the other: ~4 min on 2 cores
def test_smoke_runs_lockstep_and_stock_and_writes_the_report(tmp_path):
    out = tmp_path / "rl_step.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--steps", "2", "--out", str(out), "--ckpt-dir", str(tmp_path / "ckpt")],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["runs"]) == ["local-cpu smoke"]
    runs = report["runs"]["local-cpu smoke"]["impls"]
    assert set(runs) == {"lockstep", "stock"}
    for impl, run in runs.items():
        assert "error" not in run, (impl, run)
        assert len(run["steps"]) == 2 and run["num_timed_steps"] == 1
        # no scoring pass; the weight fingerprint check runs on lockstep's side only
        verify = {"verify"} if impl == "lockstep" else set()
        assert set(run["median_s"]) == {"generate", "reward", "train", "sync", "step"} | verify
        assert all(v > 0 for v in run["median_s"].values())
    assert runs["lockstep"]["barrier"] == "strict" and runs["stock"]["barrier"] == "measure"
    assert all(m["barrier/num_differing_tokens"] == 0 for m in runs["lockstep"]["steps"])
    # same prompts and seeds: both runs sampled the same number of completions
    assert [m["num_samples"] for m in runs["lockstep"]["steps"]] == [m["num_samples"] for m in runs["stock"]["steps"]]
    for phase in ("generate", "train", "sync", "step"):
        assert any(line.startswith(phase) and line.endswith("x") for line in report["table"].splitlines()), phase
    assert report["table"] in result.stdout
    assert not (tmp_path / "ckpt" / "runs").exists() or not any((tmp_path / "ckpt" / "runs").iterdir())  # kept on failure only


def test_bad_arguments_are_one_line_errors():
    for args, message in ([["--smoke"], "pass --out PATH"], [["--shape", "9B", "--out", "x"], "--shape 9B: choose from"],
                          [["--steps", "1", "--warmup", "1", "--out", "x"], "leaves no timed step"]):
        result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr[-500:])
