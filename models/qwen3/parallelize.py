"""Tensor parallelism for lockstep's Qwen3 that keeps TP=1's bits, forward and backward.

The layout (sharding.py) splits no reduction of the forward: every sharded weight is split
on its output features. `parallelize(model, comm)` makes `model` one rank of a TP group:

    embedding   rows of this rank's vocab slice looked up, the others -0.0; summed over
                ranks (one contributor per element, and v + -0.0 == v, so exact)
    q/k/v, gate/up   column-parallel: this rank's heads / intermediate columns, no comm
    o, down     the input all-gathered (exact), this rank's output features over the
                whole K, the output all-gathered (exact): every rank holds the full hidden
    lm_head     this rank's vocab columns of the fp32 logits, all-gathered before logprobs

So each output element is the kernel TP=1 runs over the same K: the forward bits are TP=1's
on any device, and the logprob reductions see the full logits row, as on one rank.

Backward (trainer): a column-parallel layer's input gradient is a sum over every rank's
output features. Each rank computes its fp32 partial (`linear_partial`), the partials are
all-gathered and folded with `kernels.tree_combine` in rank order, then rounded once, as
TP=1's backward does over the unsplit N. On CPU's tiled tree that is TP=1's bits when each
rank's share of the features is a multiple of `kernels.TILE_K`, and weight gradients are
TP=1's rows. On GPU the backward repeats bit for bit but is not TP=1's (chained K here, cuBLAS
at TP=1): only the forward must match the generator.

`parallelize` replaces the forward of the modules it touches on this instance (the model
class holds no parallelism); DTensor parameters (the trainer's) are used through their
local shard. `comm` is a `TPComm` (torch.distributed) or anything with the same four members
(vLLM's GroupCoordinator wrapper, models/vllm/qwen3.py).
"""

import types

import torch
import torch.distributed as dist
from torch import nn

from lockstep import kernels

from .model import QKNormRope, Qwen3Model, RMSNorm
from .sharding import check_tp, tp_rows, tp_shard_dim


# torch >= 2.13 names it all_gather_single; older ones (the GPU hosts' 2.11) all_gather_into_tensor.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TPComm:
    """A torch.distributed group seen as a TP group: rank, size, all_gather, all_reduce."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's `x` concatenated along `dim`, in rank order."""
        out = x.new_empty((self.size * x.numel(),))
        _all_gather_flat(out, x.contiguous().view(-1), group=self.group)
        return torch.cat(out.view(self.size, *x.shape).unbind(0), dim=dim)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, group=self.group)
        return out


def _local(p: torch.Tensor) -> torch.Tensor:
    """A DTensor parameter's local shard (differentiable), a plain one as it is."""
    return p.to_local() if hasattr(p, "to_local") else p


def _combine(comm, partial: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of fp32 partials, folded in rank order (kernels.tree_combine)."""
    if comm.size == 1:
        return partial
    chunks = comm.all_gather(partial.unsqueeze(0), dim=0)  # [size, ...]
    return kernels.tree_combine(list(chunks.unbind(0)))


class _GatherLast(torch.autograd.Function):
    """All-gather along the last dim. Backward: this rank's slice of the gradient, which is
    the same on every rank (all consumers downstream run replicated or combine exactly)."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm, ctx.width = comm, x.shape[-1]
        return comm.all_gather(x, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(-1, ctx.comm.rank * ctx.width, ctx.width).contiguous(), None


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) of values with one nonzero contributor. Backward: identity."""

    @staticmethod
    def forward(ctx, x, comm):
        return comm.all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ColumnLinear(torch.autograd.Function):
    """cat_i(linear(x, w_i)) over this rank's rows of each w_i (fp32 `linear_partial` for one
    weight with partial=True); x's gradient combined over ranks exactly (module docstring)."""

    @staticmethod
    def forward(ctx, x, comm, partial, *weights):
        ctx.comm = comm
        ctx.save_for_backward(x, *weights)
        if partial:
            return kernels.linear_partial(x, weights[0])
        if len(weights) == 1:
            return kernels.linear(x, weights[0])
        return kernels.linear_group(x, list(weights))

    @staticmethod
    def backward(ctx, grad):
        # kernels.linear's backward, with the fp32 input partials combined before rounding.
        x, *weights = ctx.saved_tensors
        g2d = grad.reshape(-1, grad.shape[-1]).to(x.dtype)
        x2d = x.reshape(-1, x.shape[-1])
        grad_x, grad_ws, col = None, [], 0
        for i, w in enumerate(weights):
            g = g2d[:, col : col + w.shape[0]]
            col += w.shape[0]
            if ctx.needs_input_grad[0]:
                part = _combine(ctx.comm, kernels.linear_partial(g, w.t()))  # fp32 [T, K]
                grad_x = part if grad_x is None else grad_x + part
            needs_w = ctx.needs_input_grad[3 + i]
            grad_ws.append(kernels.linear_partial(g.t(), x2d.t()).to(w.dtype) if needs_w else None)
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype).reshape(x.shape)
        return grad_x, None, None, *grad_ws


