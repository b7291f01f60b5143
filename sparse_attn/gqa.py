"""The GQA fold shared by the compact decode (sparse_attn.attention, the decode_attention
reference) and the replay's completion attention (sf_train.replay).

The g = Hq / Hkv query heads that one KV head serves are folded into the query axis: one
attention per KV head reads its keys once (no repeat_kv) and takes that head's own row length
or mask. Row i * T + t of a fold is query head h * g + i at step t.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gqa_fold(query: Tensor, visible: Tensor) -> tuple[Tensor, Tensor]:
    """query [B, Hq, T, D] -> [B, Hkv, g * T, D], and visible [B, Hkv, T, S] (a bool mask or
    weights per step t and key slot) -> [B, Hkv, g * T, S] in the same row order: each member
    of a group sees what its KV head's step t sees (a view, no copy, when T = 1)."""
    B, Hq, T, D = query.shape
    Hkv, S = visible.shape[1], visible.shape[-1]
    g = Hq // Hkv
    folded = query.reshape(B, Hkv, g * T, D)
    return folded, visible[:, :, None].expand(B, Hkv, g, T, S).reshape(B, Hkv, g * T, S)


def compact_visibility(lengths: Tensor, steps: int, capacity: int) -> Tensor:
    """bool [B, Hkv, steps, capacity]: in a compact row of ``capacity`` slots that holds
    lengths[b, h] tokens (clamped to [0, capacity]), the last ``steps`` of them the new queries,
    step t sees slot j < length - (steps - 1 - t): causal among the new."""
    held = lengths.long().clamp(0, capacity)  # a row holds at most `capacity` tokens
    t = torch.arange(steps, device=lengths.device)
    end = held[:, :, None] - (steps - 1 - t)  # [B, Hkv, steps]
    return torch.arange(capacity, device=lengths.device) < end[..., None]


def gqa_fold_visibility(query: Tensor, lengths: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """GQA fold of the new queries and what each sees in a compact cache of ``capacity`` slots.

    query [B, Hq, T, D] -> [B, Hkv, g * T, D] (g = Hq / Hkv; row i * T + t is query head
    h * g + i at step t: KV head h serves its g query heads without repeat_kv), and
    visible bool [B, Hkv, g * T, capacity]: row (i, t) sees slot j < lengths[b, h] - (T - 1 - t)
    (lengths clamped to [0, capacity]).
    """
    return gqa_fold(query, compact_visibility(lengths, query.shape[2], capacity))
