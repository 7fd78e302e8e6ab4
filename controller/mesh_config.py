"""mesh_configs/*.yaml -> MeshConfig: hosts, devices, launcher and a layout per role.

    cfg = load_mesh_config("local-cpu")          # a bare name: the packaged file
    cfg = load_mesh_config("path/to/mine.yaml")  # or a path
    cfg.layout("trainer")                         # Layout(("dp_shard", "tp"), (2, 1), "cpu")
    cfg.gpu_ids("trainer", host=0)                # [] on CPU, e.g. [4, 5, 6, 7] on h100x8

Placement: a role runs on the hosts its `hosts` lists (consecutive indices, e.g. [0] or
[0, 1]), its procs split evenly over them in rank order: rank r is on hosts[r // per_host];
a TP group must fit on one host.
GPUs: on each host, the generator takes the first GPUs and the trainer the next ones, unless
`colocate: true`, where both share GPUs 0.. (one generator proc and one trainer proc per GPU,
e.g. generator tp=2 and trainer FSDP 2 on a 2-GPU host): the generator then keeps only
`generator.gpu_memory_utilization` of each GPU and the trainer uses the rest. One proc per
GPU. Reward procs use none unless `reward.gpus` (GPUs per reward proc, e.g. for a reward
model): they take the GPUs after the generator's and trainer's, or with `reward.colocate: true`
share theirs from GPU 0. `cfg.placement()` lists every proc (what --dry-run prints).
"""

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from lockstep.actors.dist import ROLE_DIM_NAMES, Layout

ROLES = ("generator", "trainer", "reward")
DEVICES = ("cpu", "cuda")
LAUNCHERS = ("local", "processes", "slurm", "hosts")
WORKER_LAUNCHERS = ("slurm", "hosts")  # hosts reached over TCP, where a Monarch worker listens
DEFAULT_WORKER_PORT = 22222  # Monarch's own default (SlurmJob, SSHJob)
# Workers in a fresh SLURM allocation start with the job (imports on a shared filesystem can be
# slow); `lockstep worker`s of kind hosts should already be up.
DEFAULT_CONNECT_TIMEOUT_S = {"slurm": 300.0, "hosts": 60.0}


@dataclass(kw_only=True, slots=True)
class LauncherConfig:
    """How the mesh's hosts are found; procs are then spawned on them through Monarch.

    local      this machine (hosts: 1)
    processes  `hosts` Monarch worker processes on this machine, each a simulated host (CI)
    slurm      one SLURM job of `hosts` nodes through Monarch's SlurmJob; run inside an
               allocation (SLURM_JOB_ID set), it attaches to `lockstep worker` on the job's nodes
    hosts      attaches to `lockstep worker` already running at `hosts` ("NAME" or "NAME:PORT")
    """

    kind: str = "local"
    hosts: list[str] = field(default_factory=list)  # kind hosts: one address per mesh host
    port: int | None = None  # kinds slurm, hosts: where `lockstep worker` listens (default 22222)
    connect_timeout_s: float | None = None  # kinds slurm, hosts: wait this long for every worker (default 300, 60)
    partition: str | None = None  # kind slurm; unset: the cluster's default
    account: str | None = None  # kind slurm
    time_limit: str | None = None  # kind slurm, e.g. "04:00:00"

    def __post_init__(self):
        if self.kind not in LAUNCHERS:
            raise ValueError(f"kind must be one of {list(LAUNCHERS)}, got {self.kind!r}")
        if self.hosts and self.kind != "hosts":
            raise ValueError(f"hosts is only for kind hosts (kind is {self.kind!r})")
        slurm_fields = [n for n in ("partition", "account", "time_limit") if getattr(self, n) is not None]
        if slurm_fields and self.kind != "slurm":
            raise ValueError(f"{_listed(slurm_fields)} only to kind slurm (kind is {self.kind!r})")
        worker_fields = [n for n in ("port", "connect_timeout_s") if getattr(self, n) is not None]
        if worker_fields and self.kind not in WORKER_LAUNCHERS:
            raise ValueError(f"{_listed(worker_fields)} only to kinds slurm and hosts (kind is {self.kind!r})")
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.connect_timeout_s is not None and not self.connect_timeout_s > 0:
            raise ValueError(f"connect_timeout_s must be > 0, got {self.connect_timeout_s}")
        for address in self.hosts:
            _split_address(address, DEFAULT_WORKER_PORT)  # raises on a malformed one

    @property
    def worker_port(self) -> int:
        return self.port or DEFAULT_WORKER_PORT

    @property
    def timeout_s(self) -> float:
        return self.connect_timeout_s or DEFAULT_CONNECT_TIMEOUT_S.get(self.kind, 60.0)

    def host_addresses(self) -> list[tuple[str, int]]:
        """kind hosts: (name, port) of each mesh host's worker."""
        return [_split_address(a, self.worker_port) for a in self.hosts]


