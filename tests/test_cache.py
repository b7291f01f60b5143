"""TopPCache + sparse_topp attention on tiny random-init transformers models (CPU, no downloads).

Independent references: the dense model (p = 1), sparse_attn.reference's scores and selection on
the queries / keys of a dense run (kept counts), and a dense forward whose per-layer mask hides
the dropped tokens (decode logits).
"""

from functools import partial
from itertools import pairwise

import pytest
import torch
from transformers import (
    AttentionInterface,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sparse_attn import reference
from sparse_attn.attention import cache_argument, enable
from sparse_attn.cache import TopPCache
from sparse_attn.policy import TopPPolicy

VOCAB = 128
IMAGE, VIDEO, VISION_START, VISION_END = 120, 121, 122, 123
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=0,
)
IMAGE_GRID = (1, 8, 8)  # patches (t, h, w); 2 x 2 patches merge into one token
IMAGE_TOKENS = IMAGE_GRID[0] * IMAGE_GRID[1] * IMAGE_GRID[2] // 4
# A random init attends almost uniformly, so every head and layer would keep ~p of the tokens.
# Scaling the query and key projections makes attention peaked and different across heads.
SHARPEN_QK = 16.0


def make_model(family: str):
    torch.manual_seed(0)
    model = _random_model(family).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(SHARPEN_QK)
    return model


def _random_model(family: str):
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**TEXT))
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**TEXT))
    config = Qwen2_5_VLConfig(
        text_config=dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=2,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=64,
            window_size=8,
            fullatt_block_indexes=[0],
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def make_inputs(family: str, batch: int) -> dict:
    """Left-padded prompts of different lengths; Qwen2.5-VL prompts hold one image each."""
    generator = torch.Generator().manual_seed(1)
    text = lambda n: torch.randint(1, 100, (n,), generator=generator)  # noqa: E731
    rows = []
    for i in range(batch):
        if family == "qwen2_5_vl":
            image = torch.tensor([VISION_START] + [IMAGE] * IMAGE_TOKENS + [VISION_END])
            rows.append(torch.cat([text(3 + 2 * i), image, text(9 - 3 * i)]))
        else:
            rows.append(text(40 - 9 * i))
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(batch, length, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row) :] = row
        attention_mask[i, length - len(row) :] = 1
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
    if family == "qwen2_5_vl":
        patches = IMAGE_GRID[0] * IMAGE_GRID[1] * IMAGE_GRID[2]
        inputs["pixel_values"] = torch.randn(batch * patches, 3 * 2 * 2 * 2, generator=generator)
        inputs["image_grid_thw"] = torch.tensor([IMAGE_GRID] * batch)
    return inputs


def generate(model, inputs, cache=None, seed=None, **kwargs):
    """model.generate with the cache under the installed transformers' keyword (the direct
    forward calls in these tests pass the older past_key_values: both must reach the cache)."""
    if seed is not None:
        torch.manual_seed(seed)
    return model.generate(
        **inputs, **{cache_argument(model): cache}, max_new_tokens=8, pad_token_id=0, **kwargs
    )


def score_rows(scores: torch.Tensor, granularity: str) -> torch.Tensor:
    """[B, Hkv, L] scores -> the rows one budget is chosen from (docs/design.md#top-p-selection)."""
    return scores.sum(1) if granularity == "layer" else scores.flatten(0, 1)


