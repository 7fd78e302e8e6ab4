"""The TP table: every matrix split on its output features, so rank outputs concatenate to the full layer."""

import pytest
import torch

from lockstep import kernels
from lockstep.models import ModelConfig, build_model
from lockstep.models.qwen3 import tp_placements, tp_shard, tp_shard_dim
from lockstep.models.qwen3.sharding import tp_rows

TP_SIZE = 2


def test_every_matrix_is_sharded_and_every_vector_replicated(tied_dir):
    model = build_model(ModelConfig(path=str(tied_dir)), "cpu")
    for name, tensor in model.state_dict().items():
        dim = tp_shard_dim(name)
        if tensor.ndim == 2:
            assert dim == 0, f"{name} is not split on its output features"
        else:
            assert dim is None, f"{name} ({tensor.ndim}-D) should be replicated"
    assert tp_shard_dim("layers.7.attention.wo.weight") == 0  # no reduction dim is ever split
    assert tp_shard_dim("layers.7.feed_forward.w3.weight") == 0
    assert set(tp_placements().values()) == {0}


def test_shards_concatenate_back_to_the_full_tensor():
    full = torch.arange(24.0).reshape(4, 6)
    for name in ["layers.0.attention.wq.weight", "layers.0.feed_forward.w2.weight"]:
        shards = [tp_shard(name, full, r, TP_SIZE) for r in range(TP_SIZE)]
        assert torch.equal(torch.cat(shards, 0), full)
    assert tp_shard("norm.weight", full, 1, TP_SIZE) is full
    with pytest.raises(ValueError, match="tp_size=3"):
        tp_shard("layers.0.feed_forward.w2.weight", full, 0, 3)


@torch.no_grad()
def test_rank_output_features_concatenate_to_the_full_layer_bit_for_bit(tied_dir):
    """Every sharded weight is split on its output features: rank r's linear over the full
    input is columns of the full one, bit for bit (the same kernel over the same K)."""
    model = build_model(ModelConfig(path=str(tied_dir)), "cpu")
    block = model.layers["1"]
    gen = torch.Generator().manual_seed(0)
    for name, weight in [("layers.1.attention.wo.weight", block.attention.wo.weight),
                         ("layers.1.feed_forward.w2.weight", block.feed_forward.w2.weight),
                         ("layers.1.attention.wq.weight", block.attention.wq.weight)]:
        x = torch.randn(9, weight.shape[1], generator=gen)
        parts = [kernels.linear(x, tp_shard(name, weight, r, TP_SIZE)) for r in range(TP_SIZE)]
        assert torch.equal(torch.cat(parts, dim=-1), kernels.linear(x, weight)), name


def test_kv_heads_replicate_when_tp_exceeds_them():
    # 2 KV heads of 32 rows over 4 ranks: ranks 0-1 hold head 0, ranks 2-3 head 1.
    rows = [tp_rows("layers.0.attention.wk.weight", 64, r, 4, num_kv_heads=2) for r in range(4)]
    assert rows == [(0, 32), (0, 32), (32, 32), (32, 32)]
    assert tp_rows("layers.0.attention.wq.weight", 256, 3, 4, num_kv_heads=2) == (192, 64)
