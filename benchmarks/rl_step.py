"""The whole RL step, lockstep against the same loop on stock kernels, through `Session` on a mesh.

    python benchmarks/rl_step.py --mesh h200x2 --shape 0.6B     # -> benchmarks/results/rl_step-h200.json
    python benchmarks/rl_step.py --mesh h200x1 --shape 1.7B     # merged into the same file
    python benchmarks/rl_step.py --smoke --out /tmp/rl_step.json  # local-cpu, tiny model: checks the script

Per (mesh, shape), two runs of `--steps` real steps each, with the same checkpoint, prompts,
seeds and sampling (the generator, trainer and data seeds are fixed):

  lockstep  model.impl=lockstep loop.barrier=strict   (our model and kernels, bitwise barrier)
  stock     model.impl=stock    loop.barrier=measure  (vLLM's and TorchTitan's own Qwen3)

Each run is a fresh process with its own meshes. The table gives the median of each phase
(generate, reward, train, sync, and the whole step) over the steps after `--warmup`, for both
runs, with lockstep / stock ratios. The JSON keeps the per-step metrics, and runs of other
meshes and shapes already in the file stay. Completions are sampled from random weights over
a 151,936-token vocabulary, so they rarely hit EOS and run close to `--max-tokens` (256).

The checkpoints (Qwen3 shapes, random weights, ascii tokenizer padded to the vocab) are written
locally, no hub (`lockstep.models.tiny.write_random_checkpoint`).
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
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from lockstep_bench import environment, gpu_slug, run_part, spawn  # noqa: E402

HERE = Path(_HERE)
IMPLS = ("lockstep", "stock")
BARRIER = {"lockstep": "strict", "stock": "measure"}
PHASES = ("verify", "generate", "reward", "score", "train", "sync", "step")
# Qwen3 shapes come from lockstep.models.tiny.QWEN3_SHAPES; `cpu-medium` (~40M parameters) is
# big enough on 2 CPU cores that weight bytes, not calls, dominate a sync.
CPU_SHAPES = {
    "smoke": dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128,
                  vocab_size=512),
    "cpu-medium": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                       intermediate_size=1536, vocab_size=32000),
}
# prompts per step, samples per prompt, max new tokens, trainer micro-batch (sequences)
WORKLOADS = {
    "gpu": dict(num_prompts=16, num_samples=8, max_tokens=256, micro_batch_size=32),
    "cpu": dict(num_prompts=2, num_samples=2, max_tokens=16, micro_batch_size=8),
}
MAX_PROMPT_TOKENS = 64  # max_model_len = this + max_tokens


def shapes() -> dict:
    from lockstep.models.tiny import QWEN3_SHAPES

    return {**QWEN3_SHAPES, **CPU_SHAPES}


def make_prompts(num_prompts: int) -> list[str]:
    return [f"Q{i}: continue {i * 7919 % 1000} {i * 104729 % 997} ->" for i in range(num_prompts)]


def digit_fraction(prompt: str, completion: str, **fields) -> float:
    """The reward: share of the completion's characters that are digits (varies across a
    group, so advantages and gradients are not zero)."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


# --- one run (its own process) ------------------------------------------------------------


def run_config(args, impl: str, ckpt: str, prompts_file: str, log_dir: str) -> dict:
    work = args.work
    return dict(
        model={"path": ckpt, "impl": impl, "dtype": args.dtype},
        generator={"num_samples": work["num_samples"], "max_tokens": work["max_tokens"], "temperature": 1.0,
                   "max_model_len": MAX_PROMPT_TOKENS + work["max_tokens"], "seed": 0},
        trainer={"lr": 1e-5, "micro_batch_size": work["micro_batch_size"], "seed": 0},
        data={"source": "jsonl", "path": prompts_file, "prompts_per_step": work["num_prompts"], "seed": 0},
        reward={"functions": [{"fn": f"{Path(__file__).resolve()}:digit_fraction", "weight": 1.0}]},
        loop={"barrier": BARRIER[impl], "log_dir": log_dir, "steps": args.steps, "save_every": 0},
    )