@dataclass(kw_only=True, slots=True)
class GridRole:
    """A dp x tp grid of procs on `hosts` (indices into the mesh's hosts)."""

    dp: int = 1
    tp: int = 1
    hosts: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self):
        _check_positive(dp=self.dp, tp=self.tp)
        _check_hosts(self.hosts)
        if self.num_procs % len(self.hosts):
            raise ValueError(f"dp*tp={self.num_procs} procs do not split evenly over {len(self.hosts)} hosts")

    @property
    def num_procs(self) -> int:
        return self.dp * self.tp


@dataclass(kw_only=True, slots=True)
class GeneratorRole(GridRole):
    """vLLM engines: dp replicas, each tensor-parallel over tp GPUs."""

    # Fraction of each GPU vLLM may take; when set it overrides the run config's
    # generator.gpu_memory_utilization (it depends on the hardware split, e.g. colocate).
    gpu_memory_utilization: float | None = None

    def __post_init__(self):
        GridRole.__post_init__(self)
        u = self.gpu_memory_utilization
        if u is not None and not 0.0 < u <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {u}")


@dataclass(kw_only=True, slots=True)
class TrainerRole(GridRole):
    """TorchTitan: dp is the FSDP shard dim, tp the tensor-parallel dim."""


@dataclass(kw_only=True, slots=True)
class RewardRole:
    """Reward procs: rank r scores samples[r::procs], on `gpus` GPUs of its own (0: CPU only)."""

    procs: int = 1
    gpus: int = 0  # GPUs per reward proc (device cuda), e.g. for a reward model
    colocate: bool = False  # share the generator's and trainer's GPUs (from GPU 0) instead
    hosts: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self):
        _check_positive(procs=self.procs)
        _check_hosts(self.hosts)
        if self.procs % len(self.hosts):
            raise ValueError(f"procs={self.procs} do not split evenly over {len(self.hosts)} hosts")
        if self.gpus < 0:
            raise ValueError(f"gpus must be >= 0 (GPUs per reward proc), got {self.gpus}")
        if self.colocate and not self.gpus:
            raise ValueError("colocate shares GPUs but gpus is 0; set gpus (per reward proc) or drop colocate")

    @property
    def num_procs(self) -> int:
        return self.procs


@dataclass(frozen=True, slots=True)
class ProcPlacement:
    """Where one proc of a role runs (one row of --dry-run)."""

    role: str
    rank: int  # in the role's world (row-major over its layout)
    host: int  # mesh host index
    local_rank: int  # among the role's procs on that host (LOCAL_RANK)
    gpus: tuple[int, ...]  # GPU indices on that host; () on CPU
    coords: tuple[tuple[str, int], ...]  # (dim, index) in the role's layout, e.g. (("dp", 1), ("tp", 0))


