"""GPU: the Triton linear is batch invariant, grid/tile/TMA/fold-choice invariant, chain-exact, accurate."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (N, K): 4, 12, 8 and 24 chains of 512 (K = 2048, 6144, 4096, 12288), 2 (1024), K not a
# multiple of the chain, of BLOCK_K or of 8 (1000, 100).
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
    # M crosses the small/big tile switch (64) and the split / one-program-per-tile switch.
    for m in (1, 2, 3, 8, 17, 64, 65, 129, 256, 513, 1100):
        idx = torch.randperm(1100, generator=gen, device="cuda")[:m]
        assert torch.equal(lin.linear_fwd(x[idx], w, None, dtype), full[idx]), f"M={m}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES[:5])
def test_grid_tiles_load_path_and_fold_do_not_change_bits(dtype, n, k):
    lin = _lin()
    b = torch.randn(n, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype)
    for m in (3, 300):  # decode-sized and prefill-sized
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        outs = [lin._launch(x, w, b, dtype, split=s, use_tma=t, tiles=tiles, fold_in_kernel=f)
                for s in (False, True) for t in (False, True) for tiles in ("big", "small") for f in (False, True)]
        for o in outs[1:]:
            assert torch.equal(o, outs[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [2048, 1000, 6144])
def test_chains_add_left_to_right(dtype, k):
    """The documented arithmetic: each 512-column chain alone (a one-chain linear_partial), the
    chain partials added in order from zero; the split path's counters leave no state behind."""
    lin = _lin()
    for m in (5, 1000):  # split (ordered fold of per-chain programs) and one program per tile
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        w = torch.randn(1024, k, device="cuda", dtype=dtype)
        total = torch.zeros(m, 1024, device="cuda")
        for c0 in range(0, k, lin.CHAIN_K):
            total = total + lin.linear_partial(x[:, c0 : c0 + lin.CHAIN_K].contiguous(), w[:, c0 : c0 + lin.CHAIN_K].contiguous())
        assert torch.equal(lin.linear_partial(x, w), total)
        assert torch.equal(lin.linear_partial(x, w), total)  # again: the tile counters were re-armed
    assert not lin._counters(torch.device("cuda")).any()


def test_group_equals_separate_linears():
    """q/k/v as consecutive rows of one buffer: one launch, the bits of three linears; any other
    layout falls back to one launch per weight, same bits."""
    from lockstep import kernels

    lin = _lin()
    widths = (2048, 1024, 1024)
    buffer = torch.randn(sum(widths), 1024, device="cuda", dtype=torch.bfloat16) / 32
    packed = list(buffer.split(widths))
    loose = [w.clone() for w in packed]
    assert lin._adjacent(packed) is not None and lin._adjacent(loose) is None
    for m in (1, 7, 64, 65, 256, 3000):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        want = torch.cat([lin.linear_fwd(x, w, None, x.dtype) for w in loose], dim=1)
        assert torch.equal(lin.linear_group_fwd(x, packed, x.dtype), want), m
        assert torch.equal(lin.linear_group_fwd(x, loose, x.dtype), want), m
        assert torch.equal(kernels.linear_group(x, packed), want), m


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