def budget_rows(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """[B, Hkv, ...] per-head values that agree across heads for "layer" -> one per budget."""
    return x[:, 0] if granularity == "layer" else x.flatten(0, 1)


def held_positions(layer, length: int) -> torch.Tensor:
    """bool [B, Hkv, length]: the logical positions a compact layer holds."""
    held = torch.zeros(*layer.lengths.shape, length + 1, dtype=torch.bool)
    used = torch.arange(layer.positions.shape[-1]) < layer.lengths[..., None]
    held.scatter_(2, torch.where(used, layer.positions, length).long(), True)
    return held[..., :length]


def capture_dense_attention(model, inputs) -> dict:
    """Per decoder layer: post-RoPE queries, keys and scale of a dense prefill."""
    captured = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        if getattr(module, "layer_idx", None) is not None:
            captured[module.layer_idx] = (query, key, kwargs["scaling"])
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("test_capture", capture)
    # The padding-aware causal mask, as for sdpa (an unknown name would get no mask at all).
    AttentionMaskInterface.register("test_capture", sdpa_mask)
    model.set_attn_implementation("test_capture")
    with torch.no_grad():
        model(**inputs)
    return captured


# --- policy --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("p", 0.0),
        ("p", 1.5),
        ("p", float("nan")),
        ("p", "0.9"),
        ("n_probe", 0),
        ("n_probe", 2.0),
        ("keep_first", -1),
        ("keep_last", True),
        ("reselect_every", -3),
        ("granularity", "head"),
        ("prune", "image"),
    ],
)
def test_policy_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"TopPPolicy.{field}"):
        TopPPolicy(**{field: value})


