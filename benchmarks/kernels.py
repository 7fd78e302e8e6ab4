"""Time lockstep's Triton kernels against the stock ops at Qwen3-1.7B / 8B shapes (one NVIDIA GPU).

    python benchmarks/kernels.py                    # all tables
    python benchmarks/kernels.py --ops linear --models 8B --out bench.txt
    python benchmarks/kernels.py --sweep            # linear pipeline-depth / load-path variants

Each row: our kernel vs the stock one (cuBLAS through torch.mm; torch SDPA for attention;
torch eager for the small ops), side by side, as TFLOP/s (matmuls, attention) or GB/s (memory
bound ops) and the ratio ours / stock. Times are medians of triton.testing.do_bench (CUDA events,
L2 flushed before each run) on random bf16 data.
"""

import argparse
import datetime
import math
import sys

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


def _time(fn) -> float:
    """Median milliseconds."""
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


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


def _linear_shapes(cfg):
    h, i, q, kv = cfg["hidden"], cfg["inter"], cfg["hq"] * cfg["d"], cfg["hkv"] * cfg["d"]
    return [("q", q, h), ("k/v", kv, h), ("o", h, q), ("gate/up", i, h), ("down", h, i), ("lm_head", cfg["vocab"], h)]


def bench_linear(models, tables):
    for name in models:
        cfg = MODELS[name]
        fwd = Table(f"linear forward, Qwen3-{name} (x[M,K] @ w[N,K]^T, bf16)", "TFLOP/s",
                    ["layer", "N", "K", "M", "ours", "cuBLAS", "ratio"])
        bwd = Table(f"linear backward, Qwen3-{name} (grad_x and grad_w)", "TFLOP/s",
                    ["layer", "N", "K", "M", "ours", "cuBLAS", "ratio"])
        for layer, n, k in _linear_shapes(cfg):
            w = torch.randn(n, k, device="cuda", dtype=DT) / math.sqrt(k)
            for m in ROWS:
                x = torch.randn(m, k, device="cuda", dtype=DT)
                flops = 2.0 * m * n * k
                ours = _time(lambda: linear.linear_fwd(x, w, None, DT))
                stock = _time(lambda: torch.mm(x, w.t()))
                fwd.add(layer, n, k, m, _fmt(flops / ours / 1e9), _fmt(flops / stock / 1e9), f"{stock / ours:.2f}")
                if layer == "lm_head" and m > 2048:
                    continue  # the trainer's head sees only the selected rows
                g = torch.randn(m, n, device="cuda", dtype=DT)
                ours = _time(lambda: (linear.linear_partial(g, w.t()).to(DT), linear.linear_partial(g.t(), x.t()).to(DT)))
                stock = _time(lambda: (torch.mm(g, w), torch.mm(g.t(), x)))
                bwd.add(layer, n, k, m, _fmt(2 * flops / ours / 1e9), _fmt(2 * flops / stock / 1e9), f"{stock / ours:.2f}")
                del g
            del w
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
            q, k, v = (torch.randn(t, h, d, device="cuda", dtype=DT) for h in (hq, hkv, hkv))
            cu = torch.arange(0, t + 1, seq_len, dtype=torch.int32, device="cuda")
            # SDPA gets the kv heads repeated ahead of time (not timed) and [B, H, S, D] layouts.
            qs = q.view(num_seqs, seq_len, hq, d).transpose(1, 2)
            ks, vs = (x.view(num_seqs, seq_len, hkv, d).repeat_interleave(group, 2).transpose(1, 2) for x in (k, v))
            flops = 2.0 * 2 * num_seqs * hq * seq_len * seq_len * d / 2  # causal: half the square
            ours = _time(lambda: attention.attention_varlen_fwd(q, k, v, cu, scale))
            stock = _time(lambda: _sdpa(qs, ks, vs))
            pre.add(f"{num_seqs} x {seq_len}", "fwd", _fmt(flops / ours / 1e9), _fmt(flops / stock / 1e9), f"{stock / ours:.2f}")
            out, lse = attention.attention_varlen_fwd(q, k, v, cu, scale)
            grad = torch.randn_like(out)
            ours = _time(lambda: attention.attention_varlen_bwd(grad, q, k, v, out, lse, cu, scale))
            qs_, ks_, vs_ = (x.detach().requires_grad_() for x in (qs, ks, vs))
            o = _sdpa(qs_, ks_, vs_)
            go = grad.view(num_seqs, seq_len, hq, d).transpose(1, 2)
            stock = _time(lambda: torch.autograd.grad(o, (qs_, ks_, vs_), go, retain_graph=True))
            pre.add(f"{num_seqs} x {seq_len}", "bwd", _fmt(2.5 * flops / ours / 1e9), _fmt(2.5 * flops / stock / 1e9),
                    f"{stock / ours:.2f}")
        dec = Table(f"attention decode, Qwen3-{name} (1 new token, paged BS=16, shuffled blocks)", "GB/s of KV read",
                    ["seqs", "context", "ours (paged)", "SDPA (dense)", "ratio"])
        block_size = 16
        for num_seqs in ROWS[:4]:
            for ctx in (1024, 8192):
                if num_seqs * ctx > 256 * 4096:
                    continue
                num_blocks = num_seqs * ctx // block_size
                k_cache, v_cache = (torch.randn(num_blocks, block_size, hkv, d, device="cuda", dtype=DT) for _ in range(2))
                table = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(num_seqs, -1)
                seq_lens = torch.full((num_seqs,), ctx, dtype=torch.int32, device="cuda")
                cu_q = torch.arange(num_seqs + 1, dtype=torch.int32, device="cuda")
                q = torch.randn(num_seqs, hq, d, device="cuda", dtype=DT)
                nbytes = 2 * num_seqs * ctx * hkv * d * 2
                ours = _time(lambda: attention.attention_paged_fwd(q, k_cache, v_cache, table, seq_lens, cu_q, scale))
                kd = torch.randn(num_seqs, hq, ctx, d, device="cuda", dtype=DT)
                vd = torch.randn_like(kd)
                qd = q.view(num_seqs, hq, 1, d)
                stock = _time(lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd))
                dec.add(num_seqs, ctx, _fmt(nbytes / ours / 1e6), _fmt(nbytes * group / stock / 1e6), f"{stock / ours:.2f}")
                del k_cache, v_cache, kd, vd
        tables += [pre, dec]


