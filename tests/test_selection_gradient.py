"""The straight-through keep mask of the replay (SFConfig.selection_gradient): the forward is the
recorded selection exactly, the gradient is the one written down in sf_train/replay.py."""

import pytest
import torch
from test_replay import (
    assert_replay_matches_rollouts,
    left_padded_prompts,
    replayed_logp,
    tiny_qwen2,
)

from sf_train.config import SFConfig
from sf_train.replay import (
    LayerSelection,
    SelectionGradient,
    _completion_attention,
    _sparse_prompt_attention,
    _weighted_completion_attention,
    _weighted_prompt_attention,
    straight_through_keep,
)
from sparse_attn.rules import indices_to_keep_mask


def random_selection(gen, R, L, max_keep):
    """Ascending kept positions per row (-1 after counts), position 0 kept in row 0."""
    counts = torch.randint(1, max_keep + 1, (R,), generator=gen)
    indices = torch.full((R, max_keep), -1, dtype=torch.int32)
    for r in range(R):
        chosen = torch.randperm(L, generator=gen)[: int(counts[r])]
        if r == 0:
            chosen[0] = 0
        chosen = torch.unique(chosen)  # sorted
        indices[r, : len(chosen)] = chosen.to(torch.int32)
        counts[r] = len(chosen)
    return LayerSelection(indices, counts.to(torch.int32))


def test_indices_to_keep_mask(gen):
    R, L = 5, 23
    selection = random_selection(gen, R, L, 9)
    mask = indices_to_keep_mask(selection.indices, L)
    for r in range(R):
        expected = torch.zeros(L, dtype=torch.bool)
        expected[selection.indices[r, : int(selection.counts[r])].long()] = True
        assert torch.equal(mask[r], expected), r
    assert mask[0, 0], "an unused slot (-1) must not clear position 0"


