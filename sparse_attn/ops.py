"""The five ops, as Python functions over torch.ops.sparse_attn.*, with fake kernels
(torch.compile) and autograd. Semantics: docs/design.md#the-ops; plain-PyTorch equivalents with
the same signatures live in sparse_attn.reference."""

from __future__ import annotations

import math

import torch
from torch import Tensor

_ops = torch.ops.sparse_attn


def cumulative_scores(
    q: Tensor,
    k: Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Attention mass each key receives from the probe queries, summed over each GQA group.

    q: [B, Hq, Lq, D] probes; k: [B, Hkv, Lk, D]; fp16 / bf16 / fp32, Hq a multiple of Hkv.
    Probe i sits at position Lk - Lq + i; with ``causal`` it sees keys j <= that position.
    key_mask: optional bool [B, Lk], False for padding (no mass). Returns float32 [B, Hkv, Lk]:
    ``a[b, h, j] = sum_{r in group(h)} sum_i softmax_j(scale * q[b, r, i] . k[b, h, j])``.
    The probability matrix is never materialised.
    """
    return _ops.cumulative_scores(q, k, scale, causal, key_mask)


def topp_select(
    scores: Tensor,
    p: float | Tensor,
    *,
    valid_mask: Tensor | None = None,
    keep_first: int = 0,
    keep_last: int = 0,
    candidate_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Minimal top-p set of each row of ``scores`` (float32 [R, L], non-negative).

    p: float or float32 [R] (applied in float32), each in (0, 1]. valid_mask: bool [R, L], False =
    padding (never kept, no mass). Forced tokens - the first ``keep_first`` and last ``keep_last``
    valid positions and every valid position where ``candidate_mask`` is False - are kept and
    count toward the target; then the highest scores (ties: lower position first) until the kept
    mass reaches ``p * total``. p = 1 keeps every valid position.

    Returns (indices, counts): int32 [R, L] whose first counts[r] entries are the kept positions
    in ascending order (then -1), and int32 [R].
    """
    if isinstance(p, Tensor):
        if p.dim() == 0:
            p = p.expand(scores.shape[0])
        return _ops.topp_select(scores, 1.0, p, valid_mask, keep_first, keep_last, candidate_mask)
    return _ops.topp_select(
        scores, float(p), None, valid_mask, keep_first, keep_last, candidate_mask
    )


def gather_kv(
    k: Tensor, v: Tensor, indices: Tensor, counts: Tensor, *, capacity: int | None = None
) -> tuple[Tensor, Tensor]:
    """Compact ``k`` and ``v`` ([B, H, L, D]) to the kept positions.

    indices / counts as topp_select returns them, with one row per batch ([B, N]: the per-layer
    budget, shared by the H heads) or one per (batch, head) ([B * H, N], row b * H + h). Returns
    [B, H, C, D] with C = ``capacity`` (room for tokens appended later) or max(counts); slots past
    a row's count are zero. Differentiable in k and v (backward scatters into the full length).
    """
    return _ops.gather_kv(k, v, indices, counts, capacity)


def scatter_kv(
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    counts: Tensor | None = None,
) -> None:
    """Write ``k`` / ``v`` ([B, H, T, D]) into the caches ([B, H, C, D], contiguous) in place.

    ``k_cache[b, h, indices[r, t]] = k[b, h, t]`` for t < counts[r] (all of the N columns when
    counts is None), with r = b for [B, N] indices (same slots for every head) or r = b * H + h
    for [B * H, N]. Used slots of a row must be strictly ascending. Appending one decoded token at
    each row's current length is ``indices = lengths[:, None]``; the backward of gather_kv is
    this op writing the kept gradients back to their positions.
    """
    _ops.scatter_kv(k_cache, v_cache, k, v, indices, counts)


def decode_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    lengths: Tensor,
    *,
    scale: float | None = None,
    check_lengths: bool = True,
) -> Tensor:
    """Attention of the T newest queries over a compact KV cache (one decode step).

    query: [B, Hq, T, D], the T >= 1 new tokens, already appended to the cache. key / value:
    [B, Hkv, C, D] compact buffers (rows may hold fewer than C tokens; the last dim contiguous,
    other strides free). lengths: int32 [B, Hkv], tokens held per row, the T new ones included.
    Query t of a row attends to that row's slots ``< lengths - (T - 1 - t)``; slots past a row's
    length are never read. Hq a multiple of Hkv (GQA: query head h reads KV head h // (Hq / Hkv),
    without repeat_kv). fp32 / fp16 / bf16, query, key and value of one dtype; softmax in fp32.
    scale defaults to D ** -0.5. Returns [B, Hq, T, D] in the query's dtype.

    Lengths outside [T, C] are an error. check_lengths=False skips that check (it reads lengths
    back to the host on CUDA, a sync): for callers whose lengths are their own counters; an
    out-of-range length is then clamped to [0, C] and a query that sees no slot gets zeros.
    No autograd: a decode step runs under no_grad (sparse_attn.reference.decode_attention is the
    differentiable definition).
    """
    return _ops.decode_attention(query, key, value, lengths, scale, check_lengths)


