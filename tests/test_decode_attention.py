"""decode_attention against the plain-PyTorch reference (sparse_attn.reference.decode_attention)."""

import pytest
import torch

import sparse_attn
import sparse_attn.reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# fp32 softmax in both; the kernels sum in another order, and fp16 / bf16 round the output.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def make_inputs(B, Hkv, g, T, C, D, dtype, gen, lengths=None):
    q = torch.randn(B, Hkv * g, T, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, C, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, C, D, generator=gen).to(dtype)
    if lengths is None:  # ragged: every row its own length in [T, C], both ends included
        lengths = torch.randint(T, C + 1, (B, Hkv), generator=gen, dtype=torch.int32)
        lengths.view(-1)[0] = T
        lengths.view(-1)[-1] = C
    return q, k, v, lengths


def check(device, q, k, v, lengths, **kw):
    out = sparse_attn.decode_attention(
        q.to(device), k.to(device), v.to(device), lengths.to(device), **kw
    )
    expect = ref.decode_attention(q, k, v, lengths, **kw)
    assert (
        out.shape == q.shape
        and out.dtype == q.dtype
        and out.device.type == torch.device(device).type
    )
    torch.testing.assert_close(out.cpu().float(), expect.float(), **TOL[q.dtype])
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 7, 33, 1000])
@pytest.mark.parametrize("g", [1, 4, 7])
@pytest.mark.parametrize("T", [1, 3])
def test_matches_reference(device, gen, dtype, C, g, T):
    if T > C:
        pytest.skip("T new tokens need T slots")
    check(device, *make_inputs(3, 2, g, T, C, 64, dtype, gen))


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_rows_use_several_splits(device, gen, dtype):
    # 65537 slots: several splits per row, a last split of one slot, rows far shorter than C.
    q, k, v, lengths = make_inputs(1, 2, 4, 2, 65537, 128, dtype, gen)
    lengths[0, 0] = 40000
    check(device, q, k, v, lengths)


@pytest.mark.parametrize("D", [1, 5, 24, 96, 128, 256])
def test_head_dims(device, gen, D):
    # D % 8 != 0 takes the portable loops on CPU; D % 32 != 0 the tail of the wide ones.
    check(device, *make_inputs(2, 2, 3, 2, 77, D, torch.float32, gen))


def test_slots_past_length_are_never_read(device, gen):
    q, k, v, lengths = make_inputs(2, 2, 4, 2, 50, 32, torch.float32, gen)
    out = sparse_attn.decode_attention(q.to(device), k.to(device), v.to(device), lengths.to(device))
    pos = torch.arange(50)[None, None, :, None]
    poison = pos >= lengths[..., None, None].long()
    k2, v2 = k.masked_fill(poison, float("nan")), v.masked_fill(poison, float("inf"))
    out2 = sparse_attn.decode_attention(
        q.to(device), k2.to(device), v2.to(device), lengths.to(device)
    )
    assert torch.equal(out, out2)


def test_query_t_sees_its_prefix(device, gen):
    # With T = 3, query t sees lengths - (2 - t) slots: the same as T = 1 decodes one at a time.
    q, k, v, lengths = make_inputs(2, 2, 4, 3, 40, 16, torch.float32, gen)
    out = sparse_attn.decode_attention(q.to(device), k.to(device), v.to(device), lengths.to(device))
    for t in range(3):
        one = sparse_attn.decode_attention(
            q[:, :, t : t + 1].to(device),
            k.to(device),
            v.to(device),
            (lengths - (2 - t)).to(device),
        )
        torch.testing.assert_close(out[:, :, t : t + 1], one, rtol=1e-6, atol=1e-6)


