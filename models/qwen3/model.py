"""The one Qwen3 (dense) that both the trainer and the generator run.

Every numerical step goes through `lockstep.kernels` (linear / linear_group, rms_norm /
add_rms_norm, qk_norm_rope, attention_varlen, silu_mul), so a token's logprob is the same bits
whether it was computed inside vLLM or inside TorchTitan. The embedding is a plain gather (exact).

Tokens are packed: `forward(tokens[T], positions[T], attn_meta) -> hidden[T, H]`, with no
batch dimension. Module names follow TorchTitan's Qwen3 (tok_embeddings, layers["0"..],
norm, output; attention.{wq,wk,wv,wo,q_norm,k_norm}, feed_forward.{w1,w2,w3},
attention_norm, ffn_norm), so TorchTitan's state-dict adapter and FSDP apply functions
work on this model unchanged. The model holds no parallelism: parallelize.py makes an
instance one rank of a TP group (sharding.py's layout), setting its local head widths.

Injectable attention (how vLLM plugs in its paged KV cache):

    attn_factory(layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float) -> nn.Module
    module.forward(q[T, Hq, D], k[T, Hkv, D], v[T, Hkv, D], attn_meta) -> [T, Hq, D]

`q`/`k` arrive q/k-normed and rotated. The default factory builds `VarlenAttention`, which
reads `attn_meta.cu_seqlens` (see `VarlenMeta`); another factory may ignore `attn_meta`
(vLLM's wrapper takes its metadata from the forward context). The module is registered as
`layers[i].attention.inner_attention`.
"""

import json
import os
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
from torch import nn

from lockstep import kernels


@dataclass(kw_only=True, slots=True)
class Qwen3Config:
    """Architecture of a dense Qwen3; `from_hf` reads a Qwen3ForCausalLM config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type is int:
                if not isinstance(value, int) or value <= 0:
                    raise ValueError(f"Qwen3Config.{f.name}={value!r}: must be a positive int")
        for name in ("rms_norm_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Qwen3Config.{name}={getattr(self, name)!r}: must be > 0")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"Qwen3Config: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}; fix the checkpoint's config.json"
            )

    @classmethod
    def from_hf(cls, path_or_dict: "str | os.PathLike | dict[str, Any]") -> "Qwen3Config":
        """From a HF checkpoint dir, its config.json, or the parsed dict."""
        if isinstance(path_or_dict, dict):
            hf = path_or_dict
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise ValueError(f"no HF config at {path}: pass a checkpoint dir holding config.json")
            with open(path) as f:
                hf = json.load(f)
        _check_supported(hf)
        num_heads = hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or {}
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 1_000_000.0))),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )


def _check_supported(hf: dict[str, Any]) -> None:
    """Reject configs this model would silently get wrong."""
    archs = hf.get("architectures") or ["Qwen3ForCausalLM"]
    if hf.get("model_type", "qwen3") != "qwen3" or "Qwen3ForCausalLM" not in archs:
        raise ValueError(
            f"config.json describes {archs} (model_type={hf.get('model_type')!r}); "
            "lockstep's Qwen3 needs a dense Qwen3ForCausalLM checkpoint"
        )
    if hf.get("attention_bias"):
        raise ValueError("config.json has attention_bias=true; lockstep's Qwen3 has no q/k/v/o bias")
    if hf.get("use_sliding_window"):
        raise ValueError("config.json has use_sliding_window=true; lockstep's Qwen3 is full attention only")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}; lockstep's Qwen3 supports silu only")
    rope_type = (hf.get("rope_scaling") or hf.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"config.json rope_type={rope_type!r}; lockstep's Qwen3 supports plain RoPE only")


@dataclass
class VarlenMeta:
    """Attention metadata of packed sequences: cu_seqlens[B+1] int32, cumulative lengths from 0."""

    cu_seqlens: torch.Tensor


class Linear(nn.Linear):
    """nn.Linear whose matmul is `kernels.linear`; an nn.Linear so TP/FSDP plans recognise it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


class OutputHead(Linear):
    """lm_head with fp32 logits on every side (a parity rule).

    `linear_partial` over the whole K is `linear` before its downcast: the fp32 accumulator
    of the operands as stored, which equals linear(x.float(), w.float()) with no fp32 copy
    of the [V, H] weight.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = kernels.linear_partial(x, self.weight).float()  # [T, V]
        return logits if self.bias is None else logits + self.bias.float()


class RMSNorm(nn.RMSNorm):
    """forward(x) -> y, or forward(x, residual) -> (y, x + residual) fused."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps)
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)


