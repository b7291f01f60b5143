"""TopPCache: a transformers Cache that holds, per layer, only the top-p tokens
(docs/design.md#the-cache) - or the tokens another rule of TopPPolicy keeps (top_k, threshold, FastV-style layer sharing).

Life of a layer:
  1. prefill: ``update`` stores the prompt's K/V densely;
  2. the "sparse_topp" attention function (sparse_attn.attention) calls
     ``select_after_prefill`` - before the layer's attention under TopPPolicy(prefill="sparse"),
     which then attends only among the kept tokens, after an exact dense attention under
     prefill="dense" (docs/sparse_prefill.md): the last probe queries score the keys
     (cumulative_scores), the policy's rule picks the tokens (topp_select for top-p;
     sparse_attn.rules) and gather_kv compacts them into [B, Hkv, C, D] buffers with room for
     the tokens still to come. With ``shared_from_layer`` = K, layers other than K skip the
     scoring: layers < K keep every token, layers > K the positions layer K kept;
  3. decode: ``update`` writes each new token at its row's physical length, and the
     attention reads only the compact buffers, without a host sync (docs/decode.md). With ``reselect_every`` the selection re-runs
     over the compact cache every N decoded tokens. A later forward of several tokens is a new
     turn and selects again (``select_new_turn``); a prompt split over forwards is refused.
Rows keep different numbers of tokens (batch rows, and KV heads with granularity="kv_head"), so
a compact layer tracks ``lengths`` [B, Hkv]; the slots of a row past its length are free (never
read).

Positions stay logical: ``get_seq_length()`` counts every token seen, so positions, RoPE and
Qwen-VL mRoPE ``rope_deltas`` are unchanged; ``get_mask_sizes()`` of a compact layer covers
only the new tokens (their causal mask and padding: docs/decode.md#padding).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from .handoff import Handoff
from .ops import cumulative_scores, gather_kv
from .policy import TopPPolicy
from .rules import indices_to_keep_mask, keep_mask_to_indices, select_rows


class TopPLayer(CacheLayerMixin):
    """One layer of a TopPCache: dense K/V until its selection, compact rows after it.

    Once compact: ``keys`` / ``values`` are [B, Hkv, C, D] (C: capacity), ``lengths`` int32
    [B, Hkv] the tokens held per row, ``positions`` int32 [B, Hkv, C] the logical position of
    each slot (ascending in a row, -1 past its length).

    The decode step (``update`` of a compact layer, ``drop_padding``) runs without a host sync:
    ``lengths`` and ``positions`` stay on the device, the K/V writes are plain torch scatters at
    slots the layer computed itself (no validation round trip), and the host decides when to grow
    from counters it holds (``max_length``, ``seen_tokens``): docs/decode.md#no-host-sync.
    """

    is_sliding = False

    def __init__(self, reserve: int | None):
        super().__init__()
        # Decoded-token room after a selection: None sizes it automatically (never above a dense
        # cache's bytes), an int is the caller's (e.g. max_new_tokens): docs/decode.md#memory.
        self.reserve = reserve
        self._clear()

    def _clear(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.seen_tokens = 0  # logical length: every token appended, padding included
        self.lengths: Tensor | None = None
        self.positions: Tensor | None = None
        # An upper bound of max(lengths), kept on the host so decoding never syncs for it (exact
        # unless a chunk held padding: drop_padding shortens rows on the device only).
        self.max_length = 0
        # Reselection probes: the queries decoded since the last selection (at most n_probe).
        self.probe_queries: Tensor | None = None
        self.decoded_since_selection = 0

    @property
    def is_compact(self) -> bool:
        return self.lengths is not None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: Tensor, value_states: Tensor, *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen_tokens += key_states.shape[-2]
        if not self.is_compact:
            # The prefill: the selection right after its attention compacts the layer, so a
            # layer is dense for exactly one update.
            self.keys, self.values = key_states, value_states
            return self.keys, self.values
        self._append(key_states, value_states)
        return self.keys[:, :, : self.max_length], self.values[:, :, : self.max_length]

    def _append(self, key_states: Tensor, value_states: Tensor) -> None:
        B, H, T, D = key_states.shape
        if self.max_length + T > self.keys.shape[2]:
            self._grow(self.max_length + T)
        steps = torch.arange(T, device=self.lengths.device, dtype=torch.int32)
        slots = (self.lengths[..., None] + steps).long()  # [B, H, T]: each row at its own length
        # Trusted slots (computed here, in range by construction): a plain scatter, not the
        # validating scatter_kv op, whose status check would sync with the host.
        index = slots[..., None].expand(B, H, T, D)
        self.keys.scatter_(2, index, key_states.to(self.keys.dtype))
        self.values.scatter_(2, index, value_states.to(self.values.dtype))
        new_positions = (self.seen_tokens - T + steps).expand(B, H, T)
        self.positions.scatter_(2, slots, new_positions)
        self.lengths += T
        self.max_length += T

    def drop_padding(self, valid: Tensor) -> None:
        """Un-hold the padding among the T tokens just appended (valid: bool [B, T], False at
        padding, e.g. a left-padded later turn): each row's valid ones move to the front of the
        appended slots in order, the padding goes past the row's length (docs/decode.md#padding).
        """
        B, T = valid.shape
        H = self.lengths.shape[1]
        if T == 1:  # nothing moves: a padding token just stays past its row's shortened length
            last = (self.lengths - 1).long()[..., None]  # [B, H, 1]
            position = torch.where(valid[:, None], self.positions.gather(2, last), -1)
            self.positions.scatter_(2, last, position)
            self.lengths -= (~valid).to(self.lengths.dtype)
            return
        start = self.lengths - T  # [B, H]: where the chunk begins in each row
        # Valid tokens first, each group in its order (a stable sort of "is padding").
        order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices  # [B, T]
        source = (start[..., None] + order[:, None]).long()  # [B, H, T]
        target = (start[..., None] + torch.arange(T, device=start.device)).long()
        index = source[..., None].expand(B, H, T, self.keys.shape[-1])
        target_index = target[..., None].expand_as(index)
        self.keys.scatter_(2, target_index, self.keys.gather(2, index))
        self.values.scatter_(2, target_index, self.values.gather(2, index))
        n_valid = valid.sum(-1, dtype=torch.int32)[:, None]  # [B, 1]
        held = torch.arange(T, device=start.device) < n_valid[..., None]  # [B, 1, T]
        moved = torch.where(held, self.positions.gather(2, source), -1)
        self.positions.scatter_(2, target, moved)
        self.lengths.copy_(start + n_valid)

    def _grow(self, needed: int) -> None:
        """Reallocate to hold ``needed`` slots per row: geometric growth (x1.5), capped at the
        logical length so that the cache never holds more slots than a dense one would
        (docs/decode.md#memory)."""
        B, H, capacity, D = self.keys.shape
        capacity = max(needed, min(capacity + capacity // 2 + 1, self.seen_tokens))
        n = self.max_length
        keys = self.keys.new_zeros(B, H, capacity, D)
        values = self.values.new_zeros(B, H, capacity, D)
        keys[:, :, :n], values[:, :, :n] = self.keys[:, :, :n], self.values[:, :, :n]
        positions = self.positions.new_full((B, H, capacity), -1)
        positions[..., :n] = self.positions[..., :n]
        self.keys, self.values, self.positions = keys, values, positions

    def capacity_after_selection(self, kept: int) -> int:
        """Slots per row to allocate after a selection whose longest row keeps ``kept``
        tokens: the caller's reserve as given, or automatically room for a quarter more tokens
        (at least 16), never beyond the logical length, so that the layer holds no more slots
        than a dense cache of the same length (docs/decode.md#memory)."""
        if self.reserve is not None:
            return kept + self.reserve
        room = max(16, kept // 4)
        return max(kept, min(kept + room, self.seen_tokens))

    def compact(self, keys: Tensor, values: Tensor, lengths: Tensor, positions: Tensor) -> None:
        """Replace the layer's tokens by a selection (what gather_kv returned)."""
        self.keys, self.values, self.lengths, self.positions = keys, values, lengths, positions
        self.max_length = int(lengths.max())
        self.probe_queries = None
        self.decoded_since_selection = 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.is_compact:
            # transformers' mask over the new tokens only (kv offset: their first logical
            # position): causal among them and False at their padding, which is all the compact
            # attention needs from it (docs/decode.md#padding).
            return query_length, self.seen_tokens
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def kv_bytes(self) -> int:
        """Bytes of the K/V buffers allocated (free slots included)."""
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def kv_bytes_in_use(self) -> int:
        """Bytes of the K/V of the tokens held (reads ``lengths``: a host sync, for stats)."""
        if self.keys is None:
            return 0
        per_token = 2 * self.keys.shape[-1] * self.keys.element_size()
        if not self.is_compact:
            return self.keys.shape[0] * self.keys.shape[1] * self.keys.shape[2] * per_token
        return int(self.lengths.sum()) * per_token

    def reset(self) -> None:
        self._clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch rows (beam search); every per-row tensor moves with its row."""
        for name in ("keys", "values", "lengths", "positions", "probe_queries"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, beam_idx.to(tensor.device)))


@dataclass(frozen=True)
class Selection:
    """One selection of one layer. The counts stay on the cache's device (recording them makes
    no host sync); the cache's stats move them to the CPU when read.

    kept: int [B, Hkv] tokens kept per row (the same for every head with granularity="layer").
    existed: int [B] non-padding tokens of the sequence when the selection ran.
    kept_visual / existed_visual: the same for image / video tokens (None when not known).
    """

    layer_idx: int
    seen_tokens: int
    kept: Tensor
    existed: Tensor
    kept_visual: Tensor | None
    existed_visual: Tensor | None

    def ratios(self) -> Tensor:
        """float [B, Hkv]: tau of each row and head."""
        return self.kept / self.existed[:, None]

    def visual_ratios(self) -> Tensor | None:
        """float [B', Hkv] over the B' rows that have visual tokens; None without any."""
        if self.existed_visual is None or not (has_visual := self.existed_visual > 0).any():
            return None
        return self.kept_visual[has_visual] / self.existed_visual[has_visual, None]


def _raise_if_nonfinite(layer_idx: int, scores: Tensor, valid: Tensor, error: Exception) -> None:
    """After a failed selection: name the layer when its scores hold NaN / inf (docs/limits.md).
    cumulative_scores makes a probe row NaN whenever its logits are (as the softmax would), so
    NaN / inf in a layer's queries or keys end here instead of as a silent selection."""
    if not bool(torch.isfinite(scores[valid]).all()):
        raise RuntimeError(
            f"TopPCache layer {layer_idx}: the attention scores of the probe queries are NaN or "
            "inf, so no tokens can be selected (this layer's queries or keys hold NaN / inf, "
            "e.g. after an fp16 / bf16 overflow)"
        ) from error


@dataclass
class PromptSelection:
    """The prompt tokens one layer kept, for a replay of the rollout (sf_train.replay).

    indices: int32 [R, N] kept prompt positions, ascending, then -1 after counts[r]; counts:
    int32 [R]; R = B (granularity="layer") or B * Hkv (row b * Hkv + h, "kv_head"). prefill: the
    policy's prefill mode, which tells the replay how the prompt attended.
    """

    indices: Tensor
    counts: Tensor
    prefill: str = "sparse"


# The attention function does not receive the cache (transformers hands it to the attention
# module, which calls update() and then the attention function), so TopPCache.update leaves a
# note of the layer it just updated for the attention call that follows it in the same thread
# (sparse_attn.handoff, docs/sparse_prefill.md#handoffs).
_pending = Handoff("TopPCache layer updated, awaiting its attention call")


def take_pending_cache(layer_idx: int | None) -> TopPCache | None:
    """The TopPCache whose layer ``layer_idx`` was updated just before this attention call."""
    note = _pending.take()
    if note is None:
        return None
    cache, noted_layer = note
    if noted_layer != layer_idx:
        raise RuntimeError(
            f"TopPCache layer {noted_layer} was updated, but the next attention call is for "
            f"layer {layer_idx}"
        )
    return cache


class TopPCache(Cache):
    """A transformers Cache keeping, per layer, only the tokens of the prompt that the policy's
    rule selects (top-p by default) plus every token appended after the selection (see the
    module docstring).

    Needs the "sparse_topp" attention (``sparse_attn.enable(model)``), which runs the selection.
    ``reserve``: decoded-token slots allocated after each selection. None (default): sized
    automatically and grown geometrically, never beyond the slots of a dense cache of the same
    logical length; an int (e.g. generate's max_new_tokens): exactly that room, so that decoding
    never reallocates (docs/decode.md#memory).

    Stats (after the prefill; computed when read): ``token_ratio``, ``layer_ratios``,
    ``row_token_ratios``, ``visual_token_ratio``, ``kv_bytes()`` (allocated),
    ``kv_bytes_in_use()`` (held tokens), and ``selections``, every selection in order.
    """

    def __init__(self, policy: TopPPolicy | None = None, *, reserve: int | None = None):
        if reserve is not None and (
            isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0
        ):
            raise ValueError(f"TopPCache.reserve must be None or an int >= 0, got {reserve!r}")
        if policy is not None and not isinstance(policy, TopPPolicy):
            raise TypeError(
                "TopPCache(policy): policy must be a sparse_attn.TopPPolicy or None, got "
                f"{type(policy).__name__} {policy!r}"
            )
        super().__init__(layer_class_to_replicate=partial(TopPLayer, reserve))
        self.policy = policy if policy is not None else TopPPolicy()
        # Decoder layers of the model (from the attention modules' config): clips
        # policy.shared_from_layer; None while unknown.
        self.num_layers: int | None = None
        self._clear_stats()

    def _clear_stats(self) -> None:
        self.selections: list[Selection] = []
        # bool [B, L]: which prompt tokens are image / video tokens; set by enable()'s hook.
        self.visual_mask: Tensor | None = None
        self._padding: Tensor | None = None  # int [B]: padding tokens of each row (device)
        # Per layer, the attention module that filled it (see check_model).
        self._writers: dict[int, weakref.ref] = {}
        # layer -> its logical length when it last selected over prompt tokens (the prefill or a
        # new turn): more prompt tokens right after that are a prompt split over forwards.
        self._prompt_end: dict[int, int] = {}

    def check_model(self, layer_idx: int, module: torch.nn.Module) -> None:
        """Refuse a second model: the layer's K/V came from another model's attention module
        (same shapes or not). One identity test per layer and call: later calls of the same
        model (decode steps, a later generate) pass; ``reset()`` frees the cache for another
        model (docs/limits.md#one-cache-one-model)."""
        writer = self._writers.get(layer_idx)
        if writer is None:
            self._writers[layer_idx] = weakref.ref(module)
        elif writer() is not module:
            raise RuntimeError(
                f"TopPCache layer {layer_idx} holds the keys and values of another model: a "
                "TopPCache serves the model that filled it; use a new TopPCache (or reset() "
                "this one) for another model"
            )

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        note = _pending.peek()
        if note is not None and note[0] is self:
            _pending.take()  # the note is stale now; do not let it reach a later call
            raise RuntimeError(
                f"TopPCache layer {note[1]} was updated but no 'sparse_topp' attention "
                "ran after it: call sparse_attn.enable(model) (or load the model with "
                "attn_implementation='sparse_topp')"
            )
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        _pending.put((self, layer_idx))
        return keys, values

    def reset(self) -> None:
        super().reset()
        self._clear_stats()

    # --- selection (called by the sparse_topp attention function) -----------------------------

    def select_after_prefill(
        self,
        layer_idx: int,
        query: Tensor,
        key_valid: Tensor | None,
        scale: float,
        num_layers: int | None = None,
    ) -> None:
        """Score the dense prefill keys with the last n_probe queries, select, compact.

        query: [B, Hq, L, D] the prefill's (post-RoPE) queries; key_valid: bool [B, L], False at
        padding, or None when there is none; num_layers: the model's decoder layers, if known.
        """
        if num_layers is not None:
            self.num_layers = num_layers
        layer = self.layers[layer_idx]
        B, Hkv, L, _ = layer.keys.shape
        if key_valid is None:
            key_valid = torch.ones(B, L, dtype=torch.bool, device=layer.device)
        self._padding = (~key_valid).sum(-1)
        scores = None
        if self._selects_itself(layer_idx):
            probes = query[:, :, -self.policy.n_probe :]
            scores = cumulative_scores(probes, layer.keys, scale=scale, key_mask=key_valid)
        positions = torch.arange(L, device=layer.device, dtype=torch.int32).expand(B, Hkv, L)
        self._select(
            layer_idx,
            scores,
            key_valid[:, None].expand(B, Hkv, L),
            positions,
            layer.keys,
            layer.values,
        )
        self._prompt_end[layer_idx] = layer.seen_tokens

    def check_prompt_continues(self, layer_idx: int, new_tokens: int) -> None:
        """Refuse ``new_tokens`` > 1 prompt tokens arriving right after the layer's selection over
        a prompt (nothing decoded in between): a prompt split over several forwards, e.g.
        generate(prefill_chunk_size=...), which would select from its first chunk only."""
        end = self._prompt_end.get(layer_idx)
        if (
            new_tokens > 1
            and end is not None
            and self.layers[layer_idx].seen_tokens - new_tokens == end
        ):
            raise RuntimeError(
                "TopPCache selects once the whole prompt is in, in one forward: it received "
                f"{new_tokens} more prompt tokens right after selecting over the first {end} "
                "(a chunked prefill, e.g. generate(prefill_chunk_size=...)); pass the prompt in "
                "one forward (prefill_chunk_size=None), docs/sparse_prefill.md#new-turns"
            )

    def select_new_turn(self, layer_idx: int, query: Tensor, scale: float) -> None:
        """Select again over every held token and the new turn's tokens (the layer's compact rows
        already end with them): the new turn's last n_probe queries score the rows, the rule
        keeps the set (docs/sparse_prefill.md#new-turns)."""
        layer = self.layers[layer_idx]
        S = layer.max_length
        valid = torch.arange(S, device=layer.device) < layer.lengths[..., None]
        scores = None
        if self._selects_itself(layer_idx):
            scores = self._probe_scores(layer, query[:, :, -self.policy.n_probe :], scale)
        self._select(layer_idx, scores, valid, layer.positions[..., :S], layer.keys, layer.values)
        self._prompt_end[layer_idx] = layer.seen_tokens

    def after_decode_attention(self, layer_idx: int, query: Tensor, scale: float) -> None:
        """Keep the decoded queries as probes and re-select every ``reselect_every`` tokens."""
        every = self.policy.reselect_every
        if not every:
            return
        layer = self.layers[layer_idx]
        probes = (
            query if layer.probe_queries is None else torch.cat([layer.probe_queries, query], dim=2)
        )
        layer.probe_queries = probes[:, :, -self.policy.n_probe :]
        layer.decoded_since_selection += query.shape[2]
        if layer.decoded_since_selection >= every:
            self._reselect(layer_idx, scale)

    def _reselect(self, layer_idx: int, scale: float) -> None:
        layer = self.layers[layer_idx]
        S = layer.max_length
        valid = torch.arange(S, device=layer.device) < layer.lengths[..., None]
        if not self._selects_itself(layer_idx):
            self._select(layer_idx, None, valid, layer.positions[..., :S], layer.keys, layer.values)
            return
        scores = self._probe_scores(layer, layer.probe_queries, scale)
        self._select(layer_idx, scores, valid, layer.positions[..., :S], layer.keys, layer.values)

    @staticmethod
    def _probe_scores(layer: TopPLayer, probes: Tensor, scale: float) -> Tensor:
        """float [B, Hkv, S]: cumulative scores of a compact layer's held slots from ``probes``
        [B, Hq, n, D], the newest n tokens of every row; 0 past a row's length."""
        S = layer.max_length
        keys = layer.keys[:, :, :S]
        B, Hkv = layer.lengths.shape
        g = probes.shape[1] // Hkv
        # The probes are the newest tokens of every row, but cumulative_scores places probe i at
        # key position Lk - n_probes + i in all rows: rows of different lengths are scored apart.
        scores = torch.zeros(B, Hkv, S, dtype=torch.float32, device=layer.device)
        for b, row_lengths in enumerate(layer.lengths.tolist()):
            if len(set(row_lengths)) == 1:
                n = row_lengths[0]
                scores[b, :, :n] = cumulative_scores(
                    probes[b : b + 1], keys[b : b + 1, :, :n], scale=scale
                )[0]
                continue
            for h, n in enumerate(row_lengths):
                q = probes[b : b + 1, h * g : (h + 1) * g]
                scores[b, h, :n] = cumulative_scores(
                    q, keys[b : b + 1, h : h + 1, :n], scale=scale
                )[0, 0]
        return scores

    def shared_layer(self) -> int | None:
        """The layer whose selection every later layer keeps: policy.shared_from_layer clipped
        to the model's last layer (as given while the model's depth is unknown); None when
        every layer selects for itself."""
        K = self.policy.shared_from_layer
        if K is None or self.num_layers is None:
            return K
        return min(K, self.num_layers - 1)

    def _selects_itself(self, layer_idx: int) -> bool:
        K = self.shared_layer()
        return K is None or layer_idx == K

    def _select(
        self,
        layer_idx: int,
        scores: Tensor | None,
        valid: Tensor,
        positions: Tensor,
        keys: Tensor,
        values: Tensor,
    ) -> None:
        """Select from ``scores`` [B, Hkv, S] and compact ``keys`` / ``values`` to the kept tokens.

        valid: bool [B, Hkv, S] the slots holding a token; positions: int32 [B, Hkv, S] their
        logical positions. With granularity="layer" both are the same for every head. Layers
        that do not select themselves (policy.shared_from_layer) get ``scores`` None.
        """
        policy, layer = self.policy, self.layers[layer_idx]
        B, Hkv, S = valid.shape
        is_visual = self._visual_at(positions) & valid if self.visual_mask is not None else None
        if policy.prune == "visual" and is_visual is None:
            raise RuntimeError(
                "TopPPolicy(prune='visual') needs the prompt's image / video tokens: call "
                "sparse_attn.enable(model, policy) on a model whose config has image_token_id / "
                "video_token_id, and pass input_ids"
            )

        def rows(x: Tensor) -> Tensor:  # [B, Hkv, ...] -> one row per selection budget
            return x.flatten(0, 1) if policy.granularity == "kv_head" else x[:, 0]

        K = self.shared_layer()
        if K is not None and layer_idx < K:  # before the shared selection: every token stays
            indices, counts = keep_mask_to_indices(rows(valid))
        elif K is not None and layer_idx > K:  # after it: the positions layer K holds
            indices, counts = keep_mask_to_indices(
                rows(valid) & self._held_by(K, rows(positions), rows)
            )
        else:
            # A per-layer budget ranks the tokens by their mass summed over the KV heads.
            row_scores = rows(scores) if policy.granularity == "kv_head" else scores.sum(1)
            try:
                indices, counts = select_rows(
                    policy,
                    row_scores,
                    valid_mask=rows(valid),
                    candidate_mask=rows(is_visual) if policy.prune == "visual" else None,
                )
            except (RuntimeError, ValueError) as error:
                _raise_if_nonfinite(layer_idx, row_scores, rows(valid), error)
                raise
        capacity = layer.capacity_after_selection(int(counts.max()))
        compact_keys, compact_values = gather_kv(keys, values, indices, counts, capacity=capacity)

        kept = torch.arange(S, device=counts.device) < counts[:, None]  # [R, S]: used index slots
        slot = indices.long().clamp(min=0)
        kept_positions = torch.where(kept, rows(positions).gather(1, slot), -1)
        new_positions = kept_positions.new_full((kept.shape[0], capacity), -1)
        width = min(S, capacity)
        new_positions[:, :width] = kept_positions[:, :width]

        def per_head(x: Tensor) -> Tensor:  # one value per row -> [B, Hkv, ...]
            return x.view(B, -1, *x.shape[1:]).expand(B, Hkv, *x.shape[1:]).contiguous()

        lengths = per_head(counts)
        layer.compact(compact_keys, compact_values, lengths, per_head(new_positions))

        kept_visual = existed_visual = None
        if is_visual is not None:
            kept_visual = per_head((rows(is_visual).gather(1, slot) & kept).sum(-1))
            existed_visual = self.visual_mask.sum(-1)
        self.selections.append(
            Selection(
                layer_idx=layer_idx,
                seen_tokens=layer.seen_tokens,
                kept=lengths.clone(),  # lengths grows in place as tokens arrive
                existed=layer.seen_tokens - self._padding,
                kept_visual=kept_visual,
                existed_visual=existed_visual,
            )
        )

    def _held_by(self, layer_idx: int, positions: Tensor, rows) -> Tensor:
        """bool, shape of ``positions`` (budget rows of logical positions, -1 for none): the
        position is held by layer ``layer_idx``'s same row."""
        source = self.layers[layer_idx]
        if not source.is_compact:
            raise RuntimeError(
                f"TopPPolicy.shared_from_layer: layer {layer_idx} has not selected yet"
            )
        held_positions = rows(source.positions)  # ascending, -1 past each row's length
        end = max(int(held_positions.max()), int(positions.max())) + 1
        held = F.pad(
            indices_to_keep_mask(held_positions, end), (0, 1)
        )  # column `end`: False, for -1
        return held.gather(1, torch.where(positions >= 0, positions, end).long())

    def _visual_at(self, positions: Tensor) -> Tensor:
        """bool, shape of ``positions``: the token at each logical position is visual (decoded
        tokens, past the prompt, are text)."""
        B, prompt_length = self.visual_mask.shape
        in_prompt = (positions >= 0) & (positions < prompt_length)
        flat = positions.clamp(0, prompt_length - 1).long().reshape(B, -1)
        return in_prompt & self.visual_mask.gather(1, flat).view(positions.shape)

    def recorded_selections(self, prompt_length: int) -> list[PromptSelection]:
        """Per layer, the prompt tokens this cache kept (call after generation), for a replay.

        Decoded tokens sit after the kept prompt tokens in each row, at logical positions >=
        prompt_length, so the prompt part of every row is the prefix of positions < prompt_length.
        Needs one selection per layer (reselect_every=0).
        """
        if self.policy.reselect_every:
            raise ValueError(
                "a replay needs one selection per layer: use TopPPolicy(reselect_every=0)"
            )
        per_head = self.policy.granularity == "kv_head"
        selections = []
        for layer in self.layers:
            if not layer.is_compact:
                raise RuntimeError(
                    "TopPCache has not selected yet: run a prefill through a model with the "
                    "sparse_topp attention"
                )
            positions = layer.positions  # [B, Hkv, C], logical positions, -1 in free slots
            is_prompt = (positions >= 0) & (positions < prompt_length)
            rows = positions.flatten(0, 1) if per_head else positions[:, 0]
            kept = is_prompt.flatten(0, 1) if per_head else is_prompt[:, 0]
            counts = kept.sum(-1).to(torch.int32)
            width = max(int(counts.max()), 1)
            indices = torch.where(kept, rows, -1)[:, :width].to(torch.int32).contiguous()
            selections.append(PromptSelection(indices, counts, self.policy.prefill))
        return selections

    # --- stats -----------------------------------------------------------------------------------

    def _latest_selections(self) -> list[Selection]:
        latest = {s.layer_idx: s for s in self.selections}
        if not latest:
            raise RuntimeError(
                "TopPCache has not selected yet: run a prefill through a model with the "
                "sparse_topp attention"
            )
        return [latest[i] for i in sorted(latest)]

    @property
    def layer_ratios(self) -> list[float]:
        """tau of each layer's latest selection: kept / existing tokens, averaged over the rows
        (and heads). A row with no token (all padding) has no ratio and is left out of the
        mean (NaN only if every row is empty)."""
        return [
            float(s.ratios()[s.existed > 0].mean()) for s in self._latest_selections()
        ]  # host sync: read

    @property
    def token_ratio(self) -> float:
        """tau (docs/design.md#token-ratio): ``layer_ratios`` averaged over the layers."""
        ratios = self.layer_ratios
        return sum(ratios) / len(ratios)

    @property
    def row_token_ratios(self) -> Tensor:
        """float [B]: tau of each batch row (one sequence's token ratio, e.g. for a reward); NaN
        for a row with no token (all padding)."""
        return torch.stack([s.ratios().mean(-1) for s in self._latest_selections()]).mean(0).cpu()

    @property
    def visual_token_ratio(self) -> float | None:
        """tau over image / video tokens only; None without any (or when they are unknown)."""
        ratios = [
            r.mean() for s in self._latest_selections() if (r := s.visual_ratios()) is not None
        ]
        return float(torch.stack(ratios).mean()) if ratios else None

    def kv_bytes(self) -> int:
        """Bytes of K/V the cache has allocated on its device (compact buffers, free slots
        included)."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def kv_bytes_in_use(self) -> int:
        """Bytes of K/V of the tokens the cache holds (without free slots or the padding of rows
        shorter than their layer's longest)."""
        return sum(layer.kv_bytes_in_use() for layer in self.layers)
