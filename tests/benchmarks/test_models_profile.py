"""benchmarks/models.py --profile: one call profiled, both tables written, wall time returned."""

import importlib.util
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "models.py"


def _load_script():
    saved = list(sys.path)  # the script appends benchmarks/ to sys.path
    try:
        spec = importlib.util.spec_from_file_location("models_bench", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def test_profile_step_writes_op_and_python_tables(tmp_path):
    bench = _load_script()
    calls = []

    def step():
        calls.append(1)
        a = torch.randn(64, 64)
        return (a @ a).sum()

    path = tmp_path / "profile.txt"
    result = bench.profile_step(step, "cpu", path)
    assert len(calls) == 2  # once under torch.profiler, once under cProfile
    text = path.read_text()
    assert "aten::mm" in text  # the op table
    assert "host time per Python function" in text and "step" in text  # the cProfile table names fn
    assert result["profiled_wall_ms"] > 0 and result["profiled_gpu_ms"] == 0.0 and result["profile"] == str(path)
