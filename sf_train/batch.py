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
    return logp_from_logits(
        logits, batch.completions, temperature, suppressed, distribution=distribution
    )


def _rope_deltas(model) -> tuple[bool, Tensor | None]:
    """(whether the model keeps mRoPE offsets, the ones it stored in its last prefill): a Qwen-VL
    model's text positions after the prompt are index + delta; (False, None) for other models."""
    has_slot = False
    for module in model.modules():
        deltas = getattr(module, "rope_deltas", None)
        if isinstance(deltas, Tensor):
            return True, deltas
        has_slot = has_slot or hasattr(module, "rope_deltas")
    return has_slot, None


@torch.no_grad()
def shared_prompt_logits(model, prompts: dict, batch: TrainingBatch) -> Tensor:
    """logits [N, T, V] at the completion positions of ``batch`` (rows g * B + b: prompt b of
    ``prompts``, p-major, sf_train/batch.py training_batch) from one forward of the B distinct
    prompts and one of the N completions over a copy of their cache: the prompt's tokens, the
    same for every rollout of a group, are computed once instead of N / B times. Equal to the
    logits of a forward of the whole batch (sequence_logp) up to floating point, for a model
    whose text positions after the prompt continue from its cache (a decoder's default, and
    Qwen-VL's mRoPE through its rope_deltas); the trainer checks that once on its first step
    (docs/design.md#training-batch)."""
    from transformers import DynamicCache

    from sparse_attn.attention import cache_argument

    P, T = batch.prompt_length, batch.completions.shape[1]
    B = prompts["input_ids"].shape[0]
    N = batch.completions.shape[0]
    if N % B or prompts["input_ids"].shape[1] != P:
        raise ValueError(
            f"shared_prompt_logits: batch rows ({N}) must be whole groups of the {B} prompts of "
            f"length {P}, got prompts of length {prompts['input_ids'].shape[1]}"
        )
    argument = cache_argument(model)
    cache = DynamicCache()
    out = model(**prompts, use_cache=True, **{argument: cache})
    rows = torch.arange(N, device=batch.completions.device) % B
    first = out.logits[:, -1][rows]  # [N, V]: predicts the first completion token
    if T == 1:
        return first[:, None]
    copy = DynamicCache()
    for layer_idx, layer in enumerate(cache.layers):
        copy.update(layer.keys[rows], layer.values[rows], layer_idx)
    has_slot, deltas = _rope_deltas(model)
    extra = {}
    if deltas is not None:  # mRoPE: positions continue from the prompt's own last position
        # (rope_deltas = last position + 1 - the prompt's valid length, as generate continues)
        valid = prompts["attention_mask"].sum(1).to(deltas.device)[rows]
        steps = torch.arange(T - 1, device=deltas.device)
        extra["position_ids"] = valid[:, None] + steps[None] + deltas.reshape(-1, 1)[rows]
    elif has_slot:
        raise ValueError("shared_prompt_logits: the model stored no rope_deltas in its prefill")
    mask = torch.cat(
        [prompts["attention_mask"][rows], batch.inputs["attention_mask"][:, P : P + T - 1]], dim=1
    )
    rest = model(
        input_ids=batch.completions[:, : T - 1],
        attention_mask=mask,
        use_cache=True,
        **{argument: copy},
        **extra,
    ).logits
    return torch.cat([first[:, None], rest.to(first.dtype)], dim=1)


def logp_from_logits(
    logits: Tensor,
    completions: Tensor,
    temperature: float,
    suppressed: tuple[int, ...],
    *,
    distribution: bool = False,
):
    """sequence_logp's outputs from the completion positions' logits [N, T, V]."""
    logp, entropy = completion_logp(logits, completions, temperature, suppressed)
    if not distribution:
        return logp, entropy
    return logp, entropy, completion_distribution(logits, temperature, suppressed)