def test_straight_through_keep_value_and_gradient(gen):
    R, L, temperature = 4, 17, 0.7
    scores = torch.rand(R, L, generator=gen, dtype=torch.float64) + 1e-3
    valid = torch.ones(R, L, dtype=torch.bool)
    valid[1, :5] = False  # left padding
    forced = torch.zeros(R, L, dtype=torch.bool)
    forced[:, -2:] = True
    forced[1, 5] = True
    kept = (scores > 0.5) | forced
    kept[3] = forced[3]  # a row where no candidate was kept
    kept &= valid
    scores.requires_grad_(True)
    keep = straight_through_keep(scores, kept, valid, forced, temperature)
    assert torch.equal(keep.detach(), kept.double()), "the value is the recorded selection"

    (grad,) = torch.autograd.grad(keep.sum(), scores)
    candidates = valid & ~forced
    s = scores.detach()
    log_s = s.log()
    for r in range(R):
        kept_c = kept[r] & candidates[r]
        boundary = log_s[r][kept_c].min() if kept_c.any() else log_s[r][candidates[r]].max()
        sig = torch.sigmoid((log_s[r] - boundary) / temperature)
        expected = torch.where(candidates[r], sig * (1 - sig) / (temperature * s[r]), 0.0)
        torch.testing.assert_close(grad[r], expected)
    assert (grad[~candidates] == 0).all() and (grad[candidates] > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_attention_equals_the_compact_replay(gen, dtype):
    B, Hq, Hkv, P, T, D = 3, 4, 2, 19, 5, 16
    q = torch.randn(B, Hq, T, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, P + T, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, P + T, D, generator=gen).to(dtype)
    k[0, :, 3] *= 40  # a dropped key scoring far above the kept ones must not overflow
    selection = random_selection(gen, B, P, 11)
    selection.indices[0, : int(selection.counts[0])] = torch.arange(
        4, 4 + int(selection.counts[0]), dtype=torch.int32
    )
    keep = indices_to_keep_mask(selection.indices, P).float()
    scale = D**-0.5
    compact = _completion_attention(q.float(), k.float(), v.float(), P, selection, scale, 0.0)
    weighted = _weighted_completion_attention(q, k, v, keep, scale)
    assert weighted.dtype == dtype and weighted.shape == (B, T, Hq, D)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(weighted.float(), compact, **tol)


def five_point_difference(loss, keep, b, j, h=1e-5):
    """d loss / d keep[b, j] by the five-point stencil (error O(h^4)): a dropped key may
    outscore the kept ones by far (its exponent is capped at 30), so the loss can curve sharply
    in its weight, and a one-sided step of 1e-6 was seen off by 0.7%."""

    def at(delta):
        bumped = keep.clone()
        bumped[b, j] += delta
        return loss(bumped)

    return (8 * (at(h) - at(-h)) - (at(2 * h) - at(-2 * h))) / (12 * h)


def test_weighted_attention_gradient_in_keep_matches_finite_differences(gen):
    B, Hq, Hkv, P, T, D = 2, 4, 2, 13, 3, 8
    q, k, v = (
        torch.randn(B, h, n, D, generator=gen, dtype=torch.float64)
        for h, n in ((Hq, T), (Hkv, P + T), (Hkv, P + T))
    )
    selection = random_selection(gen, B, P, 6)
    keep = indices_to_keep_mask(selection.indices, P).double().requires_grad_(True)
    w = torch.randn(B, T, Hq, D, generator=gen, dtype=torch.float64)
    loss = lambda m: (_weighted_completion_attention(q, k, v, m, 0.3) * w).sum()
    (grad,) = torch.autograd.grad(loss(keep), keep)
    for b, j in [
        (0, int(torch.nonzero(keep[0] == 0)[0])),
        (1, int(torch.nonzero(keep[1] == 0)[-1])),
        (0, int(selection.indices[0, 0])),
    ]:
        fd = five_point_difference(loss, keep.detach(), b, j)
        assert grad[b, j] == pytest.approx(float(fd), rel=1e-4, abs=1e-8), (
            b,
            j,
            float(grad[b, j]),
            float(fd),
        )
    assert (grad[keep.detach() == 0] != 0).any(), "dropped keys get a gradient"


def padded_selection(gen, B, P, valid, max_keep):
    """Ascending kept positions among each row's valid ones, the row's last position always kept."""
    indices = torch.full((B, max_keep), -1, dtype=torch.int32)
    counts = torch.zeros(B, dtype=torch.int32)
    for b in range(B):
        positions = torch.nonzero(valid[b]).flatten()
        n = int(torch.randint(1, min(max_keep, len(positions)) + 1, (1,), generator=gen))
        chosen = positions[torch.randperm(len(positions), generator=gen)[:n]]
        chosen = torch.unique(torch.cat([chosen, positions[-1:]]))[:max_keep]
        if positions[-1] not in chosen:
            chosen[-1] = positions[-1]
        indices[b, : len(chosen)] = chosen.to(torch.int32)
        counts[b] = len(chosen)
    return LayerSelection(indices, counts, "sparse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (3, 3), (7, 1)])
def test_weighted_prompt_attention_equals_the_sparse_prefill(gen, dtype, Hq, Hkv):
    """In value, the straight-through prompt attention is the sparse prefill on the recorded set:
    causal among T, zero outside it (left padding, GQA, a dropped key scoring far above)."""
    B, P, D = 3, 21, 16
    q = torch.randn(B, Hq, P, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, P, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, P, D, generator=gen).to(dtype)
    valid = torch.ones(B, P, dtype=torch.bool)
    valid[1, :6] = False
    valid[2, :1] = False
    selection = padded_selection(gen, B, P, valid, 13)
    keep = indices_to_keep_mask(selection.indices, P) & valid
    k[0, :, int(torch.nonzero(~keep[0])[0])] *= 40
    mask = valid[:, None, None, :] & torch.ones(P, P, dtype=torch.bool).tril()
    sparse = _sparse_prompt_attention(
        None, q.float(), k.float(), v.float(), mask, valid, selection, D**-0.5, 0.0
    )
    weighted = _weighted_prompt_attention(q, k, v, keep.float(), D**-0.5)
    assert weighted.dtype == dtype and weighted.shape == (B, P, Hq, D)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(weighted.float(), sparse, **tol)
    assert (weighted[~keep] == 0).all(), "a position outside T gets a zero output"


def test_weighted_prompt_attention_gradient_in_keep_matches_finite_differences(gen):
    B, Hq, Hkv, P, D = 2, 4, 2, 15, 8
    q = torch.randn(B, Hq, P, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, P, D, generator=gen, dtype=torch.float64) for _ in range(2))
    valid = torch.ones(B, P, dtype=torch.bool)
    selection = padded_selection(gen, B, P, valid, 7)
    keep = indices_to_keep_mask(selection.indices, P)
    keep[:, 0] = True  # the first token (keep_first): every position sees a kept key
    keep = keep.double().requires_grad_(True)
    w = torch.randn(B, P, Hq, D, generator=gen, dtype=torch.float64)
    loss = lambda m: (_weighted_prompt_attention(q, k, v, m, 0.3) * w).sum()
    (grad,) = torch.autograd.grad(loss(keep), keep)
    dropped = torch.nonzero(keep[0] == 0).flatten()
    for b, j in [(0, int(dropped[0])), (0, int(dropped[-1])), (1, int(selection.indices[1, 0]))]:
        fd = five_point_difference(loss, keep.detach(), b, j)
        assert grad[b, j] == pytest.approx(float(fd), rel=1e-4, abs=1e-8), (
            b,
            j,
            float(grad[b, j]),
            float(fd),
        )
    assert (grad[keep.detach() == 0] != 0).any(), "dropped positions get a gradient"


def autograd_weighted_softmax(folded, key, value, weights, scale):
    """The key-weighted softmax attention written with autograd's ops: the definition the
    replay's hand-written backward must reproduce."""
    logits = scale * folded @ key.transpose(-1, -2)
    shift = logits.detach().masked_fill(weights.detach() == 0, float("-inf")).amax(-1, keepdim=True)
    sees = torch.isfinite(shift)
    shift = torch.where(sees, shift, 0.0)
    e = torch.exp((logits - shift).clamp(max=30.0)) * weights
    total = torch.where(sees, e.sum(-1, keepdim=True), 1.0)
    return torch.where(sees, e @ value / total, 0.0)


@pytest.mark.parametrize("where", ["prompt", "completion"])
def test_hand_written_backward_equals_autograd(gen, where):
    """Values and gradients in the queries, keys, values and keep of the replay's weighted
    attention equal autograd over the plain formula: GQA, a row that sees no kept key, a dropped
    key scoring far above the kept ones (its exponent capped), random upstream gradients."""
    B, Hq, Hkv, P, T, D = 3, 6, 2, 17, 3, 8
    f64 = dict(generator=gen, dtype=torch.float64)
    S = P if where == "prompt" else P + T
    M = P if where == "prompt" else T
    q = torch.randn(B, Hq, M, D, **f64)
    k, v = (torch.randn(B, Hkv, S, D, **f64) for _ in range(2))
    keep = (torch.rand(B, P, **f64) < 0.4).double()
    keep[0, :5] = 0.0  # row 0: positions 0-4 see no kept key
    keep[0, 5] = 1.0
    k[1, :, int(torch.nonzero(keep[1] == 0)[0])] *= 60  # a dropped key far above the rest
    w = torch.randn(B, M, Hq, D, **f64)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, keep)]

    def ours(q, k, v, keep):
        if where == "prompt":
            return _weighted_prompt_attention(q, k, v, keep, 0.4)
        return _weighted_completion_attention(q, k, v, keep, 0.4)

    def plain(q, k, v, keep):
        g = Hq // Hkv
        if where == "prompt":
            weights = keep[:, None, None, :] * torch.ones(P, P, dtype=q.dtype).tril()
        else:
            weights = torch.cat(
                [
                    keep[:, None, None, :].expand(B, 1, T, P),
                    torch.ones(T, T).tril().expand(B, 1, T, T),
                ],
                dim=-1,
            )
        weights = weights.expand(B, Hkv, M, S)[:, :, None].expand(B, Hkv, g, M, S)
        folded = q.reshape(B, Hkv, g * M, D)
        out = autograd_weighted_softmax(folded, k, v, weights.reshape(B, Hkv, g * M, S), 0.4)
        out = out.view(B, Hq, M, D)
        if where == "prompt":
            out = out * keep[:, None, :, None]
        return out.transpose(1, 2)

    mine = ours(*leaves)
    grads = torch.autograd.grad((mine * w).sum(), leaves)
    fresh = [t.clone().requires_grad_(True) for t in (q, k, v, keep)]
    expected = plain(*fresh)
    expected_grads = torch.autograd.grad((expected * w).sum(), fresh)
    torch.testing.assert_close(mine, expected, rtol=1e-10, atol=1e-12)
    for name, got, want in zip("qkv", grads[:3], expected_grads[:3]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=name)
    torch.testing.assert_close(grads[3], expected_grads[3], rtol=1e-9, atol=1e-11)
    assert (grads[3][keep == 0] != 0).any(), "dropped keys get a gradient"
    if where == "prompt":
        assert (mine[0, :5] == 0).all() and (grads[0][0, :, :5] == 0).all()


