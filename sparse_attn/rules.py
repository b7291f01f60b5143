"""The selection rules a TopPPolicy names, over rows of scores (semantics: TopPPolicy).

Each returns what topp_select returns, so the cache compacts and counts every rule alike:
(indices, counts), int32 [R, L] whose first counts[r] entries are the kept positions of row r
in ascending order (then -1), and int32 [R]. Padding (valid_mask False) is never kept; forced
tokens (the first keep_first / last keep_last valid positions and every valid position where
candidate_mask is False) always are.

"top_p" is the topp_select op (csrc kernels). "top_k" and "threshold" are baselines for the
ablation, written with plain torch ops (a full sort for top_k): no kernels of their own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import topp_select
from .policy import TopPPolicy
from .reference import forced_positions


def select_rows(
    policy: TopPPolicy, scores: Tensor, *, valid_mask: Tensor, candidate_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The kept positions of each row of ``scores`` (float32 [R, L]) under ``policy.rule``."""
    forced = dict(keep_first=policy.keep_first, keep_last=policy.keep_last)
    if policy.rule == "top_p":
        return topp_select(
            scores, policy.p, valid_mask=valid_mask, candidate_mask=candidate_mask, **forced
        )
    if policy.rule == "top_k":
        return topk_select(
            scores,
            policy.keep_ratio,
            valid_mask=valid_mask,
            candidate_mask=candidate_mask,
            **forced,
        )
    return threshold_select(
        scores, policy.threshold, valid_mask=valid_mask, candidate_mask=candidate_mask, **forced
    )


def topk_select(
    scores: Tensor,
    keep_ratio: float,
    *,
    valid_mask: Tensor | None = None,
    keep_first: int = 0,
    keep_last: int = 0,
    candidate_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Forced tokens plus the ceil(keep_ratio * n) highest-scoring of a row's n candidates
    (ceiling of the float64 product; ties: lower position first)."""
    forced, candidate = _row_masks(scores, valid_mask, keep_first, keep_last, candidate_mask)
    n = candidate.sum(-1)
    k = torch.ceil(n.to(torch.float64) * keep_ratio).long()
    # Candidates by decreasing score, ties by increasing position (stable sort); others last.
    order = torch.sort(
        torch.where(candidate, scores, float("-inf")), dim=-1, descending=True, stable=True
    ).indices
    taken_sorted = torch.arange(scores.shape[1], device=scores.device) < k[:, None]
    taken = torch.zeros_like(candidate).scatter(-1, order, taken_sorted) & candidate
    return keep_mask_to_indices(forced | taken)


def threshold_select(
    scores: Tensor,
    threshold: float,
    *,
    valid_mask: Tensor | None = None,
    keep_first: int = 0,
    keep_last: int = 0,
    candidate_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Forced tokens plus every candidate scoring >= threshold * the row's mean candidate score
    (float64)."""
    forced, candidate = _row_masks(scores, valid_mask, keep_first, keep_last, candidate_mask)
    s = scores.to(torch.float64)
    n = candidate.sum(-1, keepdim=True)
    mean = torch.where(candidate, s, 0.0).sum(-1, keepdim=True) / n.clamp(min=1)
    taken = candidate & (s >= threshold * mean)
    return keep_mask_to_indices(forced | taken)


def keep_mask_to_indices(keep: Tensor) -> tuple[Tensor, Tensor]:
    """bool [R, L] kept positions -> (indices, counts) in topp_select's form."""
    R, L = keep.shape
    positions = torch.where(keep, torch.arange(L, device=keep.device), L).sort(-1).values
    indices = torch.where(positions < L, positions, -1).to(torch.int32)
    return indices, keep.sum(-1).to(torch.int32)


def indices_to_keep_mask(indices: Tensor, length: int) -> Tensor:
    """int [R, N] positions (entries < 0: free slots) -> bool [R, length], True at each row's
    listed positions; the inverse of keep_mask_to_indices."""
    keep = torch.zeros(indices.shape[0], length + 1, dtype=torch.bool, device=indices.device)
    keep.scatter_(
        1, torch.where(indices >= 0, indices, length).long(), True
    )  # free slots: column `length`
    return keep[:, :length]


def _row_masks(scores, valid_mask, keep_first, keep_last, candidate_mask):
    """(forced, candidate) bool [R, L], after checking the scores of the valid tokens."""
    if scores.dim() != 2 or scores.dtype != torch.float32:
        raise ValueError(f"scores must be float32 [R, L], got {scores.dtype} {list(scores.shape)}")
    valid = torch.ones_like(scores, dtype=torch.bool) if valid_mask is None else valid_mask
    used = scores[valid]
    if not bool(torch.isfinite(used).all()) or bool((used < 0).any()):
        raise ValueError("scores must be finite and >= 0 at every valid position")
    forced = forced_positions(valid, keep_first, keep_last, candidate_mask)
    return forced, valid & ~forced
