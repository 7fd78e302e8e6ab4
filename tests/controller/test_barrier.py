import pytest
import torch

from lockstep.controller.barrier import BarrierError, check, compare, float_bits


def _pair():
    gen = [torch.tensor([-0.5, -1.25, -3.0], dtype=torch.float32), torch.tensor([-2.0], dtype=torch.float32)]
    return gen, [t.clone() for t in gen]


def test_equal_logprobs_report_zero_differences():
    gen, train = _pair()
    report = check("strict", gen, train)
    assert report.num_tokens == 4 and report.num_differing_tokens == 0
    assert report.max_abs_diff == 0.0 and report.kl == 0.0 and report.first_mismatch is None


def test_one_ulp_counts_as_a_difference():
    gen, train = _pair()
    train[0] = torch.nextafter(train[0], torch.zeros_like(train[0]))  # every token 1 ulp off
    train[1].view(torch.int32)[0] ^= 1
    report = compare(gen, train)
    assert report.num_differing_tokens == 4
    assert 0 < report.max_abs_diff < 1e-6
    assert report.kl > 0


def test_signed_zero_differs_in_bits():
    # -0.0 == 0.0 numerically but not bitwise; the barrier compares bits
    report = compare([torch.tensor([0.0])], [torch.tensor([-0.0])])
    assert report.num_differing_tokens == 1


def test_strict_names_first_mismatch_exactly():
    gen, train = _pair()
    train[0][2] = -3.0000002
    train[1][0] = -2.5
    with pytest.raises(BarrierError) as e:
        check("strict", gen, train, token_ids=[[7, 8, 9], [4]])
    text = str(e.value)
    assert "sample 0 token 2 (id 9)" in text
    assert "-3.0 (0xc0400000)" in text
    assert float_bits(train[0][2].item()) in text
    assert "2 of 4 tokens differ" in text


def test_measure_does_not_raise_and_off_returns_none():
    gen, train = _pair()
    train[1][0] = -1.0
    report = check("measure", gen, train)
    assert report.num_differing_tokens == 1 and report.max_abs_diff == 1.0
    # k3 of r = exp(1): e - 1 - 1, averaged over 4 tokens
    assert report.kl == pytest.approx((torch.e - 2) / 4)
    assert check("off", gen, train) is None


def test_shape_mismatch_is_an_error_under_every_checking_policy():
    gen, train = _pair()
    train[0] = train[0][:2]
    with pytest.raises(ValueError, match="sample 0"):
        check("measure", gen, train)
    with pytest.raises(ValueError, match="loop.barrier"):
        check("sometimes", gen, train)