def test_misuse_is_reported():
    with pytest.raises(ValueError, match="reserve"):
        TopPCache(reserve=-1)
    model = make_model("qwen2")
    with pytest.raises(ValueError, match="image / video token ids"):
        enable(model, TopPPolicy(prune="visual"))
    with pytest.raises(RuntimeError, match="sparse_attn.enable"):  # sdpa attention never selects
        model(**make_inputs("qwen2", 1), past_key_values=TopPCache())
    sliding = Qwen2ForCausalLM(
        Qwen2Config(**TEXT, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    )
    with pytest.raises(ValueError, match="full-attention layers only"):
        enable(sliding)
    with pytest.raises(RuntimeError, match="not selected yet"):
        _ = TopPCache().token_ratio


# --- p = 1: the dense model, token for token --------------------------------------------------


@pytest.mark.parametrize("prefill", ["sparse", "dense"])
@pytest.mark.parametrize("granularity", ["layer", "kv_head"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen2_5_vl"])
def test_generate_at_p1_equals_dense(family, batch, granularity, prefill):
    model, inputs = make_model(family), make_inputs(family, batch)
    dense = generate(model, inputs)
    policy = TopPPolicy(p=1.0, granularity=granularity, prefill=prefill)
    cache = TopPCache(policy, reserve=3)  # forces regrowth
    sparse = generate(enable(model), inputs, cache)
    torch.testing.assert_close(sparse, dense, rtol=0, atol=0)
    assert cache.token_ratio == 1.0
    assert cache.get_seq_length() == inputs["input_ids"].shape[1] + 7  # logical, padding included


@pytest.mark.parametrize("prefill", ["sparse", "dense"])
def test_sampling_and_beam_search_at_p1_equal_dense(prefill):
    model, inputs = make_model("qwen2"), make_inputs("qwen2", 3)
    sampled = generate(model, inputs, seed=7, do_sample=True)
    beams = generate(model, inputs, num_beams=2)
    enable(model)
    policy = TopPPolicy(p=1.0, prefill=prefill)
    torch.testing.assert_close(
        generate(model, inputs, TopPCache(policy), seed=7, do_sample=True), sampled
    )
    torch.testing.assert_close(generate(model, inputs, TopPCache(policy), num_beams=2), beams)


# --- p < 1: the selection ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, policy",
    [
        # The reference scores the queries and keys of a dense prefill: prefill="dense" (the
        # sparse prefill has its own reference, tests/test_sparse_prefill.py).
        ("qwen2", TopPPolicy(p=0.8, n_probe=8, keep_first=2, keep_last=3, prefill="dense")),
        (
            "llama",
            TopPPolicy(
                p=0.7, n_probe=64, keep_first=0, keep_last=0, granularity="kv_head", prefill="dense"
            ),
        ),
        (
            "qwen2_5_vl",
            TopPPolicy(
                p=0.6, n_probe=4, keep_first=1, keep_last=2, prune="visual", prefill="dense"
            ),
        ),
    ],
)
def test_kept_tokens_match_reference_selection(family, policy):
    model, inputs = make_model(family), make_inputs(family, 3)
    captured = capture_dense_attention(model, inputs)
    cache = TopPCache(policy)
    with torch.no_grad():
        enable(model, policy)(**inputs, past_key_values=cache)

    valid = inputs["attention_mask"].bool()
    is_visual = torch.isin(inputs["input_ids"], torch.tensor([IMAGE, VIDEO]))
    L = valid.shape[1]
    assert [s.layer_idx for s in cache.selections] == sorted(captured)
    for selection in cache.selections:
        query, key, scale = captured[selection.layer_idx]
        rows = partial(budget_rows, granularity=policy.granularity)
        per_head = lambda mask: mask[:, None].expand(-1, key.shape[1], -1)  # noqa: E731, B023
        scores = reference.cumulative_scores(
            query[:, :, -policy.n_probe :], key, scale=scale, key_mask=valid
        )
        indices, counts = reference.topp_select(
            score_rows(scores, policy.granularity),
            policy.p,
            valid_mask=rows(per_head(valid)),
            keep_first=policy.keep_first,
            keep_last=policy.keep_last,
            candidate_mask=rows(per_head(is_visual)) if policy.prune == "visual" else None,
        )
        expected_held = torch.zeros(counts.shape[0], L + 1, dtype=torch.bool)
        expected_held.scatter_(1, torch.where(indices >= 0, indices, L).long(), True)
        held = held_positions(cache.layers[selection.layer_idx], L)  # [B, Hkv, L]
        if policy.granularity == "layer":
            assert torch.equal(held, held[:, :1].expand_as(held))  # one budget for all heads
        assert torch.equal(rows(held), expected_held[:, :L])
        assert torch.equal(rows(selection.kept), counts)
        assert torch.equal(selection.existed, valid.sum(-1))
        if policy.prune == "visual":  # text always stays; the visual ratio counts image tokens only
            assert held[(valid & ~is_visual)[:, None].expand_as(held)].all()
            expected_visual = (held & is_visual[:, None]).sum(-1) / is_visual.sum(-1)[:, None]
            torch.testing.assert_close(selection.visual_ratios(), expected_visual.float())
    if policy.prune == "visual":
        assert cache.visual_token_ratio < 1.0


def test_prune_visual_drops_only_image_tokens_through_reselections():
    policy = TopPPolicy(
        p=0.5, n_probe=4, keep_first=0, keep_last=1, prune="visual", reselect_every=3
    )
    model, inputs = make_model("qwen2_5_vl"), make_inputs("qwen2_5_vl", 3)
    cache = TopPCache(policy, reserve=2)
    tokens = generate(enable(model, policy), inputs, cache)
    total = tokens.shape[1] - 1  # the last token is never fed back
    L = inputs["input_ids"].shape[1]
    is_text = torch.cat(
        [inputs["attention_mask"].bool(), torch.ones(3, total - L, dtype=torch.bool)], 1
    )
    is_text[:, :L] &= ~torch.isin(inputs["input_ids"], torch.tensor([IMAGE, VIDEO]))
    assert len(cache.selections) == 3 * model.config.text_config.num_hidden_layers
    for layer in cache.layers:
        held = held_positions(layer, total)
        assert held[is_text[:, None].expand_as(held)].all()  # prompt text and decoded tokens stay
        assert held.sum() < is_text.sum() * held.shape[1] + IMAGE_TOKENS * 3 * held.shape[1]
    assert cache.visual_token_ratio < 0.5


def test_token_ratio_decreases_with_p():
    model, inputs = make_model("qwen2"), make_inputs("qwen2", 3)
    enable(model)
    ratios = []
    for p in (1.0, 0.95, 0.8, 0.5, 0.2):
        cache = TopPCache(TopPPolicy(p=p, n_probe=8, keep_first=1, keep_last=1))
        with torch.no_grad():
            model(**inputs, past_key_values=cache)
        ratios.append(cache.layer_ratios)
        counts = torch.stack([s.kept[:, 0] for s in cache.selections]).float()
        existed = inputs["attention_mask"].sum(-1)
        assert cache.layer_ratios == pytest.approx((counts / existed).mean(-1).tolist())
        assert cache.token_ratio == pytest.approx(sum(cache.layer_ratios) / len(cache.layer_ratios))
    assert ratios[0] == [1.0, 1.0]
    for looser, tighter in pairwise(ratios):
        assert all(t <= loose for loose, t in zip(looser, tighter, strict=True))
    assert max(ratios[-1]) < 0.5


def test_kv_bytes_are_the_compact_buffers():
    model, inputs = make_model("qwen2"), make_inputs("qwen2", 3)
    reserve = 8  # room for the 7 decoded tokens appended after the prefill: no regrowth
    dense = model.generate(**inputs, max_new_tokens=8, pad_token_id=0, return_dict_in_generate=True)
    cache = TopPCache(TopPPolicy(p=0.6, n_probe=8), reserve=reserve)
    generate(enable(model), inputs, cache)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_slot = 2 * 3 * config.num_key_value_heads * head_dim * 4  # K and V, batch 3, fp32
    expected = sum((int(s.kept.max()) + reserve) * per_slot for s in cache.selections)
    dense_bytes = sum(
        layer.keys.nbytes + layer.values.nbytes for layer in dense.past_key_values.layers
    )
    assert cache.kv_bytes() == expected
    assert cache.kv_bytes() < dense_bytes


# --- decode: exactly a dense forward with the dropped tokens masked ------------------------------


def decode_loop(model, inputs, cache, chunks):
    """Plain forward loop: a prefill, then forwards of ``chunks[i]`` new tokens each (the first
    greedy, the others random). Returns the tokens, their position ids, the logits from the
    prefill's last position on, and per layer which positions each decoded query could see:
    what the layer held before that query's forward plus the forward's tokens up to the query
    (bool [B, Hkv, decoded, total])."""
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    total = input_ids.shape[1] + sum(chunks)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    generator = torch.Generator().manual_seed(2)
    visible = {}
    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
        )
        logits = [out.logits[:, -1:]]
        for T in chunks:
            start = input_ids.shape[1]
            tokens = torch.cat(
                [
                    logits[-1][:, -1].argmax(-1, keepdim=True),
                    torch.randint(1, VOCAB, (len(input_ids), T - 1), generator=generator),
                ],
                1,
            )
            input_ids = torch.cat([input_ids, tokens], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(tokens)], dim=1)
            position_ids = torch.cat(
                [position_ids, position_ids[:, -1:] + torch.arange(1, T + 1)], dim=1
            )
            for layer_idx, layer in enumerate(cache.layers):
                held = held_positions(layer, total)
                rows = held[:, :, None].repeat(1, 1, T, 1)
                rows[..., start : start + T] |= torch.ones(T, T, dtype=torch.bool).tril()
                visible[layer_idx] = (
                    torch.cat([visible[layer_idx], rows], 2) if layer_idx in visible else rows
                )
            out = model(
                input_ids=tokens,
                attention_mask=attention_mask,
                position_ids=position_ids[:, start:],
                past_key_values=cache,
            )
            logits.append(out.logits)
    return input_ids, position_ids, torch.cat(logits, 1), visible


