"""The five ops, as Python functions over torch.ops.sparse_attn.*, with fake kernels
(torch.compile) and autograd. Semantics: SPEC section 2; plain-PyTorch equivalents with the same
signatures live in sparse_attn.reference."""
from __future__ import annotations

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
    return _ops.topp_select(scores, float(p), None, valid_mask, keep_first, keep_last, candidate_mask)


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


@torch.library.register_fake("sparse_attn::cumulative_scores")
def _cumulative_scores_fake(q, k, scale=None, causal=True, key_mask=None):
    return q.new_empty((q.shape[0], k.shape[1], k.shape[2]), dtype=torch.float32)


@torch.library.register_fake("sparse_attn::topp_select")
def _topp_select_fake(scores, p, p_rows=None, valid_mask=None, keep_first=0, keep_last=0, candidate_mask=None):
    return (
        scores.new_empty(scores.shape, dtype=torch.int32),
        scores.new_empty((scores.shape[0],), dtype=torch.int32),
    )


@torch.library.register_fake("sparse_attn::gather_kv")
def _gather_kv_fake(k, v, indices, counts, capacity=None):
    if capacity is None:  # max(counts): known only at run time
        capacity = torch.library.get_ctx().new_dynamic_size()
    shape = (k.shape[0], k.shape[1], capacity, k.shape[3])
    return k.new_empty(shape), v.new_empty(shape)


@torch.library.register_fake("sparse_attn::scatter_kv")
def _scatter_kv_fake(k_cache, v_cache, k, v, indices, counts=None):
    return None


_ATTENTION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.register_fake("sparse_attn::decode_attention")
def _decode_attention_fake(query, key, value, lengths, scale=None, check_lengths=True):
    # The shape / dtype / device contract of the C++ checks (csrc/op_checks.cpp), so that a
    # compiled graph fails where eager fails. The length values are checked at run time.
    op = "sparse_attn.decode_attention"
    torch._check(query.dim() == 4, lambda: f"{op}: query must be [B, Hq, T, D], got shape {tuple(query.shape)}")
    torch._check(key.dim() == 4, lambda: f"{op}: key must be [B, Hkv, C, D], got shape {tuple(key.shape)}")
    torch._check(value.shape == key.shape, lambda: f"{op}: value must have key's shape {tuple(key.shape)}, got {tuple(value.shape)}")
    for name, t in (("key", key), ("value", value), ("lengths", lengths)):
        torch._check(t.device == query.device, lambda: f"{op}: {name} is on {t.device} but query is on {query.device}")
    torch._check(query.dtype in _ATTENTION_DTYPES, lambda: f"{op}: query must be float32, float16 or bfloat16, got {query.dtype}")
    torch._check(
        key.dtype == query.dtype and value.dtype == query.dtype,
        lambda: f"{op}: key and value must have query's dtype {query.dtype}, got {key.dtype} and {value.dtype}",
    )
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    torch._check(key.shape[0] == B, lambda: f"{op}: key batch {key.shape[0]} != query batch {B}")
    torch._check(key.shape[3] == D, lambda: f"{op}: key head dim {key.shape[3]} != query head dim {D}")
    torch._check(T >= 1, lambda: f"{op}: query must hold T >= 1 new tokens")
    torch._check(D >= 1, lambda: f"{op}: the head dim must be >= 1")
    torch._check(Hkv > 0 and Hq % Hkv == 0, lambda: f"{op}: query heads ({Hq}) must be a multiple of key heads ({Hkv})")
    torch._check(lengths.dtype == torch.int32, lambda: f"{op}: lengths must be int32, got {lengths.dtype}")
    torch._check(
        lengths.dim() == 2 and lengths.shape[0] == B and lengths.shape[1] == Hkv,
        lambda: f"{op}: lengths must have shape [{B}, {Hkv}] (tokens per KV row), got {tuple(lengths.shape)}",
    )
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
    _ops.scatter_kv(grad_k_full, grad_v_full, grad_k.contiguous(), grad_v.contiguous(), indices, counts)
    return grad_k_full, grad_v_full, None, None, None


torch.library.register_autograd(
    "sparse_attn::gather_kv", _gather_kv_backward, setup_context=_gather_kv_setup_context
)
