"""The torch glue of the ops: errors instead of crashes, checks before allocations, no redundant
zero fills, and fake kernels that refuse what the C++ refuses."""

import pytest
import torch

import sparse_attn


def test_scatter_without_counts_and_too_many_indices_raises(device):
    # counts=None uses all N = 4 entries of an index row, but k holds only T = 1 new token: an
    # error naming the index row, not a dereference of the missing counts (used to segfault).
    kc, vc = torch.zeros(2, 2, 3, 4, 10, device=device)
    k, v = torch.randn(2, 2, 3, 1, 10, device=device)
    idx = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32, device=device)
    with pytest.raises(
        RuntimeError,
        match=r"index row length N of indices\[0\] = 4 is out of range; "
        r"expected 0 <= count <= 1 \(the T new tokens of k\)",
    ):
        sparse_attn.scatter_kv(kc, vc, k, v, idx)
    assert (kc == 0).all()


def test_gather_validates_counts_before_allocating(device):
    # capacity=None sizes the output by max(counts): a garbage count must be reported as such,
    # not as a failed allocation of 2^31 - 1 slots.
    k, v = torch.randn(2, 2, 3, 6, 64, device=device)
    idx = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=device)
    counts = torch.tensor([2, 2**31 - 1], dtype=torch.int32, device=device)
    with pytest.raises(
        RuntimeError, match=r"counts\[1\] = 2147483647 is out of range; expected 0 <= count <= 2"
    ):
        sparse_attn.gather_kv(k, v, idx, counts)


def _fills(fn):
    with torch.profiler.profile() as prof:
        fn()
    return [
        e.name for e in prof.events() if e.name in ("aten::zeros", "aten::zero_", "aten::fill_")
    ]


def test_no_zero_fill_of_outputs_the_kernels_write(device, gen):
    scores = torch.rand(3, 50, generator=gen).to(device)
    assert _fills(lambda: sparse_attn.topp_select(scores, 0.9)) == []
    idx, cnt = sparse_attn.topp_select(scores[:2, :8], 0.5)
    k, v = torch.randn(2, 2, 3, 8, 4, generator=gen).to(device)
    assert _fills(lambda: sparse_attn.gather_kv(k, v, idx, cnt, capacity=8)) == []
    kc, vc = torch.zeros(2, 2, 3, 8, 4, device=device)
    one = torch.tensor([[1], [5]], dtype=torch.int32, device=device)
    assert _fills(lambda: sparse_attn.scatter_kv(kc, vc, k[:, :, :1], v[:, :, :1], one)) == []
    lengths = torch.full((2, 3), 6, dtype=torch.int32, device=device)
    q = torch.randn(2, 6, 1, 4, generator=gen).to(device)
    assert _fills(lambda: sparse_attn.decode_attention(q, k, v, lengths, check_lengths=False)) == []
    if device.type == "cuda":  # the CPU kernel accumulates into a zeroed output
        assert _fills(lambda: sparse_attn.cumulative_scores(q, k)) == []


def _bad_calls():
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8)
    kv = torch.zeros(2, 3, 4, 6)
    idx = torch.zeros(2, 2, dtype=torch.int32)
    ops = torch.ops.sparse_attn
    return [
        (ops.cumulative_scores, (q.half(), k), "k must have q's dtype"),
        (
            ops.cumulative_scores,
            (torch.randn(1, 3, 3, 8), k),
            r"query heads \(3\) must be a multiple of key heads \(2\)",
        ),
        (
            ops.cumulative_scores,
            (q, k, None, True, torch.ones(1, 4, dtype=torch.bool)),
            r"key_mask must have shape \[1, 5\]",
        ),
        (ops.cumulative_scores, (q, k, -1.0), "scale must be a positive finite number"),
        (ops.topp_select, (torch.rand(2, 5).double(), 0.5), "scores must be float32"),
        (ops.topp_select, (torch.rand(2, 5), 1.5), r"p must be in \(0, 1\]"),
        (
            ops.topp_select,
            (torch.rand(2, 5), 1.0, torch.ones(3)),
            r"p as a tensor must have shape \[2\]",
        ),
        (
            ops.topp_select,
            (torch.rand(2, 5), 0.5, None, None, -1),
            "keep_first and keep_last must be >= 0",
        ),
        (
            ops.gather_kv,
            (kv, kv, idx.long(), torch.zeros(2, dtype=torch.int32), 4),
            "indices must be int32",
        ),
        (
            ops.gather_kv,
            (kv, kv.half(), idx, torch.zeros(2, dtype=torch.int32), 4),
            "k and v must have the same dtype",
        ),
        (
            ops.gather_kv,
            (kv, kv, idx, torch.zeros(3, dtype=torch.int32), 4),
            r"counts must have shape \[2\]",
        ),
        (
            ops.gather_kv,
            (kv, kv, idx, torch.zeros(2, dtype=torch.int32), -1),
            "capacity must be >= 0",
        ),
        (
            ops.scatter_kv,
            (kv, kv.clone(), torch.randn(2, 3, 1, 5), torch.randn(2, 3, 1, 5), idx[:, :1], None),
            r"k must be \[2, 3, T, 6\] to match k_cache",
        ),
        (
            ops.scatter_kv,
            (
                kv.transpose(2, 3),
                kv.clone().transpose(2, 3),
                torch.randn(2, 3, 1, 4),
                torch.randn(2, 3, 1, 4),
                idx[:, :1],
                None,
            ),
            "must be contiguous",
        ),
        (
            ops.decode_attention,
            (q, k, k, torch.full((1, 2), 5, dtype=torch.int32), None, True),
            None,
        ),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_fake_kernels_refuse_what_eager_refuses(case):
    from torch._subclasses.fake_tensor import FakeTensorMode

    fn, args, match = _bad_calls()[case]
    if match is None:  # a valid call: both run
        fn(*args)
        with FakeTensorMode(allow_non_fake_inputs=True):
            fn(*args)
        return
    with pytest.raises(RuntimeError, match=match):
        fn(*args)
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(RuntimeError, match=match):
            fn(*args)
