"""Generation speed on one GPU: lockstep vs stock vLLM, same engine code, same requests.

    python benchmarks/generator.py --out benchmarks/results/generator-h200.json    # 0.6B and 1.7B
    python benchmarks/generator.py --shapes 0.6B --engines lockstep-graphs stock-graphs
    python benchmarks/generator.py --smoke          # tiny dims, eager engines: checks the script (CPU)
    python benchmarks/generator.py --rounds 3       # the engine list 3 times over, each cell the median

Engines (each in its own process, through the project's `Generator`, with ignore_eos so every
sequence decodes exactly `--new-tokens`):
  lockstep-graphs   our model and kernels, decode steps replayed as CUDA graphs (the GPU default)
  lockstep-eager    the same with generator.enforce_eager=true
  stock-graphs      vLLM's own Qwen3 and kernels, vLLM's defaults (torch.compile + CUDA graphs)
  stock-invariant   stock-graphs with VLLM_BATCH_INVARIANT=1 (vLLM's own batch-invariant mode)
  lockstep-v1       lockstep-graphs on vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0; lockstep's
                    GPU default is V2): only when named in --engines

At each batch size B (B prompts, one sample each): a warm-up call, then the median over
`--repeats` of the time of a call that generates 1 token (prefill) and of one that generates
N = --new-tokens. ms per decode step = (t_N - t_1) / (N - 1); output tokens/s = B * N / t_N.
Parity (lockstep-graphs and lockstep-v1; lockstep-eager on CPU): 256 prompts whose completions
differ in length (so the decode batch shrinks through sizes that are padded to captured graphs),
scored by the trainer; the count of differing tokens and bits must be 0.

With `--rounds R` the engine list runs R times over, alternating (A B C, A B C, ...), each engine
in a fresh process every time; a cell is the median over the rounds and the JSON keeps every
round's value. On a shared host timings move between processes far more than within one (the
same stock engine took 6.6 and 12.0 ms per B=256 step in two processes on one H200).

The checkpoints (Qwen3 shapes, bf16, random weights, ascii tokenizer padded to the vocab) are
written locally, no hub (`lockstep.models.tiny.write_random_checkpoint`).
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

from lockstep_bench import check_parity, environment, gpu_slug, run_part, spawn  # noqa: E402

ENGINES = {  # in the order they run: what matters most first, if --time-budget cuts the run short
    "lockstep-graphs": dict(impl="lockstep", eager=False, env={}),
    "stock-graphs": dict(impl="stock", eager=False, env={}),
    "stock-invariant": dict(impl="stock", eager=False, env={"VLLM_BATCH_INVARIANT": "1"}),
    "lockstep-eager": dict(impl="lockstep", eager=True, env={}),
    "lockstep-v1": dict(impl="lockstep", eager=False, env={"VLLM_USE_V2_MODEL_RUNNER": "0"}, default=False),
}
BASELINE = "stock-graphs"
SMOKE_DIMS = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128,
                  vocab_size=512)
MAX_PROMPT_TOKENS = 32  # the prompts below are shorter
PARITY_PROMPTS = 256
MIN_PART_S = 60  # a part started with less time than this left is skipped


def make_prompts(num_prompts: int) -> list[str]:
    return [f"Q{i}: continue {i * 7919 % 1000} {i * 104729 % 997} ->" for i in range(num_prompts)]


def parity_lengths(num_prompts: int, new_tokens: int) -> list[int]:
    """Completion lengths from new_tokens / 2 to 3 * new_tokens / 2, mean new_tokens."""
    half = new_tokens // 2
    return [half + (i * 37) % (2 * half + 1) for i in range(num_prompts)]


# --- one engine, in its own process ----------------------------------------------------------


def bench_engine(args) -> dict:
    from lockstep.actors.generation import Generator
    from lockstep.actors.vllm_engine import GeneratorConfig
    from lockstep.models import ModelConfig

    spec = ENGINES[args.only]

    class DecodeBench(Generator):
        """The production generator's sampling, plus ignore_eos and per-seed completion lengths."""

        lengths: dict[int, int] = {}

        def sampling_params(self, *, n, temperature, max_tokens, seed):
            params = super().sampling_params(n=n, temperature=temperature, max_tokens=self.lengths.get(seed, max_tokens),
                                             seed=seed)
            params.ignore_eos = True  # read when the request is processed, nothing derived earlier
            return params

    model_cfg = ModelConfig(path=args.ckpt, impl=spec["impl"], dtype=args.dtype)
    gen_cfg = GeneratorConfig(num_samples=1, temperature=1.0, max_tokens=args.new_tokens,
                              max_model_len=MAX_PROMPT_TOKENS + 2 * args.new_tokens,
                              gpu_memory_utilization=args.gpu_mem, enforce_eager=spec["eager"])
    start = time.perf_counter()
    generator = DecodeBench(model_cfg, gen_cfg, args.device)
    result = dict(engine=args.only, load_s=time.perf_counter() - start, graphs=generator.graphs, batches={})

    def timed(prompts, max_tokens) -> tuple[float, list]:
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        samples = generator.generate(prompts, [{}] * len(prompts), 0, max_tokens=max_tokens, seeds=seeds[:len(prompts)])
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, samples

    seeds = list(range(max(max(args.batches), PARITY_PROMPTS)))
    for batch in args.batches:
        prompts = make_prompts(batch)
        timed(prompts, args.new_tokens)  # warm-up: Triton compiles, graphs of this size replay once
        repeats = 1 if spec["eager"] and spec["impl"] == "lockstep" else args.repeats  # seconds per call
        t_first = statistics.median(timed(prompts, 1)[0] for _ in range(repeats))
        runs = [timed(prompts, args.new_tokens) for _ in range(repeats)]
        t_all = statistics.median(t for t, _ in runs)
        num_tokens = sum(len(s.completion_ids) for s in runs[-1][1])
        if num_tokens != batch * args.new_tokens:
            raise RuntimeError(f"batch {batch}: {num_tokens} tokens, expected {batch * args.new_tokens} (ignore_eos)")
        result["batches"][str(batch)] = dict(
            ms_per_step=(t_all - t_first) / (args.new_tokens - 1) * 1e3, tokens_per_s=num_tokens / t_all,
            seconds=t_all, prefill_seconds=t_first, repeats=repeats)
        print(f"{args.only} batch {batch}: {result['batches'][str(batch)]['ms_per_step']:.2f} ms/step, "
              f"{result['batches'][str(batch)]['tokens_per_s']:,.0f} tok/s", flush=True)
    if args.parity:
        prompts = make_prompts(PARITY_PROMPTS)
        lengths = parity_lengths(PARITY_PROMPTS, args.new_tokens)
        DecodeBench.lengths = dict(zip(seeds, lengths))
        _, samples = timed(prompts, args.new_tokens)
        DecodeBench.lengths = {}
        result["parity"] = check_parity(model_cfg, samples, 1.0, args.device, micro_batch_size=32)
        result["parity"]["completion_lengths"] = [min(lengths), max(lengths)]
    return result


