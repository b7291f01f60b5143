import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from selection import assert_selection_equivalent, kept_sets

import sparse_attn
import sparse_attn.reference as ref


def make_scores(kind: str, R: int, L: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "uniform":
        return torch.rand(R, L, generator=gen)
    if kind == "peaked":  # like summed attention rows: a few heavy hitters, a long light tail
        return torch.softmax(8 * torch.randn(R, L, generator=gen), -1) * 64
    if kind == "flat":
        return torch.full((R, L), 0.25)
    if kind == "onehot":
        s = torch.zeros(R, L)
        s[torch.arange(R), torch.randint(L, (R,), generator=gen)] = 1.0
        return s
    if kind == "ties":  # few distinct values, zeros included: the threshold lands on ties
        return torch.randint(0, 4, (R, L), generator=gen).float() / 4
    if kind == "sparse":
        s = torch.rand(R, L, generator=gen)
        return s * (torch.rand(R, L, generator=gen) > 0.8)
    raise ValueError(kind)


KINDS = ["uniform", "peaked", "flat", "onehot", "ties", "sparse"]


@pytest.mark.parametrize("L", [1, 7, 33, 1000, 65537])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(device, gen, L, kind):
    R = 3 if L > 10000 else 6
    scores = make_scores(kind, R, L, gen)
    for p in (0.5, 0.9, 0.975, 1.0):
        idx, cnt = sparse_attn.topp_select(scores.to(device), p)
        assert_selection_equivalent(idx, cnt, scores, p)


@pytest.mark.parametrize("kind", KINDS)
def test_per_row_p(device, gen, kind):
    scores = make_scores(kind, 8, 257, gen)
    p = torch.tensor([0.1, 0.5, 0.9, 0.94, 0.975, 0.999, 1.0, 0.3])
    idx, cnt = sparse_attn.topp_select(scores.to(device), p.to(device))
    assert_selection_equivalent(idx, cnt, scores, p)


def padding_mask(R, L, side, gen):
    lengths = torch.randint(0, L + 1, (R,), generator=gen)
    pos = torch.arange(L)[None, :]
    if side == "left":
        return pos >= (L - lengths)[:, None]
    if side == "right":
        return pos < lengths[:, None]
    return torch.rand(R, L, generator=gen) > 0.3  # arbitrary holes


@pytest.mark.parametrize("side", ["left", "right", "random"])
@pytest.mark.parametrize("kind", ["uniform", "peaked", "ties"])
def test_padding(device, gen, side, kind):
    R, L = 7, 301
    scores = make_scores(kind, R, L, gen)
    valid = padding_mask(R, L, side, gen)
    # Padding may hold garbage (even NaN): it is neither validated, kept, nor counted.
    scores = torch.where(valid, scores, torch.nan)
    for p in (0.8, 0.975, 1.0):
        idx, cnt = sparse_attn.topp_select(scores.to(device), p, valid_mask=valid.to(device))
        assert_selection_equivalent(idx, cnt, scores, p, valid_mask=valid)
        if p == 1.0:
            assert torch.equal(cnt.cpu(), valid.sum(-1).int())


@pytest.mark.parametrize("keep_first,keep_last", [(0, 0), (4, 0), (0, 16), (4, 16), (200, 200)])
@pytest.mark.parametrize("with_candidates", [False, True])
def test_forced_tokens(device, gen, keep_first, keep_last, with_candidates):
    R, L = 6, 333
    scores = make_scores("peaked", R, L, gen)
    valid = padding_mask(R, L, "left", gen)
    cand = torch.rand(R, L, generator=gen) > 0.4 if with_candidates else None
    kw = dict(valid_mask=valid, keep_first=keep_first, keep_last=keep_last, candidate_mask=cand)
    dev_kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    idx, cnt = sparse_attn.topp_select(scores.to(device), 0.9, **dev_kw)
    assert_selection_equivalent(idx, cnt, scores, 0.9, **kw)
    forced = ref.forced_positions(valid, keep_first, keep_last, cand)
    for r, kept in enumerate(kept_sets(idx.cpu(), cnt.cpu())):
        assert set(forced[r].nonzero().flatten().tolist()) <= kept


def test_ties_break_to_lower_positions(device):
    # Mass 1 at position 0, then 8 equal tokens of 1/8: p * total = 0.75 * 2 = 1.5 needs 4 of
    # them beyond position 0; the 4 lowest positions must win.
    scores = torch.tensor([[0.125, 0.125, 1.0, 0.125, 0.125, 0.125, 0.125, 0.125, 0.125]])
    idx, cnt = sparse_attn.topp_select(scores.to(device), 0.75)
    assert cnt.item() == 5
    assert idx[0, :5].tolist() == [0, 1, 2, 3, 4]
    # the same when equal values straddle forced positions
    idx, cnt = sparse_attn.topp_select(scores.to(device), 0.75, keep_first=1)
    assert idx[0, : cnt.item()].tolist() == [0, 1, 2, 3, 4]


def test_exact_threshold_is_reached_not_passed(device):
    # Dyadic scores: every sum is exact, so the minimal set is unambiguous.
    scores = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]])  # total 1
    for p, expect in [
        (0.5, [0]),
        (0.75, [0, 1]),
        (0.7500001, [0, 1, 2]),
        (0.875, [0, 1, 2]),
        (0.9375, [0, 1, 2, 3]),
        (1.0, [0, 1, 2, 3, 4]),
    ]:
        idx, cnt = sparse_attn.topp_select(scores.to(device), p)
        assert idx[0, : cnt.item()].tolist() == expect, p


