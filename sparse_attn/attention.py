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
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import ops
from .cache import TopPCache, take_pending_cache
from .gqa import gqa_fold_visibility
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
    cache.check_model(layer_idx, module)
    layer = cache.layers[layer_idx]
    _check_window(kwargs.get("sliding_window"), layer_idx, layer.seen_tokens)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if layer.is_compact and query.shape[2] > 1:
        # More than one new token after a selection: a new turn's prompt (docs/sparse_prefill.md).
        return _new_turn_attention(cache, layer_idx, query, attention_mask, scale, dropout), None
    if layer.is_compact:
        # transformers' mask of a compact layer covers the new tokens only (TopPLayer.
        # get_mask_sizes): their padding leaves the cache, the rest attends to the compact rows.
        valid = new_token_validity(attention_mask, query.shape[2])
        if valid is not None:
            layer.drop_padding(valid)
        output = compact_decode(query, layer, key, value, valid, scale, dropout)
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
        query,
        layer.keys,
        layer.values,
        layer.positions,
        layer.lengths,
        layer.max_length,
        scale,
        dropout,
    )
    return output, None


def _new_turn_attention(cache, layer_idx, query, attention_mask, scale, dropout):
    """T > 1 new prompt tokens on a compact layer (a second ``generate`` on the same cache, or a
    batched later turn): the padding among them leaves the rows (as in a decode step), then the
    layer selects again over its held tokens and the new ones, probed by the new turn's last
    n_probe queries. "dense": the new tokens attend to everything held, then the selection;
    "sparse": the selection first, then new tokens in T attend to the keys in T before them and
    the others get a zero output. A chunked prefill is refused (check_prompt_continues)."""
    T = query.shape[2]
    cache.check_prompt_continues(layer_idx, T)
    layer = cache.layers[layer_idx]
    valid = new_token_validity(attention_mask, T)
    if valid is not None:
        layer.drop_padding(valid)
    if cache.policy.prefill == "dense":
        output = compact_decode(query, layer, *_held(layer), valid, scale, dropout)
        cache.select_new_turn(layer_idx, query, scale)
        return output
    held = layer.lengths.clone()
    cache.select_new_turn(layer_idx, query, scale)
    if bool((layer.lengths == held).all()):  # every token stays (p = 1): the exact attention
        return compact_decode(query, layer, *_held(layer), valid, scale, dropout)
    return sparse_prefill_attention(
        query,
        layer.keys,
        layer.values,
        layer.positions,
        layer.lengths,
        layer.max_length,
        scale,
        dropout,
        start=layer.seen_tokens - T,
    )


def _held(layer) -> tuple[Tensor, Tensor]:
    """A compact layer's K / V buffers up to its (upper bound of the) longest row."""
    return layer.keys[:, :, : layer.max_length], layer.values[:, :, : layer.max_length]


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
        F.scaled_dot_product_attention,
        dropout_p=dropout,
        is_causal=True,
        scale=scale,
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


def _check_window(window: int | None, layer_idx: int, length: int) -> None:
    """A layer with a sliding window (transformers passes it as ``sliding_window``) is served only
    while the window covers the whole sequence: beyond it the compact cache would attend to
    tokens the window hides (docs/limits.md). enable() refuses the models where this can
    happen within max_position_embeddings; this catches the rest."""
    if window is not None and length > window:
        raise RuntimeError(
            f"sparse_topp: layer {layer_idx} has a sliding window of {window} tokens and the "
            f"sequence is now {length} tokens long; the top-p cache serves full attention only"
        )


def new_token_validity(attention_mask: Tensor | None, T: int) -> Tensor | None:
    """bool [B, T], False at the padding among the T new tokens, from the 4D mask of a decode
    step (whose last query row sees every non-padding new token; the new tokens are its last T
    columns); None without a mask. No host sync."""
    if attention_mask is None:
        return None
    row = attention_mask[:, 0, -1, -T:]
    return row if row.dtype == torch.bool else row == 0  # additive masks: 0 = visible


def compact_decode(
    query: Tensor,
    layer,
    key: Tensor,
    value: Tensor,
    valid: Tensor | None,
    scale: float,
    dropout: float = 0.0,
) -> Tensor:
    """Attention of a decode step's T queries ([B, Hq, T, D]) over a compact TopPLayer that holds
    them already (``key`` / ``value``: its buffers up to max_length). ``valid``: bool [B, T],
    the new tokens that are not padding (their padding was dropped from the rows), or None.
    Returns [B, T, Hq, D]. Makes no host sync (docs/decode.md#no-host-sync)."""
    B, Hq, T, D = query.shape
    if valid is None or T == 1:
        # A padding token alone (T = 1) sees the row's earlier tokens: finite, and unused.
        return decode_attention(query, layer, key, value, scale, dropout).transpose(1, 2)
    # Queries in the order padding first, then the valid ones in order: decode_attention's rule
    # (query t sees the slots < length - (T - 1 - t)) then shows the valid query of rank r its
    # row's earlier tokens and the first r + 1 valid new ones (docs/decode.md#padding).
    order = torch.sort(valid.to(torch.uint8), dim=1, stable=True).indices  # [B, T]
    index = order[:, None, :, None].expand(B, Hq, T, D)
    sorted_output = decode_attention(query.gather(2, index), layer, key, value, scale, dropout)
    output = torch.empty_like(sorted_output).scatter_(2, index, sorted_output)
    # A padding query may see no slot at all: zero, whatever the kernel made of that.
    output = torch.where(valid[:, None, :, None], output, 0)
    return output.transpose(1, 2)


