import pytest
import torch

import sparse_attn
import sparse_attn.reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def random_selection(R, L, gen, keep=0.3):
    """indices/counts like topp_select's: random ascending kept positions, -1 after."""
    scores = torch.rand(R, L, generator=gen)
    return sparse_attn.topp_select(scores * (torch.rand(R, L, generator=gen) < keep), 0.9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("D", [1, 3, 64, 128])
def test_gather_matches_reference(device, gen, dtype, per_head, D):
    B, H, L = 3, 4, 77
    k = torch.randn(B, H, L, D, generator=gen).to(dtype)
    v = torch.randn(B, H, L, D, generator=gen).to(dtype)
    idx, cnt = random_selection(B * H if per_head else B, L, gen)
    for capacity in (None, int(cnt.max()) + 5):
        out = sparse_attn.gather_kv(
            k.to(device), v.to(device), idx.to(device), cnt.to(device), capacity=capacity
        )
        expect = ref.gather_kv(k, v, idx, cnt, capacity=capacity)
        for o, e in zip(out, expect):
            assert o.shape == e.shape and o.dtype == dtype
            assert torch.equal(o.cpu(), e), "gather is a copy: bit-exact"


def test_gather_odd_lengths_and_empty_rows(device, gen):
    B, H, L, D = 2, 3, 1, 8
    k, v = torch.randn(2, B, H, L, D, generator=gen)
    idx = torch.tensor([[0], [-1]], dtype=torch.int32)
    cnt = torch.tensor([1, 0], dtype=torch.int32)
    ko, vo = sparse_attn.gather_kv(
        k.to(device), v.to(device), idx.to(device), cnt.to(device), capacity=3
    )
    assert (
        torch.equal(ko[0, :, 0].cpu(), k[0, :, 0])
        and (ko[0, :, 1:] == 0).all()
        and (ko[1] == 0).all()
    )
    ko, _ = sparse_attn.gather_kv(
        k.to(device), v.to(device), idx.to(device), torch.zeros(2, dtype=torch.int32, device=device)
    )
    assert ko.shape == (B, H, 0, D)


def test_gather_non_contiguous(device, gen):
    k = torch.randn(2, 40, 3, 16, generator=gen).transpose(1, 2)  # [B, H, L, D] view
    v = torch.randn(2, 40, 3, 16, generator=gen).transpose(1, 2)
    idx, cnt = random_selection(2, 40, gen)
    out = sparse_attn.gather_kv(k.to(device), v.to(device), idx.to(device), cnt.to(device))
    for o, e in zip(out, ref.gather_kv(k, v, idx, cnt)):
        assert torch.equal(o.cpu(), e)


@pytest.mark.parametrize("per_head", [False, True])
def test_gather_gradcheck(per_head, gen):
    B, H, L, D = 2, 3, 11, 5
    k = torch.randn(B, H, L, D, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, H, L, D, generator=gen, dtype=torch.float64, requires_grad=True)
    idx, cnt = random_selection(B * H if per_head else B, L, gen, keep=0.5)
    fn = lambda k, v: sparse_attn.gather_kv(k, v, idx, cnt, capacity=L)
    assert torch.autograd.gradcheck(fn, (k, v))


def test_gather_backward_matches_reference(device, gen):
    B, H, L, D = 2, 4, 50, 16
    k = torch.randn(B, H, L, D, generator=gen)
    v = torch.randn(B, H, L, D, generator=gen)
    idx, cnt = random_selection(B * H, L, gen)
    grads = []
    for fn, dev in ((sparse_attn.gather_kv, device), (ref.gather_kv, torch.device("cpu"))):
        kk, vv = k.to(dev).requires_grad_(), v.to(dev).requires_grad_()
        ko, vo = fn(kk, vv, idx.to(dev), cnt.to(dev), capacity=40)
        (ko.square().sum() + 3 * vo.sum()).backward()
        grads.append((kk.grad.cpu(), vv.grad.cpu()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_head", [False, True])
def test_scatter_matches_reference(device, gen, dtype, per_head):
    B, H, C, D, T = 3, 2, 20, 8, 4
    cache_k = torch.randn(B, H, C, D, generator=gen).to(dtype)
    cache_v = torch.randn(B, H, C, D, generator=gen).to(dtype)
    k = torch.randn(B, H, T, D, generator=gen).to(dtype)
    v = torch.randn(B, H, T, D, generator=gen).to(dtype)
    R = B * H if per_head else B
    idx, cnt = random_selection(R, C, gen, keep=0.4)
    idx, cnt = idx[:, :T].contiguous(), cnt.clamp(max=T)
    for counts in (cnt, None):
        if counts is None:  # all T columns used: make every row a valid ascending slot list
            idx = (
                torch.sort(torch.randperm(C, generator=gen)[:T])
                .values.int()
                .expand(R, T)
                .contiguous()
            )
        got_k, got_v = cache_k.clone().to(device), cache_v.clone().to(device)
        sparse_attn.scatter_kv(
            got_k,
            got_v,
            k.to(device),
            v.to(device),
            idx.to(device),
            None if counts is None else counts.to(device),
        )
        exp_k, exp_v = cache_k.clone(), cache_v.clone()
        ref.scatter_kv(exp_k, exp_v, k, v, idx, counts)
        assert torch.equal(got_k.cpu(), exp_k) and torch.equal(got_v.cpu(), exp_v)


def test_append_decoded_token_at_row_lengths(device, gen):
    B, H, C, D = 3, 2, 10, 4
    cache_k, cache_v = torch.zeros(2, B, H, C, D, device=device)
    lengths = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    k_new = torch.randn(B, H, 1, D, generator=gen).to(device)
    sparse_attn.scatter_kv(cache_k, cache_v, k_new, -k_new, lengths[:, None])
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(cache_k[b, :, n], k_new[b, :, 0]) and torch.equal(
            cache_v[b, :, n], -k_new[b, :, 0]
        )
    assert int((cache_k != 0).any(-1).sum()) == B * H


def test_gather_then_scatter_round_trip(device, gen):
    B, H, L, D = 2, 3, 64, 32
    k, v = torch.randn(2, B, H, L, D, generator=gen).to(device)
    idx, cnt = random_selection(B * H, L, gen)
    idx, cnt = idx.to(device), cnt.to(device)
    ck, cv = sparse_attn.gather_kv(k, v, idx, cnt)
    back_k, back_v = torch.zeros_like(k), torch.zeros_like(v)
    sparse_attn.scatter_kv(back_k, back_v, ck, cv, idx, cnt)
    kept = torch.zeros(B * H, L, dtype=torch.bool, device=device)
    for r in range(B * H):
        kept[r, idx[r, : cnt[r]].long()] = True
    kept = kept.view(B, H, L, 1)
    assert torch.equal(back_k, torch.where(kept, k, 0)) and torch.equal(
        back_v, torch.where(kept, v, 0)
    )


# --- bad input ---------------------------------------------------------------------------------

KV = (2, 3, 10, 4)  # B, H, L, D


def gather_args(device, **over):
    args = dict(
        k=torch.randn(KV),
        v=torch.randn(KV),
        indices=torch.tensor([[0, 2, 5, -1], [1, 3, -1, -1]], dtype=torch.int32),
        counts=torch.tensor([3, 2], dtype=torch.int32),
    )
    args.update(over)
    return {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in args.items()}


@pytest.mark.parametrize(
    "over,match",
    [
        (
            dict(counts=torch.tensor([5, 2], dtype=torch.int32)),
            r"counts\[0\] = 5 is out of range; expected 0 <= count <= 4",
        ),
        (
            dict(counts=torch.tensor([3, -1], dtype=torch.int32)),
            r"counts\[1\] = -1 is out of range",
        ),
        (dict(capacity=2), r"counts\[0\] = 3 is out of range; expected 0 <= count <= 2"),
        (dict(capacity=-1), "capacity must be >= 0"),
        (
            dict(indices=torch.tensor([[0, 2, 10, -1], [1, 3, -1, -1]], dtype=torch.int32)),
            r"indices\[0\] holds a position outside \[0, 10\)",
        ),
        (
            dict(indices=torch.tensor([[0, 2, 5, -1], [-3, 3, -1, -1]], dtype=torch.int32)),
            r"indices\[1\] holds a position outside",
        ),
        (
            dict(indices=torch.tensor([[0, 5, 2, -1], [1, 3, -1, -1]], dtype=torch.int32)),
            r"indices\[0\] is not strictly ascending",
        ),
        (
            dict(indices=torch.tensor([[0, 2, 2, -1], [1, 3, -1, -1]], dtype=torch.int32)),
            r"indices\[0\] is not strictly ascending",
        ),
        (dict(indices=torch.zeros(2, 4, dtype=torch.int64)), "indices must be int32"),
        (
            dict(indices=torch.zeros(5, 4, dtype=torch.int32)),
            r"indices must be \[B, N\] \(shared by the heads\) or \[B \* H, N\]",
        ),
        (dict(counts=torch.zeros(3, dtype=torch.int32)), r"counts must have shape \[2\]"),
        (dict(counts=torch.zeros(2, dtype=torch.int64)), "counts must be int32"),
        (dict(v=torch.randn(2, 3, 9, 4)), "k and v must have the same shape"),
        (dict(v=torch.randn(KV).half()), "k and v must have the same dtype"),
        (dict(k=torch.randn(2, 3, 10)), r"k and v must be \[B, H, L, D\] with D > 0"),
        (
            dict(k=torch.randn(2, 3, 10, 0), v=torch.randn(2, 3, 10, 0)),
            r"with D > 0, got shape \[2, 3, 10, 0\]",
        ),
    ],
)
def test_gather_bad_input(device, over, match):
    with pytest.raises(RuntimeError, match=match):
        sparse_attn.gather_kv(**gather_args(device, **over))


@pytest.mark.parametrize(
    "over,match",
    [
        (
            dict(indices=torch.tensor([[0, 10]], dtype=torch.int32).expand(2, 2)),
            r"indices\[0\] holds a position outside \[0, 10\)",
        ),
        (
            dict(indices=torch.tensor([[3, 3], [0, 1]], dtype=torch.int32)),
            r"indices\[0\] is not strictly ascending",
        ),
        (
            dict(counts=torch.tensor([1, 3], dtype=torch.int32)),
            r"counts\[1\] = 3 is out of range; expected 0 <= count <= 2",
        ),
        (dict(k=torch.randn(2, 3, 2, 8)), r"k must be \[2, 3, T, 4\] to match k_cache"),
        (dict(k=torch.randn(2, 3, 2, 4).double()), "k and v must have the cache dtype"),
        (dict(k_cache=torch.zeros(2, 3, 4, 10).transpose(2, 3)), "must be contiguous"),
    ],
)
def test_scatter_bad_input(device, over, match):
    args = dict(
        k_cache=torch.zeros(KV),
        v_cache=torch.zeros(KV),
        k=torch.randn(2, 3, 2, 4),
        v=torch.randn(2, 3, 2, 4),
        indices=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
        counts=None,
    )
    args.update(over)
    if "k" in over:
        args["v"] = args["k"].clone()
    args = {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in args.items()}
    before = args["k_cache"].clone()
    with pytest.raises(RuntimeError, match=match):
        sparse_attn.scatter_kv(**args)
    if "k_cache" not in over:
        assert torch.equal(args["k_cache"], before), "a rejected call writes nothing"


# --- torch.library integration -----------------------------------------------------------------


def test_opcheck(device, gen):
    B, H, L, D = 2, 2, 30, 8
    k, v = torch.randn(2, B, H, L, D, generator=gen).to(device)
    idx, cnt = random_selection(B * H, L, gen)
    idx, cnt = idx.to(device), cnt.to(device)
    torch.library.opcheck(torch.ops.sparse_attn.gather_kv, (k, v, idx, cnt, L))
    ck, cv = torch.zeros(2, B, H, L, D, device=device)
    slots = (
        torch.tensor([[0, 3, 5, 7]], dtype=torch.int32, device=device).expand(B * H, 4).contiguous()
    )
    torch.library.opcheck(
        torch.ops.sparse_attn.scatter_kv, (ck, cv, k[:, :, :4], v[:, :, :4], slots, None)
    )


def test_compiles_fullgraph(device, gen):
    B, H, L, D = 1, 2, 30, 8
    k, v = torch.randn(2, B, H, L, D, generator=gen).to(device)
    idx, cnt = random_selection(B, L, gen)
    idx, cnt = idx.to(device), cnt.to(device)

    def select_and_compact(k, v, idx, cnt):
        ck, cv = sparse_attn.gather_kv(k, v, idx, cnt, capacity=L)
        return ck.sum() + cv.sum()

    fn = torch.compile(select_and_compact, fullgraph=True)
    expect = sum(t.sum() for t in ref.gather_kv(k.cpu(), v.cpu(), idx.cpu(), cnt.cpu(), capacity=L))
    torch.testing.assert_close(fn(k, v, idx, cnt).cpu(), expect)
