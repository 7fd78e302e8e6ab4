"""Generator role: a vLLM engine (`vllm.LLM`) that samples completions with per-token logprobs.

`Generator` holds the logic and runs without Monarch (tests use it directly);
`GeneratorActor` is its thin mesh wrapper. One engine per data-parallel replica:

- TP = 1: in-process vLLM (VLLM_ENABLE_V1_MULTIPROCESSING=0), nothing else to launch.
- TP > 1: `distributed_executor_backend="external_launcher"`, each Monarch proc is one
  vLLM rank of the torch.distributed world the mesh spawner set up (rank = dp * tp + tp_index,
  which is how vLLM derives its DP rank). impl=lockstep does not support TP > 1 yet.

Parity rules (see docs/architecture.md): prefix caching off; `compute_logits` returns our
fp32 logits; `logprobs_mode="processed_logprobs"`, i.e. log_softmax(logits / temperature),
the quantity `lockstep.kernels.token_logprobs` computes on the trainer side; weights are
reloaded in place, so no stale copy survives an update.
"""

import asyncio
import contextlib
import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from monarch.actor import Actor, current_rank, endpoint

from lockstep.actors.types import Sample
from lockstep.models.qwen3.capture import Capture, CapturedRun
from lockstep.models.vllm.plugin import ARCHITECTURE  # plugin.py imports vllm only when called

LOGPROBS_MODE = "processed_logprobs"
MIN_CPU_KV_CACHE_BYTES = 16 << 20


@dataclass(kw_only=True, slots=True)
class GeneratorConfig:
    num_samples: int = 8
    """Completions per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """Sampling temperature; logprobs are of logits / temperature."""
    top_p: float = 1.0
    """< 1 samples from a renormalized nucleus; the trainer scores the full softmax, so the
    strict barrier needs 1.0."""
    max_tokens: int = 32
    """Max new tokens per completion."""
    seed: int = 0
    """Base of the per-request sampling seeds (a run is reproducible given it)."""
    max_model_len: int = 256
    """Prompt + completion tokens per sequence."""
    gpu_memory_utilization: float = 0.3
    """Fraction of the GPU vLLM may take (weights + KV cache); unused on CPU."""
    enforce_eager: bool = True
    """No CUDA graphs / torch.compile in vLLM."""

    def __post_init__(self):
        for name in ("num_samples", "max_tokens", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"generator.{name}={value!r}: must be a positive int")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"generator.temperature={self.temperature!r}: must be > 0 (RL samples)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"generator.top_p={self.top_p!r}: must be in (0, 1]")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"generator.gpu_memory_utilization={self.gpu_memory_utilization!r}: must be in (0, 1]")
        if self.max_tokens >= self.max_model_len:
            raise ValueError(
                f"generator.max_tokens={self.max_tokens} leaves no room for the prompt in "
                f"max_model_len={self.max_model_len}; raise max_model_len"
            )
        if not isinstance(self.seed, int):
            raise ValueError(f"generator.seed={self.seed!r}: must be an int")


def configure_process(device_type: str, tp: int, impl: str = "lockstep") -> None:
    """Environment vLLM reads at engine start; call before the first `vllm.LLM` of the process."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine lives in this proc
    if impl == "lockstep":
        # vLLM's V2 GPU runner computes sampled logprobs in its own Triton kernel; the V1
        # runner's sampler calls aten log_softmax, which kernels.invariant_mode() routes to
        # the same kernel the trainer's token_logprobs runs.
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    if device_type == "cuda" and tp == 1 and "LOCAL_RANK" in os.environ:
        # A TP=1 engine uses the first visible GPU: show it only this proc's one.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        local_rank = int(os.environ["LOCAL_RANK"])
        if visible:
            if torch.cuda.is_initialized():
                raise RuntimeError("CUDA was initialized before the generator picked its GPU; start vLLM first")
            os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[local_rank]


