"""The sparse prefill (TopPPolicy(prefill="sparse"), docs/sparse_prefill.md) against an
independent plain-PyTorch reference: an attention function that, per layer, scores with
sparse_attn.reference, selects with the reference rules, and attends through an explicit mask
(query in T, key in T, key position <= query position; zero output outside T). Decoded queries
see the layer's kept prompt tokens and the decoded tokens so far. Tiny random-init models, CPU.
"""

import pytest
import torch
from test_cache import (
    IMAGE,
    VIDEO,
    budget_rows,
    held_positions,
    make_inputs,
    make_model,
    score_rows,
)
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sparse_attn import reference
from sparse_attn.attention import (
    cache_argument,
    enable,
    key_validity,
    sparse_prefill_attention,
)
from sparse_attn.cache import TopPCache
from sparse_attn.policy import TopPPolicy
from sparse_attn.rules import threshold_select, topk_select

REFERENCE = "test_sparse_prefill_reference"


def reference_keep(policy, scores, valid, is_visual):
    """bool [B, Hkv, L]: the tokens the policy's rule keeps from scores [B, Hkv, L]."""
    B, Hkv, L = scores.shape
    rows = lambda x: budget_rows(x[:, None].expand(B, Hkv, L), policy.granularity)
    kw = dict(
        valid_mask=rows(valid),
        keep_first=policy.keep_first,
        keep_last=policy.keep_last,
        candidate_mask=rows(is_visual) if policy.prune == "visual" else None,
    )
    row_scores = score_rows(scores, policy.granularity)
    if policy.rule == "top_p":
        indices, _ = reference.topp_select(row_scores, policy.p, **kw)
    elif policy.rule == "top_k":
        indices, _ = topk_select(row_scores, policy.keep_ratio, **kw)
    else:
        indices, _ = threshold_select(row_scores, policy.threshold, **kw)
    keep = torch.zeros(indices.shape[0], L + 1, dtype=torch.bool)
    keep.scatter_(1, torch.where(indices >= 0, indices, L).long(), True)
    keep = keep[:, :L]
    return (
        keep[:, None].expand(B, Hkv, L) if policy.granularity == "layer" else keep.view(B, Hkv, L)
    )


class Reference:
    """The sparse prefill as a masked dense attention over [prompt + decoded] sequences."""

    def __init__(self, policy, prompt_length, is_visual, num_layers):
        self.policy, self.P, self.is_visual = policy, prompt_length, is_visual
        K = policy.shared_from_layer
        self.shared = None if K is None else min(K, num_layers - 1)
        self.kept = {}  # layer -> bool [B, Hkv, P]

    def __call__(self, module, query, key, value, attention_mask, scaling, **kwargs):
        layer_idx, P, policy = getattr(module, "layer_idx", None), self.P, self.policy
        if layer_idx is None:  # the vision tower
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, scaling=scaling, **kwargs
            )
        B, Hq, S, D = query.shape
        Hkv = key.shape[1]
        g = Hq // Hkv
        valid = key_validity(attention_mask)
        valid = torch.ones(B, S, dtype=torch.bool) if valid is None else valid
        valid_prompt = valid[:, :P]
        K = self.shared
        if K is not None and layer_idx < K:
            keep = valid_prompt[:, None].expand(B, Hkv, P)
        elif K is not None and layer_idx > K:
            keep = self.kept[K]
        else:
            probes = query[:, :, P - policy.n_probe if P > policy.n_probe else 0 : P]
            scores = reference.cumulative_scores(
                probes, key[:, :, :P], scale=scaling, key_mask=valid_prompt
            )
            keep = reference_keep(policy, scores, valid_prompt, self.is_visual)
        self.kept[layer_idx] = keep
        # query q < P sees k <= q with both in T; a decoded query sees T and decoded keys <= q.
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        in_set = torch.cat([keep, torch.ones(B, Hkv, S - P, dtype=torch.bool)], -1)  # [B, Hkv, S]
        mask = causal & in_set[..., None, :] & in_set[..., :, None]
        mask = mask.repeat_interleave(g, 1)
        logits = (query @ key.repeat_interleave(g, 1).transpose(-1, -2)) * scaling
        probs = logits.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
        out = probs @ value.repeat_interleave(g, 1)
        return out.transpose(1, 2), None


