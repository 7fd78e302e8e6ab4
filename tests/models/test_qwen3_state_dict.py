"""HF <-> lockstep names through TorchTitan's adapter: exact round trips, tied embeddings, errors."""

import json
import shutil

import pytest
import torch

from lockstep.models import ModelConfig, build_model
from lockstep.models.qwen3 import Qwen3Config, from_hf, hf_state_dict, read_safetensors, to_hf


def test_load_then_hf_state_dict_round_trips_exactly(ckpt_dir):
    model = build_model(ModelConfig(path=str(ckpt_dir)), "cpu")
    on_disk = read_safetensors(ckpt_dir)
    back = hf_state_dict(model)
    assert sorted(back) == sorted(on_disk)
    for name, tensor in on_disk.items():
        assert torch.equal(back[name], tensor), name


def test_tied_checkpoint_shares_one_tensor(tied_dir, untied_dir):
    tied = build_model(ModelConfig(path=str(tied_dir)), "cpu")
    assert tied.output.weight is tied.tok_embeddings.weight
    assert "lm_head.weight" not in read_safetensors(tied_dir)
    assert "lm_head.weight" not in hf_state_dict(tied)
    untied = build_model(ModelConfig(path=str(untied_dir)), "cpu")
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert not torch.equal(untied.output.weight, untied.tok_embeddings.weight)


def test_bf16_load_is_the_rounded_checkpoint(untied_dir):
    model = build_model(ModelConfig(path=str(untied_dir), dtype="bfloat16"), "cpu")
    on_disk = read_safetensors(untied_dir)
    for name, tensor in hf_state_dict(model).items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, on_disk[name].to(torch.bfloat16)), name


def test_name_tables_are_inverse(untied_dir):
    config = Qwen3Config.from_hf(untied_dir)
    on_disk = read_safetensors(untied_dir)
    ours = from_hf(on_disk, config)
    assert "layers.1.attention.q_norm.weight" in ours and "output.weight" in ours
    assert to_hf(ours, config).keys() == on_disk.keys()
    assert "lm_head.weight" in on_disk  # from_hf must not have eaten the caller's dict


def test_from_hf_drops_rotary_buffers_and_rejects_foreign_weights(tied_dir):
    config = Qwen3Config.from_hf(tied_dir)
    hf = read_safetensors(tied_dir)
    hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)
    assert "output.weight" in from_hf(hf, config)
    hf["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(128)
    with pytest.raises(ValueError, match="q_proj.bias"):
        from_hf(hf, config)


def test_config_that_disagrees_with_weights_is_refused(tied_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tied_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing.*layers.2"):
        build_model(ModelConfig(path=str(bad)), "cpu")
    cfg["num_hidden_layers"], cfg["intermediate_size"] = 2, 128
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        build_model(ModelConfig(path=str(bad)), "cpu")


@pytest.mark.parametrize(
    "override, message",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"use_sliding_window": True}, "sliding"),
        ({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"}, "dense Qwen3"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"num_key_value_heads": 3}, "multiple"),
    ],
)
def test_unsupported_configs_fail_with_a_clear_line(tied_dir, override, message):
    cfg = json.loads((tied_dir / "config.json").read_text()) | override
    with pytest.raises(ValueError, match=message):
        Qwen3Config.from_hf(cfg)


def test_config_reads_both_rope_spellings(tied_dir):
    cfg = json.loads((tied_dir / "config.json").read_text())
    legacy = Qwen3Config.from_hf(cfg)
    assert legacy.rope_theta == cfg["rope_theta"]
    del cfg["rope_theta"]
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    assert Qwen3Config.from_hf(cfg).rope_theta == 5e5
