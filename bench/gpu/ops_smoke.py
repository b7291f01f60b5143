"""Calls every op of sparse_attn on a few small, odd shapes and checks each against its reference:
the program that bench/gpu/run.sh runs under compute-sanitizer (memcheck, racecheck, synccheck).

    python bench/gpu/ops_smoke.py [--device cuda|cpu]

The shapes reach the kernels' less common paths (docs/gpu.md#sanitizer): head dims that are not
a multiple of 8 (scalar staging) and misaligned base pointers (no 16-byte loads), several key
splits in cumulative_scores, rows shorter and longer than a block in topp_select, ties and flat
rows, the 1-byte word of gather_kv, B * H > 65535 (the grid-y loop), and decode_attention when
the installed sparse_attn has it. Inputs are made on the CPU and copied, so that under the
sanitizer's kernel filter almost only our kernels run. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import sparse_attn
from sparse_attn import reference

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from selection import assert_selection_equivalent  # noqa: E402  (tests/selection.py)

FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        FAILURES.append(name)


def misaligned(t: torch.Tensor, device: str) -> torch.Tensor:
    """A contiguous copy of t on device whose data starts one element past an allocation's start:
    the kernels must take their narrow-load paths."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def smoke_cumulative_scores(device: str, gen: torch.Generator) -> None:
    # (B, Hq, Hkv, Lq, Lk, D): odd D (scalar staging), Lq > Lk, a long Lk with few heads (splits).
    shapes = [
        (2, 6, 3, 5, 67, 40),
        (1, 4, 4, 9, 3, 8),
        (1, 2, 1, 3, 2100, 128),
        (1, 7, 1, 1, 130, 64),
    ]
    for B, Hq, Hkv, Lq, Lk, D in shapes:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            q = torch.randn(B, Hq, Lq, D, generator=gen).to(dtype)
            k = torch.randn(B, Hkv, Lk, D, generator=gen).to(dtype)
            key_mask = torch.rand(B, Lk, generator=gen) > 0.2
            for causal, mask, align in ((True, None, True), (False, key_mask, False)):
                qd = q.to(device) if align else misaligned(q, device)
                kd = k.to(device) if align else misaligned(k, device)
                md = None if mask is None else mask.to(device)
                out = sparse_attn.cumulative_scores(qd, kd, causal=causal, key_mask=md)
                ref = reference.cumulative_scores(
                    q.double(), k.double(), causal=causal, key_mask=mask
                )
                err = rel_err(out, ref)
                tol = 1e-4 if dtype == torch.float32 else 2e-2
                check(
                    f"cumulative_scores B{B} Hq{Hq} Hkv{Hkv} Lq{Lq} Lk{Lk} D{D} {dtype} "
                    f"causal={causal} aligned={align}",
                    err <= tol,
                    f"rel err {err:.2e}",
                )


def smoke_topp_select(device: str, gen: torch.Generator) -> None:
    for R, L in ((3, 1), (2, 7), (4, 513), (3, 2049), (2, 5000)):
        scores = torch.rand(R, L, generator=gen) ** 4
        scores[0] = 1.0  # a flat row: all ties
        if L > 4:
            scores[-1, ::3] = 0.5  # many ties among others
        valid = torch.rand(R, L, generator=gen) > 0.1
        cand = torch.rand(R, L, generator=gen) > 0.05
        p_rows = 0.5 + 0.5 * torch.rand(R, generator=gen)
        for p, kw in (
            (0.9, {}),
            (p_rows, {"valid_mask": valid, "keep_first": 2, "keep_last": 3}),
            (0.75, {"valid_mask": valid, "candidate_mask": cand}),
            (1.0, {}),
        ):
            dkw = {name: x.to(device) for name, x in kw.items() if isinstance(x, torch.Tensor)}
            dkw |= {name: x for name, x in kw.items() if not isinstance(x, torch.Tensor)}
            dp = p.to(device) if isinstance(p, torch.Tensor) else p
            indices, counts = sparse_attn.topp_select(scores.to(device), dp, **dkw)
            label = "per row" if isinstance(p, torch.Tensor) else p
            name = f"topp_select [{R}, {L}] p={label} kw={sorted(kw)}"
            try:
                assert_selection_equivalent(indices, counts, scores, p, **kw)
                check(name, True)
            except AssertionError as e:
                check(name, False, str(e).splitlines()[0])