# --- torch.compile: shapes of the outputs without running the kernels -------------------------
# Each fake kernel torch._checks the shape / dtype / device contract of the C++ checks
# (csrc/op_checks.cpp), so that a compiled graph fails where eager fails. What depends on tensor
# values (index ranges, lengths) is checked when the kernels run.

_ATTENTION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_same_device(op, ref, ref_name, t, name):
    torch._check(
        t.device == ref.device,
        lambda: f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}",
    )


def _check_mask(op, ref, ref_name, mask, name, shape):
    if mask is None:
        return
    _check_same_device(op, ref, ref_name, mask, name)
    torch._check(
        mask.dtype == torch.bool, lambda: f"{op}: {name} must be a bool tensor, got {mask.dtype}"
    )
    torch._check(
        tuple(mask.shape) == tuple(shape),
        lambda: f"{op}: {name} must have shape {list(shape)}, got {list(mask.shape)}",
    )


def _check_scale(op, scale):
    if scale is not None:
        torch._check(
            math.isfinite(scale) and scale > 0,
            lambda: f"{op}: scale must be a positive finite number, got {scale}",
        )


def _check_kv_args(op, k, v, kv_names, indices, counts):
    torch._check(
        k.dim() == 4 and k.shape[3] > 0,
        lambda: f"{op}: {kv_names} must be [B, H, L, D] with D > 0, got shape {list(k.shape)}",
    )
    torch._check(
        v.shape == k.shape,
        lambda: (
            f"{op}: {kv_names} must have the same shape, got {list(k.shape)} and {list(v.shape)}"
        ),
    )
    torch._check(
        v.dtype == k.dtype,
        lambda: f"{op}: {kv_names} must have the same dtype, got {k.dtype} and {v.dtype}",
    )
    _check_same_device(op, k, "k", v, "v")
    _check_same_device(op, k, "k", indices, "indices")
    torch._check(
        indices.dtype == torch.int32, lambda: f"{op}: indices must be int32, got {indices.dtype}"
    )
    B, H = k.shape[0], k.shape[1]
    torch._check(
        indices.dim() == 2 and (indices.shape[0] == B or indices.shape[0] == B * H),
        lambda: (
            f"{op}: indices must be [B, N] (shared by the heads) or [B * H, N] (per head) with B = {B}, H = {H}; "
            f"got shape {list(indices.shape)}"
        ),
    )
    if counts is not None:
        _check_same_device(op, k, "k", counts, "counts")
        torch._check(
            counts.dtype == torch.int32, lambda: f"{op}: counts must be int32, got {counts.dtype}"
        )
        torch._check(
            counts.dim() == 1 and counts.shape[0] == indices.shape[0],
            lambda: (
                f"{op}: counts must have shape [{indices.shape[0]}] (one per index row), got {list(counts.shape)}"
            ),
        )


