"""The baseline selection rules (top_k, threshold, FastV-style layer sharing) of TopPPolicy.

Independent reference: a per-row Python loop over plain lists (sort by (-score, position),
Python float arithmetic). Scores are multiples of 1/4 so every sum is exact and the threshold
rule's mean is the same number in both.
"""

import json
import math
from functools import partial

import pytest
import torch
from test_cache import (
    IMAGE,
    VIDEO,
    budget_rows,
    capture_dense_attention,
    decode_loop,
    generate,
    held_positions,
    make_inputs,
    make_model,
    masked_dense_logits,
    score_rows,
)
from test_replay import assert_replay_matches_rollouts, left_padded_prompts, tiny_qwen2
from toy_task import toy_model, toy_task
from transformers import Qwen2Config, Qwen2ForCausalLM

from sf_train.baselines import compare_rules, plot_rules
from sf_train.config import SFConfig
from sparse_attn import reference
from sparse_attn.attention import enable
from sparse_attn.cache import TopPCache
from sparse_attn.policy import TopPPolicy
from sparse_attn.rules import select_rows, threshold_select, topk_select

RULE_FUNCTIONS = {"top_k": topk_select, "threshold": threshold_select}


def expected_kept(scores, valid, candidate, keep_first, keep_last, rule, knob) -> list[int]:
    """The kept positions of one row (lists), straight from the TopPPolicy docstring."""
    valid_positions = [j for j, v in enumerate(valid) if v]
    forced = set(valid_positions[:keep_first])
    forced |= set(valid_positions[max(len(valid_positions) - keep_last, 0) :] if keep_last else [])
    forced |= {j for j in valid_positions if not candidate[j]}
    candidates = [j for j in valid_positions if j not in forced]
    n = len(candidates)
    if rule == "top_k":
        taken = sorted(candidates, key=lambda j: (-scores[j], j))[: math.ceil(knob * n)]
    else:
        mean = sum(scores[j] for j in candidates) / max(n, 1)
        taken = [j for j in candidates if scores[j] >= knob * mean]
    return sorted(forced | set(taken))


def random_rows(gen, R, L):
    """Scores with many ties (multiples of 1/4, zeros included), ragged left / right padding
    and holes, random visual-candidate masks."""
    scores = torch.randint(0, 9, (R, L), generator=gen).float() / 4
    valid = torch.rand(R, L, generator=gen) > 0.15
    for r in range(R):
        lo, hi = sorted(torch.randint(0, L + 1, (2,), generator=gen).tolist())
        if r % 3 == 0:
            valid[r, :lo] = False  # left padding
        elif r % 3 == 1:
            valid[r, hi:] = False  # right padding
    valid[0] = False  # a row without any token
    scores = torch.where(valid, scores, torch.rand(R, L, generator=gen) * 100)  # padding: ignored
    candidate = torch.rand(R, L, generator=gen) > 0.4
    return scores, valid, candidate


@pytest.mark.parametrize("rule", ["top_k", "threshold"])
@pytest.mark.parametrize("use_candidates", [False, True])
def test_rules_match_the_python_reference(gen, device, rule, use_candidates):
    for _ in range(20):
        R, L = (
            torch.randint(1, 9, (1,), generator=gen).item(),
            torch.randint(1, 70, (1,), generator=gen).item(),
        )
        scores, valid, candidate = random_rows(gen, R, L)
        keep_first, keep_last = torch.randint(0, 5, (2,), generator=gen).tolist()
        if rule == "top_k":
            knob = [1.0, 0.5, 0.3, 1e-3, torch.rand(1, generator=gen).item() or 1.0][_ % 5]
        else:
            knob = [1.0, 0.5, 2.0, 1e-6, 4 * torch.rand(1, generator=gen).item() + 1e-3][_ % 5]
        indices, counts = RULE_FUNCTIONS[rule](
            scores.to(device),
            knob,
            valid_mask=valid.to(device),
            keep_first=keep_first,
            keep_last=keep_last,
            candidate_mask=candidate.to(device) if use_candidates else None,
        )
        indices, counts = indices.cpu(), counts.cpu()
        assert (
            indices.shape == (R, L) and indices.dtype == torch.int32 and counts.dtype == torch.int32
        )
        cand = candidate if use_candidates else torch.ones_like(valid)
        for r in range(R):
            kept = expected_kept(
                scores[r].tolist(),
                valid[r].tolist(),
                cand[r].tolist(),
                keep_first,
                keep_last,
                rule,
                knob,
            )
            assert counts[r] == len(kept), (rule, knob, r)
            assert indices[r].tolist() == kept + [-1] * (L - len(kept)), (rule, knob, r)


