"""vLLM general plugin (entry point `vllm.general_plugins: lockstep`).

vLLM calls `register()` in every process it starts (engine, workers), possibly several
times, so it only writes two lazy names into vLLM's registries:

- the architecture `LockstepQwen3ForCausalLM` (our Qwen3 inside vLLM), picked per run with
  `hf_overrides={"architectures": [ARCHITECTURE]}`;
- our paged-attention backend in the `CUSTOM` slot of `AttentionBackendEnum`. Only our
  model asks for it (its attention layers pass `attn_backend=`), so stock models keep
  vLLM's own backend in the same process. `CUSTOM` exists in vLLM 0.26 and 0.32 alike.
"""

import logging

ARCHITECTURE = "LockstepQwen3ForCausalLM"
MODEL_CLASS_PATH = "lockstep.models.vllm.qwen3:LockstepQwen3ForCausalLM"
BACKEND_CLASS_PATH = "lockstep.models.vllm.attention_backend.LockstepAttentionBackend"

logger = logging.getLogger(__name__)


def register() -> None:
    """Register our model architecture and attention backend with vLLM (idempotent, lazy)."""
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS_PATH)
    custom = AttentionBackendEnum.CUSTOM
    if not custom.is_overridden():
        register_backend(custom, BACKEND_CLASS_PATH)
    elif custom.get_path() != BACKEND_CLASS_PATH:
        # Another plugin holds the slot: leave it; our model refuses to start (see qwen3.py).
        logger.warning(
            "vLLM attention backend CUSTOM is already %s; lockstep's model needs %s",
            custom.get_path(),
            BACKEND_CLASS_PATH,
        )


def backend_class():
    """Our registered attention backend class; a clear error if the CUSTOM slot is not ours."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    register()
    custom = AttentionBackendEnum.CUSTOM
    if custom.get_path() != BACKEND_CLASS_PATH:
        raise RuntimeError(
            f"vLLM's CUSTOM attention backend is {custom.get_path()}, not lockstep's "
            f"{BACKEND_CLASS_PATH}: uninstall the other vLLM plugin that registers CUSTOM"
        )
    return custom.get_class()