class VarlenAttention(nn.Module):
    """Default inner attention: causal attention within each packed sequence."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, q, k, v, attn_meta: VarlenMeta) -> torch.Tensor:
        return kernels.attention_varlen(q, k, v, attn_meta.cu_seqlens, self.scale)


def default_attn_factory(layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
    return VarlenAttention(scale)


AttnFactory = Callable[[int, int, int, int, float], nn.Module]


class GroupedLinear(nn.Module):
    """Projections that share their input, in one launch: out = cat([m.weight @ x for m in parts]).

    Holds no parameters: `parts` stay registered where they are (wq/wk/wv, w1/w3, the
    TorchTitan names); this module only gives the fused call a name the audit records."""

    def __init__(self, *parts: nn.Linear):
        super().__init__()
        self._parts = parts  # a tuple: not registered again

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear_group(x, [m.weight for m in self._parts])  # [T, sum N_i]


class QKNormRope(nn.Module):
    """q_norm and k_norm per head, then rope, in one launch; parameter-free like GroupedLinear."""

    def __init__(self, q_norm: nn.RMSNorm, k_norm: nn.RMSNorm):
        super().__init__()
        self._norms = (q_norm, k_norm)

    def forward(self, q, k, positions, rope_cache):
        q_norm, k_norm = self._norms
        return kernels.qk_norm_rope(q, k, q_norm.weight, k_norm.weight, q_norm.eps, positions, rope_cache)


class Attention(nn.Module):
    def __init__(self, layer_id: int, config: Qwen3Config, attn_factory: AttnFactory):
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        self.head_dim = head_dim
        # This rank's q and k/v widths (all heads here; parallelize.py sets a TP rank's share).
        self.num_q_features = config.num_heads * head_dim
        self.num_kv_features = config.num_kv_heads * head_dim
        self.wq = Linear(hidden, config.num_heads * head_dim, bias=False)
        self.wk = Linear(hidden, config.num_kv_heads * head_dim, bias=False)
        self.wv = Linear(hidden, config.num_kv_heads * head_dim, bias=False)
        self.wo = Linear(config.num_heads * head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, eps=config.rms_norm_eps)
        self.qkv = GroupedLinear(self.wq, self.wk, self.wv)
        self.qk_norm_rope = QKNormRope(self.q_norm, self.k_norm)
        self.inner_attention = attn_factory(
            layer_id, config.num_heads, config.num_kv_heads, head_dim, head_dim**-0.5
        )

    def forward(self, x, rope_cache, positions, attn_meta) -> torch.Tensor:
        num_tokens, head_dim = x.shape[0], self.head_dim
        num_q, num_kv = self.num_q_features, self.num_kv_features
        qkv = self.qkv(x)  # [T, num_q + 2 * num_kv]
        q = qkv[:, :num_q].view(num_tokens, -1, head_dim)  # [T, Hq, D], views into qkv
        k = qkv[:, num_q : num_q + num_kv].view(num_tokens, -1, head_dim)  # [T, Hkv, D]
        v = qkv[:, num_q + num_kv :].view(num_tokens, -1, head_dim)  # [T, Hkv, D]
        q, k = self.qk_norm_rope(q, k, positions, rope_cache)
        out = self.inner_attention(q, k, v, attn_meta)  # [T, Hq, D]
        return self.wo(out.reshape(num_tokens, -1))


class FeedForward(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w1 = Linear(hidden_size, intermediate_size, bias=False)  # gate
        self.w2 = Linear(intermediate_size, hidden_size, bias=False)  # down
        self.w3 = Linear(hidden_size, intermediate_size, bias=False)  # up
        # Separate w1/w3 parameters (not one fused weight) keep colwise TP shards aligned.
        self.gate_up = GroupedLinear(self.w1, self.w3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(kernels.silu_mul(self.gate_up(x)))  # gate_up [T, 2I]


class TransformerBlock(nn.Module):
    moe_enabled = False  # read by TorchTitan's apply_fsdp

    def __init__(self, layer_id: int, config: Qwen3Config, attn_factory: AttnFactory):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(layer_id, config, attn_factory)
        self.feed_forward = FeedForward(config.hidden_size, config.intermediate_size)
        self.attention_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, residual, rope_cache, positions, attn_meta):
        """Returns (ffn_out, residual); the next norm adds them (vLLM's fused-residual form)."""
        if residual is None:
            h, residual = self.attention_norm(x), x
        else:
            h, residual = self.attention_norm(x, residual)
        h = self.attention(h, rope_cache, positions, attn_meta)
        h, residual = self.ffn_norm(h, residual)
        return self.feed_forward(h), residual


class Qwen3Model(nn.Module):
    def __init__(self, config: Qwen3Config, attn_factory: AttnFactory | None = None):
        super().__init__()
        self.config = config
        attn_factory = attn_factory or default_attn_factory
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(i, config, attn_factory) for i in range(config.num_layers)}
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.output = OutputHead(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        # fp32 cos/sin table; not in the state dict, rebuilt by init_buffers().
        self.register_buffer("rope_cache", self._make_rope_cache(torch.get_default_device()), persistent=False)

    def _make_rope_cache(self, device) -> torch.Tensor:
        # Always built on CPU, then moved: the same bits on every side and device.
        cfg = self.config
        with torch.device("cpu"):
            cache = kernels.rope_cache(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        return cache.to(device)

    def tie_weights(self) -> None:
        """Share the embedding with lm_head (again after to_empty/meta init, which unties)."""
        if self.config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def pack_projections(self) -> None:
        """Lay each block's wq/wk/wv and w1/w3 out as consecutive rows of one buffer.

        `linear_group` then runs q/k/v (and gate/up) as one operand in one launch. The
        parameters stay separate (names, in-place loads); only their storage moves. The
        generator calls this once after building the model; FSDP (trainer) reshards them."""
        for block in self.layers.values():
            for parts in ((block.attention.wq, block.attention.wk, block.attention.wv),
                          (block.feed_forward.w1, block.feed_forward.w3)):
                first = parts[0].weight
                buffer = first.new_empty((sum(m.weight.shape[0] for m in parts), first.shape[1]))
                row = 0
                for m in parts:
                    rows = m.weight.shape[0]
                    buffer[row : row + rows].copy_(m.weight)
                    m.weight = nn.Parameter(buffer[row : row + rows], requires_grad=m.weight.requires_grad)
                    row += rows

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Rebuild the fp32 rope cache (after to_empty, or a dtype cast that rounded it)."""
        device = device if device is not None else self.tok_embeddings.weight.device
        self.rope_cache = self._make_rope_cache(torch.device(device))

    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        """Random init, deterministic given the torch seed. Call under torch.no_grad()."""
        self.tie_weights()
        self.init_buffers(buffer_device)
        hidden = self.config.hidden_size
        nn.init.normal_(self.tok_embeddings.weight, std=1.0)
        for layer_id, block in enumerate(self.layers.values()):
            # Depth-scaled init of the residual-writing projections, as in TorchTitan.
            out_std = 0.02 / (2 * (layer_id + 1)) ** 0.5
            attn, ffn = block.attention, block.feed_forward
            for w in (attn.wq.weight, attn.wk.weight, attn.wv.weight, ffn.w1.weight):
                nn.init.trunc_normal_(w, std=0.02, a=-0.04, b=0.04)
            for w in (attn.wo.weight, ffn.w2.weight, ffn.w3.weight):
                nn.init.trunc_normal_(w, std=out_std, a=-2 * out_std, b=2 * out_std)
            for norm in (attn.q_norm, attn.k_norm, block.attention_norm, block.ffn_norm):
                norm.reset_parameters()
        self.norm.reset_parameters()
        # Also the embedding when tied: std 1 would make logits far too large.
        out_std = hidden**-0.5
        nn.init.trunc_normal_(self.output.weight, std=out_std, a=-3 * out_std, b=3 * out_std)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attn_meta) -> torch.Tensor:
        """tokens[T] int64, positions[T] int64 -> final-normed hidden[T, H]."""
        h = self.tok_embeddings(tokens)  # [T, H]
        residual = None
        for block in self.layers.values():
            h, residual = block(h, residual, self.rope_cache, positions, attn_meta)
        h, _ = self.norm(h, residual)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden[T, H] -> fp32 logits[T, V] (tied: the embedding matrix is lm_head)."""
        return self.output(hidden)


def token_logprobs_packed(
    model: Qwen3Model,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: torch.Tensor,
    target_index: torch.Tensor,
    target_ids: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """fp32[N] logprob of target_ids[N] predicted at packed rows target_index[N].

    Row i predicts token i+1 of its sequence, so the logprob of tokens[j] is read at j-1.
    Only the selected rows go through lm_head.
    """
    hidden = model(tokens, positions, VarlenMeta(cu_seqlens))  # [T, H]
    logits = model.logits(hidden[target_index])  # [N, V] fp32
    return kernels.token_logprobs(logits, target_ids, temperature)