def test_top_k_count_is_forced_plus_ceil_of_the_candidates(gen):
    scores = torch.rand(4, 50, generator=gen)
    valid = torch.ones(4, 50, dtype=torch.bool)
    valid[1, :10] = False
    for ratio in (0.1, 0.3, 0.7, 1.0):
        _, counts = topk_select(scores, ratio, valid_mask=valid, keep_first=2, keep_last=3)
        n = valid.sum(-1) - 5
        assert counts.tolist() == [5 + math.ceil(ratio * int(c)) for c in n]


def test_threshold_is_relative_to_uniform_attention():
    """Uniform scores: a threshold <= 1 keeps every candidate, > 1 none; scaling the scores or
    the length changes nothing."""
    for L, mass in ((10, 1.0), (1000, 37.0)):
        scores = torch.full((1, L), mass / L)
        assert threshold_select(scores, 1.0)[1].item() == L
        assert threshold_select(scores, 1.01, keep_first=1)[1].item() == 1
    peaked = torch.tensor([[8.0, 1.0, 1.0, 1.0, 1.0]])  # mean 2.4
    assert threshold_select(peaked, 3.0)[0][0, :1].tolist() == [0]
    assert threshold_select(peaked * 100, 3.0)[1].item() == 1


def test_rules_reject_bad_scores():
    scores = torch.tensor([[1.0, float("nan"), 2.0]])
    for select in RULE_FUNCTIONS.values():
        with pytest.raises(ValueError, match="finite and >= 0"):
            select(scores, 0.5)
        with pytest.raises(ValueError, match="finite and >= 0"):
            select(torch.tensor([[1.0, -1.0]]), 0.5)
        with pytest.raises(ValueError, match="float32"):
            select(scores.double(), 0.5)
        # NaN in padding is never read
        select(scores, 0.5, valid_mask=torch.tensor([[True, False, True]]))


def test_select_rows_dispatches_on_the_rule(gen):
    scores, valid, candidate = random_rows(gen, 5, 40)
    kw = dict(valid_mask=valid, candidate_mask=candidate)
    policy = TopPPolicy(p=0.8, keep_first=1, keep_last=2)
    for got, want in (
        (
            select_rows(policy, scores, **kw),
            reference.topp_select(scores, 0.8, keep_first=1, keep_last=2, **kw),
        ),
        (
            select_rows(
                TopPPolicy(rule="top_k", keep_ratio=0.4, keep_first=1, keep_last=2), scores, **kw
            ),
            topk_select(scores, 0.4, keep_first=1, keep_last=2, **kw),
        ),
        (
            select_rows(
                TopPPolicy(rule="threshold", threshold=1.5, keep_first=1, keep_last=2), scores, **kw
            ),
            threshold_select(scores, 1.5, keep_first=1, keep_last=2, **kw),
        ),
    ):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# --- policy --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(rule="top_q"), "rule"),
        (dict(rule="top_k"), "keep_ratio"),
        (dict(rule="top_k", keep_ratio=0.0), "keep_ratio"),
        (dict(rule="top_k", keep_ratio=1.5), "keep_ratio"),
        (dict(rule="top_k", keep_ratio=True), "keep_ratio"),
        (dict(rule="top_k", keep_ratio="0.5"), "keep_ratio"),
        (dict(rule="top_k", keep_ratio=float("nan")), "keep_ratio"),
        (dict(rule="threshold"), "threshold"),
        (dict(rule="threshold", threshold=0.0), "threshold"),
        (dict(rule="threshold", threshold=-1.0), "threshold"),
        (dict(rule="threshold", threshold=float("inf")), "threshold"),
        (dict(rule="threshold", threshold=float("nan")), "threshold"),
        (dict(keep_ratio=0.5), "keep_ratio"),  # knobs of another rule are not silently ignored
        (dict(rule="top_k", keep_ratio=0.5, threshold=1.0), "threshold"),
        (dict(rule="threshold", threshold=1.0, keep_ratio=0.5), "keep_ratio"),
        (dict(shared_from_layer=-1), "shared_from_layer"),
        (dict(shared_from_layer=True), "shared_from_layer"),
        (dict(shared_from_layer=1.0), "shared_from_layer"),
        (dict(rule="top_k", keep_ratio=0.5, p=0.0), "p"),  # p is ignored by top_k, still checked
    ],
)
def test_policy_rejects_bad_rule_fields(fields, field):
    with pytest.raises(ValueError, match=f"TopPPolicy.{field}"):
        TopPPolicy(**fields)