def decode_attention(
    query: Tensor, layer, key: Tensor, value: Tensor, scale: float, dropout: float = 0.0
) -> Tensor:
    """The one place the compact decode attends ([B, Hq, T, D] -> [B, Hq, T, D]): the
    decode_attention op over the layer's full buffers (it reads each row's first lengths slots;
    static shapes for CUDA graphs). Attention dropout (training forwards only) takes masked SDPA
    over the buffers up to max_length, the op's semantics with dropout."""
    if dropout:
        return masked_decode_attention(query, key, value, layer.lengths, scale, dropout)
    # The lengths are the cache's own counters: no range check (a host sync on CUDA).
    return ops.decode_attention(
        query, layer.keys, layer.values, layer.lengths, scale=scale, check_lengths=False
    )


def masked_decode_attention(
    query: Tensor, key: Tensor, value: Tensor, lengths: Tensor, scale: float, dropout: float = 0.0
) -> Tensor:
    """Attention of T new queries over compact rows that end with the T new tokens (SDPA with a
    boolean mask; the decode_attention op's semantics).

    query: [B, Hq, T, D]; key / value: [B, Hkv, S, D]; lengths: [B, Hkv], tokens held by each
    row (the T new ones included). Returns [B, Hq, T, D].
    """
    B, Hq, T, D = query.shape
    # One attention per KV head over its own row length, the group's query heads folded into the
    # query axis; query t sees the slots before length - (T - 1 - t): causal among the new.
    folded, visible = gqa_fold_visibility(query, lengths, key.shape[2])
    output = F.scaled_dot_product_attention(
        folded, key, value, attn_mask=visible, dropout_p=dropout, scale=scale
    )
    return output.view(B, Hq, T, D)


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


def visual_token_ids(config) -> list[int]:
    """The image / video token ids of a model config (the tokens TopPPolicy(prune="visual")
    prunes; empty for a text model)."""
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
    Models it cannot serve exactly are refused here with a ValueError: sliding windows that can
    apply, attention outside transformers' AttentionInterface (docs/limits.md).
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            "sparse_attn.enable(model): model must be a transformers PreTrainedModel, got "
            f"{type(model).__name__}"
        )
    if policy is not None and not isinstance(policy, TopPPolicy):
        raise TypeError(
            "sparse_attn.enable(model, policy): policy must be a sparse_attn.TopPPolicy or None, "
            f"got {type(policy).__name__} {policy!r}"
        )
    _check_attention_interface(model)
    text_config = model.config.get_text_config(decoder=True)
    if (windowed := _windowed_layers(text_config)) is not None:
        # The compact decode attends to every held token: a sliding window would be ignored.
        raise ValueError(
            f"sparse_topp supports full-attention layers only; this {type(model).__name__} has "
            f"{windowed} (docs/limits.md)"
        )
    visual_ids = visual_token_ids(model.config)
    if policy is not None and policy.prune == "visual" and not visual_ids:
        raise ValueError(
            "TopPPolicy(prune='visual') needs image / video token ids, but "
            f"{type(model.config).__name__} has none of {_VISUAL_TOKEN_ID_FIELDS}"
        )
    model.set_attn_implementation(ATTENTION_NAME)
    if getattr(text_config, "_attn_implementation", ATTENTION_NAME) != ATTENTION_NAME:
        raise ValueError(_NO_INTERFACE.format(type(model).__name__))
    if visual_ids and not hasattr(model, "_sparse_topp_visual_hook"):
        hook = partial(_mark_visual_tokens, torch.tensor(visual_ids))
        model._sparse_topp_visual_hook = model.register_forward_pre_hook(hook, with_kwargs=True)
    return model


_NO_INTERFACE = (
    "sparse_topp cannot serve {}: its attention does not go through transformers' "
    "AttentionInterface, so the top-p cache would never select (docs/limits.md)"
)


def _check_attention_interface(model: PreTrainedModel) -> None:
    """Refuse a model whose attention layers do not call the registered attention function: its
    attention implementation cannot be set (transformers' own test, where it has one)."""
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():
        raise ValueError(_NO_INTERFACE.format(type(model).__name__))


def _windowed_layers(config) -> str | None:
    """What in the decoder ``config`` has a sliding window that can apply, or None.

    transformers decides it two ways (docs/limits.md): families with ``layer_types`` (Qwen2,
    Qwen2-VL, Qwen3, Gemma, ...) window only the "sliding_attention" layers, by
    ``sliding_window``; the others (Mistral, Mixtral, Phi3, Qwen3-MoE, Starcoder2, ...) window
    every layer whenever ``sliding_window`` is not None. A window of at least
    ``max_position_embeddings`` cannot apply within the model's positions (the attention checks
    the sequence against it at run time)."""
    window = getattr(config, "sliding_window", None)
    longest = getattr(config, "max_position_embeddings", None)
    applies = window is not None and (longest is None or window < longest)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        other = sorted({kind for kind in layer_types if kind not in _WINDOWED_OR_FULL})
        if other:
            return f"layers of type {other}"
        if applies and "sliding_attention" in layer_types:
            return f"sliding_attention layers (sliding_window={window})"
        return None
    return f"a sliding window on every layer (sliding_window={window})" if applies else None


_WINDOWED_OR_FULL = ("full_attention", "sliding_attention")


def sparse_topp_mask(*args, **kwargs):
    """transformers' SDPA mask, always materialised for the keys of a compact TopPCache layer
    (kv_offset > 0: its mask covers the new tokens only), where sdpa_mask would otherwise read
    the padding on the host to decide whether it may skip the mask (a sync per decode step)."""
    if kwargs.get("kv_offset", 0):
        kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTENTION_NAME, sparse_topp_attention)
# The prefill needs transformers' padding-aware causal mask: build it as for SDPA.
AttentionMaskInterface.register(ATTENTION_NAME, sparse_topp_mask)
