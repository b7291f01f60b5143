"""The TopPCache decode step: no host sync, traceable at fixed capacity, padding of later chunks
honoured, memory never above a dense cache's, one decode-attention entry point
(docs/decode.md)."""

import pytest
import torch
from test_cache import VOCAB, held_positions, make_inputs, make_model
from transformers import AttentionInterface, DynamicCache

from sparse_attn import ops
from sparse_attn.attention import compact_decode, enable, masked_decode_attention
from sparse_attn.cache import TopPCache
from sparse_attn.policy import TopPPolicy

HOST_SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


def forbid_host_syncs(monkeypatch) -> None:
    """Make every Tensor -> host conversion raise (CPU tensors would convert silently)."""

    def refuse(name):
        def method(*args, **kwargs):
            raise AssertionError(f"host sync in the decode step: Tensor.{name}")

        return method

    for name in HOST_SYNCS:
        monkeypatch.setattr(torch.Tensor, name, refuse(name))


def prefill(model, inputs, cache):
    """Prefill, and the position ids of the prompt (left padding: counted from each row's
    first token)."""
    position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model(**inputs, position_ids=position_ids, past_key_values=cache)
    return position_ids


def chunk_inputs(attention_mask, position_ids, chunk_valid, generator):
    """Tokens of a later chunk (random, 0 at its padding), the grown mask and position ids."""
    B, T = chunk_valid.shape
    tokens = torch.randint(1, VOCAB, (B, T), generator=generator) * chunk_valid
    attention_mask = torch.cat([attention_mask, chunk_valid.long()], 1)
    new_positions = position_ids[:, -1:] + chunk_valid.long().cumsum(-1)
    return tokens, attention_mask, torch.cat([position_ids, new_positions], 1)


@pytest.mark.parametrize("granularity", ["layer", "kv_head"])
def test_decode_step_makes_no_host_sync(granularity, monkeypatch):
    model, inputs = make_model("qwen2"), make_inputs("qwen2", 3)
    enable(model)
    # reserve 1: the second step grows the buffers, which the host decides alone.
    cache = TopPCache(TopPPolicy(p=0.7, n_probe=8, granularity=granularity), reserve=1)
    position_ids = prefill(model, inputs, cache)
    capacity = cache.layers[0].keys.shape[2]
    mask, generator = inputs["attention_mask"], torch.Generator().manual_seed(3)
    # Decode steps of one token, one of them padding in a row. (A later chunk of several tokens is
    # a new turn, which selects again and may sync: docs/sparse_prefill.md#new-turns.)
    chunks = [torch.ones(3, 1), torch.ones(3, 1), torch.tensor([[0], [1], [1]])]
    logits = []
    with monkeypatch.context() as patch:
        forbid_host_syncs(patch)
        with pytest.raises(AssertionError, match="host sync"):  # the patch is active
            torch.ones(1).item()
        for valid in chunks:
            tokens, mask, position_ids = chunk_inputs(mask, position_ids, valid.bool(), generator)
            with torch.no_grad():
                out = model(
                    input_ids=tokens,
                    attention_mask=mask,
                    position_ids=position_ids[:, -tokens.shape[1] :],
                    past_key_values=cache,
                )
            logits.append(out.logits)
    assert all(torch.isfinite(x).all() for x in logits)
    assert cache.layers[0].keys.shape[2] > capacity  # the buffers grew during the steps
    assert 0 < cache.token_ratio < 1  # stats read after the steps


def test_decode_step_at_fixed_capacity_traces_with_fullgraph():
    """A layer's decode step (append, padding drop, attention) traces as one graph (no graph
    break, no data-dependent Python) and gives the eager result."""
    model, inputs = make_model("qwen2"), make_inputs("qwen2", 3)
    enable(model)
    caches = [TopPCache(TopPPolicy(p=0.7, n_probe=8), reserve=8) for _ in range(2)]
    for cache in caches:
        prefill(model, inputs, cache)

    def step(layer, query, key, value, valid):
        keys, values = layer.update(key, value)
        layer.drop_padding(valid)
        return compact_decode(query, layer, keys, values, valid, 0.25)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    generator = torch.Generator().manual_seed(4)
    B, Hkv, _, D = caches[0].layers[0].keys.shape
    for T, valid in [(1, torch.ones(B, 1)), (3, torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]]))]:
        query = torch.randn(B, 2 * Hkv, T, D, generator=generator)
        key, value = torch.randn(2, B, Hkv, T, D, generator=generator)
        capacity = caches[0].layers[0].keys.shape[2]
        eager = step(caches[0].layers[0], query, key, value, valid.bool())
        traced = compiled(caches[1].layers[0], query, key, value, valid.bool())
        torch.testing.assert_close(traced, eager)
        assert caches[1].layers[0].keys.shape[2] == capacity  # fixed capacity: no regrowth
        for name in ("keys", "values", "lengths", "positions"):
            assert torch.equal(
                getattr(caches[1].layers[0], name), getattr(caches[0].layers[0], name)
            )