def test_fastv_policy():
    policy = TopPPolicy.fastv(0.5)
    assert (
        policy.rule,
        policy.keep_ratio,
        policy.n_probe,
        policy.prune,
        policy.shared_from_layer,
    ) == ("top_k", 0.5, 1, "visual", 2)
    # the sparse prefill needs the last prompt position; the dense one forces nothing by position
    assert (policy.keep_first, policy.keep_last, policy.prefill) == (0, 1, "sparse")
    dense = TopPPolicy.fastv(0.5, prefill="dense")
    assert dense.keep_first == dense.keep_last == 0
    assert TopPPolicy.fastv(0.25, layer=5, n_probe=3).n_probe == 3


# --- in the cache --------------------------------------------------------------------------------


def kept_reference(policy, scores, valid, is_visual):
    """int [R] kept counts and bool [R, L] kept positions of one layer from the Python
    reference (R budget rows)."""
    rows = partial(budget_rows, granularity=policy.granularity)
    per_head = lambda mask: rows(mask[:, None].expand(-1, scores.shape[1], -1))  # noqa: E731
    row_scores = score_rows(scores, policy.granularity)
    valid_rows = per_head(valid)
    cand = per_head(is_visual) if policy.prune == "visual" else torch.ones_like(valid_rows)
    knob = policy.keep_ratio if policy.rule == "top_k" else policy.threshold
    held = torch.zeros_like(valid_rows)
    for r in range(row_scores.shape[0]):
        kept = expected_kept(
            row_scores[r].double().tolist(),
            valid_rows[r].tolist(),
            cand[r].tolist(),
            policy.keep_first,
            policy.keep_last,
            policy.rule,
            knob,
        )
        held[r, kept] = True
    return held.sum(-1), held


POLICIES = [
    # The references score the queries and keys of a dense prefill: prefill="dense" (the sparse
    # prefill runs every rule through tests/test_sparse_prefill.py).
    (
        "qwen2",
        TopPPolicy(
            rule="top_k", keep_ratio=0.3, n_probe=8, keep_first=2, keep_last=3, prefill="dense"
        ),
    ),
    (
        "qwen2",
        TopPPolicy(
            rule="top_k",
            keep_ratio=0.45,
            n_probe=4,
            keep_first=1,
            keep_last=1,
            granularity="kv_head",
            prefill="dense",
        ),
    ),
    (
        "qwen2",
        TopPPolicy(
            rule="threshold", threshold=1.5, n_probe=8, keep_first=2, keep_last=3, prefill="dense"
        ),
    ),
    (
        "llama",
        TopPPolicy(
            rule="threshold",
            threshold=0.8,
            n_probe=16,
            keep_first=0,
            keep_last=0,
            granularity="kv_head",
            prefill="dense",
        ),
    ),
    (
        "qwen2_5_vl",
        TopPPolicy(
            rule="top_k",
            keep_ratio=0.25,
            n_probe=4,
            keep_first=1,
            keep_last=2,
            prune="visual",
            prefill="dense",
        ),
    ),
    (
        "qwen2_5_vl",
        TopPPolicy(
            rule="threshold",
            threshold=2.0,
            n_probe=4,
            keep_first=1,
            keep_last=2,
            prune="visual",
            granularity="kv_head",
            prefill="dense",
        ),
    ),
]


