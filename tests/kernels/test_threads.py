"""Trainer and generator may run with different CPU thread counts: the bits must not move."""

import pytest
import torch

import lockstep.kernels as K


@pytest.fixture
def thread_counts():
    before = torch.get_num_threads()
    yield (1, 2)
    torch.set_num_threads(before)


def _all_ops(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(130, 96, generator=g)
    w = torch.randn(64, 96, generator=g)
    q, k, v = (torch.randn(130, h, 32, generator=g) for h in (4, 2, 2))
    cu = torch.tensor([0, 40, 130], dtype=torch.int32)
    logits = torch.randn(130, 600, generator=g)
    ids = torch.randint(0, 600, (130,), generator=g)
    return [
        K.linear(x, w),
        K.rms_norm(x, x[0], 1e-6),
        K.silu_mul(x),
        K.attention_varlen(q, k, v, cu, 0.2),
        K.token_logprobs(logits, ids, 0.9),
        K.log_softmax(logits),
    ]


def test_results_do_not_depend_on_thread_count(thread_counts):
    results = []
    for num_threads in thread_counts:
        torch.set_num_threads(num_threads)
        results.append(_all_ops(0))
    assert all(torch.equal(a, b) for a, b in zip(*results))