@torch.library.register_fake("sparse_attn::cumulative_scores")
def _cumulative_scores_fake(q, k, scale=None, causal=True, key_mask=None):
    op = "sparse_attn.cumulative_scores"
    torch._check(q.dim() == 4, lambda: f"{op}: q must be [B, Hq, Lq, D], got shape {list(q.shape)}")
    torch._check(
        k.dim() == 4, lambda: f"{op}: k must be [B, Hkv, Lk, D], got shape {list(k.shape)}"
    )
    _check_same_device(op, q, "q", k, "k")
    torch._check(
        q.dtype in _ATTENTION_DTYPES,
        lambda: f"{op}: q must be float32, float16 or bfloat16, got {q.dtype}",
    )
    torch._check(
        k.dtype == q.dtype, lambda: f"{op}: k must have q's dtype {q.dtype}, got {k.dtype}"
    )
    B, Hq, D = q.shape[0], q.shape[1], q.shape[3]
    Hkv, Lk = k.shape[1], k.shape[2]
    torch._check(k.shape[0] == B, lambda: f"{op}: k batch {k.shape[0]} != q batch {B}")
    torch._check(k.shape[3] == D, lambda: f"{op}: k head dim {k.shape[3]} != q head dim {D}")
    torch._check(
        Hkv > 0 and Hq % Hkv == 0,
        lambda: f"{op}: query heads ({Hq}) must be a multiple of key heads ({Hkv})",
    )
    _check_mask(op, k, "k", key_mask, "key_mask", (B, Lk))
    _check_scale(op, scale)
    return q.new_empty((B, Hkv, Lk), dtype=torch.float32)


@torch.library.register_fake("sparse_attn::topp_select")
def _topp_select_fake(
    scores, p, p_rows=None, valid_mask=None, keep_first=0, keep_last=0, candidate_mask=None
):
    op = "sparse_attn.topp_select"
    torch._check(
        scores.dim() == 2, lambda: f"{op}: scores must be [R, L], got shape {list(scores.shape)}"
    )
    torch._check(
        scores.dtype == torch.float32, lambda: f"{op}: scores must be float32, got {scores.dtype}"
    )
    R, L = scores.shape
    torch._check(
        L <= 2**31 - 1,
        lambda: f"{op}: rows longer than 2^31 - 1 (L = {L}) are not supported (int32 indices)",
    )
    torch._check(
        keep_first >= 0 and keep_last >= 0,
        lambda: f"{op}: keep_first and keep_last must be >= 0, got {keep_first} and {keep_last}",
    )
    if p_rows is not None:
        _check_same_device(op, scores, "scores", p_rows, "p")
        torch._check(
            p_rows.dtype == torch.float32,
            lambda: f"{op}: p as a tensor must be float32, got {p_rows.dtype}",
        )
        torch._check(
            p_rows.dim() == 1 and p_rows.shape[0] == R,
            lambda: (
                f"{op}: p as a tensor must have shape [{R}] (one per row of scores), got {list(p_rows.shape)}"
            ),
        )
    else:
        torch._check(0.0 < p <= 1.0, lambda: f"{op}: p must be in (0, 1], got {p}")
    _check_mask(op, scores, "scores", valid_mask, "valid_mask", (R, L))
    _check_mask(op, scores, "scores", candidate_mask, "candidate_mask", (R, L))
    return (
        scores.new_empty(scores.shape, dtype=torch.int32),
        scores.new_empty((scores.shape[0],), dtype=torch.int32),
    )


@torch.library.register_fake("sparse_attn::gather_kv")
def _gather_kv_fake(k, v, indices, counts, capacity=None):
    op = "sparse_attn.gather_kv"
    _check_kv_args(op, k, v, "k and v", indices, counts)
    if capacity is None:  # max(counts): known only at run time
        capacity = torch.library.get_ctx().new_dynamic_size()
    else:
        torch._check(capacity >= 0, lambda: f"{op}: capacity must be >= 0, got {capacity}")
    shape = (k.shape[0], k.shape[1], capacity, k.shape[3])
    return k.new_empty(shape), v.new_empty(shape)


