"""lockstep.Session: the meshes and the loop behind one object, for scripts and notebooks.

    with Session(mesh="local-cpu", loop={"steps": 20}) as s:   # or Session("run.yaml")
        s.run(5)                     # or s.step() -> metrics dict
        s.generate("12+7=")          # ad-hoc prompts -> list[Sample]
        s.set_reward(my_fn)          # swap the reward: a function or class, or "pkg.mod:name"
        s.metrics                    # history, one dict per step
        s.save() / s.load(path)      # checkpoints (controller/checkpoint.py)
        s.audit()                    # after a strict-barrier halt: the first module that differs

    with Session.resume("runs/<stamp>") as s:    # continue a run from its latest checkpoint
        s.run()                                  # the steps it has left, bit for bit

Every coroutine runs on one event loop owned by a daemon thread (controller/event_loop.py);
actor calls go through controller/handles.py (timeouts, one-line errors).
"""

import asyncio
import dataclasses
import json
import os
import sys
import time
from typing import Callable

import monarch.actor
from tqdm.auto import tqdm

from lockstep.actors import weight_sync
from lockstep.actors.reward import RewardConfig, RewardFunctionConfig, RewardRunner, pack
from lockstep.actors.types import Sample
from lockstep.controller import audit as audit_mod
from lockstep.controller import checkpoint
from lockstep.controller.audit import AuditReport, FailedSample
from lockstep.controller.barrier import BarrierError
from lockstep.controller.config import ConfigError, RunConfig, load_config, to_dict
from lockstep.controller.data import DEFAULT_REWARDS, PromptStream, load_source, prompt_token_counts
from lockstep.controller.event_loop import LoopThread
from lockstep.controller.handles import ActorTimeout, MeshError, MeshHandle, RewardHandle, generator_replicas, report_failure
from lockstep.controller.loop import Handles, WeightMismatchError, generate, run_step
from lockstep.controller.mesh_config import check_model_layout, load_mesh_config
from lockstep.controller.metrics import DROPPED_PROMPTS, MetricsLogger
from lockstep.models import checkpoint_path

__all__ = ["Session", "MeshError", "ActorTimeout"]