# --- the driver -------------------------------------------------------------------------------


def drive(args) -> dict:
    from lockstep.models.tiny import QWEN3_SHAPES, write_random_checkpoint

    start = time.perf_counter()
    parity_engines = {"lockstep-graphs", "lockstep-v1"} if args.device == "cuda" else {"lockstep-eager"}
    report = dict(dtype=args.dtype, new_tokens=args.new_tokens, batches=args.batches, engines=args.engines,
                  rounds=args.rounds, baseline=BASELINE, environment=environment(args.device, gpu_name=False), shapes={})
    for shape in args.shapes:
        dims = SMOKE_DIMS if shape == "smoke" else QWEN3_SHAPES[shape]
        ckpt_dir = Path(args.ckpt_dir or tempfile.gettempdir()) / f"lockstep-bench-{shape}-{args.dtype}"
        print(f"writing the {shape} checkpoint to {ckpt_dir} ...", flush=True)
        ckpt = write_random_checkpoint(ckpt_dir, dims, args.dtype)
        results = report["shapes"].setdefault(shape, dict(dims=dims, results={}))["results"]
        parts: dict[str, list[dict]] = {engine: [] for engine in args.engines}
        for round_ in range(args.rounds):
            for engine in args.engines:
                left = args.time_budget - (time.perf_counter() - start) if args.time_budget else 3600.0
                if left < MIN_PART_S:
                    parts[engine].append({"error": "skipped: out of --time-budget"})
                else:
                    print(f"\n=== {shape} {engine}" + (f", round {round_ + 1} of {args.rounds}" if args.rounds > 1 else "")
                          + " ===", flush=True)
                    argv = ["--only", engine, "--ckpt", str(ckpt), "--dtype", args.dtype, "--device", args.device,
                            "--gpu-mem", str(args.gpu_mem), "--new-tokens", str(args.new_tokens),
                            "--repeats", str(args.repeats), "--batches", *map(str, args.batches)]
                    if engine in parity_engines and not args.no_parity and round_ == 0:  # once is enough
                        argv.append("--parity")
                    parts[engine].append(spawn(__file__, argv, left, ENGINES[engine]["env"]))
                results[engine] = combine_rounds(parts[engine])
                if args.out:  # after every part, so a run cut short keeps what it measured
                    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def combine_rounds(parts: list[dict]) -> dict:
    """One engine's result over its rounds: each batch's figures are the medians of the rounds
    that measured it, every round's value kept beside them. One round is returned as it is."""
    done = [p for p in parts if "error" not in p]
    if len(parts) == 1 or not done:
        return parts[0]
    out = dict(done[0])  # engine, graphs, parity (measured in the first round)
    out["rounds"] = len(done)
    if len(done) < len(parts):
        out["failed_rounds"] = [p["error"] for p in parts if "error" in p]
    out["batches"] = {}
    for batch in done[0]["batches"]:
        cells = [p["batches"][batch] for p in done if batch in p.get("batches", {})]
        out["batches"][batch] = {
            **{key: statistics.median(c[key] for c in cells) for key in ("ms_per_step", "tokens_per_s", "seconds",
                                                                        "prefill_seconds")},
            "ms_per_step_rounds": [c["ms_per_step"] for c in cells], "repeats": cells[0]["repeats"],
        }
    out["load_s"] = statistics.median(p["load_s"] for p in done)
    return out