@dataclass(kw_only=True, slots=True)
class MeshConfig:
    """Where every role runs. `gpus` (device cuda) or `procs` (device cpu) is per host."""

    name: str = ""  # filled by the loader from the file name
    device: str = "cpu"
    hosts: int = 1
    gpus: int | None = None  # GPUs per host (device cuda)
    procs: int | None = None  # max procs per host (device cpu)
    colocate: bool = False  # generator and trainer share the same GPUs (from GPU 0)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    generator: GeneratorRole = field(default_factory=GeneratorRole)
    trainer: TrainerRole = field(default_factory=TrainerRole)
    reward: RewardRole = field(default_factory=RewardRole)

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {list(DEVICES)}, got {self.device!r}")
        _check_positive(hosts=self.hosts)
        if self.device == "cuda" and (self.gpus is None or self.procs is not None):
            raise ValueError("device cuda needs gpus (GPUs per host) and no procs")
        if self.device == "cpu" and (self.procs is None or self.gpus is not None):
            raise ValueError("device cpu needs procs (procs per host) and no gpus")
        _check_positive(**({"gpus": self.gpus} if self.device == "cuda" else {"procs": self.procs}))
        if self.colocate and self.device != "cuda":
            raise ValueError("colocate shares GPUs; remove it for device cpu")
        if self.colocate and self.generator.hosts != self.trainer.hosts:
            raise ValueError("colocate needs generator.hosts == trainer.hosts")
        if self.reward.gpus and self.device != "cuda":
            raise ValueError(f"reward.gpus={self.reward.gpus} needs device cuda; remove it for device cpu")
        if self.launcher.kind == "local" and self.hosts != 1:
            raise ValueError(
                f"launcher local runs on this one machine but hosts={self.hosts}; "
                "use kind processes (simulated hosts here), slurm or hosts"
            )
        if self.launcher.kind == "hosts" and len(self.launcher.hosts) != self.hosts:
            raise ValueError(f"launcher.hosts lists {len(self.launcher.hosts)} addresses but hosts={self.hosts}")
        for role in ROLES:
            bad = [h for h in self.role(role).hosts if h >= self.hosts]
            if bad:
                raise ValueError(f"{role}.hosts {bad} out of range: the mesh has hosts 0..{self.hosts - 1}")
        for role in ("generator", "trainer"):
            spec, per_host = self.role(role), self.procs_per_host(role)
            if per_host % spec.tp:
                raise ValueError(f"{role}.tp={spec.tp} spans hosts ({per_host} {role} procs per host); "
                                 f"a TP group must fit on one host: use a tp that divides {per_host}")
        for host in range(self.hosts):
            self._check_fits(host)

    def role(self, role: str) -> GeneratorRole | TrainerRole | RewardRole:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {list(ROLES)}")
        return getattr(self, role)

    def procs_per_host(self, role: str) -> int:
        spec = self.role(role)
        return spec.num_procs // len(spec.hosts)

    def layout(self, role: str) -> Layout:
        spec = self.role(role)
        shape = (spec.procs,) if role == "reward" else (spec.dp, spec.tp)
        device_type = ("cuda" if self.reward.gpus else "cpu") if role == "reward" else self.device
        return Layout(role=role, dim_names=ROLE_DIM_NAMES[role], shape=shape, device_type=device_type)

    def gpu_ids(self, role: str, host: int = 0) -> list[int]:
        """GPU indices `role` uses on `host` (empty on CPU, for a CPU-only reward, or if the role is elsewhere)."""
        if self.device != "cuda" or host not in self.role(role).hosts:
            return []
        if role == "reward":
            start = 0 if self.reward.colocate else self._policy_gpus(host)
            return list(range(start, start + self.procs_per_host("reward") * self.reward.gpus))
        start = 0
        if role == "trainer" and not self.colocate and host in self.generator.hosts:
            start = self.procs_per_host("generator")
        return list(range(start, start + self.procs_per_host(role)))

    def _policy_gpus(self, host: int) -> int:
        """GPUs the generator and trainer take on `host`."""
        counts = [self.procs_per_host(r) for r in ("generator", "trainer") if host in self.role(r).hosts]
        return max(counts, default=0) if self.colocate else sum(counts)

    def gpus_per_proc(self, role: str) -> int:
        """GPUs each proc of `role` uses: 1 for the generator and trainer, reward.gpus for reward."""
        if self.device != "cuda":
            return 0
        return self.reward.gpus if role == "reward" else 1

    def placement(self, role: str | None = None) -> list[ProcPlacement]:
        """Every proc of `role` (default: all roles), in rank order."""
        if role is not None:
            self.role(role)  # raises on an unknown role
        rows = []
        for r in ROLES if role is None else (role,):
            spec, layout = self.role(r), self.layout(r)
            per_host, per_proc = self.procs_per_host(r), self.gpus_per_proc(r)
            for rank in range(spec.num_procs):
                host, local_rank = spec.hosts[rank // per_host], rank % per_host
                gpus = self.gpu_ids(r, host)[local_rank * per_proc:(local_rank + 1) * per_proc]
                index = [0] * len(layout.shape)
                rest = rank
                for d in reversed(range(len(layout.shape))):
                    rest, index[d] = divmod(rest, layout.shape[d])
                rows.append(ProcPlacement(
                    role=r, rank=rank, host=host, local_rank=local_rank,
                    gpus=tuple(gpus), coords=tuple(zip(layout.dim_names, index)),
                ))
        return rows

    def _check_fits(self, host: int) -> None:
        on_host = {r: self.procs_per_host(r) for r in ROLES if host in self.role(r).hosts}
        if self.device == "cpu":
            if sum(on_host.values()) > self.procs:
                raise ValueError(f"host {host} runs {_describe(on_host)} = {sum(on_host.values())} procs but procs={self.procs}")
            return
        gpu_roles = {r: n for r, n in on_host.items() if r != "reward"}
        used = max(gpu_roles.values(), default=0) if self.colocate else sum(gpu_roles.values())
        if used > self.gpus:
            how = "max" if self.colocate else "sum"
            raise ValueError(f"host {host} needs {how} of {_describe(gpu_roles)} = {used} GPUs but gpus={self.gpus}")
        reward_gpus = on_host.get("reward", 0) * self.reward.gpus
        if reward_gpus and (reward_gpus if self.reward.colocate else used + reward_gpus) > self.gpus:
            if self.reward.colocate:
                need = f"reward {on_host['reward']} procs x {self.reward.gpus} = {reward_gpus} GPUs (colocated)"
            else:
                need = f"{_describe(gpu_roles)} + reward {on_host['reward']} procs x {self.reward.gpus} = {used + reward_gpus} GPUs"
            raise ValueError(f"host {host} needs {need} but gpus={self.gpus}")


def load_mesh_config(name_or_path: str | Path) -> MeshConfig:
    """A bare name (e.g. "h100x8") loads the packaged mesh_configs/<name>.yaml; anything else is a path."""
    text, source, name = _read(str(name_or_path))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"mesh config {source}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"mesh config {source}: expected a mapping at the top level, got {type(data).__name__}")
    if "name" in data:
        raise ValueError(f"mesh config {source}: 'name' comes from the file name; remove it")
    try:
        return _build(MeshConfig, {**data, "name": name}, "")
    except ValueError as e:
        raise ValueError(f"mesh config {source}: {e}") from None


def available_mesh_configs() -> list[str]:
    files = resources.files("lockstep.mesh_configs").iterdir()
    return sorted(f.name.removesuffix(".yaml") for f in files if f.name.endswith(".yaml"))


def _read(name_or_path: str) -> tuple[str, str, str]:
    """(yaml text, where it came from for messages, config name)."""
    if "/" not in name_or_path and not name_or_path.endswith((".yaml", ".yml")):
        names = available_mesh_configs()
        if name_or_path not in names:
            raise ValueError(f"unknown mesh config {name_or_path!r}; available: {', '.join(names)} (or pass a path to a .yaml file)")
        text = resources.files("lockstep.mesh_configs").joinpath(f"{name_or_path}.yaml").read_text()
        return text, repr(name_or_path), name_or_path
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"mesh config file {str(path)!r} not found")
    return path.read_text(), repr(str(path)), path.stem


