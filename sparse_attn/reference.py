"""Plain-PyTorch definitions of the ops, with the signatures of sparse_attn.ops.

They are the specification the kernels are tested against: written for clarity (full softmax
matrix, full sort), not speed, and they do not validate their inputs (the ops do). Being plain
differentiable PyTorch, they are also what code that needs gradients through a selection uses
(sf_train's smoothed token ratio and straight-through keep mask) and the baseline rules' forced set.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .gqa import gqa_fold_visibility


def probe_visibility(Lq: int, Lk: int, causal: bool, device=None) -> Tensor:
    """bool [Lq, Lk]: probe i (at position Lk - Lq + i) sees key j."""
    if not causal:
        return torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    pos = Lk - Lq + torch.arange(Lq, device=device)
    return torch.arange(Lk, device=device)[None, :] <= pos[:, None]


def cumulative_scores(q, k, *, scale=None, causal=True, key_mask=None) -> Tensor:
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    logits = scale * torch.einsum("bhid,bhjd->bhij", q.float(), k.float().repeat_interleave(g, 1))
    visible = probe_visibility(Lq, Lk, causal, q.device)[None, None]
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    probs = torch.where(visible.any(-1, keepdim=True), probs, 0.0)  # a probe seeing no key: 0
    return probs.view(B, Hkv, g, Lq, Lk).sum(dim=(2, 3))


def forced_positions(valid: Tensor, keep_first: int, keep_last: int, candidate_mask) -> Tensor:
    """bool [R, L]: the valid positions kept whatever their score."""
    rank = valid.long().cumsum(-1) - 1  # rank among the valid positions of the row
    n_valid = valid.sum(-1, keepdim=True)
    forced = (rank < keep_first) | (rank >= n_valid - keep_last)
    if candidate_mask is not None:
        forced = forced | ~candidate_mask
    return valid & forced


def topp_select(scores, p, *, valid_mask=None, keep_first=0, keep_last=0, candidate_mask=None):
    R, L = scores.shape
    device = scores.device
    valid = torch.ones(R, L, dtype=torch.bool, device=device) if valid_mask is None else valid_mask
    p32 = torch.as_tensor(p, dtype=torch.float32, device=device).expand(R)  # ops apply p in fp32
    s = torch.where(valid, scores.double(), 0.0)
    forced = forced_positions(valid, keep_first, keep_last, candidate_mask)
    cand = valid & ~forced
    need = p32.double() * s.sum(-1) - torch.where(forced, s, 0.0).sum(-1)

    # Candidates by decreasing score, ties by increasing position (stable sort); others last.
    order = torch.sort(torch.where(cand, s, -1.0), dim=-1, descending=True, stable=True).indices
    sorted_mass = torch.where(cand, s, 0.0).gather(-1, order)
    # Minimal prefix reaching `need`; if rounding leaves it out of reach, every positive candidate.
    n_take = (sorted_mass.cumsum(-1) < need[:, None]).sum(-1) + 1
    n_take = torch.minimum(n_take, (sorted_mass > 0).sum(-1))
    n_take = torch.where(need > 0, n_take, 0)
    taken_sorted = torch.arange(L, device=device)[None, :] < n_take[:, None]
    taken = torch.zeros_like(cand).scatter(-1, order, taken_sorted) & cand

    keep = torch.where((p32 == 1.0)[:, None], valid, forced | taken)
    counts = keep.sum(-1).to(torch.int32)
    positions = torch.where(keep, torch.arange(L, device=device), L).sort(-1).values
    indices = torch.where(positions < L, positions, -1).to(torch.int32)
    return indices, counts


def _index_rows(indices: Tensor, counts, B: int, H: int):
    """[B, H, N] index rows and [B, H, N] 'used' flags for shared ([B, N]) or per-head rows."""
    N = indices.shape[1]
    idx = indices.view(B, -1, N).expand(B, H, N).long()
    cnt = torch.full((indices.shape[0],), N, device=indices.device) if counts is None else counts
    used = torch.arange(N, device=indices.device) < cnt.view(B, -1, 1).expand(B, H, 1)
    return idx, used


def gather_kv(k, v, indices, counts, *, capacity=None):
    B, H, L, D = k.shape
    C = int(counts.max().clamp(min=0)) if capacity is None else capacity
    idx, used = _index_rows(indices, counts, B, H)
    idx, used = idx[..., :C], used[..., :C]

    def gather(x):
        out = x.new_zeros(B, H, C, D)
        n = idx.shape[-1]
        picked = x.gather(2, idx.clamp(min=0)[..., None].expand(B, H, n, D))
        out[:, :, :n] = torch.where(used[..., None], picked, 0)
        return out

    return gather(k), gather(v)


def scatter_kv(k_cache, v_cache, k, v, indices, counts=None):
    B, H, _, D = k_cache.shape
    T = k.shape[2]
    idx, used = _index_rows(indices, counts, B, H)
    idx, used = idx[..., :T], used[..., :T]
    for cache, src in ((k_cache, k), (v_cache, v)):
        b, h, t = used.nonzero(as_tuple=True)
        cache[b, h, idx[b, h, t]] = src[b, h, t]


def decode_attention(query, key, value, lengths, *, scale=None, check_lengths=True) -> Tensor:
    B, Hq, T, D = query.shape
    scale = D**-0.5 if scale is None else scale
    folded, visible = gqa_fold_visibility(query, lengths, key.shape[2])
    logits = scale * (folded.float() @ key.float().transpose(-1, -2))  # [B, Hkv, g * T, C]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    probs = torch.where(visible.any(-1, keepdim=True), probs, 0.0)  # a query seeing no slot: 0
    return (probs @ value.float()).view(B, Hq, T, D).to(query.dtype)
