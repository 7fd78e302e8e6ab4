"""enable(): aten mm/addmm/bmm/_log_softmax/mean become row-invariant in this process."""

import torch

import lockstep.kernels as K
from lockstep.kernels import aten_override


def _rows_match(fn, full_input, row):
    return torch.equal(fn(full_input[row : row + 1]), fn(full_input)[row : row + 1])


def test_mm_addmm_bmm_rows_are_batch_invariant_when_enabled():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 128, generator=g)
    b = torch.randn(128, 48, generator=g)
    bias = torch.randn(48, generator=g)
    with K.invariant_mode():
        assert K.is_enabled()
        for row in (0, 17, 63):
            assert _rows_match(lambda x: torch.mm(x, b), a, row)
            assert _rows_match(lambda x: x @ b, a, row)
            assert _rows_match(lambda x: torch.addmm(bias, x, b), a, row)
            assert _rows_match(lambda x: torch.nn.functional.linear(x, b.T, bias), a, row)
            assert _rows_match(lambda x: torch.bmm(x[None], b[None])[0], a, row)
        # Same arithmetic as lockstep's own linear.
        assert torch.equal(torch.mm(a, b), K.linear(a, b.T))
        assert torch.equal(torch.addmm(bias, a, b), K.linear(a, b.T, bias))
    assert not K.is_enabled()


def test_log_softmax_and_mean_when_enabled():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 500, generator=g) * 4
    with K.invariant_mode():
        assert torch.equal(torch.log_softmax(logits, dim=-1), K.log_softmax(logits))
        assert _rows_match(lambda x: torch.log_softmax(x, dim=-1), logits, 5)
        assert torch.log_softmax(logits.bfloat16(), dim=-1).dtype == torch.bfloat16
        # dim other than the last
        torch.testing.assert_close(torch.log_softmax(logits, dim=0), torch.log_softmax(logits.double(), dim=0).float())
        assert _rows_match(lambda x: x.mean(dim=-1), logits, 9)
        assert _rows_match(lambda x: x.mean(dim=-1, keepdim=True), logits, 9)
        torch.testing.assert_close(logits.mean(), logits.double().mean().float())
        assert logits.mean(dim=(0, 1), keepdim=True).shape == (1, 1)
        assert logits.bfloat16().mean(dim=-1).dtype == torch.bfloat16


def test_autograd_still_works_and_disable_restores(monkeypatch):
    a = torch.randn(8, 40, requires_grad=True)
    b = torch.randn(40, 5, requires_grad=True)
    with K.invariant_mode():
        (a @ b).sum().backward()
    torch.testing.assert_close(a.grad, torch.ones(8, 5) @ b.detach().T)
    # Count the calls that reach lockstep's matmul: only while enabled.
    calls = []
    matmul = aten_override._matmul
    monkeypatch.setattr(aten_override, "_matmul", lambda x, y: calls.append(1) or matmul(x, y))
    K.enable()
    K.enable()  # idempotent
    a.detach() @ b.detach()
    assert len(calls) == 1
    K.disable()
    assert not K.is_enabled()
    a.detach() @ b.detach()
    assert len(calls) == 1  # aten's own mm again
