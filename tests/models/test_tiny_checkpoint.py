"""The tiny checkpoint writer: loads in transformers, tokenizer round trips, deterministic bytes."""

import json

import pytest
import torch

from lockstep.models.tiny import SPECIAL_TOKENS, VOCABS, write_tiny_checkpoint

FILES = ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
         "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def test_loads_in_transformers_with_the_written_shape(tiny_dir):
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(tiny_dir)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) \
        == (64, 2, 2, 1, 32)
    assert cfg.rope_parameters["rope_theta"] == 10000.0
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    logits = model(torch.tensor([[6, 7, 8]])).logits
    assert logits.shape == (1, 3, cfg.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("vocab", sorted(VOCABS))
def test_tokenizer_round_trips_its_alphabet_one_token_per_char(tmp_path, vocab):
    from transformers import AutoTokenizer

    path = write_tiny_checkpoint(tmp_path, vocab=vocab)
    tok = AutoTokenizer.from_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    alphabet = VOCABS[vocab]
    ids = tok.encode(alphabet, add_special_tokens=False)
    assert len(ids) == len(alphabet) and len(set(ids)) == len(alphabet)
    assert tok.decode(ids) == alphabet
    text = "12+7=19\n(3*4)-5= 7"
    assert tok.decode(tok.encode(text)) == text
    assert (tok.eos_token_id, tok.pad_token_id) == (config["eos_token_id"], config["pad_token_id"])
    assert tok.encode("<|im_start|>1<|im_end|><|endoftext|>") == [2, tok.convert_tokens_to_ids("1"), 3, 0]
    assert tok.encode("~" if vocab == "arithmetic" else "\t") == [tok.unk_token_id]
    # every id the model can emit is a token the tokenizer knows
    assert config["vocab_size"] % 8 == 0 and len(tok) == config["vocab_size"]
    assert None not in tok.convert_ids_to_tokens(list(range(config["vocab_size"])))
    assert tok.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == list(SPECIAL_TOKENS)


def test_same_arguments_same_bytes_other_seed_other_weights(tmp_path, tiny_dir):
    again = write_tiny_checkpoint(tmp_path / "again")
    for name in FILES:
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    mtime = (again / "model.safetensors").stat().st_mtime_ns
    write_tiny_checkpoint(again)
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime  # untouched, safe for concurrent readers
    other = write_tiny_checkpoint(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_untied_bf16_variant(tmp_path):
    from safetensors.torch import load_file

    path = write_tiny_checkpoint(tmp_path, tie_word_embeddings=False, dtype="bfloat16", num_layers=3)
    weights = load_file(path / "model.safetensors")
    assert "lm_head.weight" in weights and "model.layers.2.mlp.down_proj.weight" in weights
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "kwargs, message",
    [({"head_dim": 48}, "head_dim=48"), ({"vocab": "klingon"}, "vocab="), ({"dtype": "fp8"}, "dtype="),
     ({"num_heads": 3, "num_kv_heads": 2}, "multiple")],
)
def test_bad_arguments_fail_with_a_clear_line(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_tiny_checkpoint(tmp_path, **kwargs)