class _QKNormRope(torch.autograd.Function):
    """qk_norm_rope on this rank's heads. Backward: q_norm / k_norm weights are shared by
    every head, so their gradient is a sum over all heads: the op's backward runs on the
    all-gathered heads (the very call TP=1 makes) and each rank keeps its heads' input grads."""

    @staticmethod
    def forward(ctx, q, k, q_weight, k_weight, eps, positions, rope_cache, comm):
        ctx.comm, ctx.eps = comm, eps
        ctx.save_for_backward(q, k, q_weight, k_weight, positions, rope_cache)
        return kernels.qk_norm_rope(q, k, q_weight, k_weight, eps, positions, rope_cache)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        q, k, q_weight, k_weight, positions, rope_cache = ctx.saved_tensors
        comm = ctx.comm
        grad_q = grad_q if grad_q is not None else q.new_zeros(q.shape)
        grad_k = grad_k if grad_k is not None else k.new_zeros(k.shape)
        full = [comm.all_gather(t.contiguous(), dim=1) for t in (q, k, grad_q, grad_k)]  # [T, H, D] each
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (full[0], full[1], q_weight, k_weight)]
            outs = kernels.qk_norm_rope(*leaves, ctx.eps, positions, rope_cache)
            gq, gk, gqw, gkw = torch.autograd.grad(outs, leaves, full[2:])
        num_q, num_kv = q.shape[1], k.shape[1]
        gq = gq.narrow(1, comm.rank * num_q, num_q)
        gk = gk.narrow(1, comm.rank * num_kv, num_kv)
        return gq, gk, gqw, gkw, None, None, None, None


def column_linear(x, weights, comm, *, partial: bool = False):
    return _ColumnLinear.apply(x, comm, partial, *[_local(w) for w in weights])


def gather_last(x, comm):
    return x if comm.size == 1 else _GatherLast.apply(x, comm)


def vocab_embedding(ids: torch.Tensor, weight: torch.Tensor, comm) -> torch.Tensor:
    """ids [T] -> [T, H] from this rank's vocab rows `weight` [V / size, H], summed over ranks."""
    rows = weight.shape[0]
    local_ids = ids - comm.rank * rows
    mine = (local_ids >= 0) & (local_ids < rows)  # [T]
    out = nn.functional.embedding(torch.where(mine, local_ids, 0), weight)
    if comm.size == 1:
        return out
    out = torch.where(mine[:, None], out, out.new_full((), -0.0))  # v + -0.0 == v, for every v
    return _SumOverRanks.apply(out, comm)


# -- the forwards installed on one model instance --


def _embedding_forward(self, ids):
    return vocab_embedding(ids, _local(self.weight), self._tp)


def _column_group_forward(self, x):
    return column_linear(x, [m.weight for m in self._parts], self._tp)


def _gathered_row_forward(self, x):
    """o / down: full input, this rank's output features, full output."""
    comm = self._tp
    return gather_last(column_linear(gather_last(x, comm), [self.weight], comm), comm)


def _output_forward(self, x):
    comm = self._tp
    logits = gather_last(column_linear(x, [self.weight], comm, partial=True), comm)  # [T, V] fp32
    return logits if self.bias is None else logits + _local(self.bias).float()