def test_zero_rows_and_empty(device):
    scores = torch.zeros(3, 10, device=device)
    idx, cnt = sparse_attn.topp_select(scores, 0.9)
    assert cnt.tolist() == [0, 0, 0] and (idx == -1).all()
    idx, cnt = sparse_attn.topp_select(scores, 1.0)
    assert cnt.tolist() == [10, 10, 10]
    idx, cnt = sparse_attn.topp_select(torch.zeros(0, 5, device=device), 0.5)
    assert idx.shape == (0, 5) and cnt.shape == (0,)


def test_non_contiguous_scores(device, gen):
    scores = make_scores("peaked", 50, 8, gen).t()  # [8, 50] view, not contiguous
    idx, cnt = sparse_attn.topp_select(scores.to(device), 0.9)
    assert_selection_equivalent(idx, cnt, scores.contiguous(), 0.9)


# --- properties (hypothesis) -------------------------------------------------------------------

row_values = st.lists(
    st.one_of(st.floats(0, 100, width=32), st.sampled_from([0.0, 0.25, 1.0])),
    min_size=1,
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(
    values=row_values,
    p=st.floats(0.0078125, 1.0, width=32),
    keep_first=st.integers(0, 3),
    keep_last=st.integers(0, 3),
    data=st.data(),
)
def test_minimal_top_p_set_properties(values, p, keep_first, keep_last, data):
    scores = torch.tensor([values], dtype=torch.float32)
    L = scores.shape[1]
    valid = torch.tensor([data.draw(st.lists(st.booleans(), min_size=L, max_size=L))])
    idx, cnt = sparse_attn.topp_select(
        scores, p, valid_mask=valid, keep_first=keep_first, keep_last=keep_last
    )
    assert_selection_equivalent(
        idx, cnt, scores, p, valid_mask=valid, keep_first=keep_first, keep_last=keep_last
    )
    kept = idx[0, : cnt.item()].tolist()
    assert kept == sorted(set(kept)), "ascending and unique"
    assert all(valid[0, j] for j in kept), "padding is never kept"
    s = scores[0].double()
    total = float(s[valid[0]].sum())
    target = float(torch.tensor(p, dtype=torch.float32)) * total
    mass = float(s[kept].sum())
    tol = 2.0**-23 * total
    assert mass >= target - tol, "kept mass reaches p * total"
    forced = ref.forced_positions(valid, keep_first, keep_last, None)[0]
    droppable = [j for j in kept if not forced[j]]
    if droppable and p < 1.0:
        lowest = min(droppable, key=lambda j: (s[j], -j))  # the last one the greedy order took
        assert mass - float(s[lowest]) < target + tol, "dropping the lowest kept token falls below"


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_args,match",
    [
        (lambda s: (s.double(), 0.9), "scores must be float32"),
        (lambda s: (s[0], 0.9), r"scores must be \[R, L\]"),
        (lambda s: (s, 0.0), r"p must be in \(0, 1\]"),
        (lambda s: (s, 1.5), r"p must be in \(0, 1\]"),
        (lambda s: (s, math.nan), r"p must be in \(0, 1\]"),
        (
            lambda s: (s, torch.tensor([0.5, 0.5, 1.01, 0.5], device=s.device)),
            r"p\[2\] = 1.01.* outside \(0, 1\]",
        ),
        (lambda s: (s, torch.tensor([0.5, math.nan, 0.5, 0.5], device=s.device)), r"p\[1\] = nan"),
        (
            lambda s: (s, torch.tensor([0.5, 0.5], device=s.device)),
            r"p as a tensor must have shape \[4\]",
        ),
        (
            lambda s: (s, torch.full((4,), 0.5, dtype=torch.float64, device=s.device)),
            "p as a tensor must be float32",
        ),
        (
            lambda s: (
                s.index_put((torch.tensor([2]), torch.tensor([3])), torch.tensor(math.nan)),
                0.9,
            ),
            r"scores\[2\] contains NaN or inf",
        ),
        (
            lambda s: (
                s.index_put((torch.tensor([1]), torch.tensor([0])), torch.tensor(math.inf)),
                0.9,
            ),
            r"scores\[1\] contains NaN or inf",
        ),
        (
            lambda s: (
                s.index_put((torch.tensor([3]), torch.tensor([5])), torch.tensor(-0.5)),
                0.9,
            ),
            r"scores\[3\] contains a negative value",
        ),
    ],
)
def test_bad_input(device, make_args, match):
    scores = torch.rand(4, 9, device=device)
    with pytest.raises(RuntimeError, match=match):
        sparse_attn.topp_select(*make_args(scores))