def reference_forward(model, inputs, policy, prompt_length):
    is_visual = torch.isin(inputs["input_ids"][:, :prompt_length], torch.tensor([IMAGE, VIDEO]))
    config = model.config.get_text_config(decoder=True)
    ref = Reference(policy, prompt_length, is_visual, config.num_hidden_layers)
    AttentionInterface.register(REFERENCE, ref)
    AttentionMaskInterface.register(REFERENCE, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(REFERENCE)
    try:
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits
    finally:
        model.set_attn_implementation(previous)
    return logits, ref.kept


POLICIES = [
    ("qwen2", TopPPolicy(p=0.7, n_probe=8, keep_first=2, keep_last=3)),
    ("qwen2", TopPPolicy(p=0.6, n_probe=4, keep_first=1, keep_last=1, granularity="kv_head")),
    ("llama", TopPPolicy(p=0.8, n_probe=64, keep_first=0, keep_last=1)),
    ("llama", TopPPolicy(rule="top_k", keep_ratio=0.3, n_probe=8, keep_first=1, keep_last=2)),
    (
        "qwen2",
        TopPPolicy(
            rule="threshold",
            threshold=1.5,
            n_probe=4,
            keep_first=1,
            keep_last=1,
            granularity="kv_head",
        ),
    ),
    ("qwen2_5_vl", TopPPolicy(p=0.6, n_probe=4, keep_first=1, keep_last=2, prune="visual")),
    ("qwen2_5_vl", TopPPolicy(p=0.7, n_probe=4, keep_first=1, keep_last=2, granularity="kv_head")),
    ("qwen2_5_vl", TopPPolicy.fastv(0.25)),
    ("qwen2", TopPPolicy(p=0.6, n_probe=4, keep_first=1, keep_last=1, shared_from_layer=1)),
]


@pytest.mark.parametrize("family, policy", POLICIES)
def test_prefill_equals_reference(family, policy):
    """Prefill logits at every valid position and the kept sets of every layer."""
    model, inputs = make_model(family), make_inputs(family, 3)
    P = inputs["input_ids"].shape[1]
    expected, kept = reference_forward(model, inputs, policy, P)
    cache = TopPCache(policy)
    with torch.no_grad():
        logits = enable(model, policy)(**inputs, **{cache_argument(model): cache}).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], expected[valid], rtol=1e-4, atol=1e-4)
    for layer_idx, layer in enumerate(cache.layers):
        assert torch.equal(held_positions(layer, P), kept[layer_idx]), layer_idx
    assert cache.token_ratio < 0.95  # the test really prunes


@pytest.mark.parametrize("family, policy", [POLICIES[0], POLICIES[1], POLICIES[5], POLICIES[7]])
def test_greedy_generation_equals_reference(family, policy):
    """Every decoded token: the reference's greedy choice over the whole sequence so far."""
    model, inputs = make_model(family), make_inputs(family, 3)
    P = inputs["input_ids"].shape[1]
    cache = TopPCache(policy, reserve=2)
    tokens = enable(model, policy).generate(
        **inputs,
        **{cache_argument(model): cache},
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
    )
    current = dict(inputs)
    for step in range(6):
        logits, _ = reference_forward(model, current, policy, P)
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        assert torch.equal(next_token[:, 0], tokens[:, P + step]), step
        current["input_ids"] = torch.cat([current["input_ids"], next_token], 1)
        current["attention_mask"] = torch.cat(
            [current["attention_mask"], torch.ones_like(next_token)], 1
        )


