"""The GRPO objective: PPO clip surrogate + beta * KL(policy || reference), per token."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NORMALIZATIONS = ("grpo", "dr_grpo", "dapo")


@dataclass
class LossStats:
    kl: float  # mean k3 KL(policy || reference) per completion token
    clip_fraction: float  # fraction of completion tokens whose ratio was clipped
    ratio_mean: float


def grpo_loss(
    logp: Tensor,
    logp_old: Tensor,
    logp_ref: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    beta: float = 0.04,
    normalization: str = "grpo",
    max_completion_length: int | None = None,
) -> tuple[Tensor, LossStats]:
    """Loss over completions [N, T] (log-probs of the sampled tokens) with advantages [N].

    logp: current policy (differentiable); logp_old: the policy that sampled the rollouts;
    logp_ref: frozen reference (None or beta = 0: no KL term). mask: 1 for completion tokens up
    to and including EOS, 0 after it and for padding.
    normalization: "grpo" - mean over each sequence's tokens, then over sequences;
    "dr_grpo" - sum over tokens / (N * max_completion_length) (no length bias);
    "dapo" - token-level: sum over tokens / number of tokens in the batch.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    mask = mask.to(logp.dtype)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logp - logp_old)
    adv = advantages[:, None].to(logp.dtype)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if logp_ref is not None and beta != 0.0:
        # k3 estimator of KL(policy || reference): unbiased, always >= 0.
        log_ratio_ref = logp_ref - logp
        kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1.0
        per_token = per_token + beta * kl

    loss = normalize(per_token, mask, normalization, max_completion_length)

    with torch.no_grad():
        n_tokens = mask.sum().clamp(min=1.0)
        was_clipped = (clipped < unclipped).to(mask.dtype)  # the min picked the clipped term
        stats = LossStats(
            kl=float((kl * mask).sum() / n_tokens),
            clip_fraction=float((was_clipped * mask).sum() / n_tokens),
            ratio_mean=float((ratio * mask).sum() / n_tokens),
        )
    return loss, stats


def normalize(
    per_token: Tensor, mask: Tensor, normalization: str, max_completion_length: int | None = None
) -> Tensor:
    """A per-token loss [N, T] reduced to a scalar over the completion tokens (mask 1), as
    grpo_loss's ``normalization`` says."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    mask = mask.to(per_token.dtype)
    if normalization == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if normalization == "dr_grpo":
        length = max_completion_length if max_completion_length is not None else per_token.shape[1]
        return (per_token * mask).sum() / (per_token.shape[0] * length)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def distillation_kl(logp_all: Tensor, logp_ref_all: Tensor) -> Tensor:
    """float [N, T]: KL(reference || policy) over the whole vocabulary at each completion
    position, from log-distributions [N, T, V] (tokens both exclude are -inf in both and count 0).

    The rollouts' sampled tokens carry one draw of the reference's answer; the whole distribution
    carries all of it: this term (SFConfig.distill_weight, beyond the paper) teaches the pruned
    policy the dense reference's next-token distribution from the tokens it keeps
    (docs/design.md#the-trainer)."""
    if logp_all.shape != logp_ref_all.shape:
        raise ValueError(
            f"logp_all and logp_ref_all must have one shape, got {tuple(logp_all.shape)} and "
            f"{tuple(logp_ref_all.shape)}"
        )
    ref_p = logp_ref_all.exp()
    gap = torch.where(ref_p > 0, logp_ref_all - logp_all, torch.zeros_like(logp_all))
    return (ref_p * gap).sum(-1)
