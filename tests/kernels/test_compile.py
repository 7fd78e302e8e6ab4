"""The ops trace under torch.compile (custom ops with fake and autograd rules)."""

import torch

import lockstep.kernels as K


def _block(x, w_qkv, w_up, norm_w, cache, positions, cu):
    h = K.rms_norm(x, norm_w, 1e-6)
    qkv = K.linear(h, w_qkv).view(x.shape[0], 3, 2, 32)
    q, k = K.rope(qkv[:, 0].contiguous(), qkv[:, 1].contiguous(), positions, cache)
    attn = K.attention_varlen(q, k, qkv[:, 2].contiguous(), cu, 32**-0.5).reshape(x.shape[0], 64)
    y, res = K.add_rms_norm(attn, x, norm_w, 1e-6)
    return K.linear(K.silu_mul(K.linear(y, w_up)), w_up[:64].T.contiguous()) + res


def test_compiled_block_matches_eager_with_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 64, generator=g, requires_grad=True)
    w_qkv = torch.randn(192, 64, generator=g, requires_grad=True)
    w_up = torch.randn(128, 64, generator=g, requires_grad=True)
    norm_w = torch.randn(64, generator=g, requires_grad=True)
    cache = K.rope_cache(32, 64)
    positions = torch.cat([torch.arange(5), torch.arange(7)])
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    args = (x, w_qkv, w_up, norm_w, cache, positions, cu)
    eager = _block(*args)
    eager.sum().backward()
    eager_grads = [t.grad.clone() for t in (x, w_qkv, w_up, norm_w)]
    for t in (x, w_qkv, w_up, norm_w):
        t.grad = None
    compiled = torch.compile(_block, backend="aot_eager", fullgraph=True)(*args)
    compiled.sum().backward()
    assert torch.equal(compiled, eager)
    assert all(torch.equal(t.grad, e) for t, e in zip((x, w_qkv, w_up, norm_w), eager_grads))
