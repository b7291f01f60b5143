"""Inference-consistent training forward: replay each rollout's recorded selections.

During a rollout the TopPCache keeps, per layer, the top-p prompt tokens chosen right after the
prefill; every completion token then attends to those tokens plus the completion so far. The
training forward over [prompt + completion] reproduces exactly that: prompt positions attend
densely and causally (as the prefill did), completion positions attend to the recorded kept
prompt tokens - compacted with the same gather_kv op, so gradients flow into the kept keys and
values - plus the earlier completion tokens. With unchanged weights its log-probs equal the
rollout's (tests/test_replay.py).
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
from sparse_attn.cache import TopPCache

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


_active = threading.local()


@contextmanager
def replaying(selections: list[LayerSelection], prompt_length: int):
    """Within this block, forwards of a model using the replay attention replay ``selections``
    (one per decoder layer) over sequences whose first ``prompt_length`` positions are the
    prompt."""
    _active.state = (selections, prompt_length)
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
    selections, P = state
    selection = selections[layer_idx]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    prompt_mask = None if attention_mask is None else attention_mask[:, :, :P, :P]
    prompt_out, _ = sdpa_attention_forward(
        module, query[:, :, :P], key[:, :, :P], value[:, :, :P], prompt_mask, dropout=dropout, scaling=scale, **kwargs
    )
    completion_out = _completion_attention(query[:, :, P:], key, value, P, selection, scale, dropout)
    return torch.cat([prompt_out, completion_out], dim=1), None


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
