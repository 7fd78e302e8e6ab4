"""Generator role: the thin Monarch actor around `Generator` (actors/generation.py).

One engine per data-parallel replica:
- TP = 1: in-process vLLM (VLLM_ENABLE_V1_MULTIPROCESSING=0), nothing else to launch.
- TP > 1: `distributed_executor_backend="external_launcher"`, each Monarch proc is one
  vLLM rank of the torch.distributed world the mesh spawner set up (rank = dp * tp + tp_index,
  which is how vLLM derives its DP rank). Every rank of a replica gets every call and runs
  the same schedule; rank 0's answer is read. impl=lockstep: each rank holds and pulls only
  its rows of the weights (models/qwen3/sharding.py).
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor

from monarch.actor import Actor, current_rank, endpoint

from lockstep.actors.generation import Generator
from lockstep.actors.types import Sample
from lockstep.actors.vllm_engine import GeneratorConfig


class GeneratorActor(Actor):
    """One proc of the generator mesh; procs [i*tp, (i+1)*tp) form replica i's engine.

    The engine lives on one thread of its own: building it and generating block for seconds,
    and Monarch serves every actor of this proc (its own bookkeeping ones too) from the event
    loop, which must not stall that long. The lock keeps engine calls and weight pulls apart.
    """

    def __init__(self, model_cfg, gen_cfg: GeneratorConfig, layout):
        tp, dp = layout.size("tp"), layout.size("dp")
        replica = current_rank().rank // tp
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-engine")
        self._generator = self._engine_thread.submit(
            Generator, model_cfg, gen_cfg, layout.device_type, tp=tp, dp=dp, replica=replica
        )
        self._lock = asyncio.Lock()

    async def _run(self, fn, *args):
        return await asyncio.wrap_future(self._engine_thread.submit(fn, *args))

    async def _engine(self) -> Generator:
        return await asyncio.wrap_future(self._generator)  # raises the engine's start-up error, if any

    @endpoint
    async def generate(
        self,
        prompts: list[str],
        fields: list[dict],
        expected_version: int,
        n: int | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> list[Sample]:
        async with self._lock:
            generator = await self._engine()
            return await self._run(generator.generate, prompts, fields, expected_version, n, temperature, max_tokens)

    @endpoint
    async def update_weights(self, version: int) -> None:
        async with self._lock:
            generator = await self._engine()
            await generator.update_weights(version, run=self._run)

    @endpoint
    async def audit(
        self, prompt_ids: list[int], seed: int, temperature: float, max_tokens: int, expected_version: int
    ):
        async with self._lock:
            generator = await self._engine()
            return await self._run(generator.audit, prompt_ids, seed, temperature, max_tokens, expected_version)

    @endpoint
    async def perturb_weight(self, name: str, ulps: int = 1) -> None:
        async with self._lock:
            generator = await self._engine()
            await self._run(generator.perturb_weight, name, ulps)

    @endpoint
    async def version(self) -> int:
        async with self._lock:
            return (await self._engine()).version

    @endpoint
    async def sampling_state(self) -> dict:
        async with self._lock:
            return (await self._engine()).sampling_state()

    @endpoint
    async def set_sampling_state(self, state: dict) -> None:
        async with self._lock:
            (await self._engine()).set_sampling_state(state)

    @endpoint
    async def fingerprint(self):
        async with self._lock:
            generator = await self._engine()
            return await self._run(generator.fingerprint)