def pruned_rollout(max_new_tokens, prefill="sparse"):
    """(tiny Qwen2, its prompts, one rollout group at p = 0.6 that really prunes)."""
    from sf_train.rollout import rollout
    from sparse_attn.attention import enable
    from sparse_attn.policy import TopPPolicy

    model, inputs = tiny_qwen2(), left_padded_prompts([40, 27, 33])
    enable(model)
    policy = TopPPolicy(p=0.6, n_probe=8, keep_first=1, keep_last=2, prefill=prefill)
    group = rollout(
        model,
        inputs,
        policy,
        max_new_tokens=max_new_tokens,
        eos_token_id=1,
        pad_token_id=0,
        temperature=1.0,
    )
    assert float(group.token_ratio.max()) < 0.9
    return model, inputs, group


@pytest.mark.parametrize("prefill", ["sparse", "dense"])
def test_first_answer_token_reaches_the_selection_only_under_the_sparse_prefill(prefill):
    """The first completion token comes out of the prefill: under prefill="sparse" it read only
    the kept tokens, so the straight-through mask gives its log-prob a gradient in the probes'
    attention; under "dense" it read every token, and the mask changes no gradient of it."""
    model, inputs, group = pruned_rollout(1, prefill)
    grads = {}
    for name, gradient in (("off", None), ("on", SelectionGradient(8, 1, 2))):
        model.zero_grad()
        logp, logp_old, mask = replayed_logp(
            model, inputs, [group], 1.0, gradient=gradient, no_grad=False
        )
        torch.testing.assert_close(logp[:, 0], logp_old[:, 0], rtol=0, atol=2e-5)
        logp[:, 0].sum().backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    name_q = "model.layers.1.self_attn.q_proj.weight"
    if prefill == "sparse":
        assert not torch.allclose(grads["on"][name_q], grads["off"][name_q])
    else:
        torch.testing.assert_close(grads["on"][name_q], grads["off"][name_q])


