"""Prefill: the sparse prefill (select, then attend among the kept tokens) vs the dense one.

    python bench/prefill_bench.py [--device cpu|cuda] [--lengths 2048 8192 16384] [--taus 0.25 0.5]
                                  [--quick] [--no-ttft]

Part 1, one layer's prefill attention at the Qwen2.5-7B attention shape (28 query heads, 4 KV
heads, d = 128), batch 1, random inputs:
  dense   SDPA over all L prompt positions, causal, K / V repeated to the query heads (what
          transformers' SDPA path runs; FlashAttention-2 first on GPU);
  sparse  everything the sparse prefill adds or replaces, timed together: cumulative_scores of
          the last 64 probe queries over all keys, the per-layer budget (sum over KV heads),
          topp_select, gather_kv of K / V into the compact cache, and sparse_prefill_attention
          (gather of the kept query rows, one causal SDPA among them, scatter of the output).
  The threshold p of each row is calibrated (untimed) so that top-p keeps exactly tau * L tokens.
  "attention only" times sparse_prefill_attention alone (the ideal ratio is 1 / tau^2).
Part 2 (--no-ttft skips it): time to first token of a random-init Qwen2 with ``--layers``
7B-shaped layers (hidden 3584, 28 / 4 heads; MLP width ``--intermediate``: 18944 as in 7B on
CUDA, 1024 on CPU where the 7B MLP alone takes minutes per call), one prompt of
``--ttft-length`` tokens: model.generate(max_new_tokens=1) with a TopPCache, prefill="dense" vs
"sparse", both with the fixed-ratio rule keeping ``--ttft-tau`` of the tokens in every layer
(the measured token ratio is reported), and plain SDPA without a TopPCache.

Timing: time.perf_counter on CPU, CUDA events on GPU; the variants take turns (an untimed
warm-up call each, then ``--repeats`` timed rounds), medians reported with the ratio. Writes
bench/results/prefill_<device>.json (environment, settings, rows) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch.nn.attention import sdpa_kernel

# bench/ for run_op_bench, and the checkout this script belongs to (ahead of an installed copy).
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from run_op_bench import RESULTS, environment

from sparse_attn import cumulative_scores, gather_kv, topp_select
from sparse_attn.attention import (
    FLASH_FIRST,
    cache_argument,
    enable,
    sparse_prefill_attention,
)
from sparse_attn.cache import TopPCache
from sparse_attn.policy import TopPPolicy

Q_HEADS, KV_HEADS, HEAD_DIM, N_PROBE = 28, 4, 128, 64


def timer(device: str):
    """fn -> milliseconds of one call (CUDA events on GPU, perf_counter on CPU)."""
    if device == "cuda":

        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)

        return run

    def run(fn):
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3

    return run


def take_turns(variants: dict, repeats: int, device: str) -> dict[str, list[float]]:
    """One untimed warm-up call per variant, then ``repeats`` rounds in which each runs once."""
    measure = timer(device)
    for fn in variants.values():
        measure(fn)
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(measure(fn))
    return times


def dense_attention(q, k, v, scale):
    """What transformers' SDPA path runs for one unpadded prompt: causal, GQA inside SDPA."""
    if q.is_cuda:
        with sdpa_kernel(FLASH_FIRST, set_priority=True):
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=True
            )
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


def calibrated_p(scores: torch.Tensor, keep: int) -> float:
    """The top-p threshold whose minimal set holds exactly ``keep`` tokens of one row of scores."""
    ordered = scores.double().sort(descending=True).values
    mass = ordered.cumsum(0) / ordered.sum()
    # Halfway between the mass of keep - 1 and keep tokens: float32 rounding cannot flip it.
    return float((mass[keep - 2] + mass[keep - 1]) / 2) if keep > 1 else float(mass[0] / 2)


def sparse_prefill(q, k, v, scale, p):
    """Scores, selection, compaction and the attention among the kept tokens: one layer."""
    scores = cumulative_scores(q[:, :, -N_PROBE:], k, scale=scale).sum(1)  # [B, L] layer budget
    indices, counts = topp_select(scores, p)
    width = int(counts.max())
    keys, values = gather_kv(k, v, indices, counts, capacity=width)
    B = q.shape[0]
    positions = indices[:, None, :width].expand(B, KV_HEADS, width)
    lengths = counts[:, None].expand(B, KV_HEADS)
    return sparse_prefill_attention(q, keys, values, positions, lengths, width, scale)