def _build(cls, data, where: str):
    """Typed construction of dataclass `cls` from YAML data; errors name the dotted key."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'top level'} must be a mapping, got {_show(data)}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ValueError(f"unknown key {_dotted(where, unknown[0])!r}; allowed here: {', '.join(n for n in names if n != 'name')}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _convert(hints[k], v, _dotted(where, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{where}: {e}" if where else str(e)) from None


def _convert(hint, value, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {_show(value)}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
    }[hint]
    if not ok:
        raise ValueError(f"{where} must be {hint.__name__}, got {_show(value)}")
    return float(value) if hint is float else value


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")


def _check_hosts(hosts: list[int]) -> None:
    # Consecutive, so a role's hosts are one slice of the host mesh.
    if not hosts or hosts[0] < 0 or hosts != list(range(hosts[0], hosts[0] + len(hosts))):
        raise ValueError(f"hosts must be consecutive host indices in increasing order (e.g. [0] or [1, 2]), got {hosts}")


def _split_address(address: str, default_port: int) -> tuple[str, int]:
    """"node-a", "node-a:22222", "[fd00::1]:22222" -> (name, port)."""
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:/\[\]\s]+)(?::(\d+))?", address)
    if match is None or (match[2] and not 0 < int(match[2]) < 65536):
        raise ValueError(f"host address {address!r} must be NAME or NAME:PORT (e.g. node-a or node-a:22222)")
    return match[1].strip("[]"), int(match[2]) if match[2] else default_port


def _listed(keys: list[str]) -> str:
    return f"{', '.join(keys)} {'applies' if len(keys) == 1 else 'apply'}"


def _dotted(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _describe(counts: dict[str, int]) -> str:
    return " + ".join(f"{role} {n}" for role, n in counts.items()) or "nothing"


def _show(value) -> str:
    return f"{type(value).__name__} {value!r}"


def check_model_layout(mesh: MeshConfig, impl: str, model_dir: str | Path) -> None:
    """One-line ValueError unless each role's tp splits the model in `model_dir` (config.json).

    Called before any proc starts. impl=stock: vLLM checks its own TP; the trainer's TP runs
    lockstep's Qwen3 only."""
    from lockstep.models.qwen3 import Qwen3Config
    from lockstep.models.qwen3.sharding import check_tp

    config = Qwen3Config.from_hf(model_dir)
    where = f"mesh config {mesh.name!r}"
    if impl == "lockstep":
        check_tp(config, mesh.generator.tp, field=f"{where}: generator.tp")
    if mesh.trainer.tp > 1:
        if impl != "lockstep":
            raise ValueError(f"{where}: trainer.tp={mesh.trainer.tp} runs lockstep's Qwen3 only; "
                             "set model.impl=lockstep or trainer.tp=1")
        check_tp(config, mesh.trainer.tp, field=f"{where}: trainer.tp", trainer=True)