def table(report: dict) -> str:
    env = report["environment"]
    lines = [f"lockstep generator benchmark: {report['dtype']}, {report['new_tokens']} new tokens per sequence, "
             f"on {env['device']}",
             f"torch {env['torch']} (CUDA {env['cuda']}), vLLM {env['vllm']}, triton {env['triton']}",
             "ms/step = decode time per step; tok/s = output tokens per second; x = ratio to "
             f"{report['baseline']} (ms: ours / stock, lower is better; tok/s: ours / stock, higher is better)"]
    if report.get("rounds", 1) > 1:
        lines.append(f"each cell: the median over the rounds an engine completed, of {report['rounds']} asked "
                     "(one process per engine and round)")
    for shape, entry in report["shapes"].items():
        res = entry["results"]
        base = res.get(report["baseline"], {}).get("batches", {})
        lines += ["", f"## {shape}", ""]
        head = "| engine | " + " | ".join(f"B={b} ms/step | x | tok/s | x" for b in report["batches"]) + " |"
        lines += [head, "|---" * (1 + 4 * len(report["batches"])) + "|"]
        short = {e: r.get("rounds", 1) for e, r in res.items() if "error" not in r and r.get("rounds", 1) < report.get("rounds", 1)}
        if short:
            lines.insert(-2, "rounds completed: " + ", ".join(f"{e} {n}" for e, n in short.items()) + "\n")
        for engine in report["engines"]:
            r = res.get(engine, {})
            if "error" in r:
                lines.append(f"| {engine} | " + r["error"] + " |")
                continue
            cells = []
            for b in map(str, report["batches"]):
                ours, stock = r.get("batches", {}).get(b), base.get(b)
                if ours is None:
                    cells += ["-"] * 4
                    continue
                ms_x = f"{ours['ms_per_step'] / stock['ms_per_step']:.2f}" if stock else "-"
                tok_x = f"{ours['tokens_per_s'] / stock['tokens_per_s']:.2f}" if stock else "-"
                cells += [f"{ours['ms_per_step']:.2f}", ms_x, f"{ours['tokens_per_s']:,.0f}", tok_x]
            lines.append(f"| {engine} | " + " | ".join(cells) + " |")
        for parity_engine, parity in ((e, r["parity"]) for e, r in res.items() if "parity" in r):
            lines.append("")
            lines.append(f"parity, {parity_engine} vs trainer ({parity['num_tokens']:,} tokens, completions of "
                         f"{parity['completion_lengths'][0]}-{parity['completion_lengths'][1]} tokens): "
                         f"{parity['num_tokens_differing']} tokens differ, {parity['num_bits_differing']} bits differ")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny dims, eager engines, short runs (CPU is fine)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 (default) | float32 (default with --smoke)")
    p.add_argument("--shapes", nargs="+", default=None, help="Qwen3 shapes (default: 0.6B 1.7B)")
    p.add_argument("--engines", nargs="+", default=None, choices=list(ENGINES))
    p.add_argument("--batches", nargs="+", type=int, default=None, help="default: 1 8 64 256")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per sequence (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per batch size in one process (median)")
    p.add_argument("--rounds", type=int, default=1, help="run the engine list this many times, alternating; "
                   "each cell is the median over the rounds")
    p.add_argument("--no-parity", action="store_true")
    p.add_argument("--gpu-mem", type=float, default=0.5, help="vLLM gpu_memory_utilization")
    p.add_argument("--time-budget", type=float, default=0, help="seconds for the whole run (0: none)")
    p.add_argument("--ckpt-dir", default="", help="where to write the checkpoints (kept for later runs)")
    p.add_argument("--out", default="", help="write the results as JSON here (default with a GPU: "
                                             "benchmarks/results/generator-<gpu>.json)")
    p.add_argument("--only", choices=list(ENGINES), help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--parity", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shapes = args.shapes or (["smoke"] if args.smoke else ["0.6B", "1.7B"])
    args.dtype = args.dtype or ("float32" if args.smoke else "bfloat16")
    args.engines = args.engines or (["lockstep-eager"] if args.smoke else
                                    [name for name, spec in ENGINES.items() if spec.get("default", True)])
    args.batches = args.batches or ([1, 4] if args.smoke else [1, 8, 64, 256])
    args.new_tokens = args.new_tokens or (8 if args.smoke else 128)
    if args.rounds < 1 or args.repeats < 1:
        p.error(f"--rounds {args.rounds} --repeats {args.repeats}: each must be at least 1")
    if args.only:
        run_part(lambda: bench_engine(args), args.result)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible here; use --device cpu (with --smoke)")
    if args.device == "cpu" and {"lockstep-graphs", "lockstep-v1"} & set(args.engines):
        raise SystemExit("lockstep-graphs and lockstep-v1 need a GPU (vLLM's CPU backend captures no graphs); "
                         "pass --engines")

    report = drive(args)
    report["environment"] = environment(args.device)  # the parts are done: CUDA may start here
    text = table(report)
    print("\n" + text, flush=True)
    out = args.out or (f"benchmarks/results/generator-{gpu_slug(report['environment']['device'])}.json"
                       if args.device == "cuda" else "")
    if out:
        report["table"] = text
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    failed = [f"{s}/{e}" for s, entry in report["shapes"].items() for e, r in entry["results"].items()
              if "error" in r or r.get("failed_rounds")]
    parity_bad = [s for s, entry in report["shapes"].items() for r in entry["results"].values()
                  if r.get("parity", {}).get("num_bits_differing")]
    return 1 if failed or parity_bad else 0


if __name__ == "__main__":
    sys.exit(main())