def test_replay_with_selection_gradient_reproduces_rollout_logprobs():
    gradient = SelectionGradient(n_probe=8, keep_first=1, keep_last=2, temperature=1.0)
    assert_replay_matches_rollouts(
        tiny_qwen2(),
        left_padded_prompts([40, 27, 33]),
        "layer",
        1,
        0,
        gradient=gradient,
        n_probe=8,
        keep_first=1,
        keep_last=2,
    )


def test_selection_gradient_reaches_the_probe_attention():
    """The completion log-probs' gradient in the weights changes with the straight-through mask
    (through the probes' queries and keys), not in the output head, whose inputs are unchanged."""
    model, inputs, group = pruned_rollout(4)
    grads = {}
    for name, gradient in (("off", None), ("on", SelectionGradient(8, 1, 2))):
        model.zero_grad()
        logp, _, mask = replayed_logp(model, inputs, [group], 1.0, gradient=gradient, no_grad=False)
        (logp * mask).sum().backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    name_q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(grads["on"][name_q], grads["off"][name_q]), (
        "probe queries get the new term"
    )
    torch.testing.assert_close(grads["on"]["lm_head.weight"], grads["off"]["lm_head.weight"])


def test_config_checks():
    with pytest.raises(ValueError, match="selection_gradient needs granularity='layer'"):
        SFConfig(selection_gradient=True, granularity="kv_head")
    with pytest.raises(ValueError, match="selection_gradient_temperature"):
        SFConfig(selection_gradient_temperature=0.0)
    assert SFConfig().replay_gradient() is None
    assert SFConfig(selection_gradient=True, n_probe=5).replay_gradient() == SelectionGradient(
        5, 4, 16, 1.0
    )


def test_trainer_step_with_selection_gradient(tmp_path):
    from toy_task import toy_model, toy_task

    from sf_train.trainer import SparsityForcingTrainer

    weights = {}
    for on in (False, True):
        torch.manual_seed(0)
        config = SFConfig(
            out_dir=str(tmp_path / str(on)),
            steps=1,
            prompts_per_step=4,
            p_grid=(0.5, 0.7, 0.9, 0.975),
            max_new_tokens=3,
            n_probe=4,
            keep_first=1,
            keep_last=2,
            lr=1e-3,
            beta=0.1,
            selection_gradient=on,
        )
        trainer = SparsityForcingTrainer(config, toy_model(), toy_model(), toy_task())
        (metrics,) = trainer.train(progress=False)
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
        weights[on] = torch.cat([p.detach().flatten() for p in trainer.policy.parameters()])
    assert not torch.allclose(weights[False], weights[True])