@pytest.mark.parametrize(
    "kw,match",
    [
        (
            dict(valid_mask=torch.ones(4, 8, dtype=torch.bool)),
            r"valid_mask must have shape \[4, 9\]",
        ),
        (dict(valid_mask=torch.ones(4, 9)), "valid_mask must be a bool tensor"),
        (dict(candidate_mask=torch.ones(9, dtype=torch.bool)), r"candidate_mask must have shape"),
        (dict(keep_first=-1), "keep_first and keep_last must be >= 0"),
    ],
)
def test_bad_keywords(device, kw, match):
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    with pytest.raises(RuntimeError, match=match):
        sparse_attn.topp_select(torch.rand(4, 9, device=device), 0.9, **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_mismatched_devices():
    with pytest.raises(RuntimeError, match="valid_mask is on cpu but scores is on cuda"):
        sparse_attn.topp_select(
            torch.rand(2, 3, device="cuda"), 0.9, valid_mask=torch.ones(2, 3, dtype=torch.bool)
        )


# --- torch.library integration -----------------------------------------------------------------


def test_opcheck(device, gen):
    scores = make_scores("peaked", 4, 50, gen).to(device)
    valid = padding_mask(4, 50, "left", gen).to(device)
    torch.library.opcheck(torch.ops.sparse_attn.topp_select, (scores, 0.9, None, valid, 2, 3, None))
    p = torch.rand(4, generator=gen).clamp(min=0.05).to(device)
    torch.library.opcheck(torch.ops.sparse_attn.topp_select, (scores, 1.0, p, None, 0, 0, None))


def test_compiles_fullgraph(device, gen):
    scores = make_scores("peaked", 4, 50, gen).to(device)
    compiled = torch.compile(
        lambda s: sparse_attn.topp_select(s, 0.9, keep_first=2), fullgraph=True
    )
    idx, cnt = compiled(scores)
    assert_selection_equivalent(idx, cnt, scores, 0.9, keep_first=2)


def test_negative_zero_scores_are_zero(device):
    # -0.0 passes validation (it is not negative) and must rank with the zeros, not above them
    scores = torch.tensor([[-0.0, 0.25, 0.0, 0.75, -0.0]], device=device)
    idx, cnt = sparse_attn.topp_select(scores, 0.9)
    assert idx[0, : cnt.item()].tolist() == [1, 3]
    idx, cnt = sparse_attn.topp_select(scores, 1.0)
    assert cnt.item() == 5


@pytest.mark.parametrize("kind", ["uniform", "peaked", "ties"])
def test_identical_calls_select_identically(device, gen, kind):
    # The mass sums have a fixed order on every device (docs/gpu.md#topp-select-histograms): a
    # rerun cannot move a token whose inclusion is decided at the level of float rounding.
    scores = make_scores(kind, 4, 40000, gen).to(device)
    p = torch.rand(4, generator=gen).clamp(min=0.5).to(device)
    first = sparse_attn.topp_select(scores, p, keep_first=3)
    for _ in range(5):
        again = sparse_attn.topp_select(scores, p, keep_first=3)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
