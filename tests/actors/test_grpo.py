import math

import pytest
import torch

from lockstep.actors.grpo import assign_advantages, group_advantages, kl_penalty, policy_loss
from lockstep.actors.types import Sample


def test_advantages_by_hand():
    # group 0: rewards 0, 1 -> mean 0.5, population std 0.5 -> -1, +1
    # group 1: rewards 1, 2, 3, 6 -> mean 3, population std sqrt((4+1+0+9)/4) = sqrt(3.5)
    rewards = torch.tensor([0.0, 1.0, 1.0, 2.0, 3.0, 6.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="num_samples_per_prompt"):
        group_advantages(rewards, 3)
    adv = group_advantages(rewards[:2], 2, eps=0.0)
    assert adv.tolist() == [-1.0, 1.0]
    adv = group_advantages(rewards[2:6], 4, eps=0.0)
    std = math.sqrt(3.5)
    expected = torch.tensor([-2 / std, -1 / std, 0.0, 3 / std], dtype=torch.float32)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)


def test_advantages_eps_and_zero_variance():
    # eps sits in the denominator: std 0.5 + eps 0.5 -> +-0.5
    adv = group_advantages(torch.tensor([0.0, 1.0]), 2, eps=0.5)
    assert adv.tolist() == [-0.5, 0.5]
    # all-equal groups (including values whose float mean is inexact) -> exactly 0, not NaN
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    adv = group_advantages(rewards, 3, eps=0.0)
    assert torch.equal(adv, torch.zeros(9))
    # a group of one sample: population std is 0, advantage 0
    assert torch.equal(group_advantages(torch.tensor([5.0, -2.0]), 1), torch.zeros(2))


def _sample(prompt_index, reward):
    return Sample(
        prompt_index=prompt_index, prompt="p", completion="c", prompt_ids=[1], completion_ids=[2],
        logprobs=torch.zeros(1), policy_version=0, reward=reward,
    )


def test_assign_advantages_groups_by_prompt_index():
    samples = [_sample(1, 3.0), _sample(0, 0.0), _sample(1, 1.0), _sample(0, 1.0)]
    assign_advantages(samples, eps=0.0)
    assert [s.advantage for s in samples] == [1.0, -1.0, -1.0, 1.0]
    with pytest.raises(ValueError, match="no reward"):
        assign_advantages([_sample(0, None)])
    with pytest.raises(ValueError, match="different sample counts"):
        assign_advantages([_sample(0, 1.0), _sample(0, 2.0), _sample(1, 1.0)])


def test_on_policy_ratio_is_one_and_gradient_sign():
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    logprobs = old.clone().requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, stats = policy_loss(logprobs, old, adv, num_tokens=4, clip_eps=0.2)
    assert stats["ratio_sum"].item() == 4.0 and stats["ratio_max"].item() == 1.0
    assert stats["num_clipped"].item() == 0
    # at ratio 1 the loss is -mean(A) and d loss / d logp = -A / num_tokens
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logprobs.grad, -adv / 4)
    # gradient descent raises logprobs of positive-advantage tokens, lowers negative ones
    stepped = logprobs.detach() - 0.1 * logprobs.grad
    assert (stepped[:2] > old[:2]).all() and (stepped[2:] < old[2:]).all()


def test_clipping_stops_gradient_only_on_the_clipped_side():
    old = torch.zeros(4)
    # ratios: e^0.5 (>1.2), e^0.5, e^-0.5 (<0.8), e^-0.5
    logprobs = torch.tensor([0.5, 0.5, -0.5, -0.5], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, stats = policy_loss(logprobs, old, adv, num_tokens=8, clip_eps=0.2)
    loss.backward()
    # token 0: A>0, ratio above 1+eps -> clipped, no gradient
    # token 2: A<0, ratio below 1-eps -> clipped, no gradient
    # tokens 1 and 3 move toward the trust region: gradient -A * ratio / num_tokens
    ratio = torch.exp(logprobs.detach())
    expected = torch.stack([torch.tensor(0.0), ratio[1] / 8, torch.tensor(0.0), -ratio[3] / 8])
    torch.testing.assert_close(logprobs.grad, expected, rtol=1e-6, atol=0)
    assert stats["num_clipped"].item() == 2
    # clipped loss terms use the clamped ratio
    expected_loss = -(1.2 * 1.0 + ratio[1] * -1.0 + 0.8 * -1.0 + ratio[3] * 1.0) / 8
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=1e-6, atol=0)


def test_policy_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="one length"):
        policy_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3), 3, 0.2)
    with pytest.raises(ValueError, match="num_tokens"):
        policy_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), 0, 0.2)


def test_kl_k3():
    logprobs = torch.tensor([-1.0, -2.0, -0.1])
    assert torch.equal(kl_penalty(logprobs, logprobs), torch.zeros(3))
    ref = torch.tensor([-1.5, -1.0, -0.1])
    # d = ref - logp = -0.5, 1.0, 0: e^-0.5 + 0.5 - 1, e - 2, 0
    expected = torch.tensor([math.exp(-0.5) - 0.5, math.e - 2.0, 0.0])
    torch.testing.assert_close(kl_penalty(logprobs, ref), expected, rtol=1e-6, atol=1e-7)
