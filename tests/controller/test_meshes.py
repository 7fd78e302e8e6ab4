"""Proc meshes from a MeshConfig: real CPU procs join a gloo world and build the role's DeviceMesh."""

import asyncio
import os
import sys

import cloudpickle
import pytest
import torch
from monarch.actor import Actor, endpoint

from lockstep.actors.dist import init_distributed
from lockstep.controller.mesh_config import GeneratorRole, MeshConfig, RewardRole, TrainerRole, load_mesh_config
from lockstep.controller.meshes import Meshes, proc_env

# The procs cannot import this test module; Monarch pickles with cloudpickle, so send its actor by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Worker(Actor):
    def __init__(self, layout):
        self.layout = layout

    @endpoint
    async def all_reduce(self) -> dict:
        import torch.distributed as dist

        mesh = init_distributed(self.layout)
        assert init_distributed(self.layout) is mesh, "a second call must return the same mesh"
        total = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(total)
        tp_total = torch.tensor([1.0])
        dist.all_reduce(tp_total, group=mesh.get_group("tp"))
        return {
            "rank": dist.get_rank(),
            "backend": dist.get_backend(),
            "sum": total.item(),
            "tp_sum": tp_total.item(),
            "dims": mesh.mesh_dim_names,
            "shape": tuple(mesh.shape),
            "pid": os.getpid(),
        }



def test_two_cpu_procs_all_reduce_and_exit(proc_gone):
    cfg = MeshConfig(device="cpu", procs=4, trainer=TrainerRole(dp=2), generator=GeneratorRole(), reward=RewardRole())

    async def run():
        async with Meshes(cfg) as meshes:
            workers = await meshes.spawn_role("trainer", Worker, meshes.layout("trainer"))
            return [v for _, v in (await workers.all_reduce.call()).items()]

    results = asyncio.run(run())
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["backend"] == "gloo"
        assert r["sum"] == 3.0  # 1 + 2
        assert r["tp_sum"] == 1.0  # tp groups have one member each
        assert r["dims"] == ("dp_shard", "tp") and r["shape"] == (2, 1)
    assert all(proc_gone(r["pid"]) for r in results), "procs still alive after shutdown"


def test_gpu_env_gives_each_role_its_own_gpus(tmp_path):
    cfg = load_mesh_config("h100x8")
    assert proc_env(cfg, "generator") == {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert proc_env(cfg, "trainer") == {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert proc_env(cfg, "reward") == {"CUDA_VISIBLE_DEVICES": ""}
    assert proc_env(load_mesh_config("local-cpu"), "trainer") == {}
    h100x16 = load_mesh_config("h100x16")  # real hosts: each numbers its own GPUs from 0
    assert proc_env(h100x16, "trainer", host=1) == proc_env(h100x16, "generator", host=0) == {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    # Simulated hosts share this machine's GPUs: host 1 takes the next 4.
    path = tmp_path / "sim.yaml"
    path.write_text("device: cuda\nhosts: 2\ngpus: 4\nlauncher: {kind: processes}\n"
                    "generator: {dp: 2, hosts: [0]}\ntrainer: {dp: 4, hosts: [1]}\n")
    sim = load_mesh_config(str(path))
    assert proc_env(sim, "generator", host=0) == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert proc_env(sim, "trainer", host=1) == {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}


@pytest.mark.skipif(torch.cuda.device_count() >= 8, reason="this machine has 8 GPUs")
def test_gpu_mesh_on_a_small_machine_says_so():
    with pytest.raises(ValueError, match=r"^mesh config 'h100x8' wants 8 GPUs but this machine has \d+; pick a smaller mesh"):
        asyncio.run(Meshes(load_mesh_config("h100x8")).procs("generator"))


def test_init_distributed_outside_a_mesh_says_how(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="trainer: WORLD_SIZE is not set in this proc; spawn the role with controller.meshes.Meshes"):
        init_distributed(load_mesh_config("local-cpu").layout("trainer"))


def test_world_size_must_match_layout(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match=r"trainer: WORLD_SIZE=3 but layout \{'dp_shard': 2, 'tp': 1\} needs 2 procs"):
        init_distributed(load_mesh_config("local-cpu").layout("trainer"))