def test_sparse_and_dense_prefill_differ_only_after_selection():
    """Same selection rule, same model: the sparse prefill changes the first generated token's
    logits (it depends on the selection); the dense prefill does not."""
    model, inputs = make_model("qwen2"), make_inputs("qwen2", 3)
    enable(model)
    plain = TopPPolicy(p=1.0)
    with torch.no_grad():
        exact = model(**inputs, past_key_values=TopPCache(plain)).logits[:, -1]
        dense = model(
            **inputs, past_key_values=TopPCache(TopPPolicy(p=0.6, n_probe=8, prefill="dense"))
        ).logits[:, -1]
        sparse = model(**inputs, past_key_values=TopPCache(TopPPolicy(p=0.6, n_probe=8))).logits[
            :, -1
        ]
    torch.testing.assert_close(dense, exact, rtol=0, atol=0)
    assert (sparse - exact).abs().max() > 1e-3


def test_sparse_prefill_attention_op_against_masks():
    """The attention among T on random rows (different |T| per row and head, fp32 / bf16)."""
    gen = torch.Generator().manual_seed(0)
    B, Hkv, g, L, D = 3, 2, 3, 37, 16
    for dtype in (torch.float32, torch.bfloat16):
        query = torch.randn(B, Hkv * g, L, D, generator=gen).to(dtype)
        key = torch.randn(B, Hkv, L, D, generator=gen).to(dtype)
        value = torch.randn(B, Hkv, L, D, generator=gen).to(dtype)
        keep = torch.rand(B, Hkv, L, generator=gen) < 0.4
        keep[..., -1] = True
        lengths = keep.sum(-1)
        width = int(lengths.max())
        positions = torch.full((B, Hkv, width + 2), -1)
        keys = torch.zeros(B, Hkv, width + 2, D, dtype=dtype)
        values = torch.zeros_like(keys)
        for b in range(B):
            for h in range(Hkv):
                idx = keep[b, h].nonzero()[:, 0]
                positions[b, h, : len(idx)] = idx
                keys[b, h, : len(idx)], values[b, h, : len(idx)] = key[b, h, idx], value[b, h, idx]
        out = sparse_prefill_attention(query, keys, values, positions, lengths, width, 0.3)
        mask = torch.ones(L, L, dtype=torch.bool).tril() & keep[..., None, :] & keep[..., :, None]
        mask = mask.repeat_interleave(g, 1)
        logits = query.float() @ key.float().repeat_interleave(g, 1).transpose(-1, -2) * 0.3
        probs = logits.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
        expected = (probs @ value.float().repeat_interleave(g, 1)).transpose(1, 2)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
        outside = ~keep.repeat_interleave(g, 1).transpose(1, 2)  # [B, L, Hq]
        assert (out[outside] == 0).all()


def test_sparse_prefill_needs_the_last_position():
    with pytest.raises(ValueError, match="keep_last must be >= 1 with prefill='sparse'"):
        TopPPolicy(keep_last=0)
    with pytest.raises(ValueError, match="TopPPolicy.prefill"):
        TopPPolicy(prefill="flash")
    assert TopPPolicy(keep_last=0, prefill="dense").keep_last == 0


# --- prompt tokens after the first prefill ---------------------------------------------------


@pytest.mark.parametrize("prefill", ["sparse", "dense"])
def test_chunked_prefill_is_refused(prefill):
    """A 64-token prompt in chunks of 16 would select from the first chunk only and report the
    later chunks as kept (token ratio 1.0 for keep_last=16): refused instead."""
    model = make_model("qwen2")
    inputs = {
        "input_ids": torch.randint(1, 100, (1, 64), generator=torch.Generator().manual_seed(3))
    }
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    policy = TopPPolicy(p=0.5, n_probe=8, keep_first=1, keep_last=16, prefill=prefill)
    with pytest.raises(RuntimeError, match="chunked prefill"):
        enable(model).generate(
            **inputs,
            **{cache_argument(model): TopPCache(policy)},
            max_new_tokens=2,
            pad_token_id=0,
            prefill_chunk_size=16,
        )
    cache = TopPCache(policy)  # in one forward: it prunes
    model.generate(**inputs, **{cache_argument(model): cache}, max_new_tokens=2, pad_token_id=0)
    assert cache.token_ratio < 0.9


