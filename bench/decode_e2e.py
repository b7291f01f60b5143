"""End-to-end decoding speed: TopPCache at tau ~25% vs a preallocated StaticCache (SDPA) and vs
TopPCache at p = 1.

    python bench/decode_e2e.py [--device cpu|cuda] [--contexts 8192 16384 32768] [--quick]

The model: a random-init Qwen2 whose attention has the shape of Qwen2.5-7B's (28 query heads,
4 KV heads, head_dim 128) but whose hidden size (256), MLP (512) and vocabulary (1024) are
narrow, ``--layers`` decoder layers. Why: decode speed is bytes read per token. A 7B model reads
~15 GB of weights per step and, per sequence, 28 layers x 2 x 4 heads x 128 x 2 bytes = 57 KiB
of K/V per context token: at 32k context and batch 8 that is ~15 GB of K/V too, and serving
at long context is where the K/V (what the cache prunes) dominates. Growing the batch on a CPU
would take minutes per step; shrinking the weights instead puts a single sequence in the same
regime (K/V bytes >= weight bytes) while every attention tensor keeps its real 7B shape.

The prompt's K/V (``--prefill projected``, the default): every layer's k / v projections (with
RoPE) of the prompt's embeddings, and its q projections for the probes - what a layer computes
from its input, in linear time, where a dense prefill of a 32k prompt costs minutes of CPU (the
quadratic attention). Decoding does not depend on how the K/V came about; ``--prefill model``
runs the real prefill instead (the GPU default). ``--sharpen`` scales the q / k projections so
that attention concentrates as in a trained model; the policy's p is then searched (bisection
on the cache's own token ratio) for tau ~ ``--tau``.

Methods, each decoding ``--new-tokens`` tokens greedily (a plain forward loop, batch 1):
  static: transformers' StaticCache (preallocated for prompt + new tokens), SDPA attention;
  p=1:    TopPCache keeping every token (the same layout as the pruned cache: isolates pruning);
  topp:   TopPCache at the searched p.
Every cache is preallocated for the new tokens (StaticCache max_cache_len, TopPCache reserve),
so no method reallocates while timed. Timing: CUDA events (GPU) or time.perf_counter (CPU)
around the decode loop; the methods take turns in rounds (an untimed warm-up round, then
``--repeats`` timed ones) and each reports its median. Writes bench/results/decode_e2e_<device>.json
(environment, settings, one row per context and method, with the ratios) and prints the table.
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
from transformers import (
    AttentionInterface,
    DynamicCache,
    Qwen2Config,
    Qwen2ForCausalLM,
    StaticCache,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from sparse_attn import ops
from sparse_attn.attention import FLASH_FIRST, cache_argument, enable
from sparse_attn.cache import TopPCache, take_pending_cache
from sparse_attn.policy import TopPPolicy

Q_HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128  # Qwen2.5-7B's attention
HIDDEN, MLP, VOCAB = 256, 512, 1024


def make_model(args) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=args.layers,
        num_attention_heads=Q_HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=max(args.contexts) + args.new_tokens,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    assert model.model.layers[0].self_attn.head_dim == HEAD_DIM
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
def projected_prompt(model, prompt: torch.Tensor):
    """Per layer (query, key, value) of the prompt: the layer's q / k / v projections of the
    normed embeddings, RoPE applied ([B, H, L, D] each)."""
    embeds = model.model.embed_tokens(prompt)
    positions = torch.arange(prompt.shape[1], device=prompt.device)[None]
    cos, sin = model.model.rotary_emb(embeds, positions)
    states = []
    for layer in model.model.layers:
        attn, x = layer.self_attn, layer.input_layernorm(embeds)
        shape = (*prompt.shape, -1, HEAD_DIM)
        q, k, v = (
            proj(x).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        states.append((q, k, v))
    return states


@torch.no_grad()
def model_prompt(model, prompt: torch.Tensor):
    """Per layer (last 64 queries, key, value) of a real dense prefill (SDPA)."""
    captured = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        captured[module.layer_idx] = query[:, :, -64:]  # the probes (TopPPolicy.n_probe)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("bench_capture", capture)
    AttentionMaskInterface.register("bench_capture", sdpa_mask)
    model.set_attn_implementation("bench_capture")
    dense = DynamicCache(config=model.config)
    with sdpa_kernel(FLASH_FIRST, set_priority=True):
        model(input_ids=prompt, **{cache_argument(model): dense})
    return [(captured[i], layer.keys, layer.values) for i, layer in enumerate(dense.layers)]


def topp_cache(model, states, p: float, reserve: int) -> TopPCache:
    """A TopPCache holding the prompt's K/V, selected at p as after a dense prefill."""
    cache = TopPCache(TopPPolicy(p=p), reserve=reserve)
    layers = len(states)
    for layer_idx, (query, key, value) in enumerate(states):
        cache.update(key, value, layer_idx)
        take_pending_cache(layer_idx)  # no attention call follows: the selection comes here
        cache.select_after_prefill(layer_idx, query, None, HEAD_DIM**-0.5, num_layers=layers)
    return cache


def static_cache(model, states, max_cache_len: int) -> StaticCache:
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    L = states[0][1].shape[2]
    for layer_idx, (_, key, value) in enumerate(states):
        cache.update(key, value, layer_idx, {"cache_position": torch.arange(L, device=key.device)})
    return cache


def search_p(model, states, tau: float, reserve: int) -> tuple[float, float]:
    """(p, token ratio): bisection on p for the cache's token ratio closest to ``tau``."""
    low, high, best = 0.0, 1.0, None
    for _ in range(12):
        p = (low + high) / 2
        ratio = topp_cache(model, states, p, reserve).token_ratio
        if best is None or abs(ratio - tau) < abs(best[1] - tau):
            best = (p, ratio)
        low, high = (p, high) if ratio < tau else (low, p)
    return best


