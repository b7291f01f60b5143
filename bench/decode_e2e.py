"""End-to-end decoding: dense SDPA over the full cache vs TopPCache at p in {1, 0.975, 0.95, 0.9}.

    python bench/decode_e2e.py [--device cpu|cuda] [--contexts 4096 16384 32768] [--quick]

A random-init Qwen2 model with the Qwen2.5-7B attention shape (28 query heads, 4 KV heads,
d = 128), a few layers and a small vocabulary, decodes ``--new-tokens`` tokens greedily after a
prompt of each context length (a plain forward loop, batch ``--batch``). Random weights attend
almost uniformly, which would make top-p keep ~p of the tokens; ``--sharpen`` scales the query
and key projections so that attention concentrates as in a trained model (the measured token
ratio is reported with every row).

Timing: CUDA events (GPU) or time.perf_counter (CPU) around the prefill (selection included) and
around the decode loop; the methods take turns in rounds (an untimed warm-up round, then
``--repeats`` timed ones) and each reports its medians. Writes
bench/results/decode_e2e_<device>.json (environment, settings, one row per context and method)
and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import transformers
from run_op_bench import RESULTS, environment  # bench/run_op_bench.py
from torch.nn.attention import sdpa_kernel
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from sparse_attn.attention import FLASH_FIRST, cache_argument, enable
from sparse_attn.cache import TopPCache
from sparse_attn.policy import TopPPolicy

Q_HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128
# p = 1 keeps every token: against dense it isolates the cache layout (no per-step torch.cat of
# DynamicCache), against p < 1 the pruning itself.
THRESHOLDS = (1.0, 0.975, 0.95, 0.9)


def make_model(args) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=Q_HEADS * HEAD_DIM,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=Q_HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=max(args.contexts) + args.new_tokens,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(args.sharpen)
    return model.to(device=args.device, dtype=args.dtype)


class Stopwatch:
    """Seconds of GPU work (CUDA events) or of wall time (CPU) between start() and stop()."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.begin = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return self.begin.elapsed_time(end) / 1e3
        return time.perf_counter() - self.begin