def two_turns(model, inputs, cache, new_tokens=9):
    """generate a first turn, append new prompt tokens, generate a second turn on the same cache."""
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    first = model.generate(**inputs, **{cache_argument(model): cache}, **kw)
    B = first.shape[0]
    new = torch.randint(1, 100, (B, new_tokens), generator=torch.Generator().manual_seed(4))
    conversation = torch.cat([first, new], 1)
    mask = torch.cat(
        [
            inputs["attention_mask"],
            torch.ones(B, conversation.shape[1] - inputs["input_ids"].shape[1], dtype=torch.long),
        ],
        1,
    )
    second = model.generate(
        input_ids=conversation, attention_mask=mask, **{cache_argument(model): cache}, **kw
    )
    return first, second, mask


@pytest.mark.parametrize("prefill", ["sparse", "dense"])
def test_second_turn_at_p1_equals_dense(prefill):
    from transformers import DynamicCache

    model, inputs = make_model("qwen2"), make_inputs("qwen2", 3)
    dense = two_turns(model, inputs, DynamicCache(config=model.config))
    sparse = two_turns(
        enable(model), inputs, TopPCache(TopPPolicy(p=1.0, prefill=prefill), reserve=2)
    )
    torch.testing.assert_close(sparse[1], dense[1], rtol=0, atol=0)


@pytest.mark.parametrize("granularity", ["layer", "kv_head"])
@pytest.mark.parametrize("prefill", ["sparse", "dense"])
def test_second_turn_selects_again(prefill, granularity):
    """Every layer selects again over what it held and the new turn's tokens; the stats count
    what the cache holds then, out of every token of the conversation."""
    model, inputs = make_model("qwen2"), make_inputs("qwen2", 3)
    policy = TopPPolicy(
        p=0.6, n_probe=4, keep_first=1, keep_last=2, prefill=prefill, granularity=granularity
    )
    cache = TopPCache(policy, reserve=2)
    first, second, mask = two_turns(enable(model), inputs, cache)
    n_layers = model.config.num_hidden_layers
    conversation = mask.shape[1]
    assert len(cache.selections) == 2 * n_layers
    first_held = None
    for selection in cache.selections[n_layers:]:
        assert selection.seen_tokens == conversation
        assert torch.equal(selection.existed, mask.sum(-1))
        held = held_positions(cache.layers[selection.layer_idx], second.shape[1])[
            ..., :conversation
        ]
        assert torch.equal(held.sum(-1), selection.kept)
        assert held[..., first.shape[1] :].any()  # new-turn tokens are kept ...
        assert held[..., conversation - policy.keep_last :].all()  # ... the last ones always
        first_held = held
    assert first_held is not None and cache.token_ratio < 0.95
    assert cache.token_ratio == pytest.approx(
        sum(float((s.kept / s.existed[:, None]).mean()) for s in cache.selections[n_layers:])
        / n_layers
    )


# --- the hand-off to the attention function ----------------------------------------------------


def test_handoff_nested_blocks_restore_the_outer_value():
    import threading

    from sparse_attn.handoff import Handoff

    slot = Handoff("test")
    assert slot.peek() is None
    with slot.holding("outer"):
        with slot.holding("inner"):
            assert slot.peek() == "inner"
        assert slot.peek() == "outer"
        seen = []
        worker = threading.Thread(target=lambda: seen.append(slot.peek()))  # thread-local
        worker.start()
        worker.join()
        assert seen == [None]
        with pytest.raises(KeyError), slot.holding("failing"):
            raise KeyError
        assert slot.peek() == "outer"
    assert slot.peek() is None
    slot.put("note")
    assert slot.take() == "note" and slot.take() is None


def test_nested_replay_restores_the_outer_replay():
    from sf_train.replay import _replay, replaying

    with replaying([], 5) as outer:
        with replaying([], 7, probe_scores=2) as inner:
            assert _replay.peek() is inner and inner.prompt_length == 7
        assert _replay.peek() is outer
    assert _replay.peek() is None