@pytest.mark.parametrize("family, policy", POLICIES)
def test_generate_keeps_what_the_rule_says(family, policy):
    """generate() runs with each rule; every layer holds the reference's positions (scored from
    a dense run's queries and keys), and the stats count them."""
    model, inputs = make_model(family), make_inputs(family, 3)
    captured = capture_dense_attention(model, inputs)
    cache = TopPCache(policy, reserve=2)
    tokens = generate(enable(model, policy), inputs, cache)
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + 8
    valid = inputs["attention_mask"].bool()
    is_visual = torch.isin(inputs["input_ids"], torch.tensor([IMAGE, VIDEO]))
    L = valid.shape[1]
    rows = partial(budget_rows, granularity=policy.granularity)
    assert [s.layer_idx for s in cache.selections] == sorted(captured)
    for selection in cache.selections:
        query, key, scale = captured[selection.layer_idx]
        scores = reference.cumulative_scores(
            query[:, :, -policy.n_probe :], key, scale=scale, key_mask=valid
        )
        counts, expected_held = kept_reference(policy, scores, valid, is_visual)
        held = held_positions(cache.layers[selection.layer_idx], L + 7)  # 7 decoded tokens
        assert held[..., L:].all()
        held = held[..., :L]
        assert torch.equal(rows(held), expected_held)
        assert torch.equal(rows(selection.kept), counts)
        assert torch.equal(selection.existed, valid.sum(-1))
        if policy.rule == "top_k":  # exactly forced + ceil(ratio * n) per row
            forced = (
                rows(valid[:, None].expand_as(held) & ~is_visual[:, None])
                if policy.prune == "visual"
                else torch.zeros_like(rows(held))
            )
            n_valid = rows(valid[:, None].expand_as(held)).sum(-1)
            ends = torch.arange(L) - (L - n_valid[:, None])  # rank among the valid (left padding)
            forced |= rows(valid[:, None].expand_as(held)) & (
                (ends < policy.keep_first) | (ends >= n_valid[:, None] - policy.keep_last)
            )
            n = rows(valid[:, None].expand_as(held)).sum(-1) - forced.sum(-1)
            assert counts.tolist() == [
                int(f) + math.ceil(policy.keep_ratio * int(c)) for f, c in zip(forced.sum(-1), n)
            ]
    ratios = [
        float((rows(s.kept) / rows(s.existed[:, None].expand_as(s.kept))).mean())
        for s in cache.selections
    ]
    assert cache.layer_ratios == pytest.approx(ratios)
    assert cache.token_ratio < 0.9


def deep_qwen2(layers: int):
    from test_cache import SHARPEN_QK, TEXT

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**dict(TEXT, num_hidden_layers=layers))).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(SHARPEN_QK)
    return model


@pytest.mark.parametrize("granularity", ["layer", "kv_head"])
@pytest.mark.parametrize(
    "rule", [dict(rule="top_k", keep_ratio=0.3), dict(rule="threshold", threshold=1.2), dict(p=0.6)]
)
def test_shared_from_layer(rule, granularity):
    """Layers < K keep every token, layer K selects with the rule, layers > K hold exactly layer
    K's positions."""
    model, inputs = deep_qwen2(4), make_inputs("qwen2", 3)
    policy = TopPPolicy(
        **rule,
        n_probe=4,
        keep_first=1,
        keep_last=1,
        granularity=granularity,
        shared_from_layer=2,
        prefill="dense",
    )  # layer 2's reference scores a dense prefill
    captured = capture_dense_attention(model, inputs)
    cache = TopPCache(policy)
    with torch.no_grad():
        enable(model, policy)(**inputs, past_key_values=cache)
    L = inputs["input_ids"].shape[1]
    valid = inputs["attention_mask"].bool()
    held = [held_positions(layer, L) for layer in cache.layers]
    assert cache.shared_layer() == 2 and len(cache.selections) == 4
    for layer_idx in (0, 1):
        assert torch.equal(held[layer_idx], valid[:, None].expand_as(held[layer_idx]))
    assert cache.layer_ratios[:2] == [1.0, 1.0]
    assert cache.layer_ratios[2] < 0.9
    assert torch.equal(held[3], held[2]) and cache.layer_ratios[3] == cache.layer_ratios[2]
    if "rule" in rule:  # layer 2 keeps what the rule says on its own scores
        query, key, scale = captured[2]
        scores = reference.cumulative_scores(
            query[:, :, -policy.n_probe :], key, scale=scale, key_mask=valid
        )
        _, expected = kept_reference(policy, scores, valid, torch.zeros_like(valid))
        assert torch.equal(budget_rows(held[2], granularity), expected)


@pytest.mark.parametrize("K", [2, 7])
def test_shared_from_layer_is_clipped_to_the_last_layer(K):
    model, inputs = make_model("qwen2"), make_inputs("qwen2", 3)  # 2 layers
    cache = TopPCache(
        TopPPolicy(
            rule="top_k", keep_ratio=0.2, n_probe=4, keep_first=1, keep_last=1, shared_from_layer=K
        )
    )
    with torch.no_grad():
        enable(model)(**inputs, past_key_values=cache)
    assert cache.shared_layer() == 1
    assert cache.layer_ratios[0] == 1.0 and cache.layer_ratios[1] < 0.6


