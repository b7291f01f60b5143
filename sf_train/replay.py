"""Inference-consistent training forward: replay each rollout's recorded selections.

During a rollout the TopPCache keeps, per layer, the top-p prompt tokens chosen right after the
prefill; every completion token then attends to those tokens plus the completion so far. The
training forward over [prompt + completion] reproduces exactly that: prompt positions attend
densely and causally (as the prefill did), completion positions attend to the recorded kept
prompt tokens - compacted with the same gather_kv op, so gradients flow into the kept keys and
values - plus the earlier completion tokens. With unchanged weights its log-probs equal the
rollout's (tests/test_replay.py).

The recorded selection is a constant of that forward, so no gradient says which prompt tokens the
completion needed. With a SelectionGradient (beyond the paper, SFConfig.selection_gradient) the
completion attends to every prompt key with a weight that is the recorded 0/1 mask in value and,
in gradient, a sigmoid of each candidate's probe score (log-space, against the row's lowest kept
candidate): a straight-through estimator. The forward, and so the log-probs, are unchanged; the
loss then raises the probe attention of dropped tokens the completion would have used.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sparse_attn import gather_kv
from sparse_attn.attention import key_validity
from sparse_attn.cache import TopPCache
from sparse_attn.reference import cumulative_scores, forced_positions
from sparse_attn.rules import indices_to_keep_mask

REPLAY_ATTENTION = "sparse_topp_replay"


@dataclass
class LayerSelection:
    """The prompt tokens one layer kept for a batch: int32 indices [R, N] (ascending, -1 after
    counts[r]) and counts [R], with R = B (one budget per layer) or B * Hkv (per KV head)."""

    indices: Tensor
    counts: Tensor


def recorded_selections(cache: TopPCache, prompt_length: int) -> list[LayerSelection]:
    """Per layer, the prompt tokens a rollout's cache kept (call after generation).

    Decoded tokens sit after the kept prompt tokens in each row, at logical positions >=
    prompt_length, so the prompt part of every row is the prefix of positions < prompt_length.
    """
    if cache.policy.reselect_every:
        raise ValueError("replay needs one selection per layer: use TopPPolicy(reselect_every=0)")
    per_head = cache.policy.granularity == "kv_head"
    selections = []
    for layer in cache.layers:
        positions = layer.positions  # [B, Hkv, C], logical positions, -1 in free slots
        is_prompt = (positions >= 0) & (positions < prompt_length)
        rows = positions.flatten(0, 1) if per_head else positions[:, 0]
        kept = is_prompt.flatten(0, 1) if per_head else is_prompt[:, 0]
        counts = kept.sum(-1).to(torch.int32)
        width = max(int(counts.max()), 1)
        indices = torch.where(kept, rows, -1)[:, :width].to(torch.int32).contiguous()
        selections.append(LayerSelection(indices, counts))
    return selections


def concat_selections(selections: list[list[LayerSelection]]) -> list[LayerSelection]:
    """Stack the per-layer selections of several rollout batches into one batch."""
    merged = []
    for layer_parts in zip(*selections):
        width = max(part.indices.shape[1] for part in layer_parts)
        indices = torch.cat([F.pad(part.indices, (0, width - part.indices.shape[1]), value=-1) for part in layer_parts])
        merged.append(LayerSelection(indices, torch.cat([part.counts for part in layer_parts])))
    return merged


@dataclass(frozen=True)
class SelectionGradient:
    """The rollouts' TopPPolicy fields the straight-through keep mask needs (one budget per layer,
    every token a candidate), and the width of its sigmoid in log-score units."""

    n_probe: int
    keep_first: int
    keep_last: int
    temperature: float = 1.0


_active = threading.local()


@contextmanager
def replaying(selections: list[LayerSelection], prompt_length: int, gradient: SelectionGradient | None = None):
    """Within this block, forwards of a model using the replay attention replay ``selections``
    (one per decoder layer) over sequences whose first ``prompt_length`` positions are the
    prompt; with ``gradient``, through a straight-through keep mask."""
    _active.state = (selections, prompt_length, gradient)
    try:
        yield
    finally:
        _active.state = None


def replay_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: dense for the prompt, recorded selection for the rest."""
    state = getattr(_active, "state", None)
    layer_idx = getattr(module, "layer_idx", None)
    if state is None or layer_idx is None:  # not replaying, or a vision-tower attention
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    selections, P, gradient = state
    selection = selections[layer_idx]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    prompt_mask = None if attention_mask is None else attention_mask[:, :, :P, :P]
    prompt_out, _ = sdpa_attention_forward(
        module, query[:, :, :P], key[:, :, :P], value[:, :, :P], prompt_mask, dropout=dropout, scaling=scale, **kwargs
    )
    if gradient is None:
        completion_out = _completion_attention(query[:, :, P:], key, value, P, selection, scale, dropout)
    else:
        if dropout:
            raise ValueError(f"selection_gradient supports no attention dropout, got {dropout}")
        keep = _layer_keep(query[:, :, :P], key[:, :, :P], key_validity(prompt_mask), selection, scale, gradient)
        completion_out = _weighted_completion_attention(query[:, :, P:], key, value, keep, scale)
    return torch.cat([prompt_out, completion_out], dim=1), None


