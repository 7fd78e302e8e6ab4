"""torchstore weight transfer between real Monarch proc meshes on CPU.

One trainer world (2 procs, FSDP-style Shard(0) DTensors on its ("dp_shard", "tp") = (2, 1)
mesh) pushes; generators in their own worlds pull into their own layouts: 1 proc with full
tensors, and 2 procs with TP Shard(1) DTensors. Every received tensor must be bitwise equal
(torch.equal) to the matching piece of the trainer's full weights.
"""

import asyncio
import os
import sys

import cloudpickle
import pytest
import torch
from monarch.actor import Actor, endpoint

from lockstep.actors import weight_sync
from lockstep.actors.dist import Layout, init_distributed
from lockstep.controller.mesh_config import MeshConfig, TrainerRole, GeneratorRole, RewardRole
from lockstep.controller.meshes import Meshes

# The procs cannot import this test module; Monarch pickles with cloudpickle, so send its
# actor classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

# name -> full shape; odd first dims check uneven FSDP shards (4 + 3 rows).
SHAPES = {
    "model.embed_tokens.weight": (7, 6),
    "model.layers.0.mlp.down_proj.weight": (5, 8),
    "model.norm.weight": (6,),
}


def full_weights(version: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + version)
    return {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}


class Proc(Actor):
    @endpoint
    async def pid(self) -> int:
        return os.getpid()


def _sharded(mesh, version: int) -> dict:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    return {n: distribute_tensor(t, mesh, [Shard(0), Replicate()]) for n, t in full_weights(version).items()}


class Trainer(Proc):
    def __init__(self, layout: Layout):
        self.layout = layout

    @endpoint
    async def set_max_part_bytes(self, num_bytes: int) -> None:
        weight_sync.MAX_PART_BYTES = num_bytes

    @endpoint
    async def init(self) -> None:
        init_distributed(self.layout)

    @endpoint
    async def fingerprint(self, version: int):
        """Of FSDP-style Shard(0) shards (odd first dims: uneven), replicated over tp."""
        return weight_sync.fingerprint(_sharded(init_distributed(self.layout), version), version)

    @endpoint
    async def push(self, version: int) -> None:
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh = init_distributed(self.layout)
        sharded = {n: distribute_tensor(t, mesh, [Shard(0), Replicate()]) for n, t in full_weights(version).items()}
        await weight_sync.push_state_dict(sharded, version)


class Generator(Proc):
    """Receives into plain full tensors (tp == 1) or TP DTensors: 2-D Shard(1), 1-D Replicate."""

    def __init__(self, layout: Layout):
        self.layout = layout

    @endpoint
    async def pull(self, version: int, inplace: bool = False) -> dict[str, torch.Tensor]:
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh = init_distributed(self.layout)
        zeros = {n: torch.zeros(s) for n, s in SHAPES.items()}
        if self.layout.size("tp") == 1:
            like = zeros
        else:
            like = {n: distribute_tensor(t, mesh["tp"], [Shard(1) if t.ndim == 2 else Replicate()]) for n, t in zeros.items()}
        if inplace:  # as a model's own weights: Parameters that require grad
            like = {n: torch.nn.Parameter(t) for n, t in like.items()}
        got = await weight_sync.pull_state_dict(version, like, inplace=inplace)
        if inplace:
            assert all(got[n] is like[n] for n in like), "inplace pull must return the receiver's own tensors"
        return {n: (t.to_local() if hasattr(t, "to_local") else t).detach() for n, t in got.items()}

    @endpoint
    async def fingerprint(self, version: int):
        """Of the pulled weights in this generator's own layout (full, or TP Shard(1))."""
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh = init_distributed(self.layout)
        like = {n: torch.zeros(s) for n, s in SHAPES.items()}
        if self.layout.size("tp") > 1:
            like = {n: distribute_tensor(t, mesh["tp"], [Shard(1) if t.ndim == 2 else Replicate()]) for n, t in like.items()}
        return weight_sync.fingerprint(await weight_sync.pull_state_dict(version, like), version)

    @endpoint
    async def push_plain(self, version: int) -> None:
        """A one-rank world pushing plain tensors (a trainer without FSDP)."""
        init_distributed(self.layout)
        await weight_sync.push_state_dict(full_weights(version), version)

    @endpoint
    async def pull_named(self, version: int, names: list[str]) -> None:
        await weight_sync.pull_state_dict(version, {n: torch.zeros(SHAPES.get(n, (1,))) for n in names})

    @endpoint
    async def keys(self) -> list[str]:
        return await weight_sync._policy_keys(await weight_sync._client())

    @endpoint
    async def latest(self) -> tuple[int | None, list[int]]:
        return await weight_sync.latest_version(), await weight_sync.stored_versions()


