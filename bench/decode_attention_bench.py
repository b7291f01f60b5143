"""Decode attention: dense SDPA over the full cache vs sparse_attn.decode_attention over a compact
cache holding a fraction tau of the tokens, in one run.

    python bench/decode_attention_bench.py [--device cpu|cuda] [--quick]

Shapes: Qwen2.5-7B attention (28 query heads, 4 KV heads, d = 128), one new token per sequence
(T = 1), contexts 4k / 16k / 32k, batch 1 and 8, fp32 and bf16, tau = 10 / 25 / 50 %. The compact
rows are ragged like real per-head budgets: each KV row holds tau * L * U(0.8, 1.2) tokens (the
measured mean is reported), in buffers of the longest row's size.

Methods (each call produces the attention output of the step):
  dense_sdpa      F.scaled_dot_product_attention(q, K, V, enable_gqa=True) over all L tokens
  masked_sdpa     the same over the compact buffers with a bool mask of the used slots (what a
                  cache without a decode kernel does)
  decode_attention  sparse_attn.decode_attention over the compact buffers (reads each row's
                  first lengths[b, h] slots only)
  decode_attention_full  the same kernel over the full cache (lengths = L): a dense baseline
                  with the same code, which isolates what reading fewer bytes buys
bytes_ratio = bytes of K / V a dense method must read / bytes decode_attention reads (= 1 /
measured tau); efficiency = speedup / bytes_ratio (1.0: as fast as the bytes allow), against
dense SDPA and against decode_attention_full. On CPU, SDPA with one query row per head is far
slower per byte than this kernel (measured: about 4x at 16k fp32), so the speedup over SDPA
overstates what the pruning buys; the ratio to decode_attention_full is the measure of the
bytes bound.

Timing: perf_counter (CPU) or CUDA events (GPU) around each call; the methods take turns in rounds
(warm-up then timed calls in every round), inputs rotate over several copies so that a call never
finds the previous call's data in cache; medians. Writes
bench/results/decode_attention_<device>.json (environment, settings, one row per configuration)
and prints the table. --quick: contexts 4k and 16k, batch 1 (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from run_op_bench import RESULTS, Repeats, environment, times_ms_cpu, times_ms_cuda  # bench/

import sparse_attn

Q_HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_copies(B, L, tau, dtype, device, n_copies, gen):
    """n_copies independent inputs: the full cache and its compact version (first slots)."""
    copies = []
    for _ in range(n_copies):
        q = torch.randn(B, Q_HEADS, 1, HEAD_DIM, generator=gen).to(device, dtype)
        k = torch.randn(B, KV_HEADS, L, HEAD_DIM, generator=gen).to(device, dtype)
        v = torch.randn(B, KV_HEADS, L, HEAD_DIM, generator=gen).to(device, dtype)
        spread = 0.8 + 0.4 * torch.rand(B, KV_HEADS, generator=gen)
        lengths = (tau * L * spread).round().clamp(1, L).to(torch.int32)
        C = int(lengths.max())
        kc, vc = k[:, :, :C].clone(), v[:, :, :C].clone()  # kept tokens; contents do not matter
        lengths = lengths.to(device)
        used = torch.arange(C, device=device) < lengths[..., None]  # [B, Hkv, C]
        mask = used.repeat_interleave(Q_HEADS // KV_HEADS, 1)[:, :, None, :]  # [B, Hq, 1, C]
        full_lengths = torch.full((B, KV_HEADS), L, dtype=torch.int32, device=device)
        copies.append(
            dict(q=q, k=k, v=v, kc=kc, vc=vc, lengths=lengths, mask=mask, full_lengths=full_lengths)
        )
    return copies


def calls_for(copies):
    return {
        "dense_sdpa": [
            lambda c=c: F.scaled_dot_product_attention(c["q"], c["k"], c["v"], enable_gqa=True)
            for c in copies
        ],
        "masked_sdpa": [
            lambda c=c: F.scaled_dot_product_attention(
                c["q"], c["kc"], c["vc"], attn_mask=c["mask"], enable_gqa=True
            )
            for c in copies
        ],
        "decode_attention": [
            lambda c=c: sparse_attn.decode_attention(c["q"], c["kc"], c["vc"], c["lengths"])
            for c in copies
        ],
        "decode_attention_full": [
            lambda c=c: sparse_attn.decode_attention(c["q"], c["k"], c["v"], c["full_lengths"])
            for c in copies
        ],
    }


def check_outputs(copies):
    """The three methods agree where they should: decode_attention == masked SDPA."""
    c = copies[0]
    a = sparse_attn.decode_attention(c["q"], c["kc"], c["vc"], c["lengths"]).float()
    b = F.scaled_dot_product_attention(
        c["q"], c["kc"], c["vc"], attn_mask=c["mask"], enable_gqa=True
    ).float()
    err = (a - b).abs().max().item()
    assert err < (1e-4 if c["q"].dtype == torch.float32 else 3e-2), (
        f"decode_attention differs from SDPA by {err}"
    )
    return err


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--contexts", type=int, nargs="+", default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--taus", type=float, nargs="+", default=[0.10, 0.25, 0.50])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument(
        "--quick", action="store_true", help="contexts 4k / 16k, batch 1, fewer calls"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for every method (default: torch's choice); on a "
        "machine shared with other jobs, 1 avoids timing the wait for a second core",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON path (default bench/results/decode_attention_<device>.json)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = args.contexts or ([4096, 16384] if args.quick else [4096, 16384, 32768])
    batches = args.batches or ([1] if args.quick else [1, 8])
    cuda = args.device == "cuda"
    timer = times_ms_cuda if cuda else times_ms_cpu
    gen = torch.Generator().manual_seed(0)

    rows = []
    header = (
        f"{'dtype':5} {'B':>2} {'L':>6} {'tau':>5} | {'dense':>8} {'masked':>8} {'own full':>8} {'decode':>8} ms | "
        f"{'x dense':>7} {'x own':>6} {'bytes x':>7} | {'GB/s':>6}"
    )
    print(header)
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for B in batches:
            for L in contexts:
                for tau in args.taus:
                    full_bytes = 2 * B * KV_HEADS * L * HEAD_DIM * dtype.itemsize
                    # Rotate over copies whose K / V exceed the last-level cache together; bounded
                    # by memory for the largest shapes.
                    n_copies = 2 if full_bytes >= 2**28 else 3
                    copies = make_copies(B, L, tau, dtype, args.device, n_copies, gen)
                    err = check_outputs(copies)
                    big = full_bytes * (1 if cuda else B) >= 2**29
                    repeats = (
                        Repeats(rounds=2, warmup_s=0.0, runs=3)
                        if args.quick or big
                        else Repeats(rounds=3, warmup_s=0.2, runs=5)
                    )
                    if cuda:
                        repeats = Repeats(rounds=4, warmup_s=0.1, runs=50)
                    times = timer(calls_for(copies), repeats)
                    ms = {name: statistics.median(t) for name, t in times.items()}
                    min_ms = {name: min(t) for name, t in times.items()}
                    held = sum(int(c["lengths"].sum()) for c in copies) / len(copies)
                    tau_measured = held / (B * KV_HEADS * L)
                    speedup = ms["dense_sdpa"] / ms["decode_attention"]
                    speedup_full = ms["decode_attention_full"] / ms["decode_attention"]
                    bytes_ratio = 1 / tau_measured
                    read_bytes = 2 * held * HEAD_DIM * dtype.itemsize
                    row = dict(
                        dtype=dname,
                        batch=B,
                        context=L,
                        tau=tau,
                        tau_measured=tau_measured,
                        dense_sdpa_ms=ms["dense_sdpa"],
                        masked_sdpa_ms=ms["masked_sdpa"],
                        decode_attention_ms=ms["decode_attention"],
                        decode_attention_full_ms=ms["decode_attention_full"],
                        speedup_vs_dense=speedup,
                        speedup_vs_masked=ms["masked_sdpa"] / ms["decode_attention"],
                        speedup_vs_own_full=speedup_full,
                        bytes_ratio=bytes_ratio,
                        efficiency_vs_bytes_bound=speedup / bytes_ratio,
                        efficiency_vs_bytes_bound_own_full=speedup_full / bytes_ratio,
                        decode_attention_gb_per_s=read_bytes / ms["decode_attention"] / 1e6,
                        dense_sdpa_gb_per_s=full_bytes / ms["dense_sdpa"] / 1e6,
                        min_ms=min_ms,
                        max_abs_diff_vs_masked_sdpa=err,
                        samples={k: v for k, v in times.items()},
                    )
                    rows.append(row)
                    print(
                        f"{dname:5} {B:>2} {L:>6} {tau_measured:5.3f} | {ms['dense_sdpa']:8.3f} {ms['masked_sdpa']:8.3f} "
                        f"{ms['decode_attention_full']:8.3f} {ms['decode_attention']:8.3f}    | {speedup:7.2f} "
                        f"{speedup_full:6.2f} {bytes_ratio:7.2f} | {row['decode_attention_gb_per_s']:6.2f}",
                        flush=True,
                    )
                    del copies

    out = args.out or RESULTS / f"decode_attention_{args.device}.json"
    settings = dict(
        q_heads=Q_HEADS,
        kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        new_tokens=1,
        contexts=contexts,
        batches=batches,
        taus=args.taus,
        dtypes=args.dtypes,
        quick=args.quick,
        threads=torch.get_num_threads(),
        command="python " + " ".join(__import__("sys").argv),
    )
    with open(out, "w") as f:
        json.dump(
            dict(environment=environment(args.device), settings=settings, rows=rows), f, indent=1
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