def test_fastv_on_qwen2_5_vl():
    """FastV (K = 2, clipped to layer 1 here): layer 0 keeps everything, layer 1 the text plus
    ceil(ratio * visual) image tokens chosen by the last prompt token."""
    model, inputs = make_model("qwen2_5_vl"), make_inputs("qwen2_5_vl", 3)
    policy = TopPPolicy.fastv(0.25)
    cache = TopPCache(policy)
    generate(enable(model, policy), inputs, cache)
    valid = inputs["attention_mask"].bool()
    is_visual = torch.isin(inputs["input_ids"], torch.tensor([IMAGE, VIDEO]))
    first, second = cache.selections
    assert torch.equal(first.kept[:, 0], valid.sum(-1))
    expected = (valid & ~is_visual).sum(-1) + math.ceil(0.25 * int(is_visual[0].sum()))
    assert torch.equal(second.kept[:, 0], expected)
    assert cache.visual_token_ratio == pytest.approx((1 + 0.25) / 2)


def test_decode_with_shared_layers_and_reselection_equals_masked_dense():
    """Decode logits with FastV-style sharing and reselections equal a dense forward with each
    layer's dropped tokens masked; after each reselection layers > K hold layer K's positions."""
    model, inputs = deep_qwen2(3), make_inputs("qwen2", 3)
    policy = TopPPolicy(
        rule="threshold",
        threshold=1.0,
        n_probe=3,
        keep_first=1,
        keep_last=1,
        shared_from_layer=1,
        reselect_every=2,
        prefill="dense",
    )  # dense prompt in the reference
    cache = TopPCache(policy, reserve=2)
    input_ids, position_ids, logits, visible = decode_loop(
        enable(model), inputs, cache, [1, 3, 1, 1, 2]
    )
    expected = masked_dense_logits(
        model, input_ids, position_ids, inputs["attention_mask"], visible
    )
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    total = input_ids.shape[1] - 1
    held = [held_positions(layer, total) for layer in cache.layers]
    assert torch.equal(held[2], held[1])
    assert held[0].sum() > held[1].sum()
    assert len(cache.selections) > 3  # reselections ran
    for s in cache.selections:
        if s.layer_idx == 0:
            assert torch.equal(s.kept[:, 0], s.existed)


@pytest.mark.parametrize(
    "policy_kw",
    [
        dict(rule="top_k", keep_ratio=0.4),
        dict(rule="threshold", threshold=3.0, shared_from_layer=1),
    ],
)
def test_replay_reproduces_baseline_rollouts(policy_kw):
    assert_replay_matches_rollouts(
        tiny_qwen2(),
        left_padded_prompts([40, 27, 33]),
        "layer",
        1,
        0,
        n_probe=8,
        keep_first=1,
        keep_last=2,
        **policy_kw,
    )


# --- sf_train.baselines ----------------------------------------------------------------------------


def test_compare_rules_matches_the_token_ratio(tmp_path):
    """On a text-only toy task (FastV needs visual tokens: skipped): every rule is tuned to
    top-p's calibration token ratio, evaluated, and plotted."""
    torch.manual_seed(0)
    config = SFConfig(
        n_probe=4, keep_first=1, keep_last=2, max_new_tokens=2, deploy_p=0.8, p_grid=(0.7, 0.8)
    )
    report = compare_rules(toy_model(), toy_task(), config, samples=4, calibration=4)
    assert set(report["rules"]) == {"top_p", "top_k", "threshold"}
    target = report["target_ratio"]
    assert target < 0.95 and report["rules"]["top_p"]["matched"]["calibration_ratio"] == target
    for name, rule in report["rules"].items():
        matched = rule["matched"]
        assert abs(matched["calibration_ratio"] - target) < 0.05, name
        assert rule["policy"]["rule"] == name and rule["policy"][rule["knob"]] == matched["knob"]
        assert len(rule["curve"]) >= 5 and matched["knob"] in [c["knob"] for c in rule["curve"]]
        assert 0.0 <= matched["accuracy"] <= 1.0
        ratios = [c["token_ratio"] for c in rule["curve"]]
        assert ratios == sorted(ratios) and len(set(ratios)) > 1
    json.dumps(report)
    plot_rules({"before": report, "after": report}, tmp_path / "rules.png")
    assert (tmp_path / "rules.png").stat().st_size > 0
