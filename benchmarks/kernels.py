"""Time lockstep's Triton kernels against the stock ops at Qwen3-1.7B / 8B shapes (one NVIDIA GPU).

    python benchmarks/kernels.py                    # all tables
    python benchmarks/kernels.py --ops linear --models 8B --out bench.txt
    python benchmarks/kernels.py --sweep            # tile / pipeline variants of linear and attention

Each row: our kernel vs the stock one (cuBLAS through torch.mm; torch SDPA for attention;
torch eager for the small ops), side by side, as TFLOP/s (matmuls, attention) or GB/s (memory
bound ops) and the ratio stock time / our time (> 1: ours is faster).

Timing: the GPU time of one call, as vLLM and a training step see it. The calls are captured
in a CUDA graph (so Python launch overhead, which a graph or a busy stream hides, stays out),
cycling over enough copies of the inputs that they do not stay in L2; median over replays of
CUDA-event times. Attention prefill / backward are timed with triton.testing.do_bench (eager,
L2 flushed; milliseconds long, so launch overhead is noise). Random bf16 data throughout.
"""

import argparse
import datetime
import math
import statistics
import sys
import time

import torch
import triton
from triton.testing import do_bench

from lockstep import kernels
from lockstep.kernels.triton import activation, attention, linear, logprobs, rms_norm, rope

MODELS = {  # hidden, intermediate, q heads, kv heads, head_dim, vocab
    "1.7B": dict(hidden=2048, inter=6144, hq=16, hkv=8, d=128, vocab=151936),
    "8B": dict(hidden=4096, inter=12288, hq=32, hkv=8, d=128, vocab=151936),
}
ROWS = [1, 8, 64, 256, 2048, 8192]
DT = torch.bfloat16
_COLD_BYTES = 256 << 20  # inputs cycled per graph: several times the L2 (50-60 MB on H100/H200)


