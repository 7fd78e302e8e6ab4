"""log_softmax / token_logprobs: batch invariance, temperature, accuracy, gradients."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lockstep.kernels import log_softmax, token_logprobs
from lockstep.kernels._tree import tree_fold
from lockstep.kernels.logprobs import TILE_V, _shift_and_log_sum

SETTINGS = settings(max_examples=25, deadline=None)


@SETTINGS
@given(
    t=st.integers(1, 64),
    v=st.integers(2, 1200),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    temperature=st.sampled_from([1.0, 0.7, 1.3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_rows_are_batch_invariant(t, v, dtype, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(t, v, generator=g) * 5).to(dtype)
    ids = torch.randint(0, v, (t,), generator=g)
    logp = log_softmax(logits, temperature)
    tok = token_logprobs(logits, ids, temperature)
    assert logp.dtype == tok.dtype == torch.float32
    # The per-token op is the full one gathered, bit for bit.
    assert torch.equal(tok, logp.gather(1, ids[:, None])[:, 0])
    i = seed % t
    assert torch.equal(token_logprobs(logits[i : i + 1], ids[i : i + 1], temperature), tok[i : i + 1])
    perm = torch.randperm(t, generator=g)
    assert torch.equal(log_softmax(logits[perm], temperature), logp[perm])
    assert torch.equal(token_logprobs(logits[perm], ids[perm], temperature), tok[perm])


def test_temperature_is_a_true_division_of_the_fp32_logits():
    logits = torch.randn(8, 300).bfloat16()
    ids = torch.randint(0, 300, (8,))
    for temperature in (0.7, 1.0, 3.0):
        # As vLLM's sampler: divide by a per-row fp32 temperature tensor.
        scaled = logits.float() / torch.full((8, 1), temperature, dtype=torch.float32)
        assert torch.equal(token_logprobs(logits, ids, temperature), token_logprobs(scaled, ids, 1.0))
        assert torch.equal(log_softmax(logits, temperature), log_softmax(scaled))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_accuracy_against_float64(temperature):
    logits = torch.randn(32, 1000) * 10
    ref = torch.log_softmax(logits.double() / temperature, -1)
    ours = log_softmax(logits, temperature).double()
    torch_fp32 = torch.log_softmax(logits / temperature, -1).double()
    # Stated bound: a few fp32 roundings of the terms z, max(z), logp (the fp32 division
    # alone is off by half an ulp of z); and no worse than 2x torch's own fp32 op.
    z = logits.double() / temperature
    scale = z.abs() + z.amax(-1, keepdim=True).abs() + ref.abs() + 1.0
    assert ((ours - ref).abs() <= 4 * 2**-24 * scale).all()
    assert (ours - ref).abs().max() <= 2 * (torch_fp32 - ref).abs().max() + 1e-7


def test_vocab_shards_are_subtrees():
    # Vocab parallel later: shard sums of exp(z - m) over whole tiles fold into the same bits.
    logits = torch.randn(5, 8 * TILE_V)
    z = logits.float()
    m = z.amax(-1, keepdim=True)
    from lockstep.kernels._math import det_exp, det_log
    from lockstep.kernels._tree import tiled_sum

    shards = [tiled_sum(det_exp(z[:, s * 2 * TILE_V : (s + 1) * 2 * TILE_V] - m), dim=-1, tile=TILE_V) for s in range(4)]
    _, log_sum = _shift_and_log_sum(z)
    assert torch.equal(det_log(tree_fold(shards)), log_sum[:, 0])


def test_gradients_against_float64():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(7, 333, generator=g) * 3).requires_grad_()
    ids = torch.randint(0, 333, (7,), generator=g)
    w = torch.randn(7, generator=g)
    (token_logprobs(logits, ids, 0.8) * w).sum().backward()
    l64 = logits.detach().double().requires_grad_()
    (torch.log_softmax(l64 / 0.8, -1).gather(1, ids[:, None])[:, 0] * w.double()).sum().backward()
    torch.testing.assert_close(logits.grad.double(), l64.grad, rtol=1e-5, atol=1e-6)

    gfull = torch.randn(7, 333, generator=g)
    logits.grad = l64.grad = None
    (log_softmax(logits, 0.8) * gfull).sum().backward()
    (torch.log_softmax(l64 / 0.8, -1) * gfull.double()).sum().backward()
    torch.testing.assert_close(logits.grad.double(), l64.grad, rtol=1e-5, atol=1e-5)


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="temperature"):
        log_softmax(torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="flatten"):
        token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))


def test_opcheck():
    logits = torch.randn(4, 50, requires_grad=True)
    torch.library.opcheck(torch.ops.lockstep.log_softmax, (logits, 0.9))
    torch.library.opcheck(torch.ops.lockstep.token_logprobs, (logits, torch.tensor([0, 3, 49, 7]), 0.9))
