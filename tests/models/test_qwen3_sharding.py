"""The TP table: it covers every matrix, and per-rank shards recombine to the full layer."""

import dataclasses

import pytest
import torch

from lockstep.models import ModelConfig, build_model
from lockstep.models.qwen3 import VarlenMeta, tp_placements, tp_shard, tp_shard_dim
from lockstep.models.qwen3.model import Attention, FeedForward, default_attn_factory

TP_SIZE = 2


def test_every_matrix_is_sharded_and_every_vector_replicated(tied_dir):
    model = build_model(ModelConfig(path=str(tied_dir)), "cpu")
    for name, tensor in model.state_dict().items():
        dim = tp_shard_dim(name)
        if tensor.ndim == 2:
            assert dim in (0, 1), f"{name} has no TP layout"
        else:
            assert dim is None, f"{name} ({tensor.ndim}-D) should be replicated"
    assert tp_shard_dim("layers.7.attention.wo.weight") == 1
    assert tp_shard_dim("layers.7.feed_forward.w3.weight") == 0
    assert set(tp_placements().values()) == {0, 1}


def test_shards_concatenate_back_to_the_full_tensor():
    full = torch.arange(24.0).reshape(4, 6)
    for name, dim in [("layers.0.attention.wq.weight", 0), ("layers.0.feed_forward.w2.weight", 1)]:
        shards = [tp_shard(name, full, r, TP_SIZE) for r in range(TP_SIZE)]
        assert torch.equal(torch.cat(shards, dim), full)
    assert tp_shard("norm.weight", full, 1, TP_SIZE) is full
    with pytest.raises(ValueError, match="tp_size=4"):
        tp_shard("layers.0.feed_forward.w2.weight", full, 0, 4)


@torch.no_grad()
def test_rank_partial_outputs_sum_to_the_full_block(tied_dir):
    """colwise in, rowwise out: the sum over ranks of each rank's output is the full output."""
    model = build_model(ModelConfig(path=str(tied_dir)), "cpu")
    cfg = model.config
    rank_cfg = dataclasses.replace(cfg, num_heads=cfg.num_heads // TP_SIZE, num_kv_heads=cfg.num_kv_heads // TP_SIZE,
                                   intermediate_size=cfg.intermediate_size // TP_SIZE)
    x = torch.randn(9, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(9)
    meta = VarlenMeta(torch.tensor([0, 4, 9], dtype=torch.int32))
    block = model.layers["1"]

    attn_sum = ffn_sum = 0
    for rank in range(TP_SIZE):
        attn = Attention(1, rank_cfg, default_attn_factory)
        attn.load_state_dict({k: tp_shard(f"layers.1.attention.{k}", v, rank, TP_SIZE)
                              for k, v in block.attention.state_dict().items()})
        attn_sum = attn_sum + attn(x, model.rope_cache, positions, meta)
        ffn = FeedForward(cfg.hidden_size, rank_cfg.intermediate_size)
        ffn.load_state_dict({k: tp_shard(f"layers.1.feed_forward.{k}", v, rank, TP_SIZE)
                             for k, v in block.feed_forward.state_dict().items()})
        ffn_sum = ffn_sum + ffn(x)
    # summation order differs from the full matmul: close, not equal
    torch.testing.assert_close(attn_sum, block.attention(x, model.rope_cache, positions, meta), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ffn_sum, block.feed_forward(x), atol=1e-5, rtol=1e-5)