def smoke_gather_scatter(device: str, gen: torch.Generator) -> None:
    # (B, H, L, D, dtype): an odd row of bytes (1-byte words), fp32, bf16 per-head rows.
    for B, H, L, D, dtype in (
        (2, 3, 37, 5, torch.uint8),
        (1, 2, 70, 33, torch.float32),
        (3, 4, 129, 64, torch.bfloat16),
    ):
        k = torch.randint(0, 200, (B, H, L, D), generator=gen).to(dtype)
        v = torch.randint(0, 200, (B, H, L, D), generator=gen).to(dtype)
        for per_head in (False, True):
            R = B * H if per_head else B
            counts = torch.randint(0, L + 1, (R,), generator=gen, dtype=torch.int32)
            indices = torch.full((R, L), -1, dtype=torch.int32)
            for r in range(R):
                kept = torch.randperm(L, generator=gen)[: counts[r]].sort().values
                indices[r, : counts[r]] = kept.to(torch.int32)
            capacity = int(counts.max()) + 3
            args = (k, v, indices, counts)
            out = sparse_attn.gather_kv(*(x.to(device) for x in args), capacity=capacity)
            ref = reference.gather_kv(*args, capacity=capacity)
            same = all(torch.equal(o.cpu(), r) for o, r in zip(out, ref))
            check(f"gather_kv [{B}, {H}, {L}, {D}] {dtype} per_head={per_head}", same)

            kc, vc = (
                torch.randint(0, 200, (B, H, capacity, D), generator=gen).to(dtype) for _ in "kv"
            )
            new_k, new_v = (
                torch.randint(0, 200, (B, H, L, D), generator=gen).to(dtype) for _ in "kv"
            )
            slots = torch.full((R, L), -1, dtype=torch.int32)
            for r in range(R):
                slots[r, : counts[r]] = (
                    torch.randperm(capacity, generator=gen)[: counts[r]].sort().values.int()
                )
            dk, dv = kc.to(device), vc.to(device)
            sparse_attn.scatter_kv(
                dk, dv, new_k.to(device), new_v.to(device), slots.to(device), counts.to(device)
            )
            rk, rv = kc.clone(), vc.clone()
            reference.scatter_kv(rk, rv, new_k, new_v, slots, counts)
            same = torch.equal(dk.cpu(), rk) and torch.equal(dv.cpu(), rv)
            check(f"scatter_kv [{B}, {H}, {capacity}, {D}] {dtype} per_head={per_head}", same)

    # B * H > 65535 rows: the copy kernels loop over grid y.
    B, H, L, D = 1, 65537, 3, 2
    k = torch.randn(B, H, L, D, generator=gen)
    indices = torch.tensor([[0, 2, -1]], dtype=torch.int32)
    counts = torch.tensor([2], dtype=torch.int32)
    out = sparse_attn.gather_kv(
        k.to(device), (2 * k).to(device), indices.to(device), counts.to(device)
    )
    ref = reference.gather_kv(k, 2 * k, indices, counts)
    check(f"gather_kv B*H = {B * H}", all(torch.equal(o.cpu(), r) for o, r in zip(out, ref)))
    kc, vc = torch.zeros(B, H, 4, D), torch.zeros(B, H, 4, D)
    dk, dv = kc.to(device), vc.to(device)
    lengths = torch.tensor([[3]], dtype=torch.int32)
    sparse_attn.scatter_kv(
        dk, dv, k[:, :, :1].to(device), k[:, :, 1:2].to(device), lengths.to(device)
    )
    reference.scatter_kv(kc, vc, k[:, :, :1], k[:, :, 1:2], lengths)
    check(f"scatter_kv B*H = {B * H}", torch.equal(dk.cpu(), kc) and torch.equal(dv.cpu(), vc))


def smoke_decode_attention(device: str, gen: torch.Generator) -> None:
    """Only when the installed sparse_attn has the op (docs/gpu.md#sanitizer)."""
    if not hasattr(sparse_attn, "decode_attention"):
        print("skip decode_attention: not in this sparse_attn", flush=True)
        return
    ref_fn = getattr(reference, "decode_attention", None)
    for B, Hq, Hkv, T, C, D in ((2, 4, 4, 1, 7, 64), (1, 7, 1, 3, 33, 128), (3, 8, 2, 1, 1000, 40)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            q = torch.randn(B, Hq, T, D, generator=gen).to(dtype)
            k, v = (torch.randn(B, Hkv, C, D, generator=gen).to(dtype) for _ in "kv")
            lengths = torch.randint(T, C + 1, (B, Hkv), generator=gen, dtype=torch.int32)
            out = sparse_attn.decode_attention(*(x.to(device) for x in (q, k, v, lengths)))
            name = f"decode_attention B{B} Hq{Hq} Hkv{Hkv} T{T} C{C} D{D} {dtype}"
            if ref_fn is None:
                check(name, bool(torch.isfinite(out).all()), "finite (no reference to compare)")
                continue
            ref = ref_fn(q.double(), k.double(), v.double(), lengths)
            err = rel_err(out, ref)
            check(name, err <= (1e-4 if dtype == torch.float32 else 2e-2), f"rel err {err:.2e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.device == "cuda" and not sparse_attn.cuda_kernels_built():
        parser.error("--device cuda needs sparse_attn built with its CUDA kernels")
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for smoke in (
        smoke_cumulative_scores,
        smoke_topp_select,
        smoke_gather_scatter,
        smoke_decode_attention,
    ):
        try:
            smoke(args.device, gen)
        except Exception as e:  # one op's crash must not hide the others' results
            check(smoke.__name__, False, f"{type(e).__name__}: {e}".splitlines()[0])
        if args.device == "cuda":
            torch.cuda.synchronize()
    print(
        f"ops_smoke on {args.device}: {len(FAILURES)} failed, {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
