import pytest
import torch

import sparse_attn
import sparse_attn.reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_qk(B, Hq, Hkv, Lq, Lk, D, dtype, gen, spread=1.0):
    q = (spread * torch.randn(B, Hq, Lq, D, generator=gen)).to(dtype)
    k = (spread * torch.randn(B, Hkv, Lk, D, generator=gen)).to(dtype)
    return q, k


def assert_scores_close(out, expect, rows_per_group):
    # Each score sums up to g * Lq probabilities computed in fp32 in different orders.
    assert out.dtype == torch.float32 and out.shape == expect.shape
    torch.testing.assert_close(out.cpu(), expect, rtol=1e-4, atol=1e-5 * max(rows_per_group, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", [1, 4, 7])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference(device, gen, dtype, g, causal):
    B, Hkv, Lq, Lk, D = 2, 2, 9, 133, 32
    q, k = make_qk(B, g * Hkv, Hkv, Lq, Lk, D, dtype, gen)
    out = sparse_attn.cumulative_scores(q.to(device), k.to(device), causal=causal)
    assert_scores_close(out, ref.cumulative_scores(q, k, causal=causal), g * Lq)
    # every probe sees a key: each group's total mass is g * n_probe
    torch.testing.assert_close(
        out.sum(-1).cpu(), torch.full((B, Hkv), float(g * Lq)), rtol=1e-4, atol=0
    )


@pytest.mark.parametrize(
    "Lq,Lk,D",
    [
        (1, 1, 8),
        (1, 1000, 64),
        (64, 64, 128),
        (70, 33, 16),
        (3, 65537, 8),
        (5, 7, 1),
        (2, 300, 256),
    ],
)
def test_odd_sizes(device, gen, Lq, Lk, D):
    q, k = make_qk(1, 4, 2, Lq, Lk, D, torch.float32, gen)
    out = sparse_attn.cumulative_scores(q.to(device), k.to(device))
    assert_scores_close(out, ref.cumulative_scores(q, k), 2 * Lq)


def test_probes_longer_than_keys_see_nothing_before_position_zero(device, gen):
    # Lq > Lk: the first Lq - Lk probes sit before the first key and contribute no mass.
    q, k = make_qk(1, 2, 1, 10, 4, 16, torch.float32, gen)
    out = sparse_attn.cumulative_scores(q.to(device), k.to(device))
    assert_scores_close(out, ref.cumulative_scores(q, k), 20)
    torch.testing.assert_close(out.sum().cpu(), torch.tensor(2.0 * 4), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_key_mask_left_and_right_padding(device, gen, dtype):
    B, Hq, Hkv, Lq, Lk, D = 4, 8, 2, 16, 50, 32
    q, k = make_qk(B, Hq, Hkv, Lq, Lk, D, dtype, gen)
    lengths = torch.tensor([50, 37, 5, 0])
    pos = torch.arange(Lk)
    for key_mask in (pos[None] >= (Lk - lengths)[:, None], pos[None] < lengths[:, None]):
        out = sparse_attn.cumulative_scores(
            q.to(device), k.to(device), key_mask=key_mask.to(device)
        )
        expect = ref.cumulative_scores(q, k, key_mask=key_mask)
        assert_scores_close(out, expect, Hq // Hkv * Lq)
        assert (out.cpu()[~key_mask[:, None, :].expand_as(out.cpu())] == 0).all(), (
            "padding gets no mass"
        )
        assert torch.isfinite(out).all()


def test_scale_and_peaked_logits(device, gen):
    q, k = make_qk(
        1, 4, 4, 8, 200, 64, torch.float32, gen, spread=4.0
    )  # logits ~ +-100: softmax saturates
    for scale in (None, 0.01, 1.0):
        out = sparse_attn.cumulative_scores(q.to(device), k.to(device), scale=scale)
        assert_scores_close(out, ref.cumulative_scores(q, k, scale=scale), 8)


def test_non_contiguous_inputs(device, gen):
    q, k = make_qk(1, 4, 2, 6, 40, 16, torch.float32, gen)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    kt = k.transpose(2, 3).contiguous().transpose(2, 3)
    assert not qt.is_contiguous() and not kt.is_contiguous()
    out = sparse_attn.cumulative_scores(qt.to(device), kt.to(device))
    assert_scores_close(out, ref.cumulative_scores(q, k), 12)


@pytest.mark.parametrize(
    "q_shape,k_shape,kw,match",
    [
        ((1, 4, 3, 8), (1, 2, 5), {}, r"k must be \[B, Hkv, Lk, D\]"),
        ((4, 3, 8), (1, 2, 5, 8), {}, r"q must be \[B, Hq, Lq, D\]"),
        (
            (1, 6, 3, 8),
            (1, 4, 5, 8),
            {},
            r"query heads \(6\) must be a multiple of key heads \(4\)",
        ),
        ((1, 4, 3, 8), (1, 2, 5, 16), {}, "k head dim 16 != q head dim 8"),
        ((2, 4, 3, 8), (1, 2, 5, 8), {}, "k batch 1 != q batch 2"),
        ((1, 4, 3, 8), (1, 2, 5, 8), {"scale": -1.0}, "scale must be a positive finite number"),
        (
            (1, 4, 3, 8),
            (1, 2, 5, 8),
            {"key_mask": torch.ones(1, 4, dtype=torch.bool)},
            r"key_mask must have shape \[1, 5\]",
        ),
        (
            (1, 4, 3, 8),
            (1, 2, 5, 8),
            {"key_mask": torch.ones(1, 5)},
            "key_mask must be a bool tensor",
        ),
    ],
)
def test_bad_shapes(device, q_shape, k_shape, kw, match):
    kw = {n: (v.to(device) if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
    with pytest.raises(RuntimeError, match=match):
        sparse_attn.cumulative_scores(
            torch.randn(q_shape, device=device), torch.randn(k_shape, device=device), **kw
        )


def test_bad_dtypes(device):
    q = torch.randn(1, 2, 3, 8, device=device)
    with pytest.raises(RuntimeError, match="q must be float32, float16 or bfloat16, got Int"):
        sparse_attn.cumulative_scores(q.int(), q.int())
    with pytest.raises(RuntimeError, match="k must have q's dtype Float, got Half"):
        sparse_attn.cumulative_scores(q, q.half())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_mismatched_devices():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(RuntimeError, match="k is on cuda:0 but q is on cpu"):
        sparse_attn.cumulative_scores(q, q.cuda())


def test_opcheck(device, gen):
    q, k = make_qk(2, 4, 2, 5, 17, 8, torch.float32, gen)
    mask = torch.arange(17)[None].expand(2, 17) >= torch.tensor([[0], [6]])
    torch.library.opcheck(
        torch.ops.sparse_attn.cumulative_scores,
        (q.to(device), k.to(device), None, True, mask.to(device)),
    )


def test_compiles_fullgraph(device, gen):
    q, k = make_qk(1, 4, 2, 5, 17, 8, torch.bfloat16, gen)
    fn = torch.compile(lambda q, k: sparse_attn.cumulative_scores(q, k).sum(1), fullgraph=True)
    torch.testing.assert_close(
        fn(q.to(device), k.to(device)).cpu(),
        ref.cumulative_scores(q, k).sum(1),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [300, 576])
def test_head_dims_above_256(device, gen, dtype, D):
    # Any head dim, on every device (MLA-style heads are 576 wide): the kernels loop over D.
    q, k = make_qk(1, 4, 2, 5, 70, D, dtype, gen)
    out = sparse_attn.cumulative_scores(q.to(device), k.to(device))
    assert_scores_close(out, ref.cumulative_scores(q, k), 2 * 5)