@torch.no_grad()
def decode_once(
    model, prompt: torch.Tensor, cache, new_tokens: int, watch: Stopwatch
) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one greedy generation of ``new_tokens`` tokens."""
    watch.start()
    cache_kw = {cache_argument(model): cache}
    logits = model(input_ids=prompt, **cache_kw).logits[:, -1]
    prefill = watch.stop()
    watch.start()
    for _ in range(new_tokens):
        token = logits.argmax(-1, keepdim=True)
        logits = model(input_ids=token, **cache_kw).logits[:, -1]
    return prefill, watch.stop()


def run_once(model, prompt, p: float | None, args, watch: Stopwatch):
    """One generation with a dense DynamicCache (p None) or a TopPCache at p:
    (prefill seconds, decode seconds, the cache)."""
    if p is None:
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
        with sdpa_kernel(FLASH_FIRST, set_priority=True):  # FlashAttention-2 over the full cache
            return *decode_once(model, prompt, cache, args.new_tokens, watch), cache
    enable(model)
    # Room for every decoded token: the timed loop never regrows the buffers.
    cache = TopPCache(TopPPolicy(p=p), reserve=args.new_tokens)
    return *decode_once(model, prompt, cache, args.new_tokens, watch), cache


def cache_size(cache) -> dict:
    if isinstance(cache, TopPCache):
        return {"kv_bytes": cache.kv_bytes(), "token_ratio": cache.token_ratio}
    kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    return {"kv_bytes": kv_bytes, "token_ratio": 1.0}  # a DynamicCache holds every token


def measure(model, prompt, args) -> dict:
    """Per method (None: dense, else p): median times and cache size. The methods take turns in
    rounds, so that a change in the shared machine's load hits them alike; round 0 warms up."""
    methods = (None, *THRESHOLDS)
    watch = Stopwatch(args.device)
    runs, sizes = {p: [] for p in methods}, {}
    for round_index in range(1 + args.repeats):
        for p in methods:
            prefill, decode, cache = run_once(model, prompt, p, args, watch)
            if round_index:
                runs[p].append((prefill, decode))
            sizes[p] = cache_size(cache)
    results = {}
    for p in methods:
        decode = statistics.median(r[1] for r in runs[p])
        results[p] = {
            "prefill_ms": statistics.median(r[0] for r in runs[p]) * 1e3,
            "decode_ms_per_step": decode * 1e3 / args.new_tokens,
            "decode_tokens_per_s": prompt.shape[0] * args.new_tokens / decode,
            **sizes[p],
        }
    return results


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--contexts",
        type=int,
        nargs="+",
        help="prompt lengths (default: CPU 512 2048, GPU 4096 16384 32768)",
    )
    parser.add_argument(
        "--batch", type=int, help="sequences decoded together (default: CPU 1, GPU 4)"
    )
    parser.add_argument("--layers", type=int, help="decoder layers (default: CPU 2, GPU 4)")
    parser.add_argument(
        "--intermediate", type=int, help="MLP width (default: CPU 1024, GPU 18944 as Qwen2.5-7B)"
    )
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument(
        "--new-tokens", type=int, help="decoded tokens timed (default: CPU 16, GPU 64)"
    )
    parser.add_argument(
        "--repeats", type=int, help="timed runs per row, median taken (default: CPU 2, GPU 5)"
    )
    parser.add_argument(
        "--sharpen", type=float, default=16.0, help="scale of the q / k projections"
    )
    parser.add_argument(
        "--quick", action="store_true", help="one timed run, 4 decoded tokens: a smoke test"
    )
    args = parser.parse_args()
    gpu = args.device == "cuda"
    defaults = dict(
        contexts=[4096, 16384, 32768] if gpu else [512, 2048],
        batch=4 if gpu else 1,
        layers=4 if gpu else 2,
        intermediate=18944 if gpu else 1024,
        new_tokens=64 if gpu else 16,
        repeats=5 if gpu else 2,
    )
    if args.quick:
        defaults.update(new_tokens=4, repeats=1)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.dtype = torch.bfloat16 if gpu else torch.float32
    return args


def format_row(row: dict) -> str:
    method = "dense" if row["p"] is None else f"p={row['p']}"
    return (
        f"context {row['context']:>6}  {method:>8}  {row['decode_tokens_per_s']:9.1f} tok/s "
        f"x{row['speedup']:.2f}  prefill {row['prefill_ms']:8.1f} ms  "
        f"KV {row['kv_bytes'] / 2**20:8.1f} MiB ({row['kv_fraction']:.2f})  "
        f"tau {row['token_ratio']:.3f}"
    )


def main() -> None:
    args = parse_args()
    env = environment(args.device) | {"transformers": transformers.__version__}
    model = make_model(args)
    rows = []
    for context in args.contexts:
        generator = torch.Generator().manual_seed(context)
        prompt = torch.randint(0, args.vocab, (args.batch, context), generator=generator)
        prompt = prompt.to(args.device)
        results = measure(model, prompt, args)
        dense = results[None]
        for p, result in results.items():
            rows.append(
                {
                    "context": context,
                    "method": "dense" if p is None else "topp",
                    "p": p,
                    **result,
                    "speedup": result["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
                    "kv_fraction": result["kv_bytes"] / dense["kv_bytes"],
                }
            )
            print(format_row(rows[-1]), flush=True)

    settings = {k: v for k, v in vars(args).items() if k != "dtype"} | {
        "dtype": str(args.dtype).removeprefix("torch.")
    }
    model_shape = {
        "q_heads": Q_HEADS,
        "kv_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden": Q_HEADS * HEAD_DIM,
    }
    env["load_average_at_end"] = os.getloadavg()[0]  # other processes sharing the cores
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"decode_e2e_{args.device}.json"
    path.write_text(
        json.dumps(
            {"environment": env, "settings": settings, "model": model_shape, "rows": rows}, indent=2
        )
        + "\n"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