def straight_through_keep(scores: Tensor, kept: Tensor, valid: Tensor, forced: Tensor, temperature: float) -> Tensor:
    """float [R, L]: ``kept`` (0/1) in value; in gradient, each candidate's
    sigmoid((log score - log boundary) / temperature), the boundary being the row's lowest kept
    candidate score (its highest candidate score when none was kept). Forced and invalid
    positions carry no gradient."""
    candidates = valid & ~forced
    log_s = scores.clamp_min(1e-30).log()
    kept_candidates = kept & candidates
    lowest_kept = log_s.detach().masked_fill(~kept_candidates, float("inf")).amin(-1, keepdim=True)
    highest = log_s.detach().masked_fill(~candidates, float("-inf")).amax(-1, keepdim=True)
    boundary = torch.where(kept_candidates.any(-1, keepdim=True), lowest_kept, highest)
    soft = torch.where(candidates, torch.sigmoid((log_s - boundary) / temperature), 0.0)
    return kept.to(soft.dtype) + (soft - soft.detach())


def _layer_keep(query, key, valid, selection: LayerSelection, scale, gradient: SelectionGradient) -> Tensor:
    """float [B, P]: one layer's straight-through keep mask, from the prompt's probe attention
    recomputed differentiably (the cumulative_scores op's plain-PyTorch definition)."""
    B, _, P, _ = query.shape
    if selection.indices.shape[0] != B:
        raise ValueError("SelectionGradient needs one selection per row (granularity='layer')")
    valid = torch.ones(B, P, dtype=torch.bool, device=query.device) if valid is None else valid
    probes = query[:, :, -gradient.n_probe:]
    scores = cumulative_scores(probes, key, scale=scale, key_mask=valid).sum(1)  # the layer's budget
    forced = forced_positions(valid, gradient.keep_first, gradient.keep_last, None)
    return straight_through_keep(scores, indices_to_keep_mask(selection.indices, P) & valid, valid, forced, gradient.temperature)


def _weighted_completion_attention(query, key, value, keep: Tensor, scale) -> Tensor:
    """Completion queries [B, Hq, T, D] over all P prompt keys weighted by keep [B, P], plus the
    completion so far: in value the softmax over the keys with keep = 1; a dropped key's weight
    exp(logit) * keep is exactly 0 but has a gradient in keep."""
    B, Hq, T, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    g = Hq // Hkv
    work = torch.promote_types(query.dtype, torch.float32)
    folded = query.reshape(B, Hkv, g * T, D).to(work)  # rows (group member, t), as in _completion_attention
    logits = scale * folded @ key.to(work).transpose(-1, -2)  # [B, Hkv, g*T, P + T]
    causal = torch.ones(T, T, dtype=work, device=query.device).tril().repeat(g, 1)
    weights = torch.cat([keep.to(work)[:, None, None, :].expand(B, Hkv, g * T, S - T),
                         causal.expand(B, Hkv, g * T, T)], dim=-1)
    shift = logits.detach().masked_fill(weights.detach() == 0, float("-inf")).amax(-1, keepdim=True)
    # A dropped key may score far above the visible ones: cap its exponent (its weight is 0).
    e = torch.exp((logits - shift).clamp(max=30.0)) * weights
    out = (e @ value.to(work)) / e.sum(-1, keepdim=True)
    return out.to(query.dtype).view(B, Hq, T, D).transpose(1, 2)


def _completion_attention(query, key, value, P, selection: LayerSelection, scale, dropout):
    """Completion queries [B, Hq, T, D] over the kept prompt tokens + the completion so far."""
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    g = Hq // Hkv
    counts = selection.counts.to(query.device)
    indices = selection.indices.to(query.device)
    N = indices.shape[1]
    kept_k, kept_v = gather_kv(key[:, :, :P].contiguous(), value[:, :, :P].contiguous(), indices, counts, capacity=N)
    keys = torch.cat([kept_k, key[:, :, P:]], dim=2)
    values = torch.cat([kept_v, value[:, :, P:]], dim=2)
    # Slot visibility per KV head: kept slot c < count, completion j <= t.
    count_per_head = counts.view(B, -1).expand(B, Hkv)  # [B, Hkv]
    kept_visible = torch.arange(N, device=query.device) < count_per_head[..., None]  # [B, Hkv, N]
    causal = torch.ones(T, T, dtype=torch.bool, device=query.device).tril()
    visible = torch.cat([kept_visible[:, :, None, :].expand(B, Hkv, T, N), causal.expand(B, Hkv, T, T)], dim=-1)
    # One attention per KV head with its group's query heads folded into the query axis.
    folded = query.reshape(B, Hkv, g * T, D)
    visible = visible.repeat(1, 1, g, 1)
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=visible, dropout_p=dropout, scale=scale)
    return out.view(B, Hq, T, D).transpose(1, 2)


AttentionInterface.register(REPLAY_ATTENTION, replay_attention)
AttentionMaskInterface.register(REPLAY_ATTENTION, sdpa_mask)
