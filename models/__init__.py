"""Models: the one Qwen3 (lockstep.models.qwen3), the tiny-checkpoint writer, the model config."""

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

IMPLS = ("lockstep", "stock")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    path: str = ""
    """HF checkpoint dir (config.json + safetensors + tokenizer); empty = the tiny demo model."""
    impl: str = "lockstep"
    """`lockstep`: our Qwen3 on both sides; `stock`: TorchTitan's / vLLM's own (the baseline)."""
    dtype: str = "float32"
    """Parameter dtype: `float32` or `bfloat16`."""

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"model.impl={self.impl!r}: choose one of {', '.join(IMPLS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def tiny_checkpoint_dir() -> Path:
    """Where the tiny demo checkpoint lives ($LOCKSTEP_TINY_DIR, else under the temp dir)."""
    default = Path(tempfile.gettempdir()) / "lockstep-tiny-qwen3"
    return Path(os.environ.get("LOCKSTEP_TINY_DIR", default))


def checkpoint_path(model_cfg: ModelConfig) -> Path:
    """The HF checkpoint dir to load; writes the tiny one when model_cfg.path is empty.

    Every process that calls this gets the same bytes (the writer is deterministic).
    """
    if model_cfg.path:
        path = Path(model_cfg.path)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model.path={model_cfg.path!r} has no config.json: give a HF checkpoint dir, or '' for the tiny model"
            )
        return path
    from .tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tiny_checkpoint_dir())


def build_model(model_cfg: ModelConfig, device: torch.device | str, attn_factory=None):
    """lockstep's Qwen3 with the checkpoint's weights, in model_cfg.dtype, on `device`."""
    if model_cfg.impl != "lockstep":
        raise ValueError(f"build_model builds impl=lockstep; impl={model_cfg.impl!r} uses the library's own model")
    from .qwen3 import Qwen3Config, Qwen3Model, load_hf_weights

    path = checkpoint_path(model_cfg)
    with torch.device("meta"):
        model = Qwen3Model(Qwen3Config.from_hf(path), attn_factory=attn_factory)
    # to_empty allocates without init work; it unties tied weights, so re-tie.
    model = model.to_empty(device=device).to(model_cfg.torch_dtype)
    model.tie_weights()
    model.init_buffers(device)
    load_hf_weights(model, path)
    return model


__all__ = ["ModelConfig", "build_model", "checkpoint_path", "tiny_checkpoint_dir"]
