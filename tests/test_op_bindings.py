"""The torch glue of the ops: errors instead of crashes, checks before allocations, no redundant
zero fills (findings of docs/cuda_review.md F3, F7, F8)."""
import pytest
import torch

import sparse_attn


def test_scatter_without_counts_and_too_many_indices_raises(device):
    # counts=None uses all N = 4 entries of an index row, but k holds only T = 1 new token: an
    # error naming the index row, not a dereference of the missing counts (used to segfault).
    kc, vc = torch.zeros(2, 2, 3, 4, 10, device=device)
    k, v = torch.randn(2, 2, 3, 1, 10, device=device)
    idx = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match=r"index row length N of indices\[0\] = 4 is out of range; "
                                           r"expected 0 <= count <= 1 \(the T new tokens of k\)"):
        sparse_attn.scatter_kv(kc, vc, k, v, idx)
    assert (kc == 0).all()


def test_gather_validates_counts_before_allocating(device):
    # capacity=None sizes the output by max(counts): a garbage count must be reported as such,
    # not as a failed allocation of 2^31 - 1 slots.
    k, v = torch.randn(2, 2, 3, 6, 64, device=device)
    idx = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=device)
    counts = torch.tensor([2, 2**31 - 1], dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match=r"counts\[1\] = 2147483647 is out of range; expected 0 <= count <= 2"):
        sparse_attn.gather_kv(k, v, idx, counts)


def _fills(fn):
    with torch.profiler.profile() as prof:
        fn()
    return [e.name for e in prof.events() if e.name in ("aten::zeros", "aten::zero_", "aten::fill_")]


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