RUN_CONFIG_FILE = "config.json"  # in the log dir: the run's config and mesh, for --resume and audit


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
        self._reward_handle: RewardHandle | None = None
        self._stream: PromptStream | None = None
        self._logger: MetricsLogger | None = None
        self._thread: LoopThread | None = None
        self._previous_fault_hook = None
        self._model_dir: str | None = None
        self._reward_cfg: RewardConfig | None = None
        self._reward_override = None  # set_reward's functions (packed), sent again after a restart
        self._resume_from: str | None = None  # a checkpoint start() loads (Session.resume)
        self._num_restarts = 0

    @classmethod
    def resume(cls, run_dir: str, mesh: str | None = None, *, config=None, echo: bool = True, **overrides) -> "Session":
        """A session that continues the run in `run_dir` (its log dir) from its latest
        checkpoint when started: same config (only loop.steps, loop.save_every and other keys
        that do not change the numbers may differ), same log dir; `mesh` defaults to the run's."""
        run_dir = os.path.abspath(run_dir)
        try:
            with open(os.path.join(run_dir, RUN_CONFIG_FILE)) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            raise checkpoint.CheckpointError(
                f"--resume {run_dir}: no readable {RUN_CONFIG_FILE}; pass a run's log dir (runs/<stamp>)"
            ) from None
        path = checkpoint.resolve(run_dir)
        state = checkpoint.read_state(path)
        new = _config_from(config if config is not None else saved["config"], overrides)
        new.loop.log_dir = run_dir
        new.loop.checkpoint_dir = new.loop.checkpoint_dir or saved["config"]["loop"]["checkpoint_dir"]
        changes = checkpoint.config_changes(state["config"], to_dict(new))
        if changes:
            raise ConfigError(
                f"--resume {run_dir}: the config differs from the run's in {', '.join(changes)}; a resumed run "
                f"keeps its config (to start a new run from these weights instead: model.path={path})"
            )
        session = cls(new, mesh or saved.get("mesh_source") or saved["mesh"], echo=echo)
        session._resume_from = path
        return session

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
        monarch.actor.unhandled_fault_hook = report_failure
        self._thread = LoopThread()
        try:
            self._prepare()
            self._thread.run(self._spawn())
            if self._resume_from:
                path, self._resume_from = self._resume_from, None
                self.load(path)
                self._say(f"lockstep: resumed {self.log_dir} from {os.path.basename(path)} (step {self.num_steps_done})")
        except BaseException:
            self._stop_quietly()
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

    def _say(self, line: str) -> None:
        if self.echo:
            tqdm.write(line, file=sys.stderr)

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

    def _prepare(self) -> None:
        """Once per session, before any proc: data, reward, model files, logs (bad input fails here)."""
        cfg = self.config
        cfg.loop.resolve_dirs()
        self._reward_cfg = self._reward_config()
        RewardRunner.from_config(self._reward_cfg)  # a bad dotted path fails here, before any proc starts
        # Write the tiny checkpoint once here, so every actor loads the same directory.
        self._model_dir = str(checkpoint_path(cfg.model))
        check_model_layout(self.mesh_config, cfg.model.impl, self._model_dir)  # tp vs heads, vocab, ...
        dataset = load_source(cfg.data)
        what = f"data.source={cfg.data.source}" + (f" ({cfg.data.path})" if cfg.data.path else "")
        max_prompt_tokens = cfg.generator.max_model_len - cfg.generator.max_tokens
        self._stream = PromptStream(
            dataset, cfg.data.prompts_per_step, cfg.data.seed, what=what,
            prompt_lengths=prompt_token_counts(dataset, self._model_dir) if len(dataset) else None,
            max_prompt_tokens=max_prompt_tokens,
        )
        if self._stream.num_too_long:
            self._say(
                f"lockstep: {self._stream.num_too_long} of {len(dataset)} prompts are longer than {max_prompt_tokens} "
                "tokens (generator.max_model_len - generator.max_tokens); steps skip them (data/num_dropped_prompts)"
            )
        self._logger = MetricsLogger(cfg.loop.log_dir, echo=self.echo)
        checkpoint.write_json(
            os.path.join(cfg.loop.log_dir, RUN_CONFIG_FILE),
            {"config": to_dict(cfg), "mesh": self.mesh_config.name, "mesh_source": self._mesh_source},
        )

    async def _spawn(self) -> None:
        """Spawn the meshes and bring the generators to the trainer's weights."""
        from lockstep.controller.meshes import Meshes

        self._meshes = Meshes(self.mesh_config)
        await self._meshes.host_mesh()  # finding the hosts (e.g. a SLURM queue) is not the start phase
        limit = self.config.loop.timeouts.seconds("start")
        try:
            await asyncio.wait_for(self._spawn_meshes(), limit)
        except asyncio.TimeoutError:
            raise ActorTimeout(
                f"the meshes did not start within {limit:g} s (phase start); if it is only slow, raise loop.timeouts.start"
            ) from None

    async def _spawn_meshes(self) -> None:
        from lockstep.actors.generator import GeneratorActor
        from lockstep.actors.reward import RewardActor
        from lockstep.actors.trainer import TrainerActor

        cfg, timeouts = self.config, self.config.loop.timeouts
        model_cfg = dataclasses.replace(cfg.model, path=self._model_dir)
        meshes = self._meshes
        trainer = await meshes.spawn_role("trainer", TrainerActor, model_cfg, cfg.trainer, meshes.layout("trainer"))
        transport = weight_sync.transport_for(self.mesh_config.device, self.mesh_config.hosts)
        await weight_sync.start_store(await meshes.procs("trainer"), transport=transport)
        generator = await meshes.spawn_role(
            "generator", GeneratorActor, model_cfg, cfg.generator, meshes.layout("generator")
        )
        reward = await meshes.spawn_role("reward", RewardActor, self._reward_cfg)
        gen_role = self.mesh_config.generator
        self._reward_handle = RewardHandle(reward, "reward", timeouts)
        handles = Handles(
            generators=generator_replicas(generator, gen_role.dp, gen_role.tp, timeouts),
            trainer=MeshHandle(trainer, "trainer", timeouts),
            reward=self._reward_handle,
        )
        # The first calls wait for the actors' __init__ (models, vLLM): the start phase's limit.
        await asyncio.gather(handles.trainer.call("version", phase="start"),
                             *(g.call("version", phase="start") for g in handles.generators))
        if self._reward_override is not None:
            await self._reward_handle.call("set_functions", self._reward_override)
        self._handles = handles
        await self._sync_generators()

    async def _sync_generators(self, force: bool = False) -> None:
        """Bring every generator to the trainer's version (after start, load or a failed step)."""
        handles = self._handles
        self.policy_version = await handles.trainer.version()
        versions = await asyncio.gather(*(g.version() for g in handles.generators))
        if force or any(v != self.policy_version for v in versions):
            await handles.trainer.push_weights(self.policy_version)
            await asyncio.gather(*(g.update_weights(self.policy_version) for g in handles.generators))

    def stop(self) -> None:
        """Stop every proc mesh; safe to call twice. Raises if stopping failed."""
        if self._thread is None:
            return
        error = None
        try:
            if self._meshes is not None:
                self._thread.run(self._teardown())
        except Exception as e:
            error = e
        finally:
            self._thread.close()
            self._thread = None
            self._handles = None
            if self._previous_fault_hook is not None:
                monarch.actor.unhandled_fault_hook, self._previous_fault_hook = self._previous_fault_hook, None
            if self._logger:
                self._logger.close()
        if error is not None:
            raise RuntimeError(f"stopping the meshes failed: {error}") from error

    def _stop_quietly(self) -> None:
        """stop() while another error is on its way out: that error is the one to report."""
        try:
            self.stop()
        except Exception as e:
            sys.stderr.write(f"lockstep: also, {e}\n")

    async def _teardown(self) -> None:
        """Drop the store and stop the meshes, within loop.timeouts.stop each; raises the first failure."""
        limit = self.config.loop.timeouts.seconds("stop")
        meshes, self._meshes, self._handles = self._meshes, None, None
        errors = []
        try:
            await weight_sync.stop_store(limit or 60.0)
        except Exception:
            pass  # the store may never have started, or its procs are gone; they go away below either way
        try:
            await asyncio.wait_for(meshes.shutdown(), limit)
        except asyncio.TimeoutError:
            errors.append(f"the procs did not stop within {limit:g} s (loop.timeouts.stop)")
        except Exception as e:
            errors.append(str(e))
        if errors:
            raise RuntimeError(errors[0])

    def __enter__(self) -> "Session":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.stop()
        else:
            self._stop_quietly()

    # -- training --

    def step(self) -> dict:
        """One on-policy step; returns its metrics. On error nothing is applied; after a reward,
        barrier or weight error the session stays usable (a dead or hung actor: see run())."""
        return self._run(self._step())

    async def _step(self) -> dict:
        cfg = self.config
        prompts, fields = self._stream.next_batch()
        num_dropped = self._stream.num_dropped
        try:
            result = await run_step(
                self._handles, prompts, fields, self.policy_version,
                barrier=cfg.loop.barrier, temperature=cfg.generator.temperature,
                num_samples=cfg.generator.num_samples, step=self.num_steps_done + 1,
                check_weights=cfg.loop.check_weights and cfg.model.impl == "lockstep",
            )
        except BarrierError as e:
            if e.failed is not None:
                self.last_failure = e.failed
                e.args = (f"{e} {await self._keep_failure(e.failed)}",)
            raise
        except (MeshError, ActorTimeout) as e:
            if (lost := await self._meshes.lost_host_error()) is not None:
                raise lost from e  # a MeshError naming the host that is gone (run() restarts as for any)
            raise  # the meshes are broken: nothing to realign (run() restarts them)
        except Exception as e:
            try:  # e.g. trained but the sync failed, or a generator's weights differ: realign
                await self._sync_generators(force=isinstance(e, WeightMismatchError))
            except Exception:
                pass  # the step's own error is the one to report
            raise
        self.policy_version = result.policy_version
        self.num_steps_done += 1
        result.metrics[DROPPED_PROMPTS] = num_dropped
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
        """Train until loop.steps steps are done (a resumed run does the ones left), or
        `num_steps` more; saves every loop.save_every. When an actor dies or hangs, restarts
        the meshes from the last checkpoint up to loop.max_restarts times in the session and
        goes on: the same steps, bit for bit. Returns the metrics of the steps it ran."""
        self._require_started()
        loop_cfg = self.config.loop
        first = self.num_steps_done
        target = loop_cfg.steps if num_steps is None else first + num_steps
        # A bar only on a terminal (disable=None); the per-step console line is the log.
        quiet = True if not self.echo or target - first < 2 else None
        with tqdm(total=max(0, target - first), desc="steps", unit="step", disable=quiet) as bar:
            while self.num_steps_done < target:
                try:
                    self.step()
                    if loop_cfg.save_every and self.num_steps_done % loop_cfg.save_every == 0:
                        self.save()
                except (MeshError, ActorTimeout) as e:
                    self._restart(e)
                bar.n = max(0, self.num_steps_done - first)
                bar.refresh()
        return [m for m in self.metrics if first < m["step"] <= target]

    def _restart(self, error: Exception) -> None:
        """Respawn every mesh and load the last checkpoint; re-raises `error` if it may not."""
        if self._meshes is not None:  # a host that is gone (e.g. during a save): name it
            error = self._thread.run(self._meshes.lost_host_error()) or error
        path = checkpoint.latest(self.config.loop.checkpoint_dir)
        if self._num_restarts >= self.config.loop.max_restarts:
            raise error
        if path is None:
            error.args = (f"{error} (no checkpoint to restart from: set loop.save_every)",)
            raise error
        self._num_restarts += 1
        self._say(f"lockstep: {error}")
        self._say(
            f"lockstep: restarting the meshes from {os.path.basename(path)} "
            f"(restart {self._num_restarts} of loop.max_restarts={self.config.loop.max_restarts})"
        )
        try:
            self._thread.run(self._teardown())
        except Exception as e:
            self._say(f"lockstep: stopping what was left: {e}")
        self._thread.run(self._spawn())
        self.load(path)

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
        packed = pack(functions)
        self._run(self._reward_handle.call("set_functions", packed))
        self._reward_override = packed

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
        """A checkpoint of everything the run needs to continue bit for bit (controller/checkpoint.py);
        default path: <loop.checkpoint_dir>/step_<N>, which also moves `latest` and prunes old ones."""
        self._require_started()
        checkpoint_dir = self.config.loop.checkpoint_dir
        path = os.path.abspath(path or os.path.join(checkpoint_dir, checkpoint.step_dir_name(self.num_steps_done)))
        start = time.perf_counter()
        self._run(self._save(path))
        if os.path.dirname(path) == checkpoint_dir:
            checkpoint.set_latest(checkpoint_dir, path)
            checkpoint.prune(checkpoint_dir, self.config.loop.keep_checkpoints)
        self._say(f"lockstep: saved {path} ({time.perf_counter() - start:.1f} s)")
        return path

    async def _save(self, path: str) -> str:
        state = {
            "step": self.num_steps_done,
            "policy_version": self.policy_version,
            "data": self._stream.state_dict(),
            "config": to_dict(self.config),
            "mesh": self.mesh_config.name,
        }
        return await checkpoint.save(path, self._handles, state, self._model_dir)

    def load(self, path: str) -> None:
        """Continue from a checkpoint: `path` is one, or a run's log dir / checkpoints dir
        (then its `latest`). Restores trainer, generators, data position, step and version."""
        self._require_started()
        path = checkpoint.resolve(path)
        state = checkpoint.read_state(path)
        checkpoint.check_same_model(state, self._model_dir, path)
        self._stream.load_state_dict(state["data"])  # checks it fits the dataset before anything changes
        if state.get("mesh") != self.mesh_config.name or len(state["generators"]) != len(self._handles.generators):
            self._say(
                f"lockstep: {os.path.basename(path)} was written on mesh {state.get('mesh')!r} with "
                f"{len(state['generators'])} generator replica(s), this is {self.mesh_config.name!r} with "
                f"{len(self._handles.generators)}: the run continues, but not bit for bit as it would have"
            )
        self._run(self._load(path, state))
        self.num_steps_done = state["step"]
        self._logger.rewind(self.num_steps_done)

    async def _load(self, path: str, state: dict) -> None:
        handles = self._handles
        await handles.trainer.load(os.path.join(path, checkpoint.TRAINER_DIR))
        self.policy_version = await handles.trainer.version()
        if self.policy_version != state["policy_version"]:
            raise checkpoint.CheckpointError(
                f"checkpoint {path}: the trainer restored version {self.policy_version} but the controller "
                f"saved {state['policy_version']}; the checkpoint is inconsistent"
            )
        # Always push: generators may hold a same-numbered version from another history.
        await self._sync_generators(force=True)
        saved = state["generators"]
        await asyncio.gather(*(g.set_sampling_state(saved[i % len(saved)]) for i, g in enumerate(handles.generators)))
