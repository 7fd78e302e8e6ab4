"""ModelConfig validation, the tiny default checkpoint, build_model."""

import pytest
import torch

from lockstep.models import ModelConfig, build_model, checkpoint_path


def test_defaults_and_dtype():
    cfg = ModelConfig()
    assert (cfg.path, cfg.impl, cfg.dtype, cfg.torch_dtype) == ("", "lockstep", "float32", torch.float32)
    assert ModelConfig(dtype="bfloat16").torch_dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs, message", [({"impl": "hf"}, "model.impl='hf'"), ({"dtype": "fp16"}, "model.dtype='fp16'")])
def test_bad_values_fail_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_empty_path_is_the_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCKSTEP_TINY_DIR", str(tmp_path / "tiny"))
    path = checkpoint_path(ModelConfig())
    assert path == tmp_path / "tiny" and (path / "model.safetensors").is_file()
    model = build_model(ModelConfig(dtype="bfloat16"), "cpu")
    assert model.config.num_layers == 2 and model.tok_embeddings.weight.dtype == torch.bfloat16


def test_missing_checkpoint_and_stock_impl_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        build_model(ModelConfig(path=str(tmp_path)), "cpu")
    with pytest.raises(ValueError, match="impl=lockstep"):
        build_model(ModelConfig(impl="stock"), "cpu")