def test_gqa_without_repeat_kv(device, gen):
    q, k, v, lengths = make_inputs(2, 3, 7, 1, 29, 16, torch.float32, gen)
    out = sparse_attn.decode_attention(
        q.to(device), k.to(device), v.to(device), lengths.to(device)
    ).cpu()
    for b in range(2):
        for h in range(21):
            n = int(lengths[b, h // 7])
            expect = torch.nn.functional.scaled_dot_product_attention(
                q[b, h][None], k[b, h // 7, :n][None], v[b, h // 7, :n][None]
            )[0]
            torch.testing.assert_close(out[b, h], expect, rtol=1e-5, atol=1e-5)


def test_scale_and_peaked_logits(device, gen):
    q, k, v, lengths = make_inputs(2, 2, 2, 1, 300, 32, torch.float32, gen)
    # Softmax dominated by one slot: needs the running max. Logits reach ~160 here, and an fp32
    # logit s carries a rounding of ~|s| * 2^-24 that softmax passes on to the output scaled by
    # |v|: torch's own fp32 SDPA is off the fp64 result by up to 3.6e-5 on these inputs (300
    # seeds), so the tolerance follows the logits rather than the default 1e-5.
    peaked = q * 30
    group, d = q.shape[1] // k.shape[1], q.shape[-1]
    logits = (peaked @ k.repeat_interleave(group, dim=1).transpose(-1, -2)).abs().max() / d**0.5
    tol = float(logits * v.abs().max()) * 2.0**-21
    out = sparse_attn.decode_attention(*(t.to(device) for t in (peaked, k, v, lengths))).cpu()
    expect = ref.decode_attention(peaked.double(), k.double(), v.double(), lengths)
    assert out.isfinite().all()
    torch.testing.assert_close(out.double(), expect, rtol=0, atol=tol)
    check(device, q, k, v, lengths, scale=0.01)


def test_strided_inputs(device, gen):
    # A compact cache narrowed to its used slots and a transposed query: no copy needed.
    q, k, v, lengths = make_inputs(2, 2, 3, 2, 90, 32, torch.float32, gen)
    big_k, big_v = (
        torch.randn(2, 2, 120, 32, generator=gen),
        torch.randn(2, 2, 120, 32, generator=gen),
    )
    big_k[:, :, :90], big_v[:, :, :90] = k, v
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    out = check(device, qt, big_k[:, :, :90], big_v[:, :, :90], lengths)
    torch.testing.assert_close(
        out.cpu(), ref.decode_attention(q, k, v, lengths), rtol=1e-5, atol=1e-5
    )


def test_unchecked_lengths_are_clamped(device, gen):
    # check_lengths=False (the cache's own counters): no error, clamped to [0, C], zeros when
    # a query sees no slot; never an out-of-bounds read.
    q, k, v, _ = make_inputs(2, 2, 2, 2, 20, 16, torch.float32, gen)
    lengths = torch.tensor([[0, 1], [25, 20]], dtype=torch.int32)
    out = check(device, q, k, v, lengths, check_lengths=False)
    assert (out[0, :2] == 0).all() and (out[0, 2:, 0] == 0).all() and (out[0, 2:, 1] != 0).any()


@pytest.mark.parametrize(
    "over,match",
    [
        (
            dict(lengths=torch.tensor([[0, 5]], dtype=torch.int32)),
            r"lengths\[0, 0\] = 0 is out of range; expected T <= length <= C with T = 1 new tokens and C = 9",
        ),
        (
            dict(lengths=torch.tensor([[5, 10]], dtype=torch.int32)),
            r"lengths\[0, 1\] = 10 is out of range",
        ),
        (
            dict(lengths=torch.tensor([[5, 1]], dtype=torch.int32), query=torch.randn(1, 4, 2, 8)),
            r"lengths\[0, 1\] = 1 is out of range; expected T <= length <= C with T = 2",
        ),
        (
            dict(lengths=torch.tensor([[5, 5]], dtype=torch.int64)),
            "lengths must be int32, got Long",
        ),
        (
            dict(lengths=torch.tensor([5, 5], dtype=torch.int32)),
            r"lengths must have shape \[1, 2\]",
        ),
        (
            dict(query=torch.randn(1, 4, 1, 8).int()),
            "query must be float32, float16 or bfloat16, got Int",
        ),
        (
            dict(key=torch.randn(1, 2, 9, 8).half()),
            "key and value must have query's dtype Float, got Half and Float",
        ),
        (dict(value=torch.randn(1, 2, 9, 8).bfloat16()), "key and value must have query's dtype"),
        (dict(query=torch.randn(4, 1, 8)), r"query must be \[B, Hq, T, D\], got shape \[4, 1, 8\]"),
        (dict(key=torch.randn(2, 9, 8)), r"key must be \[B, Hkv, C, D\]"),
        (
            dict(value=torch.randn(1, 2, 8, 8)),
            r"value must have key's shape \[1, 2, 9, 8\], got \[1, 2, 8, 8\]",
        ),
        (
            dict(query=torch.randn(1, 3, 1, 8)),
            r"query heads \(3\) must be a multiple of key heads \(2\)",
        ),
        (dict(query=torch.randn(1, 4, 1, 4)), "key head dim 8 != query head dim 4"),
        (dict(query=torch.randn(2, 4, 1, 8)), "key batch 1 != query batch 2"),
        (dict(query=torch.randn(1, 4, 0, 8)), "query must hold T >= 1 new tokens"),
        (dict(scale=-1.0), "scale must be a positive finite number"),
    ],
)
def test_bad_input(device, over, match):
    args = dict(
        query=torch.randn(1, 4, 1, 8),
        key=torch.randn(1, 2, 9, 8),
        value=torch.randn(1, 2, 9, 8),
        lengths=torch.tensor([[5, 9]], dtype=torch.int32),
    )
    args.update(over)
    args = {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in args.items()}
    with pytest.raises(RuntimeError, match=match):
        sparse_attn.decode_attention(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_mismatched_devices():
    q, k = torch.randn(1, 2, 1, 8, device="cuda"), torch.randn(1, 2, 9, 8, device="cuda")
    with pytest.raises(RuntimeError, match="lengths is on cpu but query is on cuda:0"):
        sparse_attn.decode_attention(q, k, k, torch.full((1, 2), 5, dtype=torch.int32))


def test_fake_kernel_checks_the_same_contract():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k = torch.randn(1, 3, 1, 8), torch.randn(1, 2, 9, 8)
        lengths = torch.full((1, 2), 5, dtype=torch.int32)
        with pytest.raises(
            RuntimeError, match=r"query heads \(3\) must be a multiple of key heads \(2\)"
        ):
            torch.ops.sparse_attn.decode_attention(q, k, k, lengths)
        with pytest.raises(RuntimeError, match="lengths must be int32"):
            torch.ops.sparse_attn.decode_attention(q[:, :2], k, k, lengths.long())
        out = torch.ops.sparse_attn.decode_attention(q[:, :2].half(), k.half(), k.half(), lengths)
        assert out.shape == (1, 2, 1, 8) and out.dtype == torch.float16


def test_opcheck(device, gen):
    q, k, v, lengths = make_inputs(2, 2, 3, 2, 33, 16, torch.float32, gen)
    args = tuple(t.to(device) for t in (q, k, v, lengths))
    torch.library.opcheck(torch.ops.sparse_attn.decode_attention, (*args, None, True))
    torch.library.opcheck(torch.ops.sparse_attn.decode_attention, (*args, 0.5, False))


def test_compiles_fullgraph(device, gen):
    q, k, v, lengths = make_inputs(1, 2, 4, 1, 40, 16, torch.bfloat16, gen)
    fn = torch.compile(
        lambda *a: sparse_attn.decode_attention(*a, check_lengths=False) * 2, fullgraph=True
    )
    torch.testing.assert_close(
        fn(q.to(device), k.to(device), v.to(device), lengths.to(device)).cpu(),
        ref.decode_attention(q, k, v, lengths) * 2,
        **TOL[torch.bfloat16],
    )


def test_reference_fold_and_visibility():
    q = torch.arange(2 * 6 * 3 * 1, dtype=torch.float32).view(2, 6, 3, 1)
    lengths = torch.tensor([[3, 5], [4, 3]], dtype=torch.int32)
    folded, visible = ref.gqa_fold_visibility(q, lengths, 6)
    assert folded.shape == (2, 2, 9, 1) and visible.shape == (2, 2, 9, 6)
    assert torch.equal(folded[1, 1, 4], q[1, 4, 1])  # row i * T + t = query head h * g + i, step t
    assert visible[0, 1, 2].sum() == 5 and visible[0, 1, 0].sum() == 3  # t = T - 1 sees all
    assert visible[0, 0, 3].sum() == 1  # length 3, t = 0 of 3: one slot