def kv_bytes(cache) -> int:
    if isinstance(cache, TopPCache):
        return cache.kv_bytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


@torch.no_grad()
def decode(model, cache, first_token: torch.Tensor, new_tokens: int, watch: Stopwatch) -> float:
    """Seconds for ``new_tokens`` greedy steps from ``first_token`` ([B, 1])."""
    token, kwargs = first_token, {cache_argument(model): cache}
    watch.start()
    for _ in range(new_tokens):
        token = model(input_ids=token, **kwargs).logits[:, -1:].argmax(-1)
    return watch.stop()


def measure(model, states, first_token, p: float, args) -> dict:
    """Median decode time of each method (the methods take turns; round 0 warms up)."""
    L = states[0][1].shape[2]
    methods = {
        "static": lambda: static_cache(model, states, L + args.new_tokens),
        "p=1": lambda: topp_cache(model, states, 1.0, args.new_tokens),
        "topp": lambda: topp_cache(model, states, p, args.new_tokens),
    }
    watch, runs, info = Stopwatch(args.device), {name: [] for name in methods}, {}
    for round_index in range(1 + args.repeats):
        for name, build in methods.items():
            cache = build()
            info[name] = {"kv_bytes": kv_bytes(cache)}
            if name == "static":
                model.set_attn_implementation("sdpa")
                with sdpa_kernel(FLASH_FIRST, set_priority=True):
                    seconds = decode(model, cache, first_token, args.new_tokens, watch)
            else:
                enable(model)
                seconds = decode(model, cache, first_token, args.new_tokens, watch)
                info[name] |= {
                    "token_ratio": cache.token_ratio,
                    "kv_bytes_in_use": cache.kv_bytes_in_use(),
                }
            if round_index:
                runs[name].append(seconds)
            del cache
    results = {}
    for name in methods:
        seconds = statistics.median(runs[name])
        results[name] = {
            "decode_ms_per_step": seconds * 1e3 / args.new_tokens,
            "decode_tokens_per_s": first_token.shape[0] * args.new_tokens / seconds,
            **info[name],
        }
    return results


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--layers", type=int, help="decoder layers (default: CPU 2, GPU 4)")
    parser.add_argument("--new-tokens", type=int, help="decoded tokens timed (CPU 16, GPU 64)")
    parser.add_argument("--repeats", type=int, help="timed rounds, median taken (CPU 3, GPU 5)")
    parser.add_argument("--tau", type=float, default=0.25, help="token ratio aimed at")
    parser.add_argument("--sharpen", type=float, default=4.0, help="scale of the q / k projections")
    parser.add_argument(
        "--prefill",
        choices=["projected", "model"],
        help="where the prompt's K/V come from (default: CPU projected, GPU model)",
    )
    parser.add_argument("--quick", action="store_true", help="8 decoded tokens, 2 timed rounds")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    defaults = dict(
        layers=4 if gpu else 2,
        new_tokens=64 if gpu else 16,
        repeats=5 if gpu else 3,
        prefill="model" if gpu else "projected",
    )
    if args.quick:
        defaults.update(new_tokens=8, repeats=2)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.dtype = torch.bfloat16 if gpu else torch.float32
    return args


def format_row(row: dict) -> str:
    return (
        f"context {row['context']:>6}  {row['method']:>6}  {row['decode_tokens_per_s']:8.1f} tok/s "
        f"({row['decode_ms_per_step']:7.1f} ms/step)  x{row['speedup_vs_static']:.2f} vs static "
        f"x{row['speedup_vs_p1']:.2f} vs p=1  KV {row['kv_bytes'] / 2**20:7.1f} MiB "
        f"({row['kv_fraction_of_static']:.2f} of static)  tau {row.get('token_ratio', 1.0):.3f}"
    )


def main() -> None:
    args = parse_args()
    env = environment(args.device) | {
        "transformers": transformers.__version__,
        # The compact decode's attention (sparse_attn.attention.decode_attention).
        "decode_attention": "op" if hasattr(ops, "decode_attention") else "masked SDPA",
    }
    model = make_model(args)
    rows = []
    for context in args.contexts:
        generator = torch.Generator().manual_seed(context)
        prompt = torch.randint(0, VOCAB, (1, context + 1), generator=generator).to(args.device)
        prompt, first_token = prompt[:, :-1], prompt[:, -1:]
        states = (projected_prompt if args.prefill == "projected" else model_prompt)(model, prompt)
        p, ratio = search_p(model, states, args.tau, args.new_tokens)
        results = measure(model, states, first_token, p, args)
        for method, result in results.items():
            rows.append(
                {
                    "context": context,
                    "method": method,
                    "p": {"static": None, "p=1": 1.0, "topp": p}[method],
                    **result,
                    "speedup_vs_static": result["decode_tokens_per_s"]
                    / results["static"]["decode_tokens_per_s"],
                    "speedup_vs_p1": result["decode_tokens_per_s"]
                    / results["p=1"]["decode_tokens_per_s"],
                    "kv_fraction_of_static": result["kv_bytes"] / results["static"]["kv_bytes"],
                }
            )
            print(format_row(rows[-1]), flush=True)
        del states

    settings = {k: v for k, v in vars(args).items() if k != "dtype"} | {
        "dtype": str(args.dtype).removeprefix("torch.")
    }
    model_shape = {
        "q_heads": Q_HEADS,
        "kv_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden": HIDDEN,
        "intermediate": MLP,
        "vocab": VOCAB,
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
