"""log-softmax and per-token logprobs over the vocab, fp32.

Temperature is applied exactly as vLLM's sampler does before its processed logprobs:
`z = logits.float() / temperature` (a true division, also when temperature == 1.0).
Then m = max(z) over the whole vocab (max is exact in any order), s = sum(exp(z - m)) in
fixed TILE_V tiles folded in the balanced tree, and logp = (z - m) - log(s).
Vocab-parallel later: all-reduce the max, each rank sums its whole tiles (a subtree), gather
and `tree_fold` the partial sums, exactly as `linear.tree_combine` does for K-shards.
"""

import torch
from torch import Tensor

from lockstep.kernels._dispatch import op, triton_fn
from lockstep.kernels._math import det_exp, det_log
from lockstep.kernels._tree import tiled_sum

TILE_V = 256
_MAX_CHUNK_NUMEL = 1 << 22  # logits held in fp32 at once


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """logits.float() / temperature, a true division on every device (CUDA turns division by a
    Python scalar into multiplication by its reciprocal; by a device tensor it does not)."""
    return logits.float() / torch.full((), temperature, dtype=torch.float32, device=logits.device)


def _shift_and_log_sum(z: Tensor) -> tuple[Tensor, Tensor]:
    """z [R, V] fp32 -> (z - m [R, V], log(sum exp(z - m)) [R, 1])."""
    shifted = z - z.amax(dim=-1, keepdim=True)
    log_sum = det_log(tiled_sum(det_exp(shifted), dim=-1, tile=TILE_V)).unsqueeze(-1)
    return shifted, log_sum


def _row_chunks(num_rows: int, vocab: int):
    step = max(1, _MAX_CHUNK_NUMEL // max(vocab, 1))
    for r0 in range(0, num_rows, step):
        yield r0, min(r0 + step, num_rows)


def log_softmax_reference(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """logits [T, V] -> fp32 [T, V]."""
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    for r0, r1 in _row_chunks(*logits.shape):
        shifted, log_sum = _shift_and_log_sum(_scaled(logits[r0:r1], temperature))
        out[r0:r1] = shifted - log_sum
    return out


def token_logprobs_reference(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """logits [T, V], ids int [T] -> fp32 [T]; equals log_softmax(...)[t, ids[t]] bit for bit."""
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for r0, r1 in _row_chunks(*logits.shape):
        shifted, log_sum = _shift_and_log_sum(_scaled(logits[r0:r1], temperature))
        picked = shifted.gather(1, ids[r0:r1, None].long())
        out[r0:r1] = (picked - log_sum)[:, 0]
    return out


def log_softmax_backward_reference(grad: Tensor, logp: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """d/dlogits of sum(grad * logp): (grad - softmax * sum(grad)) / temperature."""
    total = tiled_sum(grad.float(), dim=-1, tile=TILE_V).unsqueeze(-1)
    return ((grad.float() - det_exp(logp) * total) / temperature).to(dtype)


def token_logprobs_backward_reference(grad: Tensor, logits: Tensor, ids: Tensor, temperature: float) -> Tensor:
    """d/dlogits of sum(grad * logp[t, ids[t]]): (onehot - softmax) * grad / temperature."""
    out = torch.empty_like(logits)
    for r0, r1 in _row_chunks(*logits.shape):
        shifted, log_sum = _shift_and_log_sum(_scaled(logits[r0:r1], temperature))
        g = grad[r0:r1, None].float()
        gz = -(det_exp(shifted - log_sum) * g)
        onehot = torch.zeros_like(gz, dtype=torch.bool).scatter_(1, ids[r0:r1, None].long(), True)
        gz = torch.where(onehot, gz + g, gz)
        out[r0:r1] = (gz / temperature).to(logits.dtype)
    return out


def _check(logits: Tensor, temperature: float) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logprobs: logits must be [T, V], got {tuple(logits.shape)}; flatten the batch first")
    if not temperature > 0:
        raise ValueError(f"logprobs: temperature must be > 0, got {temperature} (greedy = pass 1.0)")


@op("log_softmax", mutates_args=())
def _log_softmax_op(logits: Tensor, temperature: float) -> Tensor:
    _check(logits, temperature)
    fn = triton_fn("logprobs", "log_softmax_fwd") if logits.is_cuda else None
    return fn(logits, temperature) if fn is not None else log_softmax_reference(logits, temperature)


@op("token_logprobs", mutates_args=())
def _token_logprobs_op(logits: Tensor, ids: Tensor, temperature: float) -> Tensor:
    _check(logits, temperature)
    if ids.shape != logits.shape[:1]:
        raise ValueError(f"token_logprobs: ids must be [T={logits.shape[0]}], got {tuple(ids.shape)}")
    fn = triton_fn("logprobs", "token_logprobs_fwd") if logits.is_cuda else None
    return fn(logits, ids, temperature) if fn is not None else token_logprobs_reference(logits, ids, temperature)


@_log_softmax_op.register_fake
def _(logits, temperature):
    return logits.new_empty(logits.shape, dtype=torch.float32)


@_token_logprobs_op.register_fake
def _(logits, ids, temperature):
    return logits.new_empty(logits.shape[:1], dtype=torch.float32)


@op("log_softmax_backward", mutates_args=())
def _log_softmax_backward_op(grad: Tensor, logp: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    return log_softmax_backward_reference(grad, logp, temperature, dtype)


@_log_softmax_backward_op.register_fake
def _(grad, logp, temperature, dtype):
    return torch.empty_like(logp, dtype=dtype)


@op("token_logprobs_backward", mutates_args=())
def _token_logprobs_backward_op(grad: Tensor, logits: Tensor, ids: Tensor, temperature: float) -> Tensor:
    fn = triton_fn("logprobs", "token_logprobs_bwd") if logits.is_cuda else None
    return fn(grad, logits, ids, temperature) if fn is not None else token_logprobs_backward_reference(
        grad, logits, ids, temperature)


@_token_logprobs_backward_op.register_fake
def _(grad, logits, ids, temperature):
    return torch.empty_like(logits)


def _setup_log_softmax(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.temperature, ctx.dtype = inputs[1], inputs[0].dtype


def _log_softmax_backward(ctx, grad):
    (logp,) = ctx.saved_tensors
    return _log_softmax_backward_op(grad, logp, ctx.temperature, ctx.dtype), None


def _setup_token_logprobs(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.temperature = inputs[2]


def _token_logprobs_backward(ctx, grad):
    logits, ids = ctx.saved_tensors
    return _token_logprobs_backward_op(grad, logits, ids, ctx.temperature), None, None


_log_softmax_op.register_autograd(_log_softmax_backward, setup_context=_setup_log_softmax)
_token_logprobs_op.register_autograd(_token_logprobs_backward, setup_context=_setup_token_logprobs)


def log_softmax(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """logits [T, V] -> fp32 [T, V] of log_softmax(logits.float() / temperature)."""
    return _log_softmax_op(logits, float(temperature))


def token_logprobs(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """logits [T, V], ids int [T] -> fp32 [T]: log_softmax(logits.float() / temperature)[t, ids[t]]."""
    return _token_logprobs_op(logits, ids, float(temperature))
