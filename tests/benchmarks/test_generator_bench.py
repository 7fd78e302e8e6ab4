"""benchmarks/generator.py: --smoke on CPU end to end, rounds combined into medians, bad arguments."""

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "generator.py"


@pytest.fixture
def script(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script appends benchmarks/ to it
    spec = importlib.util.spec_from_file_location("generator_bench_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _part(ms: list[float], load_s: float, **extra) -> dict:
    batches = {str(b): dict(ms_per_step=m, tokens_per_s=1000 / m, seconds=m / 10, prefill_seconds=m / 100, repeats=3)
               for b, m in zip((1, 8), ms)}
    return dict(engine="lockstep-graphs", load_s=load_s, graphs=True, batches=batches, **extra)


def test_rounds_combine_into_per_batch_medians_and_keep_every_round(script):
    parity = {"num_tokens": 10, "num_bits_differing": 0}
    parts = [_part([2.0, 5.0], 30.0, parity=parity), {"error": "timed out"}, _part([4.0, 3.0], 40.0), _part([3.0, 9.0], 35.0)]
    combined = script.combine_rounds(parts)
    assert combined["rounds"] == 3 and combined["failed_rounds"] == ["timed out"]
    assert combined["parity"] == parity and combined["load_s"] == 35.0
    assert combined["batches"]["1"]["ms_per_step"] == 3.0 and combined["batches"]["8"]["ms_per_step"] == 5.0
    assert combined["batches"]["8"]["ms_per_step_rounds"] == [5.0, 3.0, 9.0]
    assert combined["batches"]["8"]["tokens_per_s"] == statistics.median([200.0, 1000 / 3, 1000 / 9])
    # one round is returned as measured; all rounds failed: the first error
    assert script.combine_rounds(parts[:1]) is parts[0]
    assert script.combine_rounds([{"error": "a"}, {"error": "b"}]) == {"error": "a"}


def test_bad_arguments_are_one_line_errors(script, capsys):
    with pytest.raises(SystemExit) as e:
        script.main(["--rounds", "0"])
    assert e.value.code == 2 and "--rounds 0 --repeats 3: each must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # its message is the exit's one line
        script.main(["--engines", "lockstep-graphs", "--device", "cpu"])
    assert str(e.value.code).startswith("lockstep-graphs and lockstep-v1 need a GPU")


@pytest.mark.slow  # two engine processes (vLLM's CPU backend), then the trainer for parity: ~45 s on 2 cores
def test_smoke_in_two_rounds_reports_medians_and_zero_differing_bits(tmp_path):
    out = tmp_path / "generator.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--rounds", "2", "--out", str(out),
                             "--ckpt-dir", str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["rounds"] == 2 and report["engines"] == ["lockstep-eager"]
    entry = report["shapes"]["smoke"]["results"]["lockstep-eager"]
    assert entry["rounds"] == 2 and sorted(entry["batches"]) == ["1", "4"]
    for cell in entry["batches"].values():
        assert len(cell["ms_per_step_rounds"]) == 2 and cell["ms_per_step"] == statistics.median(cell["ms_per_step_rounds"])
        assert cell["ms_per_step"] > 0 and cell["tokens_per_s"] > 0
    assert entry["parity"]["num_tokens"] > 1000
    assert entry["parity"]["num_tokens_differing"] == 0 and entry["parity"]["num_bits_differing"] == 0
    assert "the median over the rounds an engine completed, of 2 asked" in result.stdout
    assert "rounds completed" not in result.stdout and report["table"] in result.stdout


def test_the_table_names_engines_that_completed_fewer_rounds(script):
    env = dict(device="NVIDIA H200", torch="2.11", cuda="13.0", vllm="0.26.0", triton="3.6.0")
    results = {"lockstep-graphs": script.combine_rounds([_part([2.0, 5.0], 30.0), {"error": "skipped: out of --time-budget"}]),
               "stock-graphs": script.combine_rounds([_part([1.0, 4.0], 30.0), _part([3.0, 4.0], 30.0)])}
    report = dict(dtype="bfloat16", new_tokens=128, batches=[1, 8], engines=list(results), rounds=2,
                  baseline="stock-graphs", environment=env, shapes={"0.6B": {"results": results}})
    text = script.table(report)
    assert "the median over the rounds an engine completed, of 2 asked" in text
    assert "rounds completed: lockstep-graphs 1\n" in text and "stock-graphs 1" not in text
    # stock, B=1: the median of 1.0 and 3.0 ms, and of 1000 and 333 tok/s (medians taken separately)
    assert "| lockstep-graphs | 2.00 | 1.00 | 500 | 0.75 | 5.00 | 1.25 |" in text