def run_one(args) -> dict:
    from lockstep import Session

    impl = args.only
    start = time.perf_counter()
    with Session(run_config(args, impl, args.ckpt, args.prompts, args.log_dir), mesh=args.mesh, echo=True) as s:
        start_s = time.perf_counter() - start
        steps = s.run(args.steps)
    keep = ("step", "num_samples", "completion/len_mean", "reward/mean", "train/loss", "train/grad_norm",
            "barrier/num_tokens", "barrier/num_differing_tokens", "barrier/max_abs_diff", "perf/tokens_per_s")
    per_step = [{k: v for k, v in m.items() if k in keep or k.startswith("time/")} for m in steps]
    timed = per_step[args.warmup:] or per_step
    median = {p: statistics.median(m[f"time/{p}"] for m in timed) for p in PHASES if f"time/{p}" in timed[0]}
    return dict(impl=impl, barrier=BARRIER[impl], start_s=start_s, median_s=median, steps=per_step,
                num_timed_steps=len(timed))


# --- the driver ---------------------------------------------------------------------------


def run_in_process(args, shape: str, impl: str, ckpt: Path, prompts: Path, run_dir: Path, timeout_s: float) -> dict:
    print(f"\n=== {shape} {impl} (loop.barrier={BARRIER[impl]}) on {args.mesh_name}, logs in {run_dir} ===", flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resume of the last one
    argv = ["--only", impl, "--ckpt", str(ckpt), "--prompts", str(prompts), "--log-dir", str(run_dir),
            "--mesh", args.mesh, "--shape", shape, "--dtype", args.dtype, "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--max-tokens", str(args.work["max_tokens"])]
    result = spawn(__file__, argv + (["--smoke"] if args.smoke else []), timeout_s)
    if "error" not in result:
        shutil.rmtree(run_dir, ignore_errors=True)  # kept only when it failed: `lockstep audit --run` reads it
    return result


def table(report: dict) -> str:
    """One block per (mesh, shape): each phase's median for both runs, and lockstep / stock."""
    lines = []
    fmt = "{:<10} {:>11} {:>11} {:>8}"
    for key, entry in report["runs"].items():
        w, impls = entry["workload"], entry["impls"]
        lines += [f"{key} ({entry['device']}, {entry['dtype']}): {w['num_prompts']} prompts x {w['num_samples']} "
                  f"samples x <= {w['max_tokens']} new tokens; median of {entry['steps'] - entry['warmup']} steps "
                  f"after {entry['warmup']} warm-up ({entry['date']})",
                  fmt.format("phase", "lockstep s", "stock s", "ratio")]
        ours, stock = impls.get("lockstep", {}).get("median_s", {}), impls.get("stock", {}).get("median_s", {})
        for phase in PHASES:
            a, b = ours.get(phase), stock.get(phase)
            if a is None and b is None:
                continue
            cell = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            lines.append(fmt.format(phase, cell(a), cell(b), f"{a / b:.2f}x" if a is not None and b else "-"))
        for impl, run in impls.items():
            if "error" in run:
                lines.append(f"  {impl}: FAILED: {run['error']}")
            elif run.get("steps"):
                last = run["steps"][-1]
                diff = last.get("barrier/num_differing_tokens")
                lines.append(f"  {impl}: completion tokens (mean) {last.get('completion/len_mean', 0):.0f}"
                             + ("" if diff is None else f", differing tokens at the barrier {diff:.0f}")
                             + f", start-up {run['start_s']:.0f} s")
        lines.append("")
    lines.append("ratio = lockstep time / stock time (lower is better; target <= 1.15x for the step)")
    return "\n".join(lines)


def gpu_name() -> str:
    """"h200", "h100", ... from nvidia-smi: this process stays off the GPU (the runs need it)."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=60).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        names = []
    return gpu_slug(names[0]) if names else "cpu"


def drive(args) -> dict:
    """Run every (shape, impl); results go into args.out, merged with the runs of other meshes
    and shapes already there (so each GPU run can be its own command)."""
    from lockstep.models.tiny import write_random_checkpoint

    start = time.perf_counter()
    workdir = Path(args.ckpt_dir or Path(tempfile.gettempdir()) / "lockstep-rl-step")
    prompts = workdir / "prompts.jsonl"
    workdir.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in make_prompts(256)))
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {}
    report.setdefault("runs", {})
    report["environment"] = environment("cpu" if args.smoke else "cuda", gpu_name=False)
    device = "cpu" if args.smoke else gpu_name()
    for shape in args.shape:
        ckpt = workdir / f"{shape}-{args.dtype}"
        print(f"writing the {shape} checkpoint to {ckpt} ...", flush=True)
        write_random_checkpoint(ckpt, shapes()[shape], args.dtype)
        entry = dict(mesh=args.mesh_name, shape=shape, dims=shapes()[shape], device=device, dtype=args.dtype,
                     steps=args.steps, warmup=args.warmup, workload=args.work,
                     date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]), impls={})
        report["runs"][f"{args.mesh_name} {shape}"] = entry
        for impl in args.impls:
            left = args.time_budget - (time.perf_counter() - start) if args.time_budget else 3600.0
            if left < 30:
                entry["impls"][impl] = {"error": "skipped: out of --time-budget"}
                continue
            run_dir = workdir / "runs" / f"{args.mesh_name}-{shape}-{impl}"
            entry["impls"][impl] = run_in_process(args, shape, impl, ckpt, prompts, run_dir, left)
            out.write_text(json.dumps(report, indent=2) + "\n")  # a run cut short keeps the rest
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="local-cpu, tiny model, a few short steps")
    p.add_argument("--mesh", default=None, help="mesh config name or file (default: h200x2; local-cpu with --smoke)")
    p.add_argument("--shape", nargs="+", default=None,
                   help="model shapes: 0.6B 1.7B (GPU), smoke cpu-medium (CPU); default 0.6B, smoke with --smoke")
    p.add_argument("--dtype", default=None, help="bfloat16 (default) | float32 (default with --smoke)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 6; 3 with --smoke)")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the medians")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS, help="which runs (default both)")
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens per completion (default 256; 16 smoke)")
    p.add_argument("--time-budget", type=float, default=0, help="seconds for the whole run (0: none)")
    p.add_argument("--ckpt-dir", default="", help="where to write checkpoints and prompts (kept for later runs)")
    p.add_argument("--out", default="", help="JSON path (default benchmarks/results/rl_step-<gpu>.json; "
                                            "required with --smoke)")
    p.add_argument("--only", choices=IMPLS, help=argparse.SUPPRESS)  # one run, in this process
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--prompts", help=argparse.SUPPRESS)
    p.add_argument("--log-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.mesh = args.mesh or ("local-cpu" if args.smoke else "h200x2")
    args.shape = args.shape or (["smoke"] if args.smoke else ["0.6B"])
    args.dtype = args.dtype or ("float32" if args.smoke else "bfloat16")
    args.steps = args.steps or (3 if args.smoke else 6)
    args.work = dict(WORKLOADS["cpu" if args.smoke else "gpu"])
    if args.max_tokens:
        args.work["max_tokens"] = args.max_tokens
    if args.warmup >= args.steps:
        p.error(f"--warmup {args.warmup} leaves no timed step of --steps {args.steps}")
    unknown = [s for s in args.shape if s not in shapes()]
    if unknown:
        p.error(f"--shape {unknown[0]}: choose from {sorted(shapes())}")
    from lockstep.controller.mesh_config import load_mesh_config

    try:  # a mesh file's name, not its path, names the runs
        args.mesh_name = load_mesh_config(args.mesh).name
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))

    if args.only:
        run_part(lambda: run_one(args), args.result)  # exits

    if args.smoke and not args.out:
        p.error("--smoke writes nowhere by default: pass --out PATH")
    args.out = args.out or str(HERE / "results" / f"rl_step-{gpu_name()}.json")
    report = drive(args)
    text = table(report)
    print("\n" + text, flush=True)
    report["table"] = text
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    failed = [f"{k}/{i}" for k, e in report["runs"].items() for i, r in e["impls"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
