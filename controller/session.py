"""lockstep.Session: the meshes and the loop behind one object, for scripts and notebooks.

    with Session(mesh="local-cpu", loop={"steps": 20}) as s:   # or Session("run.yaml")
        s.run(5)                     # or s.step() -> metrics dict
        s.generate("12+7=")          # ad-hoc prompts -> list[Sample]
        s.set_reward(my_fn)          # swap the reward: a function or class, or "pkg.mod:name"
        s.metrics                    # history, one dict per step
        s.audit()                    # after a strict-barrier halt: the first module that differs

Every coroutine runs on one event loop owned by a daemon thread, so the same code works
under a plain script and inside Jupyter, whose own loop is already running.
"""

import asyncio
import dataclasses
import json
import os
import re
import sys
import threading
from typing import Callable

import monarch.actor
from monarch._rust_bindings.monarch_hyperactor.supervision import SupervisionError
from monarch.actor import ActorError
from tqdm.auto import tqdm

from lockstep.actors import weight_sync
from lockstep.actors.reward import RewardConfig, RewardFunctionConfig, RewardRunner, Scores, merge_scores, pack
from lockstep.actors.types import Sample
from lockstep.controller import audit as audit_mod
from lockstep.controller.audit import AuditReport, FailedSample
from lockstep.controller.barrier import BarrierError
from lockstep.controller.config import RunConfig, load_config, to_dict
from lockstep.controller.data import DEFAULT_REWARDS, PromptStream, load_source
from lockstep.controller.loop import Handles, generate, run_step
from lockstep.controller.mesh_config import load_mesh_config
from lockstep.controller.metrics import MetricsLogger
from lockstep.models import checkpoint_path


class _LoopThread:
    """One asyncio loop on a daemon thread; `run(coro)` blocks the caller until it finishes."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="lockstep-session", daemon=True)
        self._thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


class MeshError(RuntimeError):
    """An actor of a role died (e.g. its __init__ raised); the session cannot go on."""


_EXCEPTION_LINE = re.compile(r"^\s*([\w.]+(?:Error|Exception)\b.*)$", re.MULTILINE)


def _unwrap(e: BaseException, role: str) -> BaseException:
    """The clear error inside Monarch's wrappers (ActorError keeps the exception; a dead
    actor's SupervisionError only its traceback text, whose last exception line we keep)."""
    if isinstance(e, ActorError) and isinstance(e.exception, Exception):
        return e.exception
    if isinstance(e, SupervisionError):
        lines = _EXCEPTION_LINE.findall(str(e))
        return MeshError(f"the {role} actors failed: {lines[-1] if lines else str(e).splitlines()[0]}")
    return e


def _report_failure(failure) -> None:
    sys.stderr.write(f"lockstep: mesh {failure.mesh_name} failed; its calls raise MeshError\n")


class _MeshHandle:
    """An actor mesh as one object with async methods: every rank gets the call, rank 0 answers."""

    def __init__(self, mesh, name: str):
        self._mesh, self._name = mesh, name

    def __getattr__(self, endpoint: str) -> Callable:
        async def call(*args, **kwargs):
            values = await self._call(endpoint, *args, **kwargs)
            return values[0]

        return call

    async def _call(self, endpoint: str, *args, **kwargs) -> list:
        try:
            result = await getattr(self._mesh, endpoint).call(*args, **kwargs)
        except (ActorError, SupervisionError) as e:
            raise _unwrap(e, self._name) from e
        return [v for _, v in sorted(result.items(), key=lambda item: item[0].rank)]


class _RewardHandle(_MeshHandle):
    async def score(self, samples: list[Sample]) -> Scores:
        return merge_scores(await self._call("score", samples))


def _generator_replicas(mesh, num_replicas: int, tp: int) -> list[_MeshHandle]:
    """Replica i = procs [i*tp, (i+1)*tp) of the flat generator mesh (rank = dp * tp + tp_index)."""
    (dim,) = mesh.sizes
    return [_MeshHandle(mesh.slice(**{dim: slice(i * tp, (i + 1) * tp)}), f"generator[{i}]") for i in range(num_replicas)]