def masked_dense_logits(model, input_ids, position_ids, prompt_mask, visible):
    """Dense forward of the whole sequence: prompt queries attend causally, decoded queries to
    the positions in ``visible`` (see decode_loop)."""
    B, total = input_ids.shape
    L = prompt_mask.shape[1]
    causal = torch.ones(L, total, dtype=torch.bool).tril()
    key_valid = torch.cat([prompt_mask.bool(), torch.ones(B, total - L, dtype=torch.bool)], 1)
    # Padding queries see only themselves: finite, and invisible to every other query.
    prompt_rows = causal & (key_valid[:, None, :] | torch.eye(L, total, dtype=torch.bool))
    masks = {
        layer_idx: torch.cat([prompt_rows[:, None].expand(B, rows.shape[1], L, total), rows], 2)
        for layer_idx, rows in visible.items()
    }

    def attention(module, query, key, value, attention_mask, scaling, **kwargs):
        g = query.shape[1] // key.shape[1]
        mask = masks[module.layer_idx].repeat_interleave(g, 1)
        logits = query @ key.repeat_interleave(g, 1).transpose(-1, -2) * scaling
        probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
        return (probs @ value.repeat_interleave(g, 1)).transpose(1, 2), None

    AttentionInterface.register("test_masked_dense", attention)
    model.set_attn_implementation("test_masked_dense")
    with torch.no_grad():
        return model(input_ids=input_ids, position_ids=position_ids).logits[:, L - 1 :]