def _mesh_cfg(generator_tp: int) -> MeshConfig:
    return MeshConfig(
        name="test", device="cpu", procs=8,
        generator=GeneratorRole(dp=1, tp=generator_tp), trainer=TrainerRole(dp=2), reward=RewardRole(procs=1),
    )


@pytest.fixture(scope="module")
def meshes(proc_gone):
    """Trainer (2 procs, store volumes) + a 1-proc generator + a 2-proc TP generator."""
    full, tp = Meshes(_mesh_cfg(1)), Meshes(_mesh_cfg(2))
    loop = asyncio.new_event_loop()

    async def start():
        await asyncio.gather(full.start(("trainer", "generator")), tp.start(("generator",)))
        await weight_sync.start_store(await full.procs("trainer"))
        return {
            "trainer": await full.spawn_role("trainer", Trainer, full.layout("trainer")),
            "gen1": await full.spawn_role("generator", Generator, full.layout("generator")),
            "gen2": await tp.spawn_role("generator", Generator, tp.layout("generator")),
        }

    async def stop():
        try:
            await weight_sync.stop_store()
        finally:
            await asyncio.gather(full.shutdown(), tp.shutdown())

    handles = loop.run_until_complete(start())
    pids = [pid for h in handles.values() for _, pid in h.pid.call().get().items()]
    try:
        yield handles
    finally:
        loop.run_until_complete(stop())
        loop.close()
    assert all(proc_gone(pid) for pid in pids), "procs still alive after shutdown"



def _values(value_mesh) -> list:
    return [v for _, v in value_mesh.items()]


def test_fsdp_shards_reach_full_and_tp_generators_bitwise(meshes):
    assert _values(meshes["gen1"].latest.call().get())[0] == (None, [])
    meshes["trainer"].push.call(0).get()
    expected = full_weights(0)

    (full,) = _values(meshes["gen1"].pull.call(0, inplace=True).get())
    for name, t in expected.items():
        assert torch.equal(full[name], t), name

    per_rank = _values(meshes["gen2"].pull.call(0, inplace=True).get())
    for rank, local in enumerate(per_rank):
        for name, t in expected.items():
            piece = t.chunk(2, dim=1)[rank] if t.ndim == 2 else t
            assert torch.equal(local[name], piece), (rank, name)


def test_versions_are_isolated_and_old_ones_deleted(meshes):
    for version in (1, 2, 3):
        meshes["trainer"].push.call(version).get()
    latest, stored = _values(meshes["gen1"].latest.call().get())[0]
    assert latest == 3
    assert stored == [2, 3]  # the previous version stays for a generator still reading it

    (v2,) = _values(meshes["gen1"].pull.call(2).get())
    for name, t in full_weights(2).items():
        assert torch.equal(v2[name], t), name
    assert not torch.equal(v2["model.norm.weight"], full_weights(3)["model.norm.weight"])

    with pytest.raises(Exception, match="policy version 1 is not in the store"):
        meshes["gen1"].pull.call(1).get()


def test_plain_tensors_are_sliced_for_tp_receivers(meshes):
    meshes["gen1"].push_plain.call(7).get()
    expected = full_weights(7)
    for rank, local in enumerate(_values(meshes["gen2"].pull.call(7).get())):
        for name, t in expected.items():
            piece = t.chunk(2, dim=1)[rank] if t.ndim == 2 else t
            assert torch.equal(local[name], piece), (rank, name)


def test_name_or_shape_mismatch_is_a_clear_error(meshes):
    names = list(SHAPES)
    with pytest.raises(Exception, match=r"policy version 7: names differ from the receiver's; in store only: \['model.norm.weight'\], in receiver only: \['lm_head.weight'\]"):
        meshes["gen1"].pull_named.call(7, names[:-1] + ["lm_head.weight"]).get()


def test_one_key_per_trainer_rank_not_per_parameter(meshes):
    meshes["trainer"].push.call(8).get()
    keys = sorted(k for k in _values(meshes["gen1"].keys.call().get())[0] if k.startswith("policy/v8/"))
    assert keys == ["policy/v8/manifest", "policy/v8/rank0/part0", "policy/v8/rank1/part0"]


