"""The whole RL step, lockstep against the same loop on stock kernels, through `Session` on a mesh.

    python benchmarks/rl_step.py --mesh h200x2 --shape 0.6B 1.7B     # -> benchmarks/results/rl_step-h200.json
    python benchmarks/rl_step.py --smoke --out /tmp/rl_step.json     # local-cpu, tiny model: checks the script

For each shape, two runs of `--steps` real steps each, same checkpoint, prompts, seeds and
sampling (generator, trainer and data seeds are fixed):

  lockstep  model.impl=lockstep loop.barrier=strict   (our model and kernels, bitwise barrier)
  stock     model.impl=stock    loop.barrier=measure  (vLLM's and TorchTitan's own Qwen3)

It prints the median step time and each phase (generate, reward, train, sync; `score` too when
the loop has that phase) over the steps after `--warmup`, with lockstep / stock ratios, and
writes the per-step metrics and the table as JSON. Completions are sampled from random weights
over a 151,936-token vocabulary, so they rarely hit EOS and run close to `--max-tokens`.

The checkpoint (Qwen3 dims, random weights, a character tokenizer padded to the vocab) is
written locally by benchmarks/models.py's `write_checkpoint`. Each run is a fresh process
(its own meshes), as benchmarks/models.py does per part.
"""

import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    # Run as a script: drop benchmarks/ from sys.path (its kernels.py must not shadow anything).
    sys.path.pop(0)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
IMPLS = ("lockstep", "stock")
BARRIER = {"lockstep": "strict", "stock": "measure"}
PHASES = ("generate", "reward", "score", "train", "sync", "step")
# Qwen3-1.7B's dims (the 0.6B and smoke ones come from benchmarks/models.py); `cpu-medium`
# is ~40M parameters: big enough on 2 CPU cores that weight bytes, not calls, dominate a sync.
EXTRA_SHAPES = {
    "1.7B": dict(hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                 intermediate_size=6144, vocab_size=151936),
    "cpu-medium": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                       intermediate_size=1536, vocab_size=32000),
}
# prompts per step, samples per prompt, max new tokens, trainer micro-batch (sequences)
WORKLOADS = {
    "gpu": dict(num_prompts=16, num_samples=8, max_tokens=256, micro_batch_size=32),
    "cpu": dict(num_prompts=2, num_samples=2, max_tokens=16, micro_batch_size=8),
}
MAX_PROMPT_TOKENS = 64  # max_model_len = this + max_tokens


def bench_models():
    """benchmarks/models.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("lockstep_bench_models", HERE / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shapes() -> dict:
    return {**bench_models().SHAPES, **EXTRA_SHAPES}


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


def spawn(args, shape: str, impl: str, ckpt: Path, prompts: Path, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--only", impl, "--ckpt", str(ckpt),
               "--prompts", str(prompts), "--log-dir", str(Path(tmp) / "run"), "--result", str(result_path),
               "--mesh", args.mesh, "--shape", shape, "--dtype", args.dtype, "--steps", str(args.steps),
               "--warmup", str(args.warmup)] + (["--smoke"] if args.smoke else [])
        print(f"\n=== {shape} {impl} (loop.barrier={BARRIER[impl]}) on {args.mesh} ===", flush=True)
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f} s"}
        result = json.loads(result_path.read_text()) if result_path.is_file() else {}
        if proc.returncode != 0 and "error" not in result:
            result["error"] = f"exit code {proc.returncode}"
        result["wall_s"] = time.perf_counter() - start
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
                               capture_output=True, text=True, timeout=60).stdout.lower().split()
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"
    for known in ("h200", "h100", "b200", "a100"):
        if known in names:
            return known
    return names[-1] if names else "cpu"


def drive(args) -> dict:
    """Run every (shape, impl); results go into args.out, merged with the runs of other meshes
    and shapes already there (so each GPU run can be its own command)."""
    models = bench_models()
    start = time.perf_counter()
    workdir = Path(args.ckpt_dir or Path(tempfile.gettempdir()) / "lockstep-rl-step")
    prompts = workdir / "prompts.jsonl"
    workdir.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in models.make_prompts(256)))
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {}
    report.setdefault("runs", {})
    report["environment"] = models.environment("cpu" if args.smoke else "cuda", gpu_name=False)
    device = "cpu" if args.smoke else gpu_name()
    for shape in args.shape:
        ckpt = workdir / f"{shape}-{args.dtype}"
        print(f"writing the {shape} checkpoint to {ckpt} ...", flush=True)
        models.write_checkpoint(ckpt, shapes()[shape], args.dtype)
        entry = dict(mesh=args.mesh, shape=shape, dims=shapes()[shape], device=device, dtype=args.dtype,
                     steps=args.steps, warmup=args.warmup, workload=args.work,
                     date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]), impls={})
        report["runs"][f"{args.mesh} {shape}"] = entry
        for impl in args.impls:
            left = args.time_budget - (time.perf_counter() - start) if args.time_budget else 3600.0
            if left < 30:
                entry["impls"][impl] = {"error": "skipped: out of --time-budget"}
                continue
            entry["impls"][impl] = spawn(args, shape, impl, ckpt, prompts, left)
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

    if args.only:
        try:
            result = run_one(args)
        except BaseException as e:
            Path(args.result).write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
            raise
        Path(args.result).write_text(json.dumps(result))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # skip engine / thread teardown at exit: the result is written

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