@pytest.mark.parametrize(
    "family, policy",
    [
        # masked_dense_logits attends densely among the prompt: prefill="dense"
        ("qwen2", TopPPolicy(p=0.7, n_probe=8, keep_first=2, keep_last=2, prefill="dense")),
        (
            "llama",
            TopPPolicy(
                p=0.6, n_probe=16, keep_first=1, keep_last=0, granularity="kv_head", prefill="dense"
            ),
        ),
        (
            "qwen2",
            TopPPolicy(
                p=0.8, n_probe=3, keep_first=1, keep_last=2, reselect_every=2, prefill="dense"
            ),
        ),
        (
            "llama",
            TopPPolicy(
                p=0.8,
                n_probe=4,
                keep_first=0,
                keep_last=1,
                granularity="kv_head",
                reselect_every=3,
                prefill="dense",
            ),
        ),
    ],
)
def test_decode_equals_dense_forward_with_dropped_tokens_masked(family, policy):
    model, inputs = make_model(family), make_inputs(family, 3)
    cache = TopPCache(policy, reserve=2)
    chunks = [1, 3, 1, 1, 2]  # new turns too (forwards of several tokens): causal among the new
    input_ids, position_ids, logits, visible = decode_loop(enable(model), inputs, cache, chunks)
    assert (
        visible[0][:, :, 0].sum() < inputs["attention_mask"].sum() * visible[0].shape[1]
    )  # tokens dropped
    expected = masked_dense_logits(
        model, input_ids, position_ids, inputs["attention_mask"], visible
    )
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    # A forward of several tokens is a new turn, which selects again (docs/sparse_prefill.md);
    # reselection runs once reselect_every tokens were decoded since the previous selection.
    selections, since = 1, 0
    for T in chunks:
        if T > 1:
            selections, since = selections + 1, 0
            continue
        since += T
        if policy.reselect_every and since >= policy.reselect_every:
            selections, since = selections + 1, 0
    assert len(cache.selections) == model.config.num_hidden_layers * selections