def test_leaked_answer_mass_is_the_last_positions_dense_mass_outside_the_kept_set():
    from sf_train.replay import leaked_answer_mass
    from sparse_attn.cache import PromptSelection

    torch.manual_seed(0)
    B, Hq, Hkv, P, D = 3, 4, 2, 9, 8
    query = torch.randn(B, Hq, P, D, requires_grad=True)
    key = torch.randn(B, Hkv, P, D, requires_grad=True)
    valid = torch.ones(B, P, dtype=torch.bool)
    valid[2, :3] = False  # left padding
    indices = torch.tensor([[0, 4, 8, -1], [1, 2, 3, 8], [3, 8, -1, -1]])
    selection = PromptSelection(indices, torch.tensor([3, 4, 2]), "sparse")
    leak = leaked_answer_mass(query, key, valid, selection, 0.5)
    expected = torch.zeros(B)
    for b in range(B):
        kept = set(indices[b][indices[b] >= 0].tolist())
        for h in range(Hq):
            logits = 0.5 * key[b, h // 2] @ query[b, h, -1]
            probs = logits.masked_fill(~valid[b], float("-inf")).softmax(-1)
            expected[b] += sum(probs[j] for j in range(P) if valid[b, j] and j not in kept) / Hq
    torch.testing.assert_close(leak, expected)
    leak.sum().backward()
    assert query.grad[:, :, -1].abs().sum() > 0 and query.grad[:, :, :-1].abs().sum() == 0
    everything = PromptSelection(torch.arange(P).repeat(B, 1), torch.full((B,), P), "sparse")
    assert torch.equal(leaked_answer_mass(query, key, valid, everything, 0.5), torch.zeros(B))
    with pytest.raises(ValueError, match="granularity"):
        SFConfig(leak_weight=1.0, granularity="kv_head")
    with pytest.raises(ValueError, match="leak_weight"):
        SFConfig(leak_weight=-1.0)


def test_keep_mask_gives_non_candidates_no_gradient(gen):
    """TopPPolicy(prune="visual"): the text tokens are forced, so only the visual ones (the
    candidates) get the straight-through gradient."""
    from sf_train.replay import _layer_keep
    from sparse_attn.reference import cumulative_scores, topp_select

    B, Hq, Hkv, P, D = 3, 4, 2, 19, 8
    query = torch.randn(B, Hq, P, D, generator=gen, dtype=torch.float64).requires_grad_()
    key = torch.randn(B, Hkv, P, D, generator=gen, dtype=torch.float64)
    valid = torch.ones(B, P, dtype=torch.bool)
    valid[2, :4] = False
    candidates = torch.zeros(B, P, dtype=torch.bool)
    candidates[:, 6:15] = True  # the "image"
    gradient = SelectionGradient(n_probe=3, keep_first=1, keep_last=2)
    scores = cumulative_scores(query[:, :, -3:].detach(), key, scale=D**-0.5, key_mask=valid)
    indices, counts = topp_select(
        scores.sum(1), 0.8, valid_mask=valid, keep_first=1, keep_last=2, candidate_mask=candidates
    )
    selection = LayerSelection(indices, counts)
    for mask, gets_gradient in ((candidates, candidates), (None, valid)):
        keep = _layer_keep(query, key, valid, selection, D**-0.5, gradient, mask)
        assert torch.equal(keep.detach(), indices_to_keep_mask(indices, P).double() * valid)
        rows = []
        for t in range(P):  # which positions' keep weight depends on the weights
            (g,) = torch.autograd.grad(keep[:, t].sum(), query, retain_graph=True)
            rows.append(g.abs().sum(dim=(1, 2, 3)) > 0)
        has_gradient = torch.stack(rows, 1)
        forced = torch.zeros(B, P, dtype=torch.bool)
        for b in range(B):
            first = int((~valid[b]).sum())
            forced[b, first] = forced[b, -2:] = True
        assert not (has_gradient & ~gets_gradient).any()
        assert torch.equal(has_gradient, gets_gradient & valid & ~forced), mask is None
