"""The "sparse_topp" attention function for transformers, and ``enable(model, policy)``.

With a TopPCache behind the call, the prefill of each layer follows the policy's ``prefill``
(docs/sparse_prefill.md): "sparse" (the default) selects first and attends only among the
selected tokens (``sparse_prefill_attention``); "dense" attends exactly (SDPA, FlashAttention-2
first on GPU) and selects after. Later calls attend only to the compact cache. Without a
TopPCache (no cache, a DynamicCache, a vision tower) it is plain SDPA.
"""

from __future__ import annotations

import inspect
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cache import TopPCache, take_pending_cache
from .policy import TopPPolicy

ATTENTION_NAME = "sparse_topp"
# Dense attention prefers FlashAttention-2 (some torch versions rank cuDNN first on Hopper) and
# still falls back when it does not apply (e.g. a padding mask).
FLASH_FIRST = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_VISUAL_TOKEN_ID_FIELDS = ("image_token_id", "video_token_id")


def sparse_topp_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention function: [B, Hq, T, D] queries -> ([B, T, Hq, D] output, None)."""
    cache = take_pending_cache(getattr(module, "layer_idx", None))
    if cache is None:
        return _dense_attention(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    layer_idx = module.layer_idx
    layer = cache.layers[layer_idx]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if layer.is_compact and query.shape[2] > 1:
        # More than one new token after a selection: a new turn's prompt (docs/sparse_prefill.md).
        return _new_turn_attention(cache, layer_idx, query, key, value, scale, dropout), None
    if layer.is_compact:
        # transformers' mask indexes the logical sequence; the compact rows need their own.
        output = compact_attention(query, key, value, layer.lengths, scale, dropout)
        cache.after_decode_attention(layer_idx, query, scale)
        return output, None
    num_layers = getattr(getattr(module, "config", None), "num_hidden_layers", None)
    valid = key_validity(attention_mask)
    if cache.policy.prefill == "dense":
        output, _ = _dense_attention(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        cache.select_after_prefill(layer_idx, query, valid, scale, num_layers=num_layers)
        return output, None
    # Sparse prefill: select first (the scores need only the probes and the keys), then attend
    # among the kept tokens, whose K / V the compact cache now holds (docs/sparse_prefill.md).
    cache.select_after_prefill(layer_idx, query, valid, scale, num_layers=num_layers)
    if keeps_every_token(layer.lengths, valid, key.shape[2]):
        # T = every valid token (p = 1, FastV's early layers): the exact dense attention is the
        # same computation, and the dense kernel is bit-identical to prefill="dense".
        output, _ = _dense_attention(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        return output, None
    output = sparse_prefill_attention(
        query, layer.keys, layer.values, layer.positions, layer.lengths, layer.max_length, scale,
        dropout,
    )
    return output, None


def _new_turn_attention(cache, layer_idx, query, key, value, scale, dropout):
    """T > 1 new prompt tokens on a compact layer (a second ``generate`` on the same cache): the
    layer selects again over its held tokens and the new ones, probed by the new turn's last
    n_probe queries. "dense": the new tokens attend to everything held, then the selection;
    "sparse": the selection first, then new tokens in T attend to the keys in T before them and
    the others get a zero output. A chunked prefill is refused (check_prompt_continues)."""
    T = query.shape[2]
    cache.check_prompt_continues(layer_idx, T)
    layer = cache.layers[layer_idx]
    held = layer.lengths
    if cache.policy.prefill == "dense":
        output = compact_attention(query, key, value, held, scale, dropout)
        cache.select_new_turn(layer_idx, query, scale)
        return output
    cache.select_new_turn(layer_idx, query, scale)
    if bool((layer.lengths == held).all()):  # every token stays (p = 1): the exact attention
        return compact_attention(query, key, value, held, scale, dropout)
    return sparse_prefill_attention(
        query, layer.keys, layer.values, layer.positions, layer.lengths, layer.max_length, scale,
        dropout, start=layer.seen_tokens - T,
    )


def keeps_every_token(lengths: Tensor, valid: Tensor | None, length: int) -> bool:
    """Every row of ``lengths`` [B, Hkv] (tokens kept) holds all valid tokens of its sequence
    (``valid`` bool [B, L], or None when none is padding)."""
    existing = valid.sum(-1, keepdim=True) if valid is not None else length
    return bool((lengths == existing).all())


def sparse_prefill_attention(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    positions: Tensor,
    lengths: Tensor,
    width: int,
    scale: float,
    dropout: float = 0.0,
    start: int = 0,
) -> Tensor:
    """Prefill attention among each row's kept tokens T (docs/sparse_prefill.md).

    query: [B, Hq, L, D], the prompt positions start .. start + L - 1; keys / values:
    [B, Hkv, >= width, D], the kept tokens of each KV-head row in ascending position (what the
    compact cache holds, possibly tokens before ``start`` too: a new turn); positions: int
    [B, Hkv, >= width] the logical position of each kept slot (ascending; anything past the row's
    length); lengths: int [B, Hkv] kept tokens per row; width: max(lengths). The query heads of
    KV head h's group use h's set. Returns [B, L, Hq, D]: at a position in T, causal attention
    over the keys in T (key position <= query position); zero at every other position.

    Cost: a gather of the kept query rows, one SDPA call over width x width rows (never an
    L x L mask), a scatter of the outputs. Rows holding fewer than ``width`` tokens need no mask:
    slot order is position order, so the causal mask over slots already hides the slots past a
    row's length from every used query slot; the outputs of the unused query slots are dropped.
    """
    B, Hq, L, D = query.shape
    Hkv = keys.shape[1]
    g = Hq // Hkv
    slots = positions[:, :, :width].long() - start
    used = torch.arange(width, device=query.device) < lengths[..., None]  # [B, Hkv, width]
    is_query = used & (slots >= 0)  # slots before `start` are keys only (their queries: dropped)
    # Rows of D contiguous values in the [B, L, Hq, D] layout that transformers' projections
    # produce (query is its transpose): whole-row copies (index_select / index_copy) instead of
    # an element-wise gather; index (b, l, r) -> (b * L + l) * Hq + r.
    heads = torch.arange(Hq, device=query.device)[:, None]  # [Hq, 1]
    rows = torch.where(is_query, slots, 0).repeat_interleave(g, dim=1)  # [B, Hq, width]
    batch = torch.arange(B, device=query.device)[:, None, None] * L
    flat = (batch + rows) * Hq + heads  # [B, Hq, width]
    q = query.transpose(1, 2).reshape(B * L * Hq, D).index_select(0, flat.view(-1))
    q = q.view(B, Hq, width, D)
    k, v = keys[:, :, :width], values[:, :, :width]
    # GQA inside SDPA (as transformers' SDPA path without a mask): no repeated K / V copies.
    sdpa = partial(
        F.scaled_dot_product_attention, dropout_p=dropout, is_causal=True, scale=scale,
        enable_gqa=g > 1,
    )
    if query.is_cuda:
        with sdpa_kernel(FLASH_FIRST, set_priority=True):
            out = sdpa(q, k, v)
    else:
        out = sdpa(q, k, v)
    # Unused query slots write into an extra row B * L * Hq, cut off after the copy.
    target = torch.where(is_query.repeat_interleave(g, dim=1), flat, B * L * Hq)
    full = out.new_zeros(B * L * Hq + 1, D)
    full.index_copy_(0, target.view(-1), out.reshape(-1, D))
    return full[:-1].view(B, L, Hq, D)


def compact_attention(
    query: Tensor, key: Tensor, value: Tensor, lengths: Tensor, scale: float, dropout: float = 0.0
) -> Tensor:
    """Attention of T new queries over compact rows that end with the T new tokens.

    query: [B, Hq, T, D]; key / value: [B, Hkv, S, D]; lengths: [B, Hkv], tokens held by each
    row (the T new ones included). Returns [B, T, Hq, D].
    """
    B, Hq, T, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    g = Hq // Hkv
    # Fold each GQA group's query heads into the query axis: one attention per KV head, which
    # reads its keys once (no repeat_kv) and takes that head's own row length.
    folded = query.reshape(B, Hkv, g * T, D)
    # Query t sees the slots of its row before index length - (T - 1 - t): causal among the new.
    ends = lengths[..., None] - (T - 1 - torch.arange(T, device=query.device))  # [B, Hkv, T]
    visible = torch.arange(S, device=query.device) < ends[..., None]  # [B, Hkv, T, S]
    if T > 1:
        visible = visible.repeat(1, 1, g, 1)  # folded rows are (group member, t)
    output = F.scaled_dot_product_attention(
        folded, key, value, attn_mask=visible, dropout_p=dropout, scale=scale
    )
    return output.view(B, Hq, T, D).transpose(1, 2)


def _dense_attention(module, query, key, value, attention_mask, **kwargs):
    if not query.is_cuda:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    with sdpa_kernel(FLASH_FIRST, set_priority=True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def key_validity(attention_mask: Tensor | None) -> Tensor | None:
    """bool [B, L] (False at padding) from the prefill's 4D mask: the last query sees every
    non-padding key. None when there is no mask (no padding)."""
    if attention_mask is None:
        return None
    last_row = attention_mask[:, 0, -1, :]
    return (
        last_row if last_row.dtype == torch.bool else last_row == 0
    )  # additive masks: 0 = visible


def _visual_token_ids(config) -> list[int]:
    return [i for name in _VISUAL_TOKEN_ID_FIELDS if (i := getattr(config, name, None)) is not None]


def _mark_visual_tokens(token_ids: Tensor, module, args, kwargs) -> None:
    """Forward pre-hook: tell a fresh TopPCache which prompt tokens are image / video tokens."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # see cache_argument
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(cache, TopPCache) and input_ids is not None and cache.get_seq_length() == 0:
        cache.visual_mask = torch.isin(input_ids, token_ids.to(input_ids.device))


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword under which ``model`` (its forward and generate) takes a cache: "cache" in
    newer transformers releases, "past_key_values" in earlier ones (deprecated since)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def enable(model: torch.nn.Module, policy: TopPPolicy | None = None) -> torch.nn.Module:
    """Use the "sparse_topp" attention in ``model`` and return it.

    Decoding prunes when a ``TopPCache`` is passed as the cache (``cache_argument(model)``); any other cache runs
    dense. On models with image / video tokens (config ``image_token_id`` / ``video_token_id``),
    a hook tells the TopPCache which prompt tokens are visual (prune="visual", visual stats).
    ``policy``, if given, is checked against the model now rather than at the first generate.
    """
    layer_types = getattr(model.config.get_text_config(decoder=True), "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        # The compact decode attends to every held token: a sliding window would be ignored.
        raise ValueError(
            "sparse_topp supports full-attention layers only; this model has "
            f"{sorted(set(layer_types))}"
        )
    visual_ids = _visual_token_ids(model.config)
    if policy is not None and policy.prune == "visual" and not visual_ids:
        raise ValueError(
            "TopPPolicy(prune='visual') needs image / video token ids, but "
            f"{type(model.config).__name__} has none of {_VISUAL_TOKEN_ID_FIELDS}"
        )
    model.set_attn_implementation(ATTENTION_NAME)
    if visual_ids and not hasattr(model, "_sparse_topp_visual_hook"):
        hook = partial(_mark_visual_tokens, torch.tensor(visual_ids))
        model._sparse_topp_visual_hook = model.register_forward_pre_hook(hook, with_kwargs=True)
    return model


AttentionInterface.register(ATTENTION_NAME, sparse_topp_attention)
# The prefill needs transformers' padding-aware causal mask: build it as for SDPA.
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