@torch.library.register_fake("sparse_attn::scatter_kv")
def _scatter_kv_fake(k_cache, v_cache, k, v, indices, counts=None):
    op = "sparse_attn.scatter_kv"
    _check_kv_args(op, k_cache, v_cache, "k_cache and v_cache", indices, counts)
    B, H, _, D = k_cache.shape
    torch._check(
        k_cache.is_contiguous() and v_cache.is_contiguous(),
        lambda: f"{op}: k_cache and v_cache are written in place and must be contiguous",
    )
    torch._check(
        k.dim() == 4 and k.shape[0] == B and k.shape[1] == H and k.shape[3] == D,
        lambda: f"{op}: k must be [{B}, {H}, T, {D}] to match k_cache, got {list(k.shape)}",
    )
    torch._check(
        v.shape == k.shape,
        lambda: f"{op}: v must have k's shape {list(k.shape)}, got {list(v.shape)}",
    )
    torch._check(
        k.dtype == k_cache.dtype and v.dtype == k_cache.dtype,
        lambda: (
            f"{op}: k and v must have the cache dtype {k_cache.dtype}, got {k.dtype} and {v.dtype}"
        ),
    )
    _check_same_device(op, k_cache, "k_cache", k, "k")
    _check_same_device(op, k_cache, "k_cache", v, "v")
    return None


@torch.library.register_fake("sparse_attn::decode_attention")
def _decode_attention_fake(query, key, value, lengths, scale=None, check_lengths=True):
    # The shape / dtype / device contract of the C++ checks (csrc/op_checks.cpp), so that a
    # compiled graph fails where eager fails. The length values are checked at run time.
    op = "sparse_attn.decode_attention"
    torch._check(
        query.dim() == 4,
        lambda: f"{op}: query must be [B, Hq, T, D], got shape {tuple(query.shape)}",
    )
    torch._check(
        key.dim() == 4, lambda: f"{op}: key must be [B, Hkv, C, D], got shape {tuple(key.shape)}"
    )
    torch._check(
        value.shape == key.shape,
        lambda: f"{op}: value must have key's shape {tuple(key.shape)}, got {tuple(value.shape)}",
    )
    for name, t in (("key", key), ("value", value), ("lengths", lengths)):
        _check_same_device(op, query, "query", t, name)
    torch._check(
        query.dtype in _ATTENTION_DTYPES,
        lambda: f"{op}: query must be float32, float16 or bfloat16, got {query.dtype}",
    )
    torch._check(
        key.dtype == query.dtype and value.dtype == query.dtype,
        lambda: (
            f"{op}: key and value must have query's dtype {query.dtype}, got {key.dtype} and {value.dtype}"
        ),
    )
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    torch._check(key.shape[0] == B, lambda: f"{op}: key batch {key.shape[0]} != query batch {B}")
    torch._check(
        key.shape[3] == D, lambda: f"{op}: key head dim {key.shape[3]} != query head dim {D}"
    )
    torch._check(T >= 1, lambda: f"{op}: query must hold T >= 1 new tokens")
    torch._check(D >= 1, lambda: f"{op}: the head dim must be >= 1")
    torch._check(
        Hkv > 0 and Hq % Hkv == 0,
        lambda: f"{op}: query heads ({Hq}) must be a multiple of key heads ({Hkv})",
    )
    torch._check(
        lengths.dtype == torch.int32, lambda: f"{op}: lengths must be int32, got {lengths.dtype}"
    )
    torch._check(
        lengths.dim() == 2 and lengths.shape[0] == B and lengths.shape[1] == Hkv,
        lambda: (
            f"{op}: lengths must have shape [{B}, {Hkv}] (tokens per KV row), got {tuple(lengths.shape)}"
        ),
    )
    _check_scale(op, scale)
    return query.new_empty(query.shape)


# --- autograd: gather_kv's backward writes the kept gradients back to their positions ---------


def _gather_kv_setup_context(ctx, inputs, output):
    k, v, indices, counts, _ = inputs
    ctx.save_for_backward(indices, counts)
    ctx.full_shape = k.shape


def _gather_kv_backward(ctx, grad_k, grad_v):
    indices, counts = ctx.saved_tensors
    grad_k_full = grad_k.new_zeros(ctx.full_shape)
    grad_v_full = grad_v.new_zeros(ctx.full_shape)
    _ops.scatter_kv(
        grad_k_full, grad_v_full, grad_k.contiguous(), grad_v.contiguous(), indices, counts
    )
    return grad_k_full, grad_v_full, None, None, None


torch.library.register_autograd(
    "sparse_attn::gather_kv", _gather_kv_backward, setup_context=_gather_kv_setup_context
)