def _copies(nbytes: int) -> int:
    return max(1, min(16, -(-_COLD_BYTES // max(nbytes, 1))))


def time_graph(make_call, nbytes: int, reps: int = 5) -> float:
    """Median ms of one call. make_call(i) -> a no-arg callable on input copy i; nbytes: its inputs."""
    calls = [make_call(i) for i in range(_copies(nbytes))]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    inner = max(1, 32 // len(calls))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            for c in calls:
                c()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (inner * len(calls)))
    del graph
    return statistics.median(times)


def time_eager(fn) -> float:
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


class Table:
    def __init__(self, title, unit, cols):
        self.title, self.unit, self.cols, self.rows = title, unit, cols, []

    def add(self, *cells):
        self.rows.append(cells)

    def render(self) -> str:
        head = f"\n### {self.title} ({self.unit})\n\n| " + " | ".join(self.cols) + " |\n|" + "---|" * len(self.cols)
        return head + "\n" + "\n".join("| " + " | ".join(str(c) for c in r) + " |" for r in self.rows)


def _fmt(x):
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _randn(*shape, scale=1.0):
    return torch.randn(*shape, device="cuda", dtype=DT) * scale


def _linear_shapes(cfg):
    h, i, q, kv = cfg["hidden"], cfg["inter"], cfg["hq"] * cfg["d"], cfg["hkv"] * cfg["d"]
    return [("q", q, h), ("k/v", kv, h), ("o", h, q), ("gate/up", i, h), ("down", h, i), ("lm_head", cfg["vocab"], h)]


def _linear_pair(m, n, k, ours_fn, stock_fn, backward=False):
    """(ours ms, stock ms) of the forward, or of grad_x + grad_w; stock_fn None: (ours ms, None)."""
    nbytes = (m * k + n * k + (m * n if backward else 0)) * 2
    copies = _copies(nbytes)
    ws = [_randn(n, k, scale=k**-0.5) for _ in range(copies)]
    xs = [_randn(m, k) for _ in range(copies)]
    gs = [_randn(m, n) for _ in range(copies)] if backward else [None] * copies
    times = [time_graph(lambda i, f=f: (lambda: f(xs[i], ws[i], gs[i])), nbytes) if f else None
             for f in (ours_fn, stock_fn)]
    del ws, xs, gs
    return times


def bench_linear(models, tables):
    for name in models:
        cfg = MODELS[name]
        cols = ["layer", "N", "K", "M", "ours", "cuBLAS", "ratio"]
        fwd = Table(f"linear forward, Qwen3-{name} (x[M,K] @ w[N,K]^T, bf16 out)", "TFLOP/s", cols)
        bwd = Table(f"linear backward, Qwen3-{name} (grad_x = g @ w and grad_w = g^T @ x, bf16 out)", "TFLOP/s", cols)
        for layer, n, k in _linear_shapes(cfg):
            for m in ROWS:
                flops = 2.0 * m * n * k
                ours, stock = _linear_pair(m, n, k, lambda x, w, g: linear.linear_fwd(x, w, None, DT),
                                           lambda x, w, g: torch.mm(x, w.t()))
                fwd.add(layer, n, k, m, _fmt(flops / ours / 1e9), _fmt(flops / stock / 1e9), f"{stock / ours:.2f}")
                if layer == "lm_head" and m > 2048:
                    continue  # the trainer's head sees only the selected rows
                # The contract's calls: linear_fwd(g, w.t()) and linear_fwd(g.t(), x.t()).
                ours, stock = _linear_pair(
                    m, n, k,
                    lambda x, w, g: (linear.linear_fwd(g, w.t(), None, DT), linear.linear_fwd(g.t(), x.t(), None, DT)),
                    lambda x, w, g: (torch.mm(g, w), torch.mm(g.t(), x)), backward=True)
                bwd.add(layer, n, k, m, _fmt(2 * flops / ours / 1e9), _fmt(2 * flops / stock / 1e9), f"{stock / ours:.2f}")
        tables += [fwd, bwd]


def _sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def bench_attention(models, tables):
    for name in models:
        cfg = MODELS[name]
        hq, hkv, d = cfg["hq"], cfg["hkv"], cfg["d"]
        group, scale = hq // hkv, d**-0.5
        pre = Table(f"attention prefill, Qwen3-{name} (causal, Hq={hq}, Hkv={hkv}, D={d})", "TFLOP/s",
                    ["seqs x len", "pass", "ours (varlen)", "SDPA", "ratio"])
        for num_seqs, seq_len in [(1, 2048), (4, 2048), (1, 8192), (16, 512)]:
            t = num_seqs * seq_len
            q, k, v = _randn(t, hq, d), _randn(t, hkv, d), _randn(t, hkv, d)
            cu = torch.arange(0, t + 1, seq_len, dtype=torch.int32, device="cuda")
            # SDPA gets the kv heads repeated ahead of time (not timed) and [B, H, S, D] layouts.
            qs = q.view(num_seqs, seq_len, hq, d).transpose(1, 2)
            ks, vs = (x.view(num_seqs, seq_len, hkv, d).repeat_interleave(group, 2).transpose(1, 2) for x in (k, v))
            flops = 2.0 * 2 * num_seqs * hq * seq_len * seq_len * d / 2  # causal: half the square
            ours = time_eager(lambda: attention.attention_varlen_fwd(q, k, v, cu, scale))
            stock = time_eager(lambda: _sdpa(qs, ks, vs))
            pre.add(f"{num_seqs} x {seq_len}", "fwd", _fmt(flops / ours / 1e9), _fmt(flops / stock / 1e9), f"{stock / ours:.2f}")
            out, lse = attention.attention_varlen_fwd(q, k, v, cu, scale)
            grad = torch.randn_like(out)
            ours = time_eager(lambda: attention.attention_varlen_bwd(grad, q, k, v, out, lse, cu, scale))
            qs_, ks_, vs_ = (x.detach().requires_grad_() for x in (qs, ks, vs))
            o = _sdpa(qs_, ks_, vs_)
            go = grad.view(num_seqs, seq_len, hq, d).transpose(1, 2)
            stock = time_eager(lambda: torch.autograd.grad(o, (qs_, ks_, vs_), go, retain_graph=True))
            pre.add(f"{num_seqs} x {seq_len}", "bwd", _fmt(2.5 * flops / ours / 1e9), _fmt(2.5 * flops / stock / 1e9),
                    f"{stock / ours:.2f}")
        dec = Table(f"attention decode, Qwen3-{name} (1 new token, paged BS=16, shuffled blocks; SDPA on a dense "
                    "cache with repeated kv heads)", "GB/s of our KV bytes", ["seqs", "context", "ours (paged)", "SDPA (dense)", "ratio"])
        block_size = 16
        for num_seqs in ROWS[:4]:
            for ctx in (1024, 8192):
                if num_seqs * ctx > 256 * 4096:
                    continue
                num_blocks = num_seqs * ctx // block_size
                nbytes = 2 * num_seqs * ctx * hkv * d * 2

                def ours_call(i):
                    k_cache, v_cache = (_randn(num_blocks, block_size, hkv, d) for _ in range(2))
                    table = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(num_seqs, -1)
                    seq_lens = torch.full((num_seqs,), ctx, dtype=torch.int32, device="cuda")
                    cu_q = torch.arange(num_seqs + 1, dtype=torch.int32, device="cuda")
                    q = _randn(num_seqs, hq, d)
                    return lambda: attention.attention_paged_fwd(q, k_cache, v_cache, table, seq_lens, cu_q, scale)

                def stock_call(i):
                    kd, vd, qd = _randn(num_seqs, hq, ctx, d), _randn(num_seqs, hq, ctx, d), _randn(num_seqs, hq, 1, d)
                    return lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd)

                ours = time_graph(ours_call, nbytes)
                stock = time_graph(stock_call, nbytes * group)
                dec.add(num_seqs, ctx, _fmt(nbytes / ours / 1e6), _fmt(nbytes / stock / 1e6), f"{stock / ours:.2f}")
        tables += [pre, dec]


def _rope_eager(q, k, pos, cache):
    half = q.shape[-1] // 2
    cs = cache[pos]
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def rot(x):
        x = x.float()
        return torch.cat([x[..., :half] * cos - x[..., half:] * sin, x[..., half:] * cos + x[..., :half] * sin], -1).to(DT)

    return rot(q), rot(k)


def bench_small(models, tables):
    cfg = MODELS[models[-1]]
    h, inter, vocab, hq, hkv, d = cfg["hidden"], cfg["inter"], cfg["vocab"], cfg["hq"], cfg["hkv"], cfg["d"]
    tab = Table(f"memory-bound ops, Qwen3-{models[-1]} widths", "GB/s (bytes read + written)",
                ["op", "M", "ours", "torch eager", "ratio"])
    cache = kernels.rope_cache(d, 16384, 1_000_000.0).cuda()
    w = _randn(h)
    for m in ROWS:
        cases = [
            ("rms_norm", 2 * m * h * 2, lambda: (_randn(m, h),),
             lambda x: rms_norm.rms_norm_fwd(x, w, 1e-6), lambda x: torch.nn.functional.rms_norm(x, (h,), w, 1e-6)),
            ("add_rms_norm", 4 * m * h * 2, lambda: (_randn(m, h), _randn(m, h)),
             lambda x, r: rms_norm.add_rms_norm_fwd(x, r, w, 1e-6),
             lambda x, r: torch.nn.functional.rms_norm(x + r, (h,), w, 1e-6)),
            ("silu_mul", 3 * m * inter * 2, lambda: (_randn(m, 2 * inter),),
             lambda gu: activation.silu_mul_fwd(gu), lambda gu: torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]),
            ("rope", 2 * m * (hq + hkv) * d * 2,
             lambda: (_randn(m, hq, d), _randn(m, hkv, d), torch.randint(0, 16384, (m,), device="cuda")),
             lambda q, k, p: rope.rope_fwd(q, k, p, cache, False), lambda q, k, p: _rope_eager(q, k, p, cache)),
        ]
        if m <= 2048:
            cases.append(("token_logprobs", m * vocab * 2,
                          lambda: (_randn(m, vocab), torch.randint(0, vocab, (m,), device="cuda")),
                          lambda lg, ids: logprobs.token_logprobs_fwd(lg, ids, 0.7),
                          lambda lg, ids: torch.log_softmax(lg.float() / 0.7, -1).gather(1, ids[:, None])))
        for op, nbytes, make_inputs, ours_fn, stock_fn in cases:
            inputs = [make_inputs() for _ in range(_copies(nbytes))]
            ours = time_graph(lambda i: (lambda: ours_fn(*inputs[i])), nbytes)
            stock = time_graph(lambda i: (lambda: stock_fn(*inputs[i])), nbytes)
            tab.add(op, m, _fmt(nbytes / ours / 1e6), _fmt(nbytes / stock / 1e6), f"{stock / ours:.2f}")
            del inputs
    tables.append(tab)


def bench_launch(tables):
    """Host time per call without graphs (what an eager loop pays before the GPU is busy)."""
    tab = Table("host time per eager call (no CUDA graph)", "microseconds", ["op", "ours", "stock"])
    x, w = _randn(1, 2048), _randn(2048, 2048)
    pairs = [("linear M=1 (TMA)", lambda: linear.linear_fwd(x, w, None, DT), lambda: torch.mm(x, w.t())),
             ("linear M=1 (pointer loads)", lambda: linear._launch(x, w, None, DT, use_tma=False), lambda: torch.mm(x, w.t()))]
    for op, ours_fn, stock_fn in pairs:
        row = [op]
        for fn in (ours_fn, stock_fn):
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                fn()
            row.append(_fmt((time.perf_counter() - t0) / 200 * 1e6))
            torch.cuda.synchronize()
        tab.add(*row)
    tables.append(tab)


def sweep(tables):
    """Tile / pipeline variants (each a fixed config for every M, so each is invariant; speed only)."""
    tab = Table("linear variants", "TFLOP/s", ["N", "K", "M", "BLOCK_M", "warps", "stages", "ours", "cuBLAS"])
    saved = dict(linear._TILES[DT])
    # Tiles that keep the arithmetic (BLOCK_K and the chains are fixed by the dtype).
    variants = [(128, 8, 4), (128, 8, 3), (64, 4, 4), (64, 4, 3), (64, 4, 5)]
    for n, k in [(2048, 2048), (6144, 2048), (2048, 6144), (4096, 4096), (12288, 4096), (4096, 12288)]:
        for m in (1, 64, 256, 2048, 8192):
            flops = 2.0 * m * n * k
            stock = None
            for block_m, warps, stages in variants:
                linear._TILES[DT] = {"big": (block_m, 128, warps), "small": (block_m, 128, warps)}
                try:
                    ours, stock_t = _linear_pair(
                        m, n, k, lambda x, w, g: linear._launch(x, w, None, DT, num_stages=stages),
                        None if stock else (lambda x, w, g: torch.mm(x, w.t())))
                    stock = stock or stock_t
                    tab.add(n, k, m, block_m, warps, stages, _fmt(flops / ours / 1e9), _fmt(flops / stock / 1e9))
                except Exception as e:  # out of shared memory or registers, say
                    tab.add(n, k, m, block_m, warps, stages, type(e).__name__, "")
                finally:
                    linear._TILES[DT] = dict(saved)
    tables.append(tab)
    att = Table("attention variants (Qwen3-8B heads, 4 x 2048)", "TFLOP/s",
                ["pass", "BLOCK_M", "BLOCK_N", "warps", "stages", "ours"])
    hq, hkv, d, num_seqs, seq_len = 32, 8, 128, 4, 2048
    t = num_seqs * seq_len
    q, k, v = _randn(t, hq, d), _randn(t, hkv, d), _randn(t, hkv, d)
    cu = torch.arange(0, t + 1, seq_len, dtype=torch.int32, device="cuda")
    flops = 2.0 * 2 * num_seqs * hq * seq_len * seq_len * d / 2
    saved_fwd, saved_bwd = attention._FWD[DT], attention._BWD[DT]
    saved_fwd_stages, saved_bwd_stages = attention._FWD_STAGES, attention._BWD_STAGES
    for bm, bn, warps, stages in [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 2),
                                  (128, 32, 8, 3), (128, 64, 8, 4)]:
        attention._FWD[DT] = (bm, bn, warps, "tf32")
        attention._FWD_STAGES = stages
        try:
            ms = time_eager(lambda: attention.attention_varlen_fwd(q, k, v, cu, d**-0.5))
            att.add("fwd", bm, bn, warps, stages, _fmt(flops / ms / 1e9))
        except Exception as e:
            att.add("fwd", bm, bn, warps, stages, type(e).__name__)
    attention._FWD[DT] = saved_fwd
    attention._FWD_STAGES = saved_fwd_stages
    out, lse = attention.attention_varlen_fwd(q, k, v, cu, d**-0.5)
    grad = torch.randn_like(out)
    for block, warps, stages in [(64, 8, 2), (64, 4, 2), (64, 4, 3), (32, 4, 2), (32, 4, 3), (32, 2, 2), (64, 4, 1)]:
        attention._BWD[DT] = (block, warps, "tf32")
        attention._BWD_STAGES = stages
        try:
            ms = time_eager(lambda: attention.attention_varlen_bwd(grad, q, k, v, out, lse, cu, d**-0.5))
            att.add("bwd", block, block, warps, stages, _fmt(2.5 * flops / ms / 1e9))
        except Exception as e:
            att.add("bwd", block, block, warps, stages, type(e).__name__)
    attention._BWD[DT] = saved_bwd
    attention._BWD_STAGES = saved_bwd_stages
    tables.append(att)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="linear,attention,small,launch")
    parser.add_argument("--models", default="1.7B,8B")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--out", default=None, help="also append the tables to this file, each as it is done")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs an NVIDIA GPU")
    models = args.models.split(",")
    head = (f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | command: python {' '.join(sys.argv)}")

    def emit(text):
        print(text, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n")

    emit(head)
    ops = args.ops.split(",")
    for op, fn in [("linear", bench_linear), ("attention", bench_attention)]:
        if op in ops:
            for name in models:
                tables = []
                fn([name], tables)
                for t in tables:
                    emit(t.render())
    for op, fn in [("small", lambda t: bench_small(models, t)), ("launch", bench_launch)] + ([("sweep", sweep)] if args.sweep else []):
        if op in ops or op == "sweep":
            tables = []
            fn(tables)
            for t in tables:
                emit(t.render())


if __name__ == "__main__":
    main()
