"""A generator's logic, without Monarch: one vLLM engine, sampling with per-token logprobs,
the audit's recorded re-run, and in-place weight reloads. `actors/generator.py` wraps it.

Sampling seeds: vLLM gives a request's n samples seed, seed + 1, ... (`Sample.seed`), so a
sample can be re-sampled alone; batch invariance makes it the same tokens.
"""

import hashlib
import math
import os

import torch

from lockstep.actors.types import Sample
from lockstep.actors.vllm_engine import GeneratorConfig, configure_process, engine_args, uses_cuda_graphs
from lockstep.models.qwen3.capture import Capture, CapturedRun


def request_seed(base_seed: int, replica: int, call: int, prompt_index: int) -> int:
    """Sampling seed of one prompt's request; vLLM gives its n samples seed, seed + 1, ..."""
    digest = hashlib.sha256(f"{base_seed}/{replica}/{call}/{prompt_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 2  # < 2**30, so seed + n stays an int32


def sampled_logprobs(logprobs, token_ids: list[int]) -> list[float]:
    """The sampled token's logprob at each position, from vLLM's flat (or per-position dict)
    container of a `logprobs=0` request."""
    if logprobs is None or len(logprobs) != len(token_ids):
        raise RuntimeError("vLLM returned no per-token logprobs; the request must ask for logprobs=0")
    flat = getattr(logprobs, "logprobs", None)
    if flat is not None and logprobs.token_ids == token_ids:  # FlatLogprobs: one entry per position
        return flat
    return [position[token].logprob for position, token in zip(logprobs, token_ids)]


def to_samples(
    outputs, prompts: list[str], fields: list[dict], policy_version: int, seeds: list[int] | None = None,
    tokenizer=None,
) -> list[Sample]:
    """vLLM RequestOutputs (one per prompt, n completions each) -> Samples, prompt-major.

    `seeds[i]` is prompt i's request seed; vLLM samples completion k with seed + k. With a
    `tokenizer`, each completion's text is decoded here, once (requests with detokenize=False).
    """
    samples = []
    for prompt_index, (request, prompt, row_fields) in enumerate(zip(outputs, prompts, fields)):
        for completion in request.outputs:
            token_ids = list(completion.token_ids)
            # vLLM's floats are the sampler's fp32 values, so this cast is exact.
            logprobs = torch.tensor(sampled_logprobs(completion.logprobs, token_ids), dtype=torch.float32)
            text = completion.text if tokenizer is None else tokenizer.decode(token_ids, skip_special_tokens=True)
            samples.append(
                Sample(
                    prompt_index=prompt_index,
                    prompt=prompt,
                    completion=text,
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

        self.model_cfg, self.gen_cfg, self.replica, self.tp = model_cfg, gen_cfg, replica, tp
        self.graphs = uses_cuda_graphs(gen_cfg, device_type)
        self.llm = LLM(**engine_args(model_cfg, gen_cfg, device_type, tp, dp))
        self.tokenizer = self.llm.get_tokenizer()
        self.version = 0
        self.num_calls = 0

    # -- sampling -------------------------------------------------------------------------

    def sampling_params(self, *, n: int, temperature: float, max_tokens: int, seed: int):
        """impl=lockstep: vLLM samples at temperature 1 (0: greedy) from the model's
        log_softmax at `temperature` (`_use_temperature` sets it); stock: vLLM applies it."""
        from vllm import SamplingParams

        if self.model_cfg.impl == "lockstep":
            temperature = 0.0 if temperature == 0 else 1.0
        # Flat logprobs and no per-token detokenizing: vLLM's per-token output work is most of
        # a small model's decode step on the host; to_samples decodes each completion once.
        return SamplingParams(
            n=n, temperature=temperature, top_p=self.gen_cfg.top_p, max_tokens=max_tokens, seed=seed, logprobs=0,
            flat_logprobs=True, detokenize=False,
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
        self._use_temperature(temperature)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return to_samples(outputs, prompts, fields, self.version, seeds, self.tokenizer)

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
        if self.tp > 1:
            raise ValueError(
                f"the audit records whole module outputs and this generator is tensor-parallel (tp={self.tp}): "
                "run `lockstep audit --run LOG_DIR --mesh local-cpu` (or another tp=1 mesh)"
            )
        if self.graphs:
            raise ValueError(
                "the audit's hooks need an eager generator and this one replays CUDA graphs: run "
                "`lockstep audit --run LOG_DIR` (it starts eager meshes), or set generator.enforce_eager=true"
            )
        params = self.sampling_params(n=1, temperature=temperature, max_tokens=max_tokens, seed=seed)
        self._use_temperature(temperature)
        with Capture(self.model().model) as capture:
            outputs = self.llm.generate([{"prompt_token_ids": list(prompt_ids)}], params, use_tqdm=False)
        (sample,) = to_samples(outputs, [""], [{}], self.version, [seed], self.tokenizer)
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

    def sampling_state(self) -> dict:
        """What the next request seeds derive from (checkpointed, so a resumed run samples on)."""
        return {"num_calls": self.num_calls}

    def set_sampling_state(self, state: dict) -> None:
        self.num_calls = int(state["num_calls"])

    def fingerprint(self):
        """Layout-independent fingerprint of the weights vLLM runs (actors/weight_sync.py)."""
        from lockstep.actors.weight_sync import fingerprint

        if self.model_cfg.impl != "lockstep":
            raise ValueError("weight fingerprints read lockstep's Qwen3 by HF name; they need model.impl=lockstep")
        group = None
        if self.tp > 1:  # LocalShards: summed over this replica's TP ranks (every rank calls)
            from vllm.distributed import get_tp_group

            group = get_tp_group().cpu_group
        return fingerprint(self.weight_buffers(), self.version, group)

    def _check_version(self, expected_version: int) -> None:
        if expected_version != self.version:
            raise RuntimeError(
                f"generator replica {self.replica} holds weights v{self.version}, the step expects "
                f"v{expected_version}; call update_weights({expected_version}) first"
            )

    def _use_temperature(self, temperature: float) -> None:
        """impl=lockstep: the model's log_softmax temperature for the next requests (greedy
        reports logprobs at 1, as the trainer scores them)."""
        if self.model_cfg.impl == "lockstep":
            t = 1.0 if temperature == 0 else temperature
            self.llm.apply_model(lambda model: model.set_sampling_temperature(t))

    # -- weights --------------------------------------------------------------------------

    def model(self):
        """The nn.Module vLLM runs (in-process engine)."""
        return self.llm.apply_model(lambda model: model)[0]

    def weight_buffers(self) -> dict:
        """HF name -> tensor to pull into. lockstep: the live parameters (an in-place pull),
        under TP each rank's rows as a `LocalShard` (so it pulls only those); stock: fresh CPU
        buffers shaped like the checkpoint (vLLM's own loader then fuses and shards them)."""
        if self.model_cfg.impl == "lockstep":
            from lockstep.models.qwen3 import to_hf

            model = self.model()
            params = model.native_parameters()
            if model.tp_size > 1:
                from lockstep.actors.weight_pack import LocalShard

                layout = model.full_shapes()
                first_holder = _first_holders(model)
                params = {name: LocalShard(p, layout[name][1], layout[name][0], first_holder[name])
                          for name, p in params.items()}
            return to_hf(params, model.config)
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
        pulled = {name: getattr(t, "local", t) for name, t in pulled.items()}  # LocalShard -> its rows
        await run(self.load_hf_weights, pulled, version)


def _first_holders(model) -> dict[str, bool]:
    """Whether this TP rank is the first to hold its rows of each weight (replicated norms:
    rank 0; a KV head replicated over several ranks: the first of them)."""
    from lockstep.models.qwen3.parallelize import local_shapes

    earlier = [local_shapes(model.config, r, model.tp_size) for r in range(model.tp_rank)]
    mine = local_shapes(model.config, model.tp_rank, model.tp_size)
    return {name: all(ranks[name][1] != start for ranks in earlier) for name, (_, start) in mine.items()}


async def _run_inline(fn, *args):
    return fn(*args)
