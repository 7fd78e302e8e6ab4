"""Tiny Qwen3 checkpoints for the model tests (written locally, no hub)."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from lockstep.models.tiny import write_tiny_checkpoint

# GQA with 2 groups, q width (4*32) != hidden (64): shape mix-ups fail loudly.
TEST_SHAPE = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=96)


def write_test_checkpoint(out_dir, *, tie_word_embeddings: bool, seed: int = 0):
    """A tiny checkpoint whose norm weights are random too (unit norms would hide a swapped norm)."""
    path = write_tiny_checkpoint(out_dir, tie_word_embeddings=tie_word_embeddings, seed=seed, **TEST_SHAPE)
    weights = load_file(path / "model.safetensors")
    gen = torch.Generator().manual_seed(seed + 1)
    for name, w in weights.items():
        if name.endswith("norm.weight"):
            weights[name] = 1 + 0.5 * torch.randn(w.shape, generator=gen)
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            weights[name] = torch.randn(w.shape, generator=gen)  # logits of order 1, not 0.01
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="session")
def tied_dir(tmp_path_factory):
    return write_test_checkpoint(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True)


@pytest.fixture(scope="session")
def untied_dir(tmp_path_factory):
    return write_test_checkpoint(tmp_path_factory.mktemp("untied"), tie_word_embeddings=False)


@pytest.fixture(params=["tied", "untied"])
def ckpt_dir(request, tied_dir, untied_dir):
    return tied_dir if request.param == "tied" else untied_dir