def kv_cache_bytes(config_json: dict, gen_cfg: GeneratorConfig, dtype: torch.dtype, max_num_seqs: int) -> int:
    """CPU KV cache size: every sequence slot at max_model_len (vLLM would take GiBs otherwise)."""
    num_kv_heads = config_json.get("num_key_value_heads") or config_json["num_attention_heads"]
    head_dim = config_json.get("head_dim") or config_json["hidden_size"] // config_json["num_attention_heads"]
    per_token = config_json["num_hidden_layers"] * 2 * num_kv_heads * head_dim * dtype.itemsize
    return max(MIN_CPU_KV_CACHE_BYTES, per_token * gen_cfg.max_model_len * max_num_seqs)


def engine_args(model_cfg, gen_cfg: GeneratorConfig, device_type: str, tp: int = 1, dp: int = 1) -> dict:
    """Keyword arguments of `vllm.LLM` for this role (plain data; tested without vLLM)."""
    import json

    from lockstep.models import checkpoint_path

    path = str(checkpoint_path(model_cfg))
    max_num_seqs = 256
    args = dict(
        model=path,
        tokenizer=path,
        dtype=model_cfg.dtype,
        seed=gen_cfg.seed,
        max_model_len=gen_cfg.max_model_len,
        max_num_seqs=max_num_seqs,
        enforce_eager=gen_cfg.enforce_eager,
        enable_prefix_caching=False,
        logprobs_mode=LOGPROBS_MODE,
    )
    if model_cfg.impl == "lockstep":
        if tp > 1:
            raise NotImplementedError(
                f"model.impl=lockstep with generator tp={tp} is not supported yet: "
                "use tp=1 (more dp replicas) or model.impl=stock"
            )
        args["hf_overrides"] = {"architectures": [ARCHITECTURE]}
    if device_type == "cpu":
        with open(os.path.join(path, "config.json")) as f:
            config_json = json.load(f)
        args["kv_cache_memory_bytes"] = kv_cache_bytes(config_json, gen_cfg, model_cfg.torch_dtype, max_num_seqs)
    else:
        args["gpu_memory_utilization"] = gen_cfg.gpu_memory_utilization
    if tp > 1:
        args.update(
            tensor_parallel_size=tp,
            data_parallel_size=dp,
            distributed_executor_backend="external_launcher",
        )
    return args


