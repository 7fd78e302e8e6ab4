"""FSDP2 on lockstep's Qwen3 (single-process gloo group, world size 1): same forward, same grads.

Untied: TorchTitan's own apply_fsdp works unchanged (module names match). Tied: TorchTitan
0.2.2's apply_fsdp shards tok_embeddings and output in different groups, which FSDP2
refuses for a shared parameter (its own Qwen3 fails the same way); grouping the embedding
with norm + output is the fix the trainer needs.
"""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lockstep.models import ModelConfig, build_model
from lockstep.models.qwen3 import VarlenMeta


@pytest.fixture
def mesh(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,), mesh_dim_names=("fsdp",))
    dist.destroy_process_group()


def shard_untied_with_torchtitan(model, mesh):
    from torchtitan.models.llama4.infra.parallelize import apply_fsdp

    apply_fsdp(model, mesh, param_dtype=torch.float32, reduce_dtype=torch.float32, pp_enabled=False)


def shard_tied(model, mesh):
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard([model.tok_embeddings, model.norm, model.output], mesh=mesh)
    fully_shard(model, mesh=mesh)


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_fsdp_model_matches_the_plain_one(mesh, which, tied_dir, untied_dir):
    path = str(tied_dir if which == "tied" else untied_dir)
    plain = build_model(ModelConfig(path=path), "cpu")
    sharded = build_model(ModelConfig(path=path), "cpu")
    (shard_tied if which == "tied" else shard_untied_with_torchtitan)(sharded, mesh)
    tokens, positions = torch.tensor([5, 6, 7, 8, 9]), torch.tensor([0, 1, 2, 0, 1])
    meta = VarlenMeta(torch.tensor([0, 3, 5], dtype=torch.int32))
    outs = [m.logits(m(tokens, positions, meta)) for m in (sharded, plain)]
    assert torch.equal(outs[0], outs[1])
    for out in outs:
        out.square().mean().backward()
    for (name, p_sharded), (_, p_plain) in zip(sharded.named_parameters(), plain.named_parameters()):
        assert torch.equal(p_sharded.grad.full_tensor(), p_plain.grad), name
