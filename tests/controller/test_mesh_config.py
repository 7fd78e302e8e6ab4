"""mesh_configs/*.yaml -> MeshConfig: the shipped files, placement, and one-line errors."""

import pickle

import pytest

from lockstep.actors.dist import Layout
from lockstep.controller.mesh_config import ROLES, available_mesh_configs, load_mesh_config

SHIPPED = ["h100x1", "h100x16", "h100x8", "h200x1", "h200x2", "h200x2-colocated", "h200x4", "local-2host", "local-cpu",
           "local-cpu-tp2"]

LOCAL = """
device: cpu
hosts: 1
procs: 5
launcher: {kind: local}
generator: {dp: 1, tp: 1}
trainer: {dp: 2, tp: 1}
reward: {procs: 2}
"""


def load_text(tmp_path, text: str, name: str = "mine"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return load_mesh_config(str(path))


def error_of(tmp_path, text: str) -> str:
    with pytest.raises(ValueError) as e:
        load_text(tmp_path, text)
    message = str(e.value)
    assert "\n" not in message, message
    return message


def test_every_shipped_config_loads_and_fits():
    assert available_mesh_configs() == SHIPPED
    for name in SHIPPED:
        cfg = load_mesh_config(name)
        assert cfg.name == name
        for role in ROLES:
            layout = cfg.layout(role)
            assert layout.num_procs == cfg.role(role).num_procs


def test_local_cpu_is_the_default_layout():
    cfg = load_mesh_config("local-cpu")
    assert cfg.device == "cpu" and cfg.launcher.kind == "local"
    assert cfg.layout("trainer") == Layout(role="trainer", dim_names=("dp_shard", "tp"), shape=(2, 1), device_type="cpu")
    assert cfg.layout("generator") == Layout(role="generator", dim_names=("dp", "tp"), shape=(1, 1), device_type="cpu")
    assert cfg.layout("reward") == Layout(role="reward", dim_names=("dp",), shape=(2,), device_type="cpu")
    assert all(cfg.gpu_ids(r) == [] for r in ROLES)
    assert pickle.loads(pickle.dumps(cfg.layout("trainer"))) == cfg.layout("trainer")


def test_gpu_placement_generator_first_then_trainer():
    h100x8 = load_mesh_config("h100x8")
    assert h100x8.gpu_ids("generator") == [0, 1, 2, 3]
    assert h100x8.gpu_ids("trainer") == [4, 5, 6, 7]
    assert h100x8.gpu_ids("reward") == []
    assert h100x8.layout("reward").device_type == "cpu"  # reward never takes a GPU

    h100x1 = load_mesh_config("h100x1")  # colocated: both on GPU 0, vLLM capped
    assert h100x1.colocate and h100x1.gpu_ids("generator") == h100x1.gpu_ids("trainer") == [0]
    assert h100x1.generator.gpu_memory_utilization == 0.3

    h100x16 = load_mesh_config("h100x16")  # generator host 0, trainer host 1, both from GPU 0
    assert h100x16.gpu_ids("generator", host=0) == list(range(8))
    assert h100x16.gpu_ids("trainer", host=0) == []
    assert h100x16.gpu_ids("trainer", host=1) == list(range(8))
    assert h100x16.launcher.kind == "slurm" and h100x16.launcher.worker_port == 22222


def test_unknown_mesh_name_lists_the_available_ones():
    with pytest.raises(ValueError) as e:
        load_mesh_config("h100x3")
    assert str(e.value) == (
        "unknown mesh config 'h100x3'; available: " + ", ".join(SHIPPED) + " (or pass a path to a .yaml file)"
    )


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"mesh config file '.*nope\.yaml' not found"):
        load_mesh_config(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize(
    "change, message",
    [
        # unknown keys, at every level
        ("fsdp: 2\n", "unknown key 'fsdp'; allowed here: device, hosts, gpus, procs, colocate, launcher, generator, trainer, reward"),
        ("trainer: {dp: 2, fsdp: 2}\n", "unknown key 'trainer.fsdp'; allowed here: dp, tp, hosts"),
        ("launcher: {kind: local, nodes: 2}\n",
         "unknown key 'launcher.nodes'; allowed here: kind, hosts, port, connect_timeout_s, partition, account, time_limit"),
        # wrong types
        ("trainer: {dp: two}\n", "trainer.dp must be int, got str 'two'"),
        ("trainer: {dp: true}\n", "trainer.dp must be int, got bool True"),
        ("reward: {procs: 2, hosts: 0}\n", "reward.hosts must be a list, got int 0"),
        ("generator: {gpu_memory_utilization: high}\n", "generator.gpu_memory_utilization must be float, got str 'high'"),
        ("trainer: 2\n", "trainer must be a mapping, got int 2"),
        # bad values and layouts that do not fit
        ("trainer: {dp: 0}\n", "trainer: dp must be >= 1, got 0"),
        ("trainer: {dp: 3, tp: 1}\n", "host 0 runs generator 1 + trainer 3 + reward 2 = 6 procs but procs=5"),
        ("device: tpu\n", "device must be one of ['cpu', 'cuda'], got 'tpu'"),
        ("launcher: {kind: k8s}\n", "launcher: kind must be one of ['local', 'processes', 'slurm', 'hosts'], got 'k8s'"),
        ("hosts: 2\n", "launcher local runs on this one machine but hosts=2; use kind processes (simulated hosts here), slurm or hosts"),
        ("launcher: {kind: local, port: 22222}\n", "launcher: port applies only to kinds slurm and hosts (kind is 'local')"),
        ("launcher: {kind: processes, partition: gpu}\n", "launcher: partition applies only to kind slurm (kind is 'processes')"),
        ("launcher: {kind: hosts, hosts: ['node-a:http']}\n",
         "launcher: host address 'node-a:http' must be NAME or NAME:PORT (e.g. node-a or node-a:22222)"),
        ("launcher: {kind: slurm, port: 0}\n", "launcher: port must be in 1..65535, got 0"),
        ("launcher: {kind: slurm, connect_timeout_s: 0}\n", "launcher: connect_timeout_s must be > 0, got 0.0"),
        ("trainer: {dp: 2, hosts: [1]}\n", "trainer.hosts [1] out of range: the mesh has hosts 0..0"),
        ("colocate: true\n", "colocate shares GPUs; remove it for device cpu"),
    ],
)
def test_malformed_config_is_one_clear_line(tmp_path, change, message):
    text = LOCAL + change  # a later YAML key replaces the earlier one
    assert error_of(tmp_path, text) == f"mesh config '{tmp_path / 'mine.yaml'}': {message}"


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "device: cuda\nhosts: 1\ngpus: 2\ngenerator: {dp: 1, tp: 2}\ntrainer: {dp: 1, tp: 1}\n",
            "host 0 needs sum of generator 2 + trainer 1 = 3 GPUs but gpus=2",
        ),
        (
            "device: cuda\nhosts: 1\ngpus: 1\ncolocate: true\ngenerator: {tp: 1}\ntrainer: {dp: 2}\n",
            "host 0 needs max of generator 1 + trainer 2 = 2 GPUs but gpus=1",
        ),
        ("device: cuda\nhosts: 1\nprocs: 4\n", "device cuda needs gpus (GPUs per host) and no procs"),
        (
            "device: cuda\nhosts: 2\ngpus: 8\nlauncher: {kind: slurm}\ntrainer: {dp: 3, hosts: [0, 1]}\n",
            "trainer: dp*tp=3 procs do not split evenly over 2 hosts",
        ),
        ("device: cuda\nhosts: 1\ngpus: 1\ngenerator: {gpu_memory_utilization: 1.5}\ncolocate: true\n",
         "generator: gpu_memory_utilization must be in (0, 1], got 1.5"),
        ("- device: cpu\n", "expected a mapping at the top level, got list"),
        (
            "device: cuda\nhosts: 2\ngpus: 8\nlauncher: {kind: slurm}\ngenerator: {dp: 1, tp: 4, hosts: [0, 1]}\n",
            "generator.tp=4 spans hosts (2 generator procs per host); a TP group must fit on one host: "
            "use a tp that divides 2",
        ),
    ],
)
def test_gpu_layouts_must_fit(tmp_path, text, message):
    assert error_of(tmp_path, text) == f"mesh config '{tmp_path / 'mine.yaml'}': {message}"