def request_seed(base_seed: int, replica: int, call: int, prompt_index: int) -> int:
    """Sampling seed of one prompt's request; vLLM gives its n samples seed, seed + 1, ..."""
    digest = hashlib.sha256(f"{base_seed}/{replica}/{call}/{prompt_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 2  # < 2**30, so seed + n stays an int32


def to_samples(
    outputs, prompts: list[str], fields: list[dict], policy_version: int, seeds: list[int] | None = None
) -> list[Sample]:
    """vLLM RequestOutputs (one per prompt, n completions each) -> Samples, prompt-major.

    `seeds[i]` is prompt i's request seed; vLLM samples completion k with seed + k.
    """
    samples = []
    for prompt_index, (request, prompt, row_fields) in enumerate(zip(outputs, prompts, fields)):
        for completion in request.outputs:
            token_ids = list(completion.token_ids)
            if completion.logprobs is None or len(completion.logprobs) != len(token_ids):
                raise RuntimeError("vLLM returned no per-token logprobs; the request must ask for logprobs=0")
            # vLLM's floats are the sampler's fp32 values, so this cast is exact.
            logprobs = torch.tensor(
                [position[token].logprob for position, token in zip(completion.logprobs, token_ids)],
                dtype=torch.float32,
            )
            samples.append(
                Sample(
                    prompt_index=prompt_index,
                    prompt=prompt,
                    completion=completion.text,
                    prompt_ids=list(request.prompt_token_ids),
                    completion_ids=token_ids,
                    logprobs=logprobs,
                    policy_version=policy_version,
                    fields=dict(row_fields),
                    seed=None if seeds is None else seeds[prompt_index] + completion.index,
                )
            )
    return samples


def _repack_tied_lm_head(model) -> None:
    """Stock vLLM, CPU: a tied lm_head loads no weight of its own, so the in-place reload skips
    its post-load step and its prepacked GEMM copy keeps the old embedding. Redo that step."""
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None or embed is None or lm_head is embed or not hasattr(lm_head, "quant_method"):
        return
    if lm_head.weight.data_ptr() == embed.weight.data_ptr():
        lm_head.quant_method.process_weights_after_loading(lm_head)


class Generator:
    """One vLLM engine plus the policy version of the weights it holds (0 = the checkpoint)."""

    def __init__(self, model_cfg, gen_cfg: GeneratorConfig, device_type: str = "cpu", *, tp: int = 1, dp: int = 1,
                 replica: int = 0):
        configure_process(device_type, tp, model_cfg.impl)
        from vllm import LLM

        self.model_cfg, self.gen_cfg, self.replica = model_cfg, gen_cfg, replica
        self.llm = LLM(**engine_args(model_cfg, gen_cfg, device_type, tp, dp))
        self.version = 0
        self.num_calls = 0

    # -- sampling -------------------------------------------------------------------------

    def sampling_params(self, *, n: int, temperature: float, max_tokens: int, seed: int):
        from vllm import SamplingParams

        return SamplingParams(
            n=n, temperature=temperature, top_p=self.gen_cfg.top_p, max_tokens=max_tokens, seed=seed, logprobs=0
        )

    def generate(
        self,
        prompts: list[str],
        fields: list[dict],
        expected_version: int,
        n: int | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        *,
        seeds: list[int] | None = None,
    ) -> list[Sample]:
        """n completions per prompt; `seeds` (one per prompt) default to a per-call derivation."""
        self._check_version(expected_version)
        if len(fields) != len(prompts):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(fields)} fields dicts; pass one per prompt")
        cfg = self.gen_cfg
        n = cfg.num_samples if n is None else n
        temperature = cfg.temperature if temperature is None else temperature
        max_tokens = cfg.max_tokens if max_tokens is None else max_tokens
        if n <= 0 or max_tokens <= 0 or temperature < 0:
            raise ValueError(f"generate: n={n}, max_tokens={max_tokens} must be > 0 and temperature={temperature} >= 0")
        if temperature == 0 and n > 1:
            raise ValueError(f"generate: temperature 0 is greedy, one completion per prompt; pass n=1, not n={n}")
        if seeds is None:
            seeds = [request_seed(cfg.seed, self.replica, self.num_calls, i) for i in range(len(prompts))]
        elif len(seeds) != len(prompts):
            raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts; pass one per prompt")
        self.num_calls += 1
        params = [self.sampling_params(n=n, temperature=temperature, max_tokens=max_tokens, seed=s) for s in seeds]
        with self._sampler_mode():
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return to_samples(outputs, prompts, fields, self.version, seeds)

    def audit(
        self, prompt_ids: list[int], seed: int, temperature: float, max_tokens: int, expected_version: int
    ) -> CapturedRun:
        """Sample one completion of `prompt_ids` alone with `seed`, recording every module's
        per-token outputs over the prefill and each decode step (the divergence audit).

        Batch invariance makes this the completion the step sampled with the same seed; the
        recorded rows cover the decode path exactly as it ran.
        """
        self._check_version(expected_version)
        if self.model_cfg.impl != "lockstep":
            raise ValueError("the audit records lockstep's Qwen3 on both sides; it needs model.impl=lockstep")
        if not self.gen_cfg.enforce_eager:
            raise ValueError("the audit's hooks need eager execution: set generator.enforce_eager=true")
        params = self.sampling_params(n=1, temperature=temperature, max_tokens=max_tokens, seed=seed)
        with self._sampler_mode(), Capture(self.model().model) as capture:
            outputs = self.llm.generate([{"prompt_token_ids": list(prompt_ids)}], params, use_tqdm=False)
        (sample,) = to_samples(outputs, [""], [{}], self.version, [seed])
        return CapturedRun(
            prompt_ids=list(sample.prompt_ids),
            completion_ids=sample.completion_ids,
            logprobs=sample.logprobs,
            activations=capture.activations(),
        )

    def perturb_weight(self, name: str, ulps: int = 1) -> None:
        """Test aid: move every element of one weight (TorchTitan name, e.g.
        `layers.1.ffn_norm.weight`) by `ulps` units in the last place, on this generator only.
        The version stays, so the barrier sees the two sides disagree; -ulps undoes it."""
        if self.model_cfg.impl != "lockstep":
            raise ValueError("perturb_weight addresses lockstep's Qwen3 by name; it needs model.impl=lockstep")
        params = self.model().native_parameters()
        if name not in params:
            raise ValueError(f"perturb_weight: no weight {name!r}; names look like {sorted(params)[:3]}")
        param = params[name]
        toward = torch.full_like(param, math.inf if ulps > 0 else -math.inf)
        with torch.no_grad():
            for _ in range(abs(ulps)):
                param.copy_(torch.nextafter(param, toward))

    def _check_version(self, expected_version: int) -> None:
        if expected_version != self.version:
            raise RuntimeError(
                f"generator replica {self.replica} holds weights v{self.version}, the step expects "
                f"v{expected_version}; call update_weights({expected_version}) first"
            )

    def _sampler_mode(self):
        """impl=lockstep: vLLM's sampler computes log_softmax with aten; route that through
        lockstep's invariant log_softmax for the call, so the generator's logprob of a token is
        `kernels.token_logprobs` bit for bit. Stock runs keep aten's."""
        if self.model_cfg.impl != "lockstep":
            return contextlib.nullcontext()
        from lockstep import kernels

        return kernels.invariant_mode()

    # -- weights --------------------------------------------------------------------------

    def model(self):
        """The nn.Module vLLM runs (in-process engine)."""
        return self.llm.apply_model(lambda model: model)[0]

    def weight_buffers(self) -> dict[str, torch.Tensor]:
        """HF name -> tensor to pull into. lockstep: the live parameters (an in-place pull);
        stock: fresh CPU buffers shaped like the checkpoint (vLLM's own loader then fuses them)."""
        if self.model_cfg.impl == "lockstep":
            from lockstep.models.qwen3 import to_hf

            model = self.model()
            return to_hf(model.native_parameters(), model.config)
        from safetensors import safe_open

        from lockstep.models import checkpoint_path

        buffers = {}
        path = checkpoint_path(self.model_cfg)
        files = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))
        for file in files:
            with safe_open(os.path.join(path, file), framework="pt") as f:
                for name in f.keys():
                    shape = f.get_slice(name).get_shape()
                    buffers[name] = torch.empty(shape, dtype=self.model_cfg.torch_dtype)
        return buffers

    def load_hf_weights(self, hf_state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Reload every weight in place from HF-named tensors, then mark them `version`."""
        self.version = -1  # until the load completes, the weights are neither old nor new
        if self.model_cfg.impl == "lockstep":
            from lockstep.models.qwen3 import from_hf

            model = self.model()
            model.load_native_state_dict(from_hf(hf_state_dict, model.config))
        else:
            # vLLM's in-place reload re-runs its post-load processing (CPU weight prepacking).
            self.llm.collective_rpc(
                "reload_weights", kwargs=dict(weights_iterator=list(hf_state_dict.items()), is_checkpoint_format=True)
            )
            self.llm.apply_model(_repack_tied_lm_head)
        self.version = version

    async def update_weights(self, version: int, run=None) -> None:
        """Pull `version` from torchstore (actors/weight_sync.py) and reload it in place.

        `run(fn, *args)` awaits a blocking engine call (the actor runs them on its engine thread).
        """
        from lockstep.actors.weight_sync import pull_state_dict

        run = run or _run_inline
        buffers = await run(self.weight_buffers)
        self.version = -1  # an in-place pull overwrites the live weights as it goes
        pulled = await pull_state_dict(version, buffers, inplace=True)
        await run(self.load_hf_weights, pulled, version)


async def _run_inline(fn, *args):
    return fn(*args)


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