@pytest.mark.parametrize("granularity", ["layer", "kv_head"])
def test_reselection_matches_reference_selection(granularity, monkeypatch):
    """Each reselection scores the cache with the last n_probe queries decoded since the previous
    selection (the newest tokens of every row) and keeps the reference's top-p set."""
    policy = TopPPolicy(
        p=0.7, n_probe=2, keep_first=1, keep_last=1, granularity=granularity, reselect_every=3
    )
    model, inputs = make_model("qwen2"), make_inputs("qwen2", 3)
    L = inputs["input_ids"].shape[1]
    cache = TopPCache(policy, reserve=2)
    decoded = {}  # layer_idx -> queries decoded since its last selection
    reselections = []  # (layer_idx, keys, lengths, positions, queries, scale) before, held after

    def record_queries(layer_idx, query, scale, original=cache.after_decode_attention):
        decoded.setdefault(layer_idx, []).append(query)
        original(layer_idx, query, scale)

    def record_reselection(layer_idx, scale, original=cache._reselect):
        layer = cache.layers[layer_idx]
        state = (
            layer_idx,
            layer.keys.clone(),
            layer.lengths.clone(),
            layer.positions.clone(),
            torch.cat(decoded.pop(layer_idx), 2),
            scale,
        )
        original(layer_idx, scale)
        reselections.append((state, scored.pop(), held_positions(layer, L + 7)))

    def record_scores(layer_idx, scores, *args, original=cache._select):
        scored.append(scores)
        original(layer_idx, scores, *args)

    scored = []
    monkeypatch.setattr(cache, "after_decode_attention", record_queries)
    monkeypatch.setattr(cache, "_reselect", record_reselection)
    monkeypatch.setattr(cache, "_select", record_scores)
    decode_loop(enable(model), inputs, cache, chunks=[1] * 7)
    selections = [s for s in cache.selections if s.seen_tokens > L]
    assert len(reselections) == len(selections) == 2 * model.config.num_hidden_layers
    for (
        (layer_idx, keys, lengths, positions, queries, scale),
        cache_scores,
        held,
    ), selection in zip(reselections, selections, strict=True):
        assert selection.layer_idx == layer_idx and queries.shape[2] == policy.reselect_every
        probes = queries[:, :, -policy.n_probe :]
        B, Hkv = lengths.shape
        g = probes.shape[1] // Hkv
        S = int(lengths.max())
        scores = torch.zeros(B, Hkv, S)
        for b in range(B):
            for h in range(Hkv):
                n = int(lengths[b, h])
                q = probes[b : b + 1, h * g : (h + 1) * g]
                scores[b, h, :n] = reference.cumulative_scores(
                    q, keys[b : b + 1, h : h + 1, :n], scale=scale
                )[0, 0]
        torch.testing.assert_close(cache_scores, scores)
        valid = torch.arange(S) < lengths[..., None]
        rows = partial(budget_rows, granularity=granularity)
        indices, counts = reference.topp_select(
            score_rows(scores, granularity),
            policy.p,
            valid_mask=rows(valid),
            keep_first=policy.keep_first,
            keep_last=policy.keep_last,
        )
        assert torch.equal(rows(selection.kept), counts)
        kept_positions = torch.where(
            indices >= 0, rows(positions[..., :S]).gather(1, indices.long().clamp(min=0)), L + 7
        )
        expected_held = torch.zeros(counts.shape[0], L + 8, dtype=torch.bool).scatter_(
            1, kept_positions.long(), True
        )
        assert torch.equal(rows(held), expected_held[:, : L + 7])
        assert torch.equal(
            selection.existed, inputs["attention_mask"].sum(-1) + selection.seen_tokens - L
        )


def test_reorder_cache_moves_every_row_state():
    """Beam search reorders batch rows: decoding after reorder_cache(perm) must equal decoding
    the permuted batch (the rows keep different numbers of tokens)."""
    model, inputs = make_model("qwen2"), make_inputs("qwen2", 3)
    enable(model)
    caches = [TopPCache(TopPPolicy(p=0.7, n_probe=8)) for _ in range(2)]
    position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        for cache in caches:
            model(**inputs, position_ids=position_ids, past_key_values=cache)
        caches[1].reorder_cache(perm)
        token = torch.tensor([[5], [6], [7]])
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1)
        step = dict(position_ids=position_ids[:, -1:] + 1)
        plain = model(
            input_ids=token, attention_mask=mask, past_key_values=caches[0], **step
        ).logits
        reordered = model(
            input_ids=token[perm],
            attention_mask=mask[perm],
            past_key_values=caches[1],
            position_ids=step["position_ids"][perm],
        ).logits
    torch.testing.assert_close(reordered, plain[perm])
    for plain_layer, reordered_layer in zip(caches[0].layers, caches[1].layers, strict=True):
        total = mask.shape[1]
        assert torch.equal(
            held_positions(reordered_layer, total), held_positions(plain_layer, total)[perm]
        )


def test_reset_makes_a_fresh_cache():
    model, inputs = make_model("qwen2"), make_inputs("qwen2", 3)
    enable(model)
    cache = TopPCache(TopPPolicy(p=0.7, n_probe=8))
    first = generate(model, inputs, cache)
    kept = [s.kept for s in cache.selections]
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.kv_bytes() == 0 and cache.selections == []
    torch.testing.assert_close(generate(model, inputs, cache), first)
    assert all(torch.equal(a, s.kept) for a, s in zip(kept, cache.selections, strict=True))