def test_role_spread_over_two_hosts(tmp_path):
    cfg = load_text(
        tmp_path,
        "device: cuda\nhosts: 2\ngpus: 8\nlauncher: {kind: hosts, hosts: [node-a, node-b]}\n"
        "generator: {dp: 2, tp: 2, hosts: [0]}\ntrainer: {dp: 2, tp: 4, hosts: [0, 1]}\n",
    )
    assert cfg.procs_per_host("trainer") == 4
    assert cfg.gpu_ids("generator", host=0) == [0, 1, 2, 3]
    assert cfg.gpu_ids("trainer", host=0) == [4, 5, 6, 7]  # after the generator's
    assert cfg.gpu_ids("trainer", host=1) == [0, 1, 2, 3]
    assert error_of(tmp_path, "device: cuda\nhosts: 2\ngpus: 8\nlauncher: {kind: hosts, hosts: [node-a]}\n") == (
        f"mesh config '{tmp_path / 'mine.yaml'}': launcher.hosts lists 1 addresses but hosts=2"
    )


def test_reward_gpus_after_the_policy_or_colocated(tmp_path):
    from lockstep.controller.meshes import proc_env

    own = load_text(tmp_path, "device: cuda\nhosts: 1\ngpus: 4\ngenerator: {dp: 1}\ntrainer: {dp: 1}\n"
                              "reward: {procs: 2, gpus: 1}\n")
    assert [own.gpu_ids(r) for r in ROLES] == [[0], [1], [2, 3]]
    assert own.layout("reward") == Layout(role="reward", dim_names=("dp",), shape=(2,), device_type="cuda")
    assert proc_env(own, "reward") == {"CUDA_VISIBLE_DEVICES": "2,3"}  # each proc then keeps its own one

    shared = load_text(tmp_path, "device: cuda\nhosts: 1\ngpus: 1\ncolocate: true\n"
                                 "reward: {procs: 1, gpus: 1, colocate: true}\n")
    assert [shared.gpu_ids(r) for r in ROLES] == [[0], [0], [0]]  # a reward model next to the policy

    two_each = load_text(tmp_path, "device: cuda\nhosts: 1\ngpus: 8\ngenerator: {dp: 2}\ntrainer: {dp: 2}\n"
                                   "reward: {procs: 2, gpus: 2}\n")
    assert two_each.gpu_ids("reward") == [4, 5, 6, 7]
    assert load_mesh_config("h100x8").gpu_ids("reward") == []  # no reward.gpus: CPU only, as before