def _config_from(config, overrides: dict) -> RunConfig:
    """config: None (embedded default), a YAML path, a RunConfig or a dict; overrides: sections."""
    tree: dict = {}
    for key, value in overrides.items():
        if "__" in key:  # trainer__lr=1e-3 is trainer.lr
            section, field = key.split("__", 1)
            tree.setdefault(section, {})[field] = value
        elif isinstance(value, dict):
            tree.setdefault(key, {}).update(value)
        else:
            raise ValueError(f"Session({key}=...): pass a section dict (trainer={{'lr': 1e-3}}) or trainer__lr=1e-3")
    if isinstance(config, RunConfig):
        base = to_dict(config)
        for section, values in tree.items():
            base.setdefault(section, {}).update(values)
        return load_config(None, base) if tree else config
    if isinstance(config, dict):
        return load_config(None, _deep_merge(config, tree))
    return load_config(config, tree)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Session:
    """One RL run: start() spawns the meshes, step()/run() train, stop() tears down."""

    def __init__(self, config=None, mesh: str = "local-cpu", *, echo: bool = True, **overrides):
        self.config: RunConfig = _config_from(config, overrides)
        self.mesh_config = load_mesh_config(mesh)
        self._mesh_source = os.path.abspath(mesh) if os.path.isfile(mesh) else mesh  # how to load it again
        self.echo = echo
        self.policy_version = 0
        self.num_steps_done = 0
        self.last_failure: FailedSample | None = None  # what the strict barrier last halted on
        self._meshes = None
        self._handles: Handles | None = None
        self._reward_handle: _RewardHandle | None = None
        self._stream: PromptStream | None = None
        self._logger: MetricsLogger | None = None
        self._thread: _LoopThread | None = None
        self._previous_fault_hook = None

    # -- lifecycle --

    @property
    def started(self) -> bool:
        return self._handles is not None

    @property
    def metrics(self) -> list[dict]:
        return self._logger.history if self._logger else []

    @property
    def log_dir(self) -> str:
        return self.config.loop.log_dir

    def start(self) -> "Session":
        if self.started:
            return self
        # vLLM logs every engine start at INFO; the procs inherit this (VLLM_LOGGING_LEVEL=INFO shows them).
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        # Monarch's default answer to a dead actor is to interrupt the main thread (and a
        # notebook's kernel); while the session runs, the call on that actor raises instead.
        self._previous_fault_hook = monarch.actor.unhandled_fault_hook
        monarch.actor.unhandled_fault_hook = _report_failure
        self._thread = _LoopThread()
        try:
            self._thread.run(self._start())
        except BaseException:
            self.stop()
            raise
        return self

    def _require_started(self) -> None:
        if not self.started:
            raise RuntimeError("the session is not started; call start() (or use `with Session(...) as s:`)")

    def _run(self, coro):
        if not self.started:
            coro.close()
            self._require_started()
        return self._thread.run(coro)

    def _reward_config(self) -> RewardConfig:
        if self.config.reward.functions:
            return self.config.reward
        default = DEFAULT_REWARDS[self.config.data.source]
        if not default:
            raise ValueError(
                f"data.source={self.config.data.source} has no built-in reward; set reward.functions "
                "(e.g. reward.functions=my_pkg.rewards:fn) or call set_reward(fn)"
            )
        return RewardConfig(functions=[RewardFunctionConfig(fn=default)])

    async def _start(self) -> None:
        from lockstep.actors.generator import GeneratorActor
        from lockstep.actors.reward import RewardActor
        from lockstep.actors.trainer import TrainerActor
        from lockstep.controller.meshes import Meshes

        cfg = self.config
        cfg.loop.resolve_dirs()
        self._stream = PromptStream(load_source(cfg.data), cfg.data.prompts_per_step, cfg.data.seed)
        reward_cfg = self._reward_config()
        RewardRunner.from_config(reward_cfg)  # a bad dotted path fails here, before any proc starts
        # Write the tiny checkpoint once here, so every actor loads the same directory.
        model_cfg = dataclasses.replace(cfg.model, path=str(checkpoint_path(cfg.model)))

        self._meshes = meshes = Meshes(self.mesh_config)
        trainer = await meshes.spawn_role("trainer", TrainerActor, model_cfg, cfg.trainer, meshes.layout("trainer"))
        transport = weight_sync.transport_for(self.mesh_config.device, self.mesh_config.hosts)
        await weight_sync.start_store(await meshes.procs("trainer"), transport=transport)
        generator = await meshes.spawn_role(
            "generator", GeneratorActor, model_cfg, cfg.generator, meshes.layout("generator")
        )
        reward = await meshes.spawn_role("reward", RewardActor, reward_cfg)
        gen_role = self.mesh_config.generator
        self._reward_handle = _RewardHandle(reward, "reward")
        self._handles = Handles(
            generators=_generator_replicas(generator, gen_role.dp, gen_role.tp),
            trainer=_MeshHandle(trainer, "trainer"),
            reward=self._reward_handle,
        )
        await self._sync_generators()
        self._logger = MetricsLogger(cfg.loop.log_dir, echo=self.echo)
        with open(os.path.join(cfg.loop.log_dir, "config.json"), "w") as f:
            json.dump({"config": to_dict(cfg), "mesh": self.mesh_config.name, "mesh_source": self._mesh_source}, f, indent=2)

    async def _sync_generators(self) -> None:
        """Bring every generator to the trainer's version (after start, load or a failed step)."""
        handles = self._handles
        self.policy_version = await handles.trainer.version()
        versions = await asyncio.gather(*(g.version() for g in handles.generators))
        if any(v != self.policy_version for v in versions):
            await handles.trainer.push_weights(self.policy_version)
            await asyncio.gather(*(g.update_weights(self.policy_version) for g in handles.generators))

    def stop(self) -> None:
        """Stop every proc mesh; safe to call twice."""
        if self._thread is None:
            return
        try:
            if self._meshes is not None:
                self._thread.run(self._stop())
        finally:
            self._thread.close()
            self._thread = None
            self._handles = None
            if self._previous_fault_hook is not None:
                monarch.actor.unhandled_fault_hook, self._previous_fault_hook = self._previous_fault_hook, None
            if self._logger:
                self._logger.close()

    async def _stop(self) -> None:
        try:
            await weight_sync.stop_store()
        except Exception:
            pass  # the store may never have started; the procs go away below either way
        meshes, self._meshes = self._meshes, None
        await meshes.shutdown()

    def __enter__(self) -> "Session":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- training --

    def step(self) -> dict:
        """One on-policy step; returns its metrics. On error nothing is applied and the session stays usable."""
        return self._run(self._step())

    async def _step(self) -> dict:
        cfg = self.config
        prompts, fields = self._stream.next_batch()
        try:
            result = await run_step(
                self._handles, prompts, fields, self.policy_version,
                barrier=cfg.loop.barrier, temperature=cfg.generator.temperature,
                num_samples=cfg.generator.num_samples, step=self.num_steps_done + 1,
            )
        except BarrierError as e:
            if e.failed is not None:
                self.last_failure = e.failed
                e.args = (f"{e} {await self._keep_failure(e.failed)}",)
            raise
        except Exception:
            try:
                await self._sync_generators()  # e.g. trained but the sync failed: realign versions
            except Exception:
                pass  # the step's own error is the one to report
            raise
        self.policy_version = result.policy_version
        self.num_steps_done += 1
        self._logger.log(self.num_steps_done, result.metrics)
        return result.metrics

    async def _keep_failure(self, failed: FailedSample) -> str:
        """Save the failing sample and the weights it was sampled with under log_dir/audit/
        (for `lockstep audit --run`); returns the hint that ends the barrier's error."""
        path = os.path.abspath(os.path.join(self.log_dir, audit_mod.AUDIT_DIR))
        hint = "To find the first module whose outputs differ: session.audit()"
        try:
            os.makedirs(path, exist_ok=True)
            failed.save(os.path.join(path, audit_mod.FAILURE_FILE))
            await self._save(os.path.join(path, audit_mod.CHECKPOINT_DIR))
        except Exception as e:  # the halt is the news; a failed save only loses the CLI route
            return f"{hint} (saving it for the command line failed: {e!r})."
        return f"{hint}, or from a shell: lockstep audit --run {os.path.abspath(self.log_dir)} (sample and weights in {path})."

    def run(self, num_steps: int | None = None) -> list[dict]:
        """`num_steps` steps (default loop.steps), saving every loop.save_every; returns their metrics."""
        num_steps = self.config.loop.steps if num_steps is None else num_steps
        save_every = self.config.loop.save_every
        out = []
        # A bar only on a terminal (disable=None); the per-step console line is the log.
        quiet = True if not self.echo or num_steps < 2 else None
        for _ in tqdm(range(num_steps), desc="steps", unit="step", disable=quiet):
            out.append(self.step())
            if save_every and self.num_steps_done % save_every == 0:
                self.save()
        return out

    # -- interactive --

    def generate(self, prompts: str | list[str], n: int = 1, fields: list[dict] | None = None) -> list[Sample]:
        """Sample `n` completions per prompt with the current policy (not trained on)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        fields = fields or [{} for _ in prompts]
        self._require_started()
        return self._run(generate(self._handles.generators, prompts, fields, self.policy_version, n))

    def set_reward(self, fn: Callable | type | str | list[tuple], weight: float = 1.0, args: dict | None = None) -> None:
        """Replace the reward: one function or reward class (the object or "pkg.mod:name"), or a
        list of (fn, weight) / (fn, weight, args) to sum. `args`: a class's constructor arguments;
        the class is built once on each reward proc."""
        self._require_started()
        functions = fn if isinstance(fn, list) else [(fn, weight, args or {})]
        RewardRunner(functions)  # resolve here: a bad path, weight or args fails with a clear line
        self._run(self._reward_handle._call("set_functions", pack(functions)))

    def audit(self, target: FailedSample | Sample | str | None = None, *, token: int | None = None) -> AuditReport:
        """Re-run one sample on the generator and the trainer with every module's outputs
        recorded; report the first (position, module) whose outputs differ in any bit.

        target: None = the last strict-barrier failure; a FailedSample, or the path of one saved
        under a run's log_dir/audit/; or any Sample this session's generators made (e.g. from
        generate()), audited up to completion token `token` (default: its last).
        """
        self._require_started()
        failed = self._audit_target(target, token)
        if failed.sample.policy_version != self.policy_version:
            raise RuntimeError(
                f"the sample was made with weights v{failed.sample.policy_version}, the session is at "
                f"v{self.policy_version}; load the checkpoint saved with it (lockstep audit --run DIR does)"
            )
        report = self._run(audit_mod.run_audit(self._handles.generators, self._handles.trainer, failed))
        if self.echo:
            print(report.summary())
        return report

    def _audit_target(self, target, token: int | None) -> FailedSample:
        if target is None:
            if self.last_failure is None:
                raise RuntimeError("no strict-barrier failure in this session to audit; pass a sample: audit(sample)")
            target = self.last_failure
        if isinstance(target, str):
            target = FailedSample.load(target)
        if isinstance(target, Sample):
            target = FailedSample(sample=target, token_position=len(target.completion_ids) - 1,
                                  temperature=self.config.generator.temperature)
        if not isinstance(target, FailedSample):
            raise TypeError(f"audit(target): pass a FailedSample, a Sample or a path, not {type(target).__name__}")
        if token is not None:
            target = dataclasses.replace(target, token_position=token)
        return target

    # -- checkpoints --

    def save(self, path: str | None = None) -> str:
        """Trainer state (weights, optimizer) plus the controller's (step, version, data position)."""
        self._require_started()
        path = os.path.abspath(path or os.path.join(self.config.loop.checkpoint_dir, f"step_{self.num_steps_done:06d}"))
        return self._run(self._save(path))

    async def _save(self, path: str) -> str:
        os.makedirs(path, exist_ok=True)
        await self._handles.trainer.save(os.path.join(path, "trainer"))
        state = {
            "num_steps_done": self.num_steps_done,
            "policy_version": self.policy_version,
            "data": self._stream.state_dict(),
            "config": to_dict(self.config),
        }
        with open(os.path.join(path, "controller.json"), "w") as f:
            json.dump(state, f, indent=2)
        return path

    def load(self, path: str) -> None:
        """Restore a save(): trainer state, then generators pulled to the restored version."""
        with open(os.path.join(path, "controller.json")) as f:
            state = json.load(f)
        self._run(self._load(os.path.abspath(os.path.join(path, "trainer"))))
        if self.policy_version != state["policy_version"]:
            raise RuntimeError(
                f"checkpoint {path}: trainer restored version {self.policy_version} but the controller "
                f"saved {state['policy_version']}; the checkpoint is inconsistent"
            )
        self.num_steps_done = state["num_steps_done"]
        self._stream.load_state_dict(state["data"])

    async def _load(self, trainer_path: str) -> None:
        await self._handles.trainer.load(trainer_path)
        self.policy_version = await self._handles.trainer.version()
        # Always push: generators may hold a same-numbered version from another history.
        await self._handles.trainer.push_weights(self.policy_version)
        await asyncio.gather(*(g.update_weights(self.policy_version) for g in self._handles.generators))
