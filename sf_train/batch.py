"""Rollouts -> one training batch: the [prompt + completion] sequences of all rollouts of a step
(p-major), their masks, old log-probs, advantages and recorded selections, and the log-probs of
the completion tokens under one forward of that batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .replay import concat_selections
from .rollout import Rollouts, completion_distribution, completion_logp

# Model inputs whose first axis is not the batch (Qwen-VL flattens the patches of all images).
_PATCH_INPUTS = ("pixel_values", "pixel_values_videos")
# Per-token inputs besides input_ids / attention_mask; completion tokens are plain text (0).
_TOKEN_TYPE_INPUTS = ("mm_token_type_ids", "token_type_ids")


def repeat_inputs(inputs: dict, times: int) -> dict:
    """The batch of prompts ``times`` over (row-block order), for a batch of rollouts."""
    out = {}
    for name, value in inputs.items():
        if not isinstance(value, Tensor):
            out[name] = value
        elif name in _PATCH_INPUTS:
            out[name] = torch.cat([value] * times)
        else:
            out[name] = value.repeat(times, *[1] * (value.dim() - 1))
    return out


def append_completions(inputs: dict, completions: Tensor) -> dict:
    """Inputs of the [prompt + completion] sequences (one completion row per prompt row).

    As during generation, every decoded position is attended: padding after EOS is never seen
    by an earlier token, and its own outputs are masked out of the loss.
    """
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], completions], dim=1)
    full["attention_mask"] = torch.cat(
        [inputs["attention_mask"], torch.ones_like(completions)], dim=1
    )
    for name in _TOKEN_TYPE_INPUTS:
        if name in inputs:
            full[name] = torch.cat([inputs[name], torch.zeros_like(completions)], dim=1)
    return full


def pad_right(x: Tensor, length: int, value) -> Tensor:
    return F.pad(x, (0, length - x.shape[1]), value=value)


@dataclass
class TrainingBatch:
    """The rollouts of one step as one batch of [prompt + completion] sequences (p-major)."""

    inputs: dict  # model inputs of the full sequences
    completions: Tensor  # [N, T]
    mask: Tensor  # [N, T]
    logp_old: Tensor  # [N, T]
    advantages: Tensor  # [N]
    prompt_length: int
    selections: list


def training_batch(
    inputs: dict, groups: list[Rollouts], advantages: Tensor, pad_token_id: int
) -> TrainingBatch:
    """The [prompt + completion] sequences of all rollouts, p-major (row g * B + b);
    advantages [B, G]."""
    G, P = len(groups), inputs["input_ids"].shape[1]
    T = max(g.completions.shape[1] for g in groups)
    completions = torch.cat([pad_right(g.completions, T, pad_token_id) for g in groups])
    return TrainingBatch(
        inputs=append_completions(repeat_inputs(inputs, G), completions),
        completions=completions,
        mask=torch.cat([pad_right(g.mask, T, 0.0) for g in groups]),
        logp_old=torch.cat([pad_right(g.logp, T, 0.0) for g in groups]),
        advantages=advantages.t().reshape(-1).to(completions.device),
        prompt_length=P,
        selections=concat_selections([g.selections for g in groups]),
    )


def sequence_logp(
    model,
    batch: TrainingBatch,
    temperature: float,
    suppressed: tuple[int, ...],
    *,
    distribution: bool = False,
):
    """(log-probs [N, T] of the completion tokens, entropy [N, T]) from one forward of the
    [prompt + completion] sequences: the logits at position i predict token i + 1. With
    ``distribution``, also the whole log-distribution [N, T, V] at each completion position."""
    logits = model(**batch.inputs).logits
    P, T = batch.prompt_length, batch.completions.shape[1]
    logits = logits[:, P - 1 : P - 1 + T]
    logp, entropy = completion_logp(logits, batch.completions, temperature, suppressed)
    if not distribution:
        return logp, entropy
    return logp, entropy, completion_distribution(logits, temperature, suppressed)
