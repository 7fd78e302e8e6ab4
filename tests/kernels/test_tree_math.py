"""The reduction tree and the elementwise exp/log every kernel builds on."""

import math

import torch
from hypothesis import given, settings, strategies as st

from lockstep.kernels._math import det_exp, det_log
from lockstep.kernels._tree import tiled_sum, tree_fold

SETTINGS = settings(max_examples=30, deadline=None)


def _recursive_tree(parts, lo, hi):
    if hi - lo == 1:
        return parts[lo]
    mid = lo + (hi - lo + 1) // 2
    return _recursive_tree(parts, lo, mid) + _recursive_tree(parts, mid, hi)


@SETTINGS
@given(n=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_tree_fold_is_the_balanced_tree_and_shards_are_subtrees(n, seed):
    parts = torch.randn(n, 3, 5, generator=torch.Generator().manual_seed(seed))
    folded = tree_fold(parts)
    assert torch.equal(folded, _recursive_tree(parts, 0, n))
    for num_shards in (2, 4):
        if n % num_shards == 0:
            size = n // num_shards
            shard_sums = [tree_fold(parts[s * size : (s + 1) * size]) for s in range(num_shards)]
            assert torch.equal(tree_fold(shard_sums), folded)


@SETTINGS
@given(n=st.integers(1, 300), rows=st.integers(1, 64), seed=st.integers(0, 2**31 - 1))
def test_tiled_sum_row_does_not_depend_on_other_rows(n, rows, seed):
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed))
    full = tiled_sum(x, dim=-1, tile=32)
    i = seed % rows
    assert torch.equal(tiled_sum(x[i : i + 1], dim=-1, tile=32), full[i : i + 1])
    # Pairwise-sum bound: |err| <= (ceil(log2 n) + 1) * eps * sum |x|.
    bound = (math.ceil(math.log2(max(n, 2))) + 1) * 2**-24 * x.abs().double().sum(-1)
    assert ((full.double() - x.double().sum(-1)).abs() <= bound).all()


def test_det_exp_accuracy_and_edges():
    x = torch.cat([torch.linspace(-87.0, 88.0, 400_001), -torch.rand(100_000)])
    ref = torch.exp(x.double())
    rel = (det_exp(x).double() - ref).abs() / ref
    assert rel.max() < 2.0 * 2**-23  # within 2 ulp (torch.exp: ~1 ulp)
    edges = det_exp(torch.tensor([0.0, -math.inf, -100.0, 100.0, math.nan]))
    assert edges[0] == 1.0 and edges[1] == 0.0 and edges[2] == 0.0
    assert edges[3] == math.inf and math.isnan(edges[4])


def test_det_exp_element_bits_do_not_depend_on_tensor_size():
    x = -torch.rand(4099) * 20.0
    full = det_exp(x)
    for size in (1, 7, 16, 33, 1000):
        assert torch.equal(det_exp(x[-size:]), full[-size:])


def test_det_log_accuracy():
    x = torch.logspace(-30, 30, 100_001, dtype=torch.float64)
    assert ((det_log(x) - torch.log(x)).abs() / torch.log(x).abs().clamp(min=1e-300)).max() < 4 * 2**-52
    assert torch.equal(det_log(torch.tensor([1.0, 2.0])), torch.tensor([0.0, math.log(2.0)]))