def masked_reference(model, input_ids, position_ids, visible):
    """Dense forward of the whole sequence where query i of layer l attends to the positions
    ``visible[l][b, h, i]`` (bool [B, Hkv, total, total])."""

    def attention(module, query, key, value, attention_mask, scaling, **kwargs):
        g = query.shape[1] // key.shape[1]
        mask = visible[module.layer_idx].repeat_interleave(g, 1)
        logits = query @ key.repeat_interleave(g, 1).transpose(-1, -2) * scaling
        probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
        return (probs @ value.repeat_interleave(g, 1)).transpose(1, 2), None

    AttentionInterface.register("test_visible", attention)
    model.set_attn_implementation("test_visible")
    with torch.no_grad():
        return model(input_ids=input_ids, position_ids=position_ids).logits


TURN = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]]).bool()
SINGLE = torch.tensor([[1], [0], [1]]).bool()  # one padding token alone
STEP = torch.ones(3, 1).bool()


@pytest.mark.parametrize(
    "granularity, p, prefill_mode, chunks",
    [
        # decode steps, one of them padding in a row: the prompt selection stays (the reference
        # below runs the prompt densely: the dense prefill's semantics)
        ("layer", 0.7, "dense", [STEP, SINGLE, STEP]),
        ("kv_head", 0.7, "dense", [STEP, SINGLE, STEP]),
        # a batched later turn left-padded to its longest row (a new turn selects again: at
        # p = 1 it keeps every valid token, so the reference below holds)
        ("layer", 1.0, "sparse", [STEP, TURN, STEP, SINGLE, STEP]),
        ("kv_head", 1.0, "dense", [STEP, TURN, STEP, SINGLE, STEP]),
    ],
)
def test_padding_inside_a_later_chunk_is_not_attended(granularity, p, prefill_mode, chunks):
    """Padding among later tokens (a decode step's padded row, or a batched later turn
    left-padded to the longest row's). No query may see that padding, in the chunk or after it,
    and the cache must not hold it."""
    model, inputs = make_model("qwen2"), make_inputs("qwen2", 3)
    enable(model)
    policy = TopPPolicy(p=p, n_probe=8, keep_first=1, granularity=granularity, prefill=prefill_mode)
    cache = TopPCache(policy)
    position_ids = prefill(model, inputs, cache)
    L = inputs["input_ids"].shape[1]
    held = [held_positions(layer, L) for layer in cache.layers]  # the prompt tokens kept
    mask, generator = inputs["attention_mask"], torch.Generator().manual_seed(5)
    input_ids, logits = inputs["input_ids"], []
    for valid in chunks:
        tokens, mask, position_ids = chunk_inputs(mask, position_ids, valid, generator)
        input_ids = torch.cat([input_ids, tokens], 1)
        with torch.no_grad():
            logits.append(
                model(
                    input_ids=tokens,
                    attention_mask=mask,
                    position_ids=position_ids[:, -tokens.shape[1] :],
                    past_key_values=cache,
                ).logits
            )
    logits = torch.cat(logits, 1)
    total = input_ids.shape[1]
    for layer in cache.layers:  # the cache holds the kept prompt and the valid new tokens only
        held_now = held_positions(layer, total)
        assert not held_now[..., L:][~mask[:, None, L:].bool().expand_as(held_now[..., L:])].any()
        assert held_now[..., L:].sum(-1).eq(mask[:, None, L:].sum(-1)).all()

    # Reference: the prompt causal over its valid tokens; every later query sees the kept prompt
    # tokens and the valid new tokens up to itself (padding queries: the kept prompt only).
    valid_keys = mask.bool()
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    visible = {}
    for layer_idx, prompt_held in enumerate(held):
        B, Hkv, _ = prompt_held.shape
        rows = causal & valid_keys[:, None, :]  # [B, total, total]
        rows = rows[:, None].expand(B, Hkv, total, total).clone()
        later = rows[:, :, L:]
        later[..., :L] = prompt_held[:, :, None]
        later &= valid_keys[:, None, L:, None]  # padding queries: no new token
        later[..., :L] |= prompt_held[:, :, None]
        rows[:, :, :L] |= torch.eye(L, total, dtype=torch.bool)  # prompt padding: itself
        visible[layer_idx] = rows
    expected = masked_reference(model, input_ids, position_ids, visible)[:, L:]
    query_valid = mask[:, L:].bool()
    torch.testing.assert_close(logits[query_valid], expected[query_valid], rtol=1e-4, atol=1e-4)