def attention_rows(args) -> list[dict]:
    rows = []
    scale = HEAD_DIM**-0.5
    for L in args.lengths:
        gen = torch.Generator(device=args.device).manual_seed(L)
        # [B, H, L, D] views of [B, L, H, D] tensors: the layout of transformers' projections
        q, k, v = (
            torch.randn((1, L, h, HEAD_DIM), generator=gen, device=args.device)
            .to(args.dtype)
            .transpose(1, 2)
            for h in (Q_HEADS, KV_HEADS, KV_HEADS)
        )
        scores = cumulative_scores(q[:, :, -N_PROBE:], k, scale=scale).sum(1)[0]
        variants = {"dense": lambda q=q, k=k, v=v: dense_attention(q, k, v, scale)}
        setup = {}
        for tau in args.taus:
            keep = max(int(round(tau * L)), 1)
            p = calibrated_p(scores.cpu(), keep)
            indices, counts = topp_select(scores[None], p)
            width = int(counts.max())
            keys, values = gather_kv(k, v, indices, counts, capacity=width)
            positions = indices[:, None, :width].expand(1, KV_HEADS, width)
            lengths = counts[:, None].expand(1, KV_HEADS)
            setup[tau] = (p, width)
            variants[f"sparse@{tau}"] = lambda p=p, q=q, k=k, v=v: sparse_prefill(q, k, v, scale, p)
            variants[f"attention_only@{tau}"] = (
                lambda a=(keys, values, positions, lengths, width), q=q: sparse_prefill_attention(
                    q, *a, scale
                )
            )
        repeats = args.repeats if L <= 8192 else max(1, args.repeats // 2)
        with torch.inference_mode():
            times = take_turns(variants, repeats, args.device)
        dense_ms = statistics.median(times["dense"])
        for tau in args.taus:
            p, width = setup[tau]
            sparse_ms = statistics.median(times[f"sparse@{tau}"])
            attention_ms = statistics.median(times[f"attention_only@{tau}"])
            rows.append(
                dict(
                    length=L,
                    tau=tau,
                    kept=width,
                    p=p,
                    repeats=repeats,
                    dense_ms=dense_ms,
                    sparse_ms=sparse_ms,
                    sparse_attention_only_ms=attention_ms,
                    speedup=dense_ms / sparse_ms,
                    attention_only_speedup=dense_ms / attention_ms,
                    ideal_attention_speedup=1 / tau**2,
                    dense_times_ms=times["dense"],
                    sparse_times_ms=times[f"sparse@{tau}"],
                )
            )
            print(
                f"L={L:>6} tau={tau:.2f} kept={width:>6}  dense {dense_ms:9.1f} ms  sparse {sparse_ms:9.1f} ms "
                f"({dense_ms / sparse_ms:5.2f}x)  attention only {attention_ms:9.1f} ms "
                f"({dense_ms / attention_ms:5.2f}x, ideal {1 / tau**2:.0f}x)",
                flush=True,
            )
    return rows


def ttft_model(args):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=Q_HEADS * HEAD_DIM,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=Q_HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=args.ttft_length + 8,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    return enable(model.to(device=args.device, dtype=args.dtype))


def ttft_rows(args) -> list[dict]:
    model = ttft_model(args)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (1, args.ttft_length), generator=gen).to(args.device)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))

    def first_token(policy):
        cache = TopPCache(policy, reserve=1) if policy is not None else None
        kw = {cache_argument(model): cache} if cache is not None else {}
        if cache is None:
            model.set_attn_implementation("sdpa")
        try:
            model.generate(**inputs, **kw, max_new_tokens=1, do_sample=False, pad_token_id=0)
        finally:
            model.set_attn_implementation("sparse_topp")
        return cache

    # The fixed-ratio rule keeps exactly ttft_tau of the tokens in every layer, in both modes,
    # without a calibration pass (the selection's own cost is small next to the layer's).
    ratios = {}

    def run(name, prefill=None):
        policy = (
            None
            if prefill is None
            else TopPPolicy(rule="top_k", keep_ratio=args.ttft_tau, prefill=prefill)
        )
        cache = first_token(policy)
        ratios[name] = 1.0 if cache is None else cache.token_ratio

    with torch.inference_mode():
        variants = {
            "sdpa (no TopPCache)": lambda: run("sdpa (no TopPCache)"),
            "prefill=dense": lambda: run("prefill=dense", "dense"),
            "prefill=sparse": lambda: run("prefill=sparse", "sparse"),
        }
        times = take_turns(variants, args.ttft_repeats, args.device)
    dense_ms = statistics.median(times["prefill=dense"])
    rows = []
    for name, t in times.items():
        ms = statistics.median(t)
        rows.append(
            dict(
                method=name,
                rule=None if "sdpa" in name else f"top_k keep_ratio={args.ttft_tau}",
                length=args.ttft_length,
                ttft_ms=ms,
                times_ms=t,
                token_ratio=ratios[name],
                speedup_vs_dense_prefill=dense_ms / ms,
            )
        )
        print(
            f"TTFT {name:>20}: {ms:9.1f} ms  token ratio {ratios[name]:.3f}  "
            f"({dense_ms / ms:.2f}x vs prefill=dense)",
            flush=True,
        )
    return rows


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--taus", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (halved for L > 8k)")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) / bfloat16 (CUDA default)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and a shorter TTFT prompt")
    ap.add_argument("--no-ttft", action="store_true")
    ap.add_argument("--no-attention", action="store_true", help="TTFT only")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument(
        "--intermediate",
        type=int,
        default=None,
        help="MLP width: 18944 (7B, CUDA default); 1024 on CPU, where the 7B MLP takes minutes a call",
    )
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--ttft-length", type=int, default=None)
    ap.add_argument("--ttft-tau", type=float, default=0.25)
    ap.add_argument("--ttft-repeats", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.repeats = args.repeats or (10 if cuda else (2 if args.quick else 3))
    args.ttft_repeats = args.ttft_repeats or (5 if cuda else (1 if args.quick else 3))
    args.ttft_length = args.ttft_length or (8192 if cuda else 2048)
    args.intermediate = args.intermediate or (18944 if cuda else 1024)
    return args


def main():
    args = parse_args()
    env = environment(args.device) | {"transformers": transformers.__version__}
    settings = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(args).items()}
    print(
        f"prefill benchmark on {env['device']} ({args.dtype}), load average {env['load_average_at_start']:.1f}"
    )
    result = {
        "environment": env,
        "settings": settings,
        "shape": dict(
            q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, n_probe=N_PROBE, batch=1
        ),
    }
    if not args.no_attention:
        result["attention"] = attention_rows(args)
    if not args.no_ttft:
        result["ttft"] = ttft_rows(args)
    env["load_average_at_end"] = os.getloadavg()[0]
    out = Path(args.out) if args.out else RESULTS / f"prefill_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
