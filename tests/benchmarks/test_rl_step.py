"""benchmarks/rl_step.py --smoke: both runs through Session on local-cpu, the table and the JSON."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "rl_step.py"


@pytest.mark.slow  # two Sessions, one after the other: ~1.5 min on 2 cores
def test_smoke_runs_lockstep_and_stock_and_writes_the_report(tmp_path):
    # One proc per role (local-cpu has 5): this checks the script, the meshes have their own tests.
    mesh = tmp_path / "cpu3.yaml"
    mesh.write_text("device: cpu\nhosts: 1\nprocs: 3\nlauncher: {kind: local}\ngenerator: {dp: 1, tp: 1}\n"
                    "trainer: {dp: 1, tp: 1}\nreward: {procs: 1}\n")
    out = tmp_path / "rl_step.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--steps", "2", "--mesh", str(mesh), "--out", str(out),
         "--ckpt-dir", str(tmp_path / "ckpt")],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["runs"]) == ["cpu3 smoke"]  # the mesh file's name, not its path
    runs = report["runs"]["cpu3 smoke"]["impls"]
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


def test_bad_arguments_are_one_line_errors(monkeypatch, capsys):
    # The script's main() in this process (argparse exits before anything starts): a fresh
    # interpreter per case would only add its imports.
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script appends benchmarks/ to it
    spec = importlib.util.spec_from_file_location("rl_step_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for args, message in ([["--smoke"], "pass --out PATH"], [["--shape", "9B", "--out", "x"], "--shape 9B: choose from"],
                          [["--steps", "1", "--warmup", "1", "--out", "x"], "leaves no timed step"],
                          [["--mesh", "h300x1", "--out", "x"], "unknown mesh config 'h300x1'"]):
        with pytest.raises(SystemExit) as e:
            script.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err, (args, err[-500:])