@pytest.mark.parametrize(
    "text, message",
    [
        (LOCAL + "reward: {procs: 2, gpus: 1}\n", "reward.gpus=1 needs device cuda; remove it for device cpu"),
        (LOCAL + "reward: {procs: 2, colocate: true}\n",
         "reward: colocate shares GPUs but gpus is 0; set gpus (per reward proc) or drop colocate"),
        (LOCAL + "reward: {procs: 2, gpus: -1}\n", "reward: gpus must be >= 0 (GPUs per reward proc), got -1"),
        (LOCAL + "reward: {procs: 2, gpu: 1}\n", "unknown key 'reward.gpu'; allowed here: procs, gpus, colocate, hosts"),
        ("device: cuda\nhosts: 1\ngpus: 2\nreward: {procs: 2, gpus: 1}\n",
         "host 0 needs generator 1 + trainer 1 + reward 2 procs x 1 = 4 GPUs but gpus=2"),
        ("device: cuda\nhosts: 1\ngpus: 2\ncolocate: true\nreward: {procs: 3, gpus: 1, colocate: true}\n",
         "host 0 needs reward 3 procs x 1 = 3 GPUs (colocated) but gpus=2"),
    ],
)
def test_bad_reward_gpus_are_one_clear_line(tmp_path, text, message):
    assert error_of(tmp_path, text) == f"mesh config '{tmp_path / 'mine.yaml'}': {message}"


