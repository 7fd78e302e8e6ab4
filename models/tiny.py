"""Writes a Qwen3 HF checkpoint with random weights + character-level tokenizer locally (no hub).

Tiny by default (tests, the demo); `write_random_checkpoint` writes the real Qwen3 shapes
(`QWEN3_SHAPES`, e.g. for benchmarks), the vocab padded with filler tokens so every id decodes.
The directory loads offline in `transformers` (Qwen3ForCausalLM, AutoTokenizer), in vLLM
and in `lockstep.models.qwen3`. Writing is deterministic: the same arguments give the same
bytes, and files whose bytes already match are left alone, so several processes may write
the same directory at once.

    python -m lockstep.models.tiny OUT_DIR
"""

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from lockstep.models import DTYPES

# ids 0.. in this order, then reserved pads, then characters.
# eos = <|endoftext|>, pad = <|pad|>, unknown characters -> <unk>.
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<unk>")
EOS_TOKEN, PAD_TOKEN, UNK_TOKEN = "<|endoftext|>", "<|pad|>", "<unk>"
# The dense Qwen3 shapes (tied embeddings); vocab_size is the real one (filler tokens pad ours).
QWEN3_SHAPES = {
    "0.6B": dict(hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                 intermediate_size=3072, vocab_size=151936),
    "1.7B": dict(hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                 intermediate_size=6144, vocab_size=151936),
}
VOCABS = {
    # "12+7=" -> "19": digits, operators, space, newline.
    "arithmetic": "0123456789+-*=() \n",
    # Free text (prompts with words), still one token per character.
    "ascii": "\n" + "".join(chr(c) for c in range(32, 127)),
}


def _vocab_tokens(vocab: str, vocab_size: int | None = None) -> tuple[list[str], list[str]]:
    """(all tokens by id, special tokens). Reserved specials pad the vocab to a multiple of 8
    (TP-divisible), so every id the model can sample is a token the tokenizer knows; with
    `vocab_size`, filler tokens `<|xN|>` pad it to that size instead."""
    chars = list(VOCABS[vocab])
    num_reserved = 0 if vocab_size else -(len(SPECIAL_TOKENS) + len(chars)) % 8
    specials = list(SPECIAL_TOKENS) + [f"<|reserved_{i}|>" for i in range(num_reserved)]
    tokens = specials + chars
    if vocab_size:
        if vocab_size < len(tokens):
            raise ValueError(f"vocab_size={vocab_size}: the {vocab!r} tokenizer needs at least {len(tokens)}")
        tokens += [f"<|x{i}|>" for i in range(vocab_size - len(tokens))]
    return tokens, specials


def _tokenizer_json(vocab: str, vocab_size: int | None = None) -> str:
    """A fast tokenizer, one token per character: a BPE with no merges, fused on decode."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    tokens, specials = _vocab_tokens(vocab, vocab_size)
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token=UNK_TOKEN))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tokenizer.to_str(pretty=True)


def _hf_weights(cfg: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random HF-named weights: normal(0, 0.02) matrices, unit norms; fixed generation order."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter, head_dim = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q_size, kv_size = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim

    def normal(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    def ones(n):
        return torch.ones(n, dtype=dtype)

    weights = {"model.embed_tokens.weight": normal(cfg["vocab_size"], hidden)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "self_attn.q_proj.weight": normal(q_size, hidden),
            p + "self_attn.k_proj.weight": normal(kv_size, hidden),
            p + "self_attn.v_proj.weight": normal(kv_size, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, q_size),
            p + "self_attn.q_norm.weight": ones(head_dim),
            p + "self_attn.k_norm.weight": ones(head_dim),
            p + "mlp.gate_proj.weight": normal(inter, hidden),
            p + "mlp.up_proj.weight": normal(inter, hidden),
            p + "mlp.down_proj.weight": normal(hidden, inter),
            p + "input_layernorm.weight": ones(hidden),
            p + "post_attention_layernorm.weight": ones(hidden),
        }
    weights["model.norm.weight"] = ones(hidden)
    if not cfg["tie_word_embeddings"]:
        weights["lm_head.weight"] = normal(cfg["vocab_size"], hidden)
    return weights


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomic, and a no-op when the bytes are already there (concurrent writers agree)."""
    if path.is_file() and path.read_bytes() == data:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_tiny_checkpoint(
    out_dir: str | os.PathLike,
    *,
    vocab: str = "arithmetic",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    head_dim: int = 32,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    max_position_embeddings: int = 512,
    rope_theta: float = 10000.0,
    dtype: str = "float32",
    vocab_size: int | None = None,
) -> Path:
    """Write config.json, generation_config.json, model.safetensors and a tokenizer to out_dir.

    head_dim must be one vLLM's CPU attention supports (32, 64, ..., 256). `vocab_size` pads
    the vocab with filler tokens (default: the characters plus specials, a multiple of 8).
    """
    if vocab not in VOCABS:
        raise ValueError(f"vocab={vocab!r}: choose one of {sorted(VOCABS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")
    if head_dim % 32 or not 32 <= head_dim <= 256:
        raise ValueError(f"head_dim={head_dim}: use a multiple of 32 in [32, 256] (vLLM CPU attention)")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    eos_id, pad_id = SPECIAL_TOKENS.index(EOS_TOKEN), SPECIAL_TOKENS.index(PAD_TOKEN)
    im_end_id = SPECIAL_TOKENS.index("<|im_end|>")
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": len(_vocab_tokens(vocab, vocab_size)[0]),
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": num_layers,
        "initializer_range": 0.02,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": dtype,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
        "bos_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_position_embeddings,
    }
    special_tokens_map = {k: tokenizer_config[k] for k in ("eos_token", "pad_token", "unk_token")}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = _hf_weights(config, seed, DTYPES[dtype])
    _write_if_changed(out / "model.safetensors", safetensors_bytes(weights, metadata={"format": "pt"}))
    _write_if_changed(out / "config.json", _json_bytes(config))
    _write_if_changed(
        out / "generation_config.json",
        _json_bytes({"eos_token_id": [eos_id, im_end_id], "pad_token_id": pad_id}),
    )
    _write_if_changed(out / "tokenizer.json", _tokenizer_json(vocab, vocab_size).encode())
    _write_if_changed(out / "tokenizer_config.json", _json_bytes(tokenizer_config))
    _write_if_changed(out / "special_tokens_map.json", _json_bytes(special_tokens_map))
    return out


def write_random_checkpoint(out_dir: str | os.PathLike, shape: str | dict, dtype: str = "bfloat16",
                            seed: int = 0) -> Path:
    """A Qwen3 of `shape` (a QWEN3_SHAPES name or its dims) with random weights, ascii tokenizer
    padded to the vocab. Kept across runs: a directory written with the same arguments is reused."""
    dims = QWEN3_SHAPES[shape] if isinstance(shape, str) else dict(shape)
    spec = dict(dims, dtype=dtype, seed=seed)
    out = Path(out_dir)
    marker = out / "random_checkpoint.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return out
    marker.unlink(missing_ok=True)
    write_tiny_checkpoint(out, vocab="ascii", dtype=dtype, seed=seed, rope_theta=1_000_000.0,
                          max_position_embeddings=4096, **dims)
    marker.write_text(json.dumps(spec))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m lockstep.models.tiny OUT_DIR")
    print(write_tiny_checkpoint(sys.argv[1]))