def bench_small(models, tables):
    cfg = MODELS[models[-1]]
    h, inter, vocab = cfg["hidden"], cfg["inter"], cfg["vocab"]
    tab = Table(f"memory-bound ops, Qwen3-{models[-1]} widths", "GB/s (bytes read + written)",
                ["op", "M", "ours", "torch eager", "ratio"])
    w = torch.randn(h, device="cuda", dtype=DT)
    cache = kernels.rope_cache(cfg["d"], 16384, 1_000_000.0).cuda()
    for m in ROWS:
        x, r = torch.randn(m, h, device="cuda", dtype=DT), torch.randn(m, h, device="cuda", dtype=DT)
        cases = [("rms_norm", 2 * m * h * 2, lambda: rms_norm.rms_norm_fwd(x, w, 1e-6),
                  lambda: torch.nn.functional.rms_norm(x, (h,), w, 1e-6)),
                 ("add_rms_norm", 4 * m * h * 2, lambda: rms_norm.add_rms_norm_fwd(x, r, w, 1e-6),
                  lambda: torch.nn.functional.rms_norm(x + r, (h,), w, 1e-6))]
        gu = torch.randn(m, 2 * inter, device="cuda", dtype=DT)
        cases.append(("silu_mul", 3 * m * inter * 2, lambda: activation.silu_mul_fwd(gu),
                      lambda: torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]))
        q = torch.randn(m, cfg["hq"], cfg["d"], device="cuda", dtype=DT)
        k = torch.randn(m, cfg["hkv"], cfg["d"], device="cuda", dtype=DT)
        pos = torch.randint(0, 16384, (m,), device="cuda")
        cases.append(("rope", 2 * (q.numel() + k.numel()) * 2, lambda: rope.rope_fwd(q, k, pos, cache, False),
                      lambda: _rope_eager(q, k, pos, cache)))
        if m <= 2048:
            logits = torch.randn(m, vocab, device="cuda", dtype=DT)
            ids = torch.randint(0, vocab, (m,), device="cuda")
            cases.append(("token_logprobs", m * vocab * 2, lambda: logprobs.token_logprobs_fwd(logits, ids, 0.7),
                          lambda: torch.log_softmax(logits.float() / 0.7, -1).gather(1, ids[:, None])))
        for op, nbytes, ours_fn, stock_fn in cases:
            ours, stock = _time(ours_fn), _time(stock_fn)
            tab.add(op, m, _fmt(nbytes / ours / 1e6), _fmt(nbytes / stock / 1e6), f"{stock / ours:.2f}")
    tables.append(tab)


def _rope_eager(q, k, pos, cache):
    half = q.shape[-1] // 2
    cs = cache[pos]
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def rot(x):
        x = x.float()
        return torch.cat([x[..., :half] * cos - x[..., half:] * sin, x[..., half:] * cos + x[..., :half] * sin], -1).to(DT)

    return rot(q), rot(k)


def sweep_linear(tables):
    """Load path and pipeline depth of the linear kernel (none changes the bits) at a few shapes."""
    tab = Table("linear variants (bits identical; speed only)", "TFLOP/s",
                ["N", "K", "M", "split", "tma", "stages", "ours", "cuBLAS"])
    for n, k in [(6144, 2048), (2048, 6144), (12288, 4096), (4096, 12288)]:
        w = torch.randn(n, k, device="cuda", dtype=DT)
        for m in (1, 64, 256, 2048, 8192):
            x = torch.randn(m, k, device="cuda", dtype=DT)
            flops = 2.0 * m * n * k
            stock = _time(lambda: torch.mm(x, w.t()))
            for split in (False, True):
                for tma in (True, False):
                    for stages in (3, 4, 5):
                        if (not tma and stages == 5) or (split and m >= 2048):
                            continue
                        try:
                            t = _time(lambda: linear._launch(x, w, None, DT, split=split, use_tma=tma, num_stages=stages))
                        except Exception as e:  # out of shared memory, say
                            tab.add(n, k, m, split, tma, stages, type(e).__name__, "")
                            continue
                        tab.add(n, k, m, split, tma, stages, _fmt(flops / t / 1e9), _fmt(flops / stock / 1e9))
    tables.append(tab)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="linear,attention,small")
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
    benches = [("linear", bench_linear), ("attention", bench_attention), ("small", bench_small)]
    for op, fn in benches:
        if op not in ops:
            continue
        for group in [[m] for m in models] if op != "small" else [models]:
            tables = []
            fn(group, tables)
            for t in tables:
                emit(t.render())
    if args.sweep:
        tables = []
        sweep_linear(tables)
        emit(tables[0].render())


if __name__ == "__main__":
    main()