def test_placement_lists_every_proc_on_its_host_and_gpu(tmp_path):
    two_host = load_mesh_config("local-2host")
    assert two_host.launcher.kind == "processes" and two_host.hosts == 2
    assert [(p.role, p.host, p.rank, p.local_rank, p.gpus) for p in two_host.placement()] == [
        ("generator", 0, 0, 0, ()),
        ("trainer", 1, 0, 0, ()),
        ("trainer", 1, 1, 1, ()),
        ("reward", 0, 0, 0, ()),
        ("reward", 0, 1, 1, ()),
    ]
    h100x16 = load_mesh_config("h100x16")
    gpu_rows = [p for p in h100x16.placement() if p.gpus]
    assert len(gpu_rows) == 16 and {p.host for p in gpu_rows} == {0, 1}
    assert {(p.host, p.gpus) for p in gpu_rows} == {(h, (g,)) for h in (0, 1) for g in range(8)}  # each GPU once

    # A role spread over two hosts: rank r on hosts[r // 4], row-major over (dp_shard, tp).
    spread = load_text(
        tmp_path,
        "device: cuda\nhosts: 2\ngpus: 8\nlauncher: {kind: hosts, hosts: [node-a, 'node-b:23000']}\n"
        "generator: {dp: 2, tp: 2, hosts: [0]}\ntrainer: {dp: 2, tp: 4, hosts: [0, 1]}\n",
    )
    trainer = spread.placement("trainer")
    assert [(p.host, p.local_rank, p.gpus) for p in trainer] == [(0, i, (4 + i,)) for i in range(4)] + [(1, i, (i,)) for i in range(4)]
    assert trainer[5].coords == (("dp_shard", 1), ("tp", 1))
    reward_gpus = load_text(tmp_path, "device: cuda\nhosts: 1\ngpus: 8\ngenerator: {dp: 2}\ntrainer: {dp: 2}\n"
                                      "reward: {procs: 2, gpus: 2}\n", "reward")
    assert [p.gpus for p in reward_gpus.placement("reward")] == [(4, 5), (6, 7)]  # reward.gpus each
    assert spread.launcher.host_addresses() == [("node-a", 22222), ("node-b", 23000)]


def test_role_hosts_must_be_consecutive(tmp_path):
    text = "device: cpu\nhosts: 3\nprocs: 4\nlauncher: {kind: processes}\ntrainer: {dp: 2, hosts: [0, 2]}\n"
    assert error_of(tmp_path, text) == (
        f"mesh config '{tmp_path / 'mine.yaml'}': trainer: hosts must be consecutive host indices in increasing "
        "order (e.g. [0] or [1, 2]), got [0, 2]"
    )


def test_colocated_tp_shares_the_gpus_and_tp_must_split_the_model(tmp_path):
    from lockstep.controller.mesh_config import check_model_layout
    from lockstep.models.tiny import write_tiny_checkpoint

    colocated = load_mesh_config("h200x2-colocated")  # generator TP=2 and trainer FSDP 2 on GPUs 0-1
    assert colocated.gpu_ids("generator") == colocated.gpu_ids("trainer") == [0, 1]
    assert colocated.layout("generator").shape == (1, 2) and colocated.layout("trainer").shape == (2, 1)
    tiny = write_tiny_checkpoint(tmp_path / "tiny")  # 2 heads, 1 KV head, vocab 24
    check_model_layout(load_mesh_config("local-cpu-tp2"), "lockstep", tiny)  # the KV head is replicated
    trainer_tp = load_mesh_config("h200x4")
    trainer_tp.trainer.tp = 2
    with pytest.raises(ValueError, match=r"^mesh config 'h200x4': trainer.tp=2 does not split the model's "
                                         r"num_kv_heads=1; use a tp that divides it$"):
        check_model_layout(trainer_tp, "lockstep", tiny)
    with pytest.raises(ValueError, match=r"^mesh config 'h200x4': trainer.tp=2 runs lockstep's Qwen3 only; "
                                         r"set model.impl=lockstep or trainer.tp=1$"):
        check_model_layout(trainer_tp, "stock", tiny)
    wide = write_tiny_checkpoint(tmp_path / "wide", num_heads=2, num_kv_heads=2)
    with pytest.raises(ValueError, match="generator.tp=8 does not divide the model's num_heads=2"):
        mesh = load_mesh_config("h100x8")
        mesh.generator.tp = 8
        check_model_layout(mesh, "lockstep", wide)
