"""Trainer throughput, lockstep's Qwen3 vs TorchTitan's own, side by side on one GPU.

    python benchmarks/models.py --out models.json          # Qwen3-0.6B and 1.7B dims, bf16, random weights
    python benchmarks/models.py --shapes 0.6B --time-budget 300
    python benchmarks/models.py --smoke                    # tiny dims (CPU is fine): checks the script
    python benchmarks/models.py --shapes 0.6B --profile prof/   # + one profiled train step per impl

`Trainer` (TorchTitan optimizer/scheduler) with impl=lockstep vs impl=stock (TorchTitan's Qwen3),
on one packed batch: train_step (forward + backward + AdamW) and logprobs (no grad), 2 warm-up
then the median of 3 timed calls; tokens/s counts every token of the batch. Generation speed
and generator/trainer parity are benchmarks/generator.py's.

The checkpoint (Qwen3 shape, random weights, a character tokenizer padded to the vocab) is
written locally, no hub. Each measurement runs in its own process (this script re-invokes
itself with --only).
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path.pop(0)  # benchmarks/ goes last (its kernels.py must not shadow a package)
sys.path.append(_HERE)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from lockstep_bench import environment, gpu_slug, run_part, spawn  # noqa: E402

SMOKE_DIMS = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128,
                  vocab_size=512)
# The trainer's batch per run: sequences x tokens (half prompt, half completion), micro-batches.
WORKLOADS = {
    "full": dict(num_seqs=32, seq_len=256, micro_batch_size=16, warmup_steps=2, timed_steps=3),
    "smoke": dict(num_seqs=4, seq_len=32, micro_batch_size=4, warmup_steps=1, timed_steps=1),
}
IMPLS = ("lockstep", "stock")
MIN_PART_S = 30  # a part started with less time than this left is skipped


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def synthetic_samples(vocab_size: int, work: dict, seed: int = 0) -> list:
    """num_seqs random sequences of seq_len tokens: half prompt, half completion."""
    from lockstep.actors.types import Sample

    gen = torch.Generator().manual_seed(seed)
    num_prompt = work["seq_len"] // 2
    tokens = torch.randint(0, vocab_size, (work["num_seqs"], work["seq_len"]), generator=gen)  # [B, S]
    advantages = torch.randn(work["num_seqs"], generator=gen)
    return [
        Sample(prompt_index=i, prompt="", completion="", prompt_ids=row[:num_prompt].tolist(),
               completion_ids=row[num_prompt:].tolist(), logprobs=torch.zeros(work["seq_len"] - num_prompt),
               policy_version=0, advantage=float(advantages[i]))
        for i, row in enumerate(tokens)
    ]


def profile_step(fn, device: str, path: Path) -> dict:
    """One call of fn under torch.profiler (per-op host and GPU self time), then one under
    cProfile (host time per Python function), both written to `path`. Returns the step's wall
    time and its summed GPU kernel time (the gap is host time the GPU does not hide)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        _sync(device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    # Kernel rows only: an op's row repeats the time of the kernels it launched.
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    host = cProfile.Profile()
    host.runcall(lambda: (fn(), _sync(device)))
    stats = io.StringIO()
    pstats.Stats(host, stream=stats).sort_stats("tottime").print_stats(40)
    path.write_text(f"wall {wall * 1e3:.1f} ms (profiler on), GPU kernels {gpu_us / 1e3:.1f} ms\n\n"
                    + events.table(sort_by=sort, row_limit=40) + "\n\n"
                    + events.table(sort_by="self_cpu_time_total", row_limit=40) + "\n\n"
                    + "host time per Python function (cProfile, one more step)\n" + stats.getvalue())
    return dict(profiled_wall_ms=wall * 1e3, profiled_gpu_ms=gpu_us / 1e3, profile=str(path))


def bench_trainer(model_cfg, work: dict, device: str, profile_path: Path | None = None) -> dict:
    from lockstep.actors.trainer import Trainer, TrainerConfig
    from lockstep.actors.types import TrainBatch
    from lockstep.models import checkpoint_path

    start = time.perf_counter()
    trainer = Trainer(model_cfg, TrainerConfig(lr=1e-5, micro_batch_size=work["micro_batch_size"]), device)
    load_s = time.perf_counter() - start
    vocab_size = json.loads((checkpoint_path(model_cfg) / "config.json").read_text())["vocab_size"]
    samples = synthetic_samples(vocab_size, work)
    num_tokens = work["num_seqs"] * work["seq_len"]

    def timed(fn) -> list[float]:
        for _ in range(work["warmup_steps"]):
            fn()
        times = []
        for _ in range(work["timed_steps"]):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        return times

    # Old logprobs = the current policy's, so the PPO ratio starts near 1 as in a real step.
    for sample, lp in zip(samples, trainer.logprobs(samples, 1.0)):
        sample.logprobs = lp
    logprob_times = timed(lambda: trainer.logprobs(samples, 1.0))

    def train_step():
        for sample in samples:
            sample.policy_version = trainer.version  # on-policy check: the batch is "fresh"
        return trainer.train_step(TrainBatch(samples=samples, temperature=1.0))

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_times = timed(train_step)
    last = train_step()
    result = dict(load_s=load_s, tokens_per_step=num_tokens,
                  train_seconds=statistics.median(train_times),
                  train_tokens_per_s=num_tokens / statistics.median(train_times),
                  logprobs_seconds=statistics.median(logprob_times),
                  logprobs_tokens_per_s=num_tokens / statistics.median(logprob_times),
                  last_loss=last["loss"], last_grad_norm=last["grad_norm"])
    if device == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if profile_path is not None:
        result.update(profile_step(train_step, device, profile_path))
    return result


def _part(args) -> dict:
    from lockstep.models import ModelConfig

    profile_path = None
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        profile_path = Path(args.profile) / f"train-{Path(args.ckpt).name}-{args.only}.txt"
    return bench_trainer(ModelConfig(path=args.ckpt, impl=args.only, dtype=args.dtype), WORKLOADS[args.work],
                         args.device, profile_path)


def drive(args) -> dict:
    from lockstep.models.tiny import QWEN3_SHAPES, write_random_checkpoint

    start = time.perf_counter()
    report = dict(dtype=args.dtype, workload=WORKLOADS[args.work], environment=environment(args.device, gpu_name=False),
                  shapes={})
    for shape in args.shapes:
        dims = SMOKE_DIMS if shape == "smoke" else QWEN3_SHAPES[shape]
        ckpt_dir = Path(args.ckpt_dir or tempfile.gettempdir()) / f"lockstep-bench-{shape}-{args.dtype}"
        print(f"writing the {shape} checkpoint to {ckpt_dir} ...", flush=True)
        ckpt = write_random_checkpoint(ckpt_dir, dims, args.dtype)
        results = report["shapes"].setdefault(shape, dict(dims=dims, results={}))["results"]
        for impl in IMPLS:
            left = args.time_budget - (time.perf_counter() - start) if args.time_budget else 3600.0
            if left < MIN_PART_S:
                results[impl] = {"error": "skipped: out of --time-budget"}
                continue
            print(f"\n=== {shape} trainer {impl} ===", flush=True)
            results[impl] = spawn(__file__, ["--only", impl, "--ckpt", str(ckpt), "--dtype", args.dtype,
                                             "--device", args.device, "--work", args.work,
                                             *(["--profile", args.profile] if args.profile else [])], left)
            if args.out:  # after every part, so a run cut short keeps what it measured
                Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def table(report: dict) -> str:
    env, w = report["environment"], report["workload"]
    lines = [f"lockstep trainer benchmark: {report['dtype']}, {w['num_seqs']}x{w['seq_len']} tokens per step "
             f"on {env['device']}",
             f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, torchtitan {env['torchtitan']}",
             "ratio = lockstep / stock tokens/s (higher is better for lockstep); target >= 0.87x", "",
             "| shape | measure | lockstep | stock | ratio |", "|---|---|---:|---:|---:|"]
    for shape, entry in report["shapes"].items():
        ours, stock = entry["results"].get("lockstep", {}), entry["results"].get("stock", {})
        for name, key in (("train step tok/s", "train_tokens_per_s"), ("logprobs tok/s (no grad)", "logprobs_tokens_per_s")):
            cells = [("FAILED" if "error" in d else f"{d[key]:,.0f}") if d else "-" for d in (ours, stock)]
            ratio = f"{ours[key] / stock[key]:.3f}x" if key in ours and key in stock else "-"
            lines.append(f"| {shape} | {name} | {cells[0]} | {cells[1]} | {ratio} |")
        for impl, value in entry["results"].items():
            if "error" in value:
                lines.append(f"{shape} {impl}: {value['error']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny dims and workload (runs on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 (default) | float32 (default with --smoke)")
    p.add_argument("--shapes", nargs="+", default=None, help="Qwen3 shapes (default: 0.6B 1.7B)")
    p.add_argument("--time-budget", type=float, default=0, help="seconds for the whole run (0: none)")
    p.add_argument("--ckpt-dir", default="", help="where to write the checkpoints (kept for later runs)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--profile", default="", help="also profile one train step per part; tables go in this folder")
    p.add_argument("--only", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shapes = args.shapes or (["smoke"] if args.smoke else ["0.6B", "1.7B"])
    args.dtype = args.dtype or ("float32" if args.smoke else "bfloat16")
    args.work = args.work or ("smoke" if args.smoke else "full")
    if args.only:
        run_part(lambda: _part(args), args.result)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible here; use --device cpu (with --smoke)")

    report = drive(args)
    report["environment"] = environment(args.device)  # the parts are done: CUDA may start here
    text = table(report)
    print("\n" + text, flush=True)
    out = args.out or (f"benchmarks/results/models-{gpu_slug(report['environment']['device'])}.json"
                       if args.device == "cuda" else "")
    if out:
        report["table"] = text
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 0 if all("error" not in r for e in report["shapes"].values() for r in e["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
