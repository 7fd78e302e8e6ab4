"""Plain eager calls skip the custom-op dispatcher; everything else goes through it. Same bits."""

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lockstep import kernels
from lockstep.kernels import _dispatch

# The modules (kernels/__init__ exports functions of the same names).
activation, attention, linear, logprobs, qk_norm_rope, rms_norm = (
    importlib.import_module(f"lockstep.kernels.{m}")
    for m in ("activation", "attention", "linear", "logprobs", "qk_norm_rope", "rms_norm"))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
OPS = [linear._linear_op, linear._linear_group_op, rms_norm._rms_norm_op, rms_norm._add_rms_norm_op,
       activation._silu_mul_op, qk_norm_rope._qk_norm_rope_op, attention._attention_varlen_op,
       logprobs._token_logprobs_op, rms_norm._norm_grads, linear._linear_partial_op]
H, HQ, HKV, D, V = 64, 2, 1, 32, 96


class _Passthrough(TorchDispatchMode):
    """Any active dispatch mode sends the ops through the registered custom op."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _params(device, dtype):
    g = torch.Generator().manual_seed(0)

    def p(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()

    return dict(w_qkv=[p(HQ * D, H), p(HKV * D, H), p(HKV * D, H)], w_o=p(H, HQ * D), w_up=[p(2 * H, H), p(2 * H, H)],
                w_down=p(H, 2 * H), norm=p(H), q_norm=p(D), k_norm=p(D), lm_head=p(V, H), bias=p(H))


def _step(x, prm, ids, positions, cu, cache):
    """A decoder layer and the logprobs of `ids`, through every op with a backward."""
    h = kernels.rms_norm(x, prm["norm"], 1e-6)
    qkv = kernels.linear_group(h, prm["w_qkv"])
    q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], -1)
    q, k = kernels.qk_norm_rope(q.view(-1, HQ, D), k.view(-1, HKV, D), prm["q_norm"], prm["k_norm"], 1e-6,
                                positions, cache)
    attn = kernels.attention_varlen(q, k, v.reshape(-1, HKV, D).contiguous(), cu, D**-0.5).reshape(-1, HQ * D)
    y, res = kernels.add_rms_norm(kernels.linear(attn, prm["w_o"], prm["bias"]), x, prm["norm"], 1e-6)
    up = kernels.silu_mul(kernels.linear_group(y, prm["w_up"]))
    out = kernels.linear(up, prm["w_down"]) + res
    return kernels.token_logprobs(kernels.linear(out, prm["lm_head"]), ids, 0.7)


def _run(device, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, H, generator=g).to(device, dtype).requires_grad_()
    prm = _params(device, dtype)
    ids = torch.randint(0, V, (9,), generator=g).to(device)
    positions = torch.cat([torch.arange(4), torch.arange(5)]).to(device)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    lp = _step(x, prm, ids, positions, cu, kernels.rope_cache(D, 16).to(device))
    lp.sum().backward()
    leaves = [x, *prm["w_qkv"], prm["w_o"], *prm["w_up"], prm["w_down"], prm["norm"], prm["q_norm"], prm["k_norm"],
              prm["lm_head"], prm["bias"]]
    return lp.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_path_equals_the_custom_op_forward_and_backward(device, dtype, monkeypatch):
    with _Passthrough():
        want_lp, want_grads = _run(device, dtype)
    # Plain eager must not touch the dispatcher at all.
    for o in OPS:
        monkeypatch.setattr(o, "custom", _fail(o.name))
    got_lp, got_grads = _run(device, dtype)
    assert torch.equal(got_lp, want_lp)
    for i, (got, want) in enumerate(zip(got_grads, want_grads)):
        assert got is not None and torch.equal(got, want), f"gradient of leaf {i} differs"


def _fail(name):
    def custom(*args):
        raise AssertionError(f"{name}: a plain eager call went through the dispatcher")

    return custom


def test_no_grad_and_inference_calls_run_the_function_itself(monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 40, generator=g, requires_grad=True)
    w = torch.randn(4, 40, generator=g, requires_grad=True)
    with _Passthrough(), torch.no_grad():
        want = kernels.linear(x, w)
    monkeypatch.setattr(linear._linear_op, "custom", _fail("linear"))
    monkeypatch.setattr(linear._linear_op, "function", None)  # no autograd path either
    with torch.no_grad():
        got = kernels.linear(x, w)
    with torch.inference_mode():
        got_inference = kernels.linear(x, w)
    assert got.grad_fn is None and torch.equal(got, want) and torch.equal(got_inference, want)


def test_tracing_and_fake_tensors_take_the_custom_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert _dispatch._plain_eager((torch.ones(1), torch.nn.Parameter(torch.ones(1))))
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(3, 8))
        w = mode.from_tensor(torch.randn(4, 8))
        assert not _dispatch._plain_eager((x, w))
        assert kernels.linear(x, w).shape == (3, 4)  # the fake rule answered
