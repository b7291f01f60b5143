"""Sparsity Forcing's joint reward and GRPO's group-relative advantage (docs/design.md#the-trainer).

A group is the rollouts of one prompt, one per threshold p of the grid (multi-budget rollouts).
score_rollouts reads a step's rollouts into the two inputs of the reward, correctness and token
ratio; the trainer and bench/sf_gradient_probe.py score the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor

EFFICIENCY_GATES = ("group", "rollout")


def efficiency_gate(correct: Tensor, gate: str = "group") -> Tensor:
    """C of each rollout [n_groups, G] (float), from correct {0, 1} [n_groups, G].

    gate "group" (the paper): C = 1 if any rollout of the group is correct, else 0 - an all-wrong
    group gets no reward for pruning harder, which would push the model to empty answers.
    gate "rollout": C = correct_i - only correct rollouts are rewarded for efficiency.
    """
    if gate not in EFFICIENCY_GATES:
        raise ValueError(f"gate must be one of {EFFICIENCY_GATES}, got {gate!r}")
    correct = correct.to(torch.float32)
    return correct.amax(dim=-1, keepdim=True).expand_as(correct) if gate == "group" else correct


def joint_rewards(
    correct: Tensor, token_ratio: Tensor, *, gate: str = "group", weight: float = 1.0
) -> Tensor:
    """r_i = r_correct_i + weight * C * (1 - tau_i) for each rollout of each group.

    weight = 1 is the paper's reward. A larger weight keeps the efficiency term from being
    swamped where correctness varies within a group (tau often spans only a few hundredths over
    the p grid, correctness a whole point).

    correct: {0, 1} [n_groups, G]; token_ratio: tau in [0, 1], same shape; C: efficiency_gate.
    """
    if not weight >= 0:
        raise ValueError(f"weight must be >= 0, got {weight!r}")
    c = efficiency_gate(correct, gate)
    return correct.to(torch.float32) + weight * c * (1.0 - token_ratio.to(torch.float32))


def group_advantages(rewards: Tensor, eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """(r - mean) / (std + eps) within each group (row) of rewards [n_groups, G].

    std is the sample standard deviation, as in TRL. A group whose rewards are all equal carries
    no signal: its advantages are exactly 0 (not eps-amplified rounding noise). Returns the
    advantages and a bool [n_groups] marking those zero-variance groups.
    """
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
    zero_variance = (rewards == rewards[..., :1]).all(dim=-1)
    advantages = (rewards - mean) / (std + eps)
    return torch.where(zero_variance[:, None], 0.0, advantages), zero_variance


def score_rollouts(task, samples: list, groups: list) -> tuple[Tensor, Tensor]:
    """(correct {0, 1} int64 [B, G], token ratio tau float [B, G] on the CPU) of the rollouts
    ``groups`` (one Rollouts per threshold p, each over the B ``samples``), judged by the
    TrainingTask's is_correct on the decoded completions."""
    texts = [task.decode(g.completions) for g in groups]  # [G][B]
    correct = torch.tensor(
        [
            [
                task.is_correct(task.prompt(s), texts[g][b], task.answer(s))
                for g in range(len(groups))
            ]
            for b, s in enumerate(samples)
        ]
    )
    tau = torch.stack([g.token_ratio for g in groups], dim=1).cpu()
    return correct, tau
