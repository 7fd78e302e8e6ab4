"""Where a lockstep decode step spends its GPU time: per kernel, at given batch sizes (one GPU).

    python benchmarks/decode_profile.py --shape 0.6B --batches 1 64 256 --context 160
    python benchmarks/decode_profile.py --shape 0.6B --generator-json benchmarks/results/generator-h200.json
    python benchmarks/decode_profile.py --batches 1 8 --context 8192 --split off   # long context, one program
                                                                                   # per (sequence, kv head)

The decode step vLLM replays as a CUDA graph, rebuilt outside vLLM: lockstep's Qwen3 (random
weights, q/k/v and gate/up packed as the generator packs them) over B sequences of `--context`
cached tokens, one new token each, through the same ops (write_kv_cache + attention_paged on a
paged cache), then lm_head and the sampler's log_softmax over the vocab. The step is captured in
a CUDA graph and replayed; torch.profiler sums each kernel's GPU time over the replays. With
`--generator-json`, the table adds the wall-clock ms/step that benchmarks/generator.py measured
inside vLLM at the same batch sizes: the difference is host time the GPU does not hide (vLLM's
scheduling, sampling and output processing).
"""

import argparse
import collections
import json
import sys

import torch
from torch import nn


class PagedDecodeAttention(nn.Module):
    """The generator's attention for a decode step: write the new K/V, attend over the cache."""

    def __init__(self, meta: dict, scale: float):
        super().__init__()
        self.meta, self.scale = meta, scale

    def forward(self, q, k, v, attn_meta):
        from lockstep import kernels

        m = self.meta
        kernels.write_kv_cache(k, v, m["k_cache"], m["v_cache"], m["slots"])
        return kernels.attention_paged(q, m["k_cache"], m["v_cache"], m["table"], m["seq_lens"], m["cu_q"], self.scale)


def build_step(shape: dict, batch: int, context: int, block_size: int = 16, device: str = "cuda"):
    """-> step() running one decode step of `batch` sequences (CUDA tensors, static buffers)."""
    from lockstep import kernels
    from lockstep.models.qwen3 import Qwen3Config, Qwen3Model

    config = Qwen3Config(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                         intermediate_size=shape["intermediate_size"], num_layers=shape["num_layers"],
                         num_heads=shape["num_heads"], num_kv_heads=shape["num_kv_heads"],
                         head_dim=shape["head_dim"], tie_word_embeddings=True)
    device = torch.device(device)
    blocks_per_seq = -(-(context + 1) // block_size)
    num_blocks = batch * blocks_per_seq
    layers_meta = []

    def attn_factory(layer_id, num_heads, num_kv_heads, head_dim, scale):
        cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, device=device, dtype=torch.bfloat16)
        meta = dict(k_cache=cache[0], v_cache=cache[1])
        layers_meta.append(meta)
        return PagedDecodeAttention(meta, scale)

    with torch.device(device):
        model = Qwen3Model(config, attn_factory=attn_factory)
        with torch.no_grad():
            model.init_weights()
    model = model.to(torch.bfloat16)
    model.init_buffers(device)
    model.pack_projections()
    table = torch.randperm(num_blocks, device=device, dtype=torch.int32).reshape(batch, blocks_per_seq)
    positions = torch.full((batch,), context, device=device, dtype=torch.int64)
    slots = (table[:, context // block_size].long() * block_size + context % block_size)
    for meta in layers_meta:
        meta.update(table=table, seq_lens=torch.full((batch,), context + 1, device=device, dtype=torch.int32),
                    cu_q=torch.arange(batch + 1, device=device, dtype=torch.int32), slots=slots)
    tokens = torch.randint(0, config.vocab_size, (batch,), device=device)

    @torch.no_grad()
    def step():
        hidden = model(tokens, positions, None)
        return kernels.log_softmax(model.logits(hidden), 1.0)  # the sampler's processed logprobs

    return step


def profile(step, replays: int) -> tuple[dict[str, float], float]:
    """-> (GPU ms per step by kernel name, GPU ms per step in all) over `replays` graph replays."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(2):  # compile, warm up
        step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    by_kernel = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_kernel[event.name] += event.device_time / 1e3 / replays  # us -> ms per step
    return dict(by_kernel), sum(by_kernel.values())


def kernel_group(name: str) -> str:
    """Kernel name -> the op it belongs to."""
    for key, group in (("_linear_kernel", "linear"), ("_fold_kernel", "linear"), ("_attention_kernel", "attention"),
                       ("_split_kernel", "attention"), ("_merge_kernel", "attention"),
                       ("_write_kv", "kv write"), ("qk_norm_rope", "q/k norm + rope"), ("rms_norm", "rms_norm"),
                       ("silu_mul", "silu_mul"), ("log_softmax", "log_softmax"), ("index", "embedding")):
        if key in name:
            return group
    return name[:40]


def main(argv=None) -> int:
    from lockstep.models.tiny import QWEN3_SHAPES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="0.6B", choices=list(QWEN3_SHAPES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64, 256])
    p.add_argument("--context", type=int, default=160, help="cached tokens per sequence (prompt + half the new)")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--generator-json", default="", help="benchmarks/generator.py's JSON: adds its wall ms/step")
    p.add_argument("--split", default="auto", choices=("auto", "off"),
                   help="off: no split-KV launch at any batch (same bits; for comparison)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("decode_profile needs an NVIDIA GPU")
    if args.split == "off":
        import functools

        from lockstep.kernels.triton import attention

        attention.attention_paged_fwd = functools.partial(attention.attention_paged_fwd, split=False)
    wall = {}
    if args.generator_json:
        report = json.load(open(args.generator_json))
        batches = report["shapes"].get(args.shape, {}).get("results", {})
        wall = {engine: {int(b): r["ms_per_step"] for b, r in res.get("batches", {}).items()}
                for engine, res in batches.items() if "batches" in res}
    results = {}
    for batch in args.batches:
        by_kernel, total = profile(build_step(QWEN3_SHAPES[args.shape], batch, args.context), args.replays)
        groups = collections.Counter()
        for name, ms in by_kernel.items():
            groups[kernel_group(name)] += ms
        results[batch] = dict(gpu_ms=total, by_group=dict(groups), by_kernel=by_kernel)
        torch.cuda.empty_cache()
    names = sorted({g for r in results.values() for g in r["by_group"]}, key=lambda g: -results[args.batches[-1]]["by_group"].get(g, 0))
    lines = [f"lockstep decode step, {args.shape} bf16, {args.context} cached tokens per sequence, split-KV {args.split}, "
             f"{torch.cuda.get_device_name(0)}: GPU ms per step (CUDA graph replay)", "",
             "| op | " + " | ".join(f"B={b}" for b in args.batches) + " |", "|---" * (1 + len(args.batches)) + "|"]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{results[b]['by_group'].get(name, 0):.3f}" for b in args.batches) + " |")
    lines.append("| **GPU total** | " + " | ".join(f"**{results[b]['gpu_ms']:.3f}**" for b in args.batches) + " |")
    for engine, per_batch in wall.items():
        lines.append(f"| wall ms/step in vLLM, {engine} | " + " | ".join(
            f"{per_batch[b]:.2f}" if b in per_batch else "-" for b in args.batches) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        json.dump(dict(shape=args.shape, context=args.context, split=args.split, results=results, wall=wall, table=text),
                  open(args.out, "w"), indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
