"""GPU: the Triton linear is batch invariant, split/TMA-choice invariant, TP-combinable, accurate."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (N, K): 2 chains (K = 2048, 6144), 4 chains (4096, 12288), 1 chain (1024), K not a multiple
# of BLOCK_K or of 8 (1000, 100).
SHAPES = [(2048, 2048), (1024, 6144), (2048, 4096), (512, 12288), (200, 1024), (130, 1000), (64, 100)]


def _lin():
    from lockstep.kernels.triton import linear

    return linear


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
def test_rows_do_not_depend_on_batch(dtype, n, k):
    lin = _lin()
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(1100, k, device="cuda", dtype=dtype, generator=gen)
    w = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) / k**0.5
    full = lin.linear_fwd(x, w, None, dtype)
    # M crosses the decode split / one-program-per-tile switch (at N=2048: M <= 512 splits).
    for m in (1, 2, 3, 8, 17, 64, 129, 256, 513, 1100):
        idx = torch.randperm(1100, generator=gen, device="cuda")[:m]
        assert torch.equal(lin.linear_fwd(x[idx], w, None, dtype), full[idx]), f"M={m}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES[:5])
def test_grid_and_load_path_do_not_change_bits(dtype, n, k, monkeypatch):
    lin = _lin()
    x = torch.randn(300, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype)
    b = torch.randn(n, device="cuda", dtype=dtype)
    outs = [lin._launch(x, w, b, dtype, split=s, use_tma=t) for s in (False, True) for t in (False, True)]
    monkeypatch.setattr(lin, "_MAX_PARK_BYTES", 4 * n * 128)  # 4 chains: one launch per 128-row slab
    outs.append(lin._launch(x, w, b, dtype, split=False))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
def test_matches_float64(dtype, n, k):
    lin = _lin()
    x = torch.randn(77, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype)
    b = torch.randn(n, device="cuda", dtype=dtype)
    ref = x.double() @ w.double().T + b.double()
    # fp32 accumulation of exact products: ~1e-7 relative; outputs rounded to 8 (bf16) / 11 (fp16) bits.
    bound = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}[dtype]
    assert _rel(lin.linear_fwd(x, w, b, dtype), ref) < bound
    assert _rel(lin.linear_partial(x, w), x.double() @ w.double().T) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k,num_shards", [(2048, 2), (6144, 2), (4096, 2), (4096, 4), (12288, 4)])
def test_k_shards_combine_to_the_unsplit_result(dtype, k, num_shards):
    from lockstep.kernels import tree_combine

    lin = _lin()
    for m in (5, 1000):  # decode split and one program per tile
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        w = torch.randn(1024, k, device="cuda", dtype=dtype)
        cols = [slice(s * k // num_shards, (s + 1) * k // num_shards) for s in range(num_shards)]
        parts = [lin.linear_partial(x[:, c], w[:, c]) for c in cols]
        assert torch.equal(tree_combine(parts), lin.linear_partial(x, w))


def test_run_to_run_and_transposed_views():
    lin = _lin()
    x = torch.randn(500, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1536, 2048, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(lin.linear_fwd(x, w, None, x.dtype), lin.linear_fwd(x, w, None, x.dtype))
    g = torch.randn(500, 1536, device="cuda", dtype=torch.bfloat16)
    # The backward's operands: g @ W (w.t() view) and g^T @ x (two transposed views).
    gx = lin.linear_partial(g, w.t())
    gw = lin.linear_partial(g.t(), x.t())
    assert _rel(gx, g.double() @ w.double()) < 1e-5
    assert _rel(gw, g.double().T @ x.double()) < 1e-5
    assert torch.equal(gw, lin.linear_partial(g.t(), x.t()))


def test_custom_op_routes_to_triton_and_backward():
    from lockstep import kernels

    lin = _lin()
    x = torch.randn(3, 37, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = kernels.linear(x, w, b)
    assert torch.equal(y.reshape(-1, 1024), lin.linear_fwd(x.detach().reshape(-1, 2048), w.detach(), b.detach(), x.dtype))
    assert torch.equal(kernels.linear_partial(x, w).reshape(-1, 1024), lin.linear_partial(x.detach().reshape(-1, 2048), w.detach()))
    g = torch.randn_like(y)
    y.backward(g)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    (x64 @ w64.T + b64).backward(g.double())
    for got, ref in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert _rel(got, ref) < 5e-3  # bf16 gradients: one rounding of an fp32 accumulator


def test_bad_shapes_raise_one_clear_error():
    lin = _lin()
    x = torch.randn(4, 64, device="cuda")
    with pytest.raises(ValueError, match="must share K"):
        lin.linear_fwd(x, torch.randn(8, 32, device="cuda"), None, x.dtype)
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        lin.linear_fwd(x.double(), torch.randn(8, 64, device="cuda").double(), None, x.dtype)
