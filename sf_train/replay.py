"""Inference-consistent training forward: replay each rollout's recorded selections.

During a rollout the TopPCache keeps, per layer, the prompt tokens the policy's rule selected in
the prefill; every completion token then attends to those tokens plus the completion so far. The
training forward over [prompt + completion] reproduces exactly that (docs/sparse_prefill.md#replay):

- the prompt attends as the rollout's prefill did, which the recorded policy names
  (PromptSelection.prefill): under prefill="sparse", each layer's prompt positions in the kept set
  T attend causally to T only and the others get a zero attention output - the same
  sparse_prefill_attention the rollout ran, on keys / values gathered with gather_kv (so gradients
  flow into the kept ones); under prefill="dense", densely and causally;
- completion positions attend to the recorded kept prompt tokens, compacted with the same
  gather_kv op, plus the earlier completion tokens.

With unchanged weights its log-probs equal the rollout's (tests/test_replay.py).

The recorded selection is a constant of that forward, so no gradient says which prompt tokens the
completion needed. With a SelectionGradient (beyond the paper, SFConfig.selection_gradient) the
completion attends to every prompt key with a weight that is the recorded 0/1 mask in value and,
in gradient, a sigmoid of each candidate's probe score (log-space, against the row's lowest kept
candidate): a straight-through estimator. The forward, and so the log-probs, are unchanged; the
loss then raises the probe attention of dropped tokens the completion would have used. Under the
sparse prefill the same mask also weights the prompt's own attention among T, on both sides (each
key's weight, each query's output): the first answer token, which the prompt's last position
produces inside the prefill, reaches the selection too.

``replaying(..., probe_scores=n_probe)`` also collects, per layer, the differentiable cumulative
attention scores of the prompt's last n_probe positions in this forward (what the rollout's
selection ranked, under the sparse prefill too): SFConfig.soft_tau_weight's smoothed token ratio.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sparse_attn import gather_kv
from sparse_attn.attention import (
    keeps_every_token,
    key_validity,
    sparse_prefill_attention,
)
from sparse_attn.cache import PromptSelection
from sparse_attn.gqa import gqa_fold
from sparse_attn.handoff import Handoff
from sparse_attn.reference import cumulative_scores, forced_positions
from sparse_attn.rules import indices_to_keep_mask

REPLAY_ATTENTION = "sparse_topp_replay"

# The prompt tokens one layer kept (TopPCache.recorded_selections); the name sf_train used.
LayerSelection = PromptSelection


def concat_selections(selections: list[list[PromptSelection]]) -> list[PromptSelection]:
    """Stack the per-layer selections of several rollout batches into one batch."""
    merged = []
    for layer_parts in zip(*selections):
        modes = {part.prefill for part in layer_parts}
        if len(modes) != 1:
            raise ValueError(
                f"cannot replay rollouts of different prefill modes in one batch: {sorted(modes)}"
            )
        width = max(part.indices.shape[1] for part in layer_parts)
        indices = torch.cat(
            [
                F.pad(part.indices, (0, width - part.indices.shape[1]), value=-1)
                for part in layer_parts
            ]
        )
        merged.append(
            PromptSelection(indices, torch.cat([part.counts for part in layer_parts]), modes.pop())
        )
    return merged


@dataclass(frozen=True)
class SelectionGradient:
    """The rollouts' TopPPolicy fields the straight-through keep mask needs (one budget per layer;
    the candidates other than every valid token come as ``replaying``'s candidate_mask), and the
    width of its sigmoid in log-score units."""

    n_probe: int
    keep_first: int
    keep_last: int
    temperature: float = 1.0


@dataclass
class ReplayState:
    """What the replay attention needs during one ``replaying`` block (see ``replaying``)."""

    selections: list[PromptSelection]
    prompt_length: int
    gradient: SelectionGradient | None = None
    probe_scores: int | None = None  # n_probe: collect each layer's probe scores
    scores: list[Tensor] = field(
        default_factory=list
    )  # per layer: float [N, P], summed over KV heads
    answer_leak: bool = False  # collect each layer's leaked_answer_mass
    leaks: list[Tensor] = field(default_factory=list)  # per layer: float [N]
    # bool [N, prompt_length]: the rule's candidates (TopPPolicy(prune="visual"): the visual
    # tokens); None: every valid token is one
    candidate_mask: Tensor | None = None


# transformers does not pass extra state to an attention function: the block hands it over
# (sparse_attn.handoff); a nested block restores the outer state when it ends.
_replay = Handoff("replay of recorded selections")


@contextmanager
def replaying(
    selections: list[PromptSelection],
    prompt_length: int,
    gradient: SelectionGradient | None = None,
    *,
    probe_scores: int | None = None,
    answer_leak: bool = False,
    candidate_mask: Tensor | None = None,
):
    """Within this block, forwards of a model using the replay attention replay ``selections``
    (one per decoder layer) over sequences whose first ``prompt_length`` positions are the
    prompt; with ``gradient``, through a straight-through keep mask. With ``probe_scores`` =
    n_probe, the yielded ReplayState's ``scores`` collects each layer's differentiable probe
    scores of the prompt (float [N, prompt_length], summed over KV heads, 0 at padding). With
    ``answer_leak``, ``leaks`` collects each layer's leaked_answer_mass (float [N]).
    ``candidate_mask`` (bool [N, prompt_length]) names the rule's candidates when the policy had
    prune="visual": the other tokens are forced, so the keep mask gives them no gradient."""
    state = ReplayState(
        selections,
        prompt_length,
        gradient,
        probe_scores,
        answer_leak=answer_leak,
        candidate_mask=candidate_mask,
    )
    with _replay.holding(state) as state:
        yield state


def replay_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
):
    """transformers attention function: the rollout's prefill for the prompt (sparse or dense),
    the recorded selection for the completion."""
    state = _replay.peek()
    layer_idx = getattr(module, "layer_idx", None)
    if state is None or layer_idx is None:  # not replaying, or a vision-tower attention
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    P, gradient = state.prompt_length, state.gradient
    selection = state.selections[layer_idx]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    prompt_mask = None if attention_mask is None else attention_mask[:, :, :P, :P]
    valid = key_validity(prompt_mask)
    keep = None
    if gradient is not None:
        if dropout:
            raise ValueError(f"selection_gradient supports no attention dropout, got {dropout}")
        keep = _layer_keep(
            query[:, :, :P],
            key[:, :, :P],
            valid,
            selection,
            scale,
            gradient,
            state.candidate_mask,
        )
    if selection.prefill == "sparse" and keep is not None:
        prompt_out = _weighted_prompt_attention(
            query[:, :, :P], key[:, :, :P], value[:, :, :P], keep, scale
        )
    elif selection.prefill == "sparse":
        prompt_out = _sparse_prompt_attention(
            module,
            query[:, :, :P],
            key[:, :, :P],
            value[:, :, :P],
            prompt_mask,
            valid,
            selection,
            scale,
            dropout,
            **kwargs,
        )
    else:
        prompt_out, _ = sdpa_attention_forward(
            module,
            query[:, :, :P],
            key[:, :, :P],
            value[:, :, :P],
            prompt_mask,
            dropout=dropout,
            scaling=scale,
            **kwargs,
        )
    if state.probe_scores is not None:
        B = query.shape[0]
        key_mask = (
            torch.ones(B, P, dtype=torch.bool, device=query.device) if valid is None else valid
        )
        probes = query[:, :, :P][:, :, -state.probe_scores :]
        state.scores.append(
            cumulative_scores(probes, key[:, :, :P], scale=scale, key_mask=key_mask).sum(1)
        )
    if state.answer_leak:
        state.leaks.append(
            leaked_answer_mass(query[:, :, :P], key[:, :, :P], valid, selection, scale)
        )
    if keep is None:
        completion_out = _completion_attention(
            query[:, :, P:], key, value, P, selection, scale, dropout
        )
    else:
        completion_out = _weighted_completion_attention(query[:, :, P:], key, value, keep, scale)
    return torch.cat([prompt_out, completion_out], dim=1), None


def _sparse_prompt_attention(
    module,
    query,
    key,
    value,
    prompt_mask,
    valid,
    selection: PromptSelection,
    scale,
    dropout,
    **kwargs,
):
    """The rollout's sparse prefill of one layer over the prompt [B, Hq, P, D]: what
    sparse_attn.attention ran, on the recorded kept set (gathered with gather_kv)."""
    B, _, P, _ = query.shape
    Hkv = key.shape[1]
    counts = selection.counts.to(query.device)
    indices = selection.indices.to(query.device)
    N = indices.shape[1]
    if indices.shape[0] == B:  # one set per layer, shared by the KV heads
        positions, lengths = indices[:, None].expand(B, Hkv, N), counts[:, None].expand(B, Hkv)
    else:
        positions, lengths = indices.view(B, Hkv, N), counts.view(B, Hkv)
    if keeps_every_token(lengths, valid, P):  # as the rollout's prefill: T = every valid token
        out, _ = sdpa_attention_forward(
            module, query, key, value, prompt_mask, dropout=dropout, scaling=scale, **kwargs
        )
        return out
    kept_k, kept_v = gather_kv(key.contiguous(), value.contiguous(), indices, counts, capacity=N)
    return sparse_prefill_attention(
        query, kept_k, kept_v, positions, lengths, int(lengths.max()), scale, dropout
    )


def leaked_answer_mass(query, key, valid, selection: PromptSelection, scale) -> Tensor:
    """float [B]: the attention mass the prompt's last position - the one that produces the first
    generated token - puts, densely, on the prompt tokens this layer did not keep (mean over query
    heads; differentiable in the query and keys). The sparse prefill renormalises that position's
    attention over the kept set, so this is how far its dense attention is from what it reads
    (SFConfig.leak_weight, docs/design.md#beyond-the-paper)."""
    B, Hq, P, _ = query.shape
    if selection.indices.shape[0] != B:
        raise ValueError("answer_leak needs one selection per row (granularity='layer')")
    valid = torch.ones(B, P, dtype=torch.bool, device=query.device) if valid is None else valid
    kept = indices_to_keep_mask(selection.indices.to(query.device), P) & valid
    Hkv = key.shape[1]
    last = query[:, :, -1].float().view(B, Hkv, Hq // Hkv, -1)  # a KV head's query heads
    logits = scale * (last @ key.float().transpose(-1, -2)).view(B, Hq, P)
    probs = logits.masked_fill(~valid[:, None], float("-inf")).softmax(-1)  # [B, Hq, P]
    return (probs * (valid & ~kept)[:, None].to(probs.dtype)).sum(-1).mean(1)


def straight_through_keep(
    scores: Tensor, kept: Tensor, valid: Tensor, forced: Tensor, temperature: float
) -> Tensor:
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


def _layer_keep(
    query,
    key,
    valid,
    selection: PromptSelection,
    scale,
    gradient: SelectionGradient,
    candidate_mask: Tensor | None = None,
) -> Tensor:
    """float [B, P]: one layer's straight-through keep mask, from the prompt's probe attention
    recomputed differentiably (the cumulative_scores op's plain-PyTorch definition)."""
    B, _, P, _ = query.shape
    if selection.indices.shape[0] != B:
        raise ValueError("SelectionGradient needs one selection per row (granularity='layer')")
    valid = torch.ones(B, P, dtype=torch.bool, device=query.device) if valid is None else valid
    probes = query[:, :, -gradient.n_probe :]
    scores = cumulative_scores(probes, key, scale=scale, key_mask=valid).sum(
        1
    )  # the layer's budget
    if candidate_mask is not None:
        candidate_mask = candidate_mask.to(valid.device)
    forced = forced_positions(valid, gradient.keep_first, gradient.keep_last, candidate_mask)
    return straight_through_keep(
        scores,
        indices_to_keep_mask(selection.indices, P) & valid,
        valid,
        forced,
        gradient.temperature,
    )


def _weighted_completion_attention(query, key, value, keep: Tensor, scale) -> Tensor:
    """Completion queries [B, Hq, T, D] over all P prompt keys weighted by keep [B, P], plus the
    completion so far: in value the softmax over the keys with keep = 1; a dropped key's weight
    exp(logit) * keep is exactly 0 but has a gradient in keep."""
    B, Hq, T, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    work = torch.promote_types(query.dtype, torch.float32)
    key_weight = torch.cat([keep.to(work), keep.new_ones(B, T, dtype=work)], dim=-1)
    visible = torch.ones(T, S, dtype=torch.bool, device=query.device)
    visible[:, S - T :] = torch.ones(T, T, dtype=torch.bool, device=query.device).tril()
    folded = query.reshape(B, Hkv, Hq // Hkv * T, D)  # rows (group member, t), as gqa_fold
    out = _KeyWeightedSoftmax.apply(
        folded.to(work), key.to(work), value.to(work), key_weight, visible, scale
    )  # [B, Hkv, g*T, D]
    return out.to(query.dtype).view(B, Hq, T, D).transpose(1, 2)


class _KeyWeightedSoftmax(torch.autograd.Function):
    """Attention with a weight on each key (docs/sparse_prefill.md#replay): row (member, t) of
    query [B, H, g*T, D] gives sum_j w_tj exp(l_j) v_j / sum_j w_tj exp(l_j) over key [B, H, S, D],
    w_tj = key_weight[b, j] * visible[t, j] (key_weight float [B, S], visible bool [T, S]). In
    value the softmax over the visible keys of weight 1; in gradient every visible key's weight,
    a 0 one included, gets d out / d w_j. A row that sees no key of nonzero weight: 0, with no
    gradient. The forward keeps one [B, H, g*T, S] tensor (the exponentials) for the backward,
    which is written out (dA = d out / d a, the softmax's chain rule by hand), so a training
    forward makes a few passes over the score matrix instead of autograd's dozen."""

    @staticmethod
    def forward(ctx, query, key, value, key_weight, visible, scale):
        B, H, M, _ = query.shape
        T, S = visible.shape
        logits = torch.matmul(query, key.transpose(-1, -2)).mul_(scale).view(B, H, M // T, T, S)
        seen = (visible & (key_weight > 0)[:, None, :])[:, None, None]  # [B, 1, 1, T, S]
        shift = logits.masked_fill(~seen, float("-inf")).amax(-1, keepdim=True)
        sees = torch.isfinite(shift)
        shift = torch.where(sees, shift, 0.0)
        # A dropped key may score far above the visible ones: cap its exponent (its weight is 0).
        e = logits.sub_(shift).clamp_(max=30.0).exp_().masked_fill_(~visible, 0.0)
        a = e * key_weight[:, None, None, None, :]
        inv_total = torch.where(sees, 1.0 / a.sum(-1, keepdim=True), 0.0).view(B, H, M, 1)
        out = torch.matmul(a.view(B, H, M, S), value).mul_(inv_total)
        ctx.scale = scale
        ctx.save_for_backward(query, key, value, key_weight, e, inv_total, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, key_weight, e, inv_total, out = ctx.saved_tensors
        B, H, M, S = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
        g_norm = grad_out * inv_total  # rows that see no key: 0
        # d loss / d a_j = (g . v_j - g . out) / total, a_j = w_j exp(l_j)
        d_a = torch.matmul(g_norm, value.transpose(-1, -2))
        d_a.sub_((g_norm * out).sum(-1, keepdim=True))
        d_a = d_a.view(e.shape)
        a = e * key_weight[:, None, None, None, :]
        d_value = torch.matmul(a.view(B, H, M, S).transpose(-1, -2), g_norm)
        d_weight = None
        if ctx.needs_input_grad[3]:
            d_weight = (d_a * e).sum((1, 2, 3))
        d_logits = d_a.mul_(a).mul_(ctx.scale).view(B, H, M, S)  # exp' = exp; shift detached
        d_query = torch.matmul(d_logits, key)
        d_key = torch.matmul(d_logits.transpose(-1, -2), query)
        return d_query, d_key, d_value, d_weight, None, None


def _weighted_prompt_attention(query, key, value, keep: Tensor, scale) -> Tensor:
    """The sparse prefill of one layer over the prompt [B, Hq, P, D] with a straight-through
    keep mask [B, P] on both sides (docs/sparse_prefill.md#replay). In value it is
    sparse_prefill_attention on the recorded set T: a query in T attends causally to the keys
    in T, a query outside T gets a zero output. In gradient each key's weight exp(logit) * keep
    and each query's output * keep carry a gradient in keep: what keeping a dropped key, or
    attending from a dropped position, would have changed. O(P^2) per head: a training forward."""
    B, Hq, P, D = query.shape
    Hkv = key.shape[1]
    work = torch.promote_types(query.dtype, torch.float32)
    causal = torch.ones(P, P, dtype=torch.bool, device=query.device).tril()
    folded = query.reshape(B, Hkv, Hq // Hkv * P, D)  # rows (group member, i), as gqa_fold
    # a dropped position before every kept one sees no kept key: output 0
    out = _KeyWeightedSoftmax.apply(
        folded.to(work), key.to(work), value.to(work), keep.to(work), causal, scale
    )  # [B, Hkv, g*P, D]
    out = out.view(B, Hq, P, D) * keep.to(work)[:, None, :, None]  # zero outside T, in value
    return out.to(query.dtype).transpose(1, 2)


def _completion_attention(query, key, value, P, selection: PromptSelection, scale, dropout):
    """Completion queries [B, Hq, T, D] over the kept prompt tokens + the completion so far."""
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    counts = selection.counts.to(query.device)
    indices = selection.indices.to(query.device)
    N = indices.shape[1]
    kept_k, kept_v = gather_kv(
        key[:, :, :P].contiguous(), value[:, :, :P].contiguous(), indices, counts, capacity=N
    )
    keys = torch.cat([kept_k, key[:, :, P:]], dim=2)
    values = torch.cat([kept_v, value[:, :, P:]], dim=2)
    # Slot visibility per KV head: kept slot c < count, completion j <= t.
    count_per_head = counts.view(B, -1).expand(B, Hkv)  # [B, Hkv]
    kept_visible = torch.arange(N, device=query.device) < count_per_head[..., None]  # [B, Hkv, N]
    causal = torch.ones(T, T, dtype=torch.bool, device=query.device).tril()
    visible = torch.cat(
        [kept_visible[:, :, None, :].expand(B, Hkv, T, N), causal.expand(B, Hkv, T, T)], dim=-1
    )
    # One attention per KV head with its group's query heads folded into the query axis.
    folded, visible = gqa_fold(query, visible)
    out = F.scaled_dot_product_attention(
        folded, keys, values, attn_mask=visible, dropout_p=dropout, scale=scale
    )
    return out.view(B, Hq, T, D).transpose(1, 2)


AttentionInterface.register(REPLAY_ATTENTION, replay_attention)
AttentionMaskInterface.register(REPLAY_ATTENTION, sdpa_mask)
