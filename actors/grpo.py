"""GRPO math as plain functions: group-normalized advantages, PPO-clipped loss, k3 KL.

All losses are token sums divided by a caller-given `num_tokens`: the trainer passes the
token count of the *whole* batch (all micro-batches, all ranks), so summing the gradients
of every micro-batch on every rank yields exactly the token-mean over the batch.
"""

import torch

from lockstep.actors.types import Sample


def group_advantages(rewards: torch.Tensor, num_samples_per_prompt: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean_group) / (std_group + eps) for rewards laid out prompt by prompt.

    rewards: [num_prompts * num_samples_per_prompt], the samples of prompt p at
    [p * n, (p + 1) * n). std is the *population* std (divide by n), so a group of one
    sample is well defined. A group whose rewards are all equal gets advantage exactly 0
    (it carries no learning signal), never NaN or rounding noise. Returns fp32, same shape.
    """
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if num_samples_per_prompt < 1 or rewards.numel() % num_samples_per_prompt != 0:
        raise ValueError(
            f"group_advantages: {rewards.numel()} rewards do not split into groups of "
            f"num_samples_per_prompt={num_samples_per_prompt}"
        )
    grouped = rewards.detach().to(torch.float64).view(-1, num_samples_per_prompt)  # [num_prompts, n]
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, unbiased=False)
    advantages = (grouped - mean) / (std + eps)
    constant = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    advantages = torch.where(constant, torch.zeros_like(advantages), advantages)
    return advantages.view(-1).to(torch.float32)


def assign_advantages(samples: list[Sample], eps: float = 1e-6) -> None:
    """Sets `sample.advantage` in place, grouping by `prompt_index` (any sample order).

    Every sample must have a reward and every prompt the same number of samples.
    """
    groups: dict[int, list[int]] = {}
    for i, sample in enumerate(samples):
        if sample.reward is None:
            raise ValueError(f"assign_advantages: sample {i} has no reward; score the samples first")
        groups.setdefault(sample.prompt_index, []).append(i)
    sizes = {len(indices) for indices in groups.values()}
    if len(sizes) > 1:
        raise ValueError(f"assign_advantages: prompts have different sample counts {sorted(sizes)}")
    order = [i for prompt in sorted(groups) for i in groups[prompt]]
    rewards = torch.tensor([samples[i].reward for i in order], dtype=torch.float64)
    advantages = group_advantages(rewards, sizes.pop() if sizes else 1, eps)
    for i, advantage in zip(order, advantages.tolist()):
        samples[i].advantage = advantage


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    num_tokens: int,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clipped surrogate, summed over these tokens and divided by `num_tokens`.

    logprobs (with grad), old_logprobs, advantages: fp32 [N], one entry per completion
    token (a sample's advantage repeated over its tokens). On-policy, old_logprobs are the
    generator's logprobs, bitwise equal to `logprobs`, so the ratio is exactly 1.
    Returns (loss, stats); stats are detached sums over these N tokens, so callers can
    add them across micro-batches and ranks: num_clipped, ratio_sum, ratio_max.
    """
    if not (logprobs.shape == old_logprobs.shape == advantages.shape) or logprobs.dim() != 1:
        raise ValueError(
            "policy_loss: logprobs, old_logprobs, advantages must be 1-D of one length, got "
            f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(advantages.shape)}"
        )
    if num_tokens < 1:
        raise ValueError(f"policy_loss: num_tokens must be >= 1, got {num_tokens}")
    ratio = torch.exp(logprobs - old_logprobs)  # [N]
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = -torch.minimum(unclipped, clipped).sum() / num_tokens
    with torch.no_grad():
        # tokens whose gradient the clip switched off
        is_clipped = ((advantages > 0) & (ratio > 1.0 + clip_eps)) | ((advantages < 0) & (ratio < 1.0 - clip_eps))
        stats = {
            "num_clipped": is_clipped.sum().to(torch.float64),
            "ratio_sum": ratio.sum().to(torch.float64),
            "ratio_max": ratio.max() if ratio.numel() else ratio.new_zeros(()),
        }
    return loss, stats


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): exp(d) - d - 1 with d = ref - logp.

    Non-negative, zero where the two agree, unbiased under samples from the policy. [N] -> [N].
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"kl_penalty: shapes differ, {tuple(logprobs.shape)} vs {tuple(ref_logprobs.shape)}"
        )
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1.0