def _rms_norm_forward(self, x, residual=None):
    if residual is None:
        return kernels.rms_norm(x, _local(self.weight), self.eps)
    return kernels.add_rms_norm(x, residual, _local(self.weight), self.eps)


def _qk_norm_rope_forward(self, q, k, positions, rope_cache):
    q_norm, k_norm = self._norms
    q_weight, k_weight, comm = _local(q_norm.weight), _local(k_norm.weight), self._tp
    if comm.size == 1 or not torch.is_grad_enabled():
        return kernels.qk_norm_rope(q, k, q_weight, k_weight, q_norm.eps, positions, rope_cache)
    return _QKNormRope.apply(q, k, q_weight, k_weight, q_norm.eps, positions, rope_cache, comm)


def _install(module: nn.Module, forward, comm) -> None:
    module._tp = comm
    module.forward = types.MethodType(forward, module)


def parallelize(model: Qwen3Model, comm) -> Qwen3Model:
    """Make `model` rank `comm.rank` of a TP group of `comm.size` (in place; returns it).

    Its TP-sharded parameters must already hold this rank's rows (`shard_parameters`, or
    DTensors with Shard(0) on the TP mesh: `distribute_parameters`)."""
    check_tp(model.config, comm.size, field="tp")
    _install(model.tok_embeddings, _embedding_forward, comm)
    _install(model.output, _output_forward, comm)
    for block in model.layers.values():
        attn, ffn = block.attention, block.feed_forward
        _install(attn.qkv, _column_group_forward, comm)
        _install(ffn.gate_up, _column_group_forward, comm)
        _install(attn.wo, _gathered_row_forward, comm)
        _install(ffn.w2, _gathered_row_forward, comm)
        attn.num_q_features = _local(attn.wq.weight).shape[0]
        attn.num_kv_features = _local(attn.wk.weight).shape[0]
    for module in model.modules():
        if isinstance(module, RMSNorm):
            _install(module, _rms_norm_forward, comm)
        elif isinstance(module, QKNormRope):
            _install(module, _qk_norm_rope_forward, comm)
    return model


def local_shapes(config, tp_rank: int, tp_size: int) -> dict[str, tuple[tuple[int, ...], int]]:
    """Parameter name -> (rank `tp_rank`'s shape, its first row in the full tensor)."""
    with torch.device("meta"):
        full = Qwen3Model(config)
    out = {}
    for name, p in full.named_parameters(remove_duplicate=False):
        start, num_rows = tp_rows(name, p.shape[0], tp_rank, tp_size, config.num_kv_heads)
        out[name] = ((num_rows, *p.shape[1:]), start)
    return out


@torch.no_grad()
def shard_parameters(model: Qwen3Model, tp_rank: int, tp_size: int, device, dtype: torch.dtype) -> None:
    """Give every parameter of a (meta-built) model this rank's shape, uninitialized, on
    `device`: the generator's way to hold only its shard. Tied weights stay tied."""
    shapes = local_shapes(model.config, tp_rank, tp_size)
    for name, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            full_name = f"{name}.{pname}" if name else pname
            shape, _ = shapes[full_name]
            setattr(module, pname, nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=False))
    model.tie_weights()
    model.init_buffers(device)


def distribute_parameters(model: Qwen3Model, tp_mesh) -> None:
    """Trainer: every parameter as a DTensor on `tp_mesh`, Shard(0) or Replicate() per
    sharding.py, from the full tensors each rank holds. Tied weights stay tied."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    check_tp(model.config, tp_mesh.size(), field="trainer layout tp", trainer=True)
    done: dict[int, nn.Parameter] = {}
    for name, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            full_name = f"{name}.{pname}" if name else pname
            if id(p) not in done:
                placement = Replicate() if tp_shard_dim(full_name) is None else Shard(0)
                done[id(p)] = nn.Parameter(distribute_tensor(p.data, tp_mesh, [placement]), requires_grad=p.requires_grad)
            setattr(module, pname, done[id(p)])


__all__ = ["TPComm", "column_linear", "distribute_parameters", "gather_last", "local_shapes", "parallelize",
           "shard_parameters", "vocab_embedding"]