def dense_bytes(model, inputs, new_tokens):
    """K/V bytes of a DynamicCache after the prompt and each decoded token."""
    cache, sizes = DynamicCache(config=model.config), []
    model.set_attn_implementation("sdpa")
    mask, token = inputs["attention_mask"], None
    with torch.no_grad():
        for step in range(new_tokens + 1):
            kwargs = dict(inputs) if step == 0 else dict(input_ids=token, attention_mask=mask)
            out = model(**kwargs, past_key_values=cache)
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            sizes.append(sum(x.keys.nbytes + x.values.nbytes for x in cache.layers))
    return sizes


@pytest.mark.parametrize("prompt_length, p", [(40, 0.8), (200, 0.6), (64, 1.0)])
def test_automatic_reserve_never_exceeds_dense_bytes(prompt_length, p):
    """After the prompt and every decoded token, the TopPCache allocates no more K/V bytes than
    a dense cache of the same logical length (a fixed 256-slot reserve held 5.9x at 40 tokens,
    p = 0.8); kv_bytes_in_use counts the tokens held."""
    model = make_model("qwen2")
    generator = torch.Generator().manual_seed(prompt_length)
    inputs = dict(
        input_ids=torch.randint(1, 100, (2, prompt_length), generator=generator),
        attention_mask=torch.ones(2, prompt_length, dtype=torch.long),
    )
    new_tokens = 40
    dense = dense_bytes(model, inputs, new_tokens)
    enable(model)
    cache = TopPCache(TopPPolicy(p=p, n_probe=8))
    mask, token = inputs["attention_mask"], None
    config = model.config
    per_token = 2 * (config.hidden_size // config.num_attention_heads) * 4  # K and V, fp32
    with torch.no_grad():
        for step in range(new_tokens + 1):
            kwargs = dict(inputs) if step == 0 else dict(input_ids=token, attention_mask=mask)
            out = model(**kwargs, past_key_values=cache)
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            assert cache.kv_bytes() <= dense[step], step
            held = sum(int(held_positions(layer, mask.shape[1]).sum()) for layer in cache.layers)
            assert cache.kv_bytes_in_use() == held * per_token
            assert cache.kv_bytes_in_use() <= cache.kv_bytes()
    if p < 1:
        assert cache.kv_bytes_in_use() < dense[-1]


def test_explicit_reserve_is_allocated_as_given():
    """reserve=N (e.g. max_new_tokens): N free slots after the selection, none reallocated for
    N decoded tokens."""
    model, inputs = make_model("qwen2"), make_inputs("qwen2", 3)
    enable(model)
    cache = TopPCache(TopPPolicy(p=0.7, n_probe=8), reserve=12)
    prefill(model, inputs, cache)
    buffers = [layer.keys for layer in cache.layers]
    for layer, selection in zip(cache.layers, cache.selections, strict=True):
        assert layer.keys.shape[2] == int(selection.kept.max()) + 12
    with torch.no_grad():
        mask = inputs["attention_mask"]
        for _ in range(12):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
            model(
                input_ids=torch.ones(3, 1, dtype=torch.long),
                attention_mask=mask,
                past_key_values=cache,
            )
    assert all(layer.keys is buffer for layer, buffer in zip(cache.layers, buffers, strict=True))


def test_decode_goes_through_the_decode_attention_op_when_present(monkeypatch):
    """With sparse_attn.ops.decode_attention present, the compact decode calls it (full buffers,
    lengths, scale) and nothing else; its result is what the model uses."""
    model, inputs = make_model("qwen2"), make_inputs("qwen2", 3)
    enable(model)
    caches = [TopPCache(TopPPolicy(p=0.7, n_probe=8)) for _ in range(2)]
    calls = []

    def op(query, key, value, lengths, *, scale=None, check_lengths=True):
        assert not check_lengths  # the cache's own lengths: no validation round trip
        calls.append((key.shape, lengths.clone()))
        return masked_decode_attention(query, key, value, lengths, scale)

    outputs = []
    for with_op, cache in zip((False, True), caches, strict=True):
        if with_op:
            monkeypatch.setattr(ops, "decode_attention", op, raising=False)
        position_ids = prefill(model, inputs, cache)
        tokens = torch.tensor([[5], [7], [9]])
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], 1)
        with torch.no_grad():
            outputs.append(
                model(
                    input_ids=tokens,
                    attention_mask=mask,
                    past_key_values=cache,
                    position_ids=position_ids[:, -1:] + 1,
                ).logits
            )
    torch.testing.assert_close(outputs[1], outputs[0])
    assert len(calls) == model.config.num_hidden_layers
    for (shape, lengths), layer in zip(calls, caches[1].layers, strict=True):
        assert shape == layer.keys.shape and torch.equal(lengths, layer.lengths)