def test_a_buffer_over_the_part_size_travels_in_parts(meshes):
    meshes["trainer"].set_max_part_bytes.call(64).get()  # each rank's buffer is a few hundred bytes
    try:
        meshes["trainer"].push.call(9).get()
    finally:
        meshes["trainer"].set_max_part_bytes.call(256 << 20).get()
    keys = [k for k in _values(meshes["gen1"].keys.call().get())[0] if k.startswith("policy/v9/rank0/")]
    assert len(keys) > 2
    (full,) = _values(meshes["gen1"].pull.call(9).get())
    for name, t in full_weights(9).items():
        assert torch.equal(full[name], t), name


def test_fingerprints_do_not_depend_on_the_layout(meshes):
    """Trainer FSDP shards (uneven rows, replicated over tp), a full generator and a TP
    generator (column shards) report one fingerprint, the plain full tensors' one."""
    meshes["trainer"].push.call(11).get()
    expected = weight_sync.fingerprint(full_weights(11), 11)
    reports = [fp for name in ("trainer", "gen1", "gen2") for fp in _values(meshes[name].fingerprint.call(11).get())]
    assert len(reports) == 5 and all(fp == expected for fp in reports)


# --- fingerprints, in one process ------------------------------------------------------------


def _reference_checksum(t: torch.Tensor) -> int:
    """The definition, element by element: sum_i bits_i * A * (i + 1) mod M over 32-bit words."""
    m = weight_sync.FINGERPRINT_MODULUS
    words = t.contiguous().view(torch.int32) if t.element_size() >= 4 else t.contiguous().view(torch.int16)
    mask = (1 << (8 * words.element_size())) - 1
    return sum((b & mask) * (weight_sync._INDEX_MUL * (i + 1) % m) for i, b in enumerate(words.flatten().tolist())) % m


@pytest.mark.parametrize("chunk", [1 << 18, 1000])  # one pass per tensor (as on a GPU), or several
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fingerprint_is_the_sum_of_its_shards(dtype, chunk, monkeypatch):
    monkeypatch.setattr(weight_sync, "_CHUNK_ELEMENTS", chunk)
    t = torch.randn(9, 700, generator=torch.Generator().manual_seed(0)).to(dtype)
    (_, _, full), = weight_sync.fingerprint({"w": t}, 0).tensors.values()
    assert full == _reference_checksum(t)
    m, block = weight_sync.FINGERPRINT_MODULUS, weight_sync._block_checksum
    rows = (block(t[:5], (9, 700), (0, 0)) + block(t[5:], (9, 700), (5, 0))) % m  # FSDP, uneven
    cols = sum(block(t[:, a:b], (9, 700), (0, a)) for a, b in [(0, 350), (350, 700)]) % m  # TP
    grid = sum(block(t[r0:r1, c0:c1], (9, 700), (r0, c0)) for r0, r1 in [(0, 4), (4, 9)] for c0, c1 in [(0, 7), (7, 700)]) % m
    assert full == rows == cols == grid


def test_fingerprint_names_the_first_differing_weight():
    weights = full_weights(0)
    expected = weight_sync.fingerprint(weights, 3)
    nudged = {n: t.clone() for n, t in weights.items()}
    x = nudged["model.layers.0.mlp.down_proj.weight"]
    x[4, 7] = torch.nextafter(x[4, 7], torch.tensor(float("inf")))  # one ulp of one element
    assert expected.first_difference(weight_sync.fingerprint(weights, 3)) is None
    assert expected.first_difference(weight_sync.fingerprint(nudged, 3)).startswith(
        "model.layers.0.mlp.down_proj.weight differs (checksum 0x")
    swapped = {n: t.clone() for n, t in weights.items()}
    swapped["model.embed_tokens.weight"][[0, 1]] = swapped["model.embed_tokens.weight"][[1, 0]]  # rows moved
    assert expected.first_difference(weight_sync.fingerprint(swapped, 3)).startswith("model.embed_tokens.weight differs")
    assert expected.first_difference(weight_sync.fingerprint(weights, 4)) == "policy version v4 instead of v3"
    half = {n: t.to(torch.bfloat16) if n == "model.norm.weight" else t for n, t in weights.items()}
    assert expected.first_difference(weight_sync.fingerprint(half, 3)) == "model.norm.weight is bfloat16[6], not float32[6]"
    fewer = dict(list(weights.items())[:-1])
    assert expected.first_difference(weight_sync.fingerprint(fewer, 3)) == "model.norm.weight is missing"
