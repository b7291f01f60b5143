"""Nothing silently wrong: non-finite attention, sliding-window models, models the attention
function cannot serve, misused arguments, a cache moved between models, empty rows, and a clean
install (docs/limits.md). Tiny random-init models, CPU, no downloads."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from test_cache import TEXT, generate, make_inputs, make_model

import sparse_attn
import sparse_attn.reference as ref
from sparse_attn.attention import enable
from sparse_attn.cache import TopPCache
from sparse_attn.policy import TopPPolicy

ROOT = Path(__file__).resolve().parents[1]

# --- non-finite logits: cumulative_scores poisons the row as the reference softmax does ----------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
B, HQ, HKV, LQ, LK, D = 2, 4, 2, 5, 70, 16  # LK > 64: rows end inside the second key tile


def _set_nonfinite(case: str, q: torch.Tensor, k: torch.Tensor) -> None:
    nan, inf = float("nan"), float("inf")
    if case == "nan_q":  # one probe's logits all NaN (was: zero mass on CPU)
        q[0, 1, 2, 3] = nan
    elif case == "nan_k":  # one key NaN for every probe of a group
        k[1, 0, 7, 5] = nan
    elif case == "nan_k_alone_in_tile":  # key 64 is the only key of its tile probe 0 sees
        k[0, 1, 64, 0] = nan
    elif case == "inf_q":  # +-inf logits, +inf max
        q[0, 3, 4, 0] = inf
    elif case == "inf_k":
        k[1, 1, 30, 2] = inf
    elif case == "neg_inf_row":  # every logit of one probe is -inf (softmax: NaN)
        k[1, 1, :, 0] = k[1, 1, :, 0].abs() + 0.1
        q[1, 2, 1, 0] = -inf
    elif case == "neg_inf_key":  # one key at -inf among finite ones: zero mass there, no NaN
        q[0, 0:2, :, 0] = q[0, 0:2, :, 0].abs() + 0.1
        k[0, 0, 10, 0] = -inf
    else:
        raise AssertionError(case)


def _expected_nan(q, k, causal, key_mask):
    """bool [B, Hkv, Lk]: keys seen by a probe whose softmax row is NaN (plain torch)."""
    g = q.shape[1] // k.shape[1]
    logits = D**-0.5 * torch.einsum("bhid,bhjd->bhij", q.float(), k.float().repeat_interleave(g, 1))
    visible = ref.probe_visibility(LQ, LK, causal)[None, None] & key_mask[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    poisoned = probs.isnan().any(-1, keepdim=True) & visible.any(-1, keepdim=True)
    return (poisoned & visible).view(B, HKV, g, LQ, LK).any(dim=(2, 3))


@pytest.mark.parametrize(
    "case",
    ["nan_q", "nan_k", "nan_k_alone_in_tile", "inf_q", "inf_k", "neg_inf_row", "neg_inf_key"],
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_nonfinite_logits_poison_rows_like_the_reference(device, gen, case, dtype, causal):
    q = torch.randn(B, HQ, LQ, D, generator=gen).to(dtype)
    k = torch.randn(B, HKV, LK, D, generator=gen).to(dtype)
    _set_nonfinite(case, q, k)
    key_mask = torch.ones(B, LK, dtype=torch.bool)
    key_mask[1, :3] = False  # left padding in row 1
    out = sparse_attn.cumulative_scores(
        q.to(device), k.to(device), causal=causal, key_mask=key_mask.to(device)
    ).cpu()
    expect = ref.cumulative_scores(q, k, causal=causal, key_mask=key_mask)
    nan_at = _expected_nan(q, k, causal, key_mask)
    # The reference makes a poisoned group's whole row NaN; the op, the keys the poisoned probes
    # see (padding may differ: it is never read). Both agree on which rows are poisoned.
    assert torch.equal(expect.isnan().any(-1), nan_at.any(-1))
    valid = key_mask[:, None, :].expand_as(out)
    assert torch.equal(out.isnan() & valid, nan_at & valid), case
    if case == "neg_inf_key":
        assert not nan_at.any() and out[0, 0, 10] == 0
    assert torch.isfinite(out[valid & ~nan_at]).all()
    clean = valid & ~nan_at.any(-1, keepdim=True)  # rows no poisoned probe touches
    torch.testing.assert_close(out[clean], expect[clean], rtol=1e-4, atol=1e-5 * (HQ // HKV) * LQ)


def _poison_layer(model, layer: int, how: str):
    attn = model.model.layers[layer].self_attn
    with torch.no_grad():
        if how == "nan_key":
            attn.k_proj.weight[0, 0] = float("nan")
        elif how == "fp32_overflow_query":
            attn.q_proj.weight[0].fill_(1e38)
        elif how == "bf16_overflow_key":
            model.to(torch.bfloat16)
            attn.k_proj.weight[0].fill_(3e38)
        else:
            raise AssertionError(how)
    return model


@pytest.mark.parametrize("how", ["nan_key", "fp32_overflow_query", "bf16_overflow_key"])
@pytest.mark.parametrize(
    "policy",
    [
        TopPPolicy(p=0.9, n_probe=8),
        TopPPolicy(p=1.0),
        TopPPolicy(p=0.9, granularity="kv_head"),
        TopPPolicy(rule="top_k", keep_ratio=0.5),
    ],
    ids=["top_p", "p1", "kv_head", "top_k"],
)
def test_nonfinite_layer_is_an_error_naming_the_layer(how, policy):
    # Before: NaN keys became zero mass and the layer silently kept only keep_first + keep_last.
    model = enable(_poison_layer(make_model("llama"), 1, how), policy)
    with pytest.raises(RuntimeError, match="TopPCache layer 1: .*NaN or inf"):
        generate(model, make_inputs("llama", 2), TopPCache(policy))


def test_nonfinite_scores_on_reselection_name_the_layer():
    policy = TopPPolicy(p=0.9, n_probe=4, reselect_every=2)
    model = enable(make_model("llama"), policy)
    cache = TopPCache(policy)
    attn = model.model.layers[0].self_attn
    calls = []

    def poison_decode_queries(module, args, kwargs):  # the decoded tokens' keys become NaN
        calls.append(1)
        if len(calls) > 1:  # after the prefill
            kwargs["hidden_states"] = torch.full_like(kwargs["hidden_states"], float("nan"))
        return args, kwargs

    handle = attn.register_forward_pre_hook(poison_decode_queries, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="TopPCache layer 0: .*NaN or inf"):
            generate(model, make_inputs("llama", 1), cache)
    finally:
        handle.remove()
