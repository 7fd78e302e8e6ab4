"""GPU: with no Triton function (the fallback), the plain references keep their invariants on CUDA."""

import sys

import pytest
import torch

import lockstep.kernels as K
from lockstep.kernels import _dispatch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


@pytest.fixture
def no_triton(monkeypatch):
    monkeypatch.setattr(_dispatch, "triton_fn", lambda module, name: None)
    for mod in ("linear", "rms_norm", "activation", "rope", "attention", "kv_cache", "logprobs"):
        # sys.modules: `lockstep.kernels.linear` the attribute is the function, not the module.
        monkeypatch.setattr(sys.modules[f"lockstep.kernels.{mod}"], "triton_fn", lambda module, name: None)


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_rows_are_batch_invariant_on_cuda(no_triton, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, 256, device="cuda", generator=g).to(dtype)
    w = torch.randn(96, 256, device="cuda", generator=g).to(dtype)
    norm_w = torch.randn(256, device="cuda", generator=g).to(dtype)
    for fn in (
        lambda t: K.linear(t, w),
        lambda t: K.rms_norm(t, norm_w, 1e-6),
        lambda t: K.silu_mul(t),
        lambda t: K.log_softmax(t, 0.7),
    ):
        full = fn(x)
        assert torch.equal(fn(x[5:6]), full[5:6])
    parts = [K.linear_partial(x[:, 64 * r : 64 * (r + 1)], w[:, 64 * r : 64 * (r + 1)]) for r in range(4)]
    assert torch.equal(K.tree_combine(parts), K.linear_partial(x, w))


def test_reference_attention_paged_equals_varlen_on_cuda(no_triton):
    g = torch.Generator(device="cuda").manual_seed(1)
    lens, block_size = [7, 50], 16
    q, k, v = (torch.randn(57, h, 64, device="cuda", generator=g) for h in (4, 2, 2))
    full = K.attention_varlen(q, k, v, _cu(lens), 0.125)
    k_cache = torch.full((10, block_size, 2, 64), float("nan"), device="cuda")
    v_cache = torch.full_like(k_cache, float("nan"))
    table = torch.tensor([[9, 0, 0, 0], [3, 1, 7, 5]], dtype=torch.int32, device="cuda")
    pos = torch.cat([torch.arange(7), torch.arange(50)]).cuda()
    seq = torch.cat([torch.zeros(7), torch.ones(50)]).long().cuda()
    slots = table[seq, pos // block_size].long() * block_size + pos % block_size
    K.write_kv_cache(k, v, k_cache, v_cache, slots)
    prefill = K.attention_paged(q, k_cache, v_cache, table, torch.tensor(lens, device="cuda"), _cu(lens), 0.125)
    assert torch.equal(prefill, full)
    last = torch.tensor([6, 56], device="cuda")
    decode = K.attention_paged(q[last], k_cache, v_cache, table, torch.tensor(lens, device="cuda"), _cu([1, 1]), 0.125)
    assert torch.equal(decode, full[last])


def test_reference_temperature_is_a_true_division_on_cuda(no_triton):
    logits = torch.randn(16, 500, device="cuda")
    ids = torch.randint(0, 500, (16,), device="cuda")
    scaled = logits / torch.full((16, 1), 0.7, device="cuda")  # vLLM's sampler
    assert torch.equal(K.token_logprobs(logits, ids, 0.7), K.token_logprobs(scaled, ids, 1.0))
