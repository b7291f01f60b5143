"""How much of a TopPCache's K/V buffers is padding when KV heads keep different numbers of tokens
(TopPPolicy(granularity="kv_head")): each layer is one [B, Hkv, C, D] buffer, so every row is
padded to the layer's longest.

    python bench/ragged_budgets.py [--samples 32] [--batch 8]

Measured on the two embedded worlds (sf_train's shipped tiny models: the visual QA world on
Qwen2.5-VL, worlds/vqa/checkpoint; the key-value retrieval world on Qwen2, worlds/kv/checkpoint) and
on synthetic peaked score rows (topp_select over Zipf-like rows whose peakedness differs per
head). Per layer: padding = 1 - sum(kept) / (rows x max(kept)), right after the prefill's
selection (slots reserved for decoded tokens excluded). Rows: one prompt alone (batch 1: the KV
heads' raggedness only) and ``--batch`` prompts together (left padding and different prompts add
to it, for granularity="layer" too). Writes bench/results/ragged_budgets.json.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from run_op_bench import RESULTS, environment  # bench/run_op_bench.py

from sf_train.worlds.registry import EMBEDDED_TASKS
from sparse_attn import TopPCache, TopPPolicy, enable, topp_select


def padding_fractions(cache: TopPCache) -> list[float]:
    """Per layer: the fraction of the selection's [B, Hkv, max kept] slots that hold no token."""
    fractions = []
    for selection in cache.selections:
        kept = selection.kept.to(torch.float64)
        fractions.append(1.0 - float(kept.sum() / (kept.numel() * kept.max())))
    return fractions


@torch.no_grad()
def world_padding(name: str, samples: int, batch: int, ps, granularity: str) -> dict:
    policy_model, _, task = EMBEDDED_TASKS[name].load(str(EMBEDDED_TASKS[name].checkpoint))
    enable(policy_model)
    prompts = task.samples("heldout", 0, samples)
    out = {}
    for p in ps:
        policy = TopPPolicy(p=p, granularity=granularity)
        per_batch = {}
        for size in (1, batch):
            fractions, ratios = [], []
            for start in range(0, samples, size):
                inputs = task.encode(prompts[start : start + size])
                cache = TopPCache(policy)
                policy_model(**inputs, past_key_values=cache)
                fractions += padding_fractions(cache)
                ratios.append(cache.token_ratio)
            per_batch[f"batch_{size}"] = {
                "padding_mean": statistics.mean(fractions),
                "padding_max": max(fractions),
                "token_ratio": statistics.mean(ratios),
                "prompt_tokens": int(inputs["input_ids"].shape[1]),
            }
        out[str(p)] = per_batch
    return out


def synthetic_padding(heads: int, length: int, ps, seed: int = 0) -> dict:
    """Rows of scores s_j ~ j^(-a_h) (shuffled), the exponent a_h spread over the heads from
    0.3 (flat) to 1.5 (peaked): one layer whose heads differ as much as a trained model's do."""
    generator = torch.Generator().manual_seed(seed)
    exponents = torch.linspace(0.3, 1.5, heads, dtype=torch.float64)
    ranks = torch.arange(1, length + 1, dtype=torch.float64)
    rows = []
    for a in exponents:
        scores = ranks.pow(-a)
        rows.append(scores[torch.randperm(length, generator=generator)])
    scores = torch.stack(rows).to(torch.float32)
    out = {}
    for p in ps:
        _, counts = topp_select(scores, p, keep_first=4, keep_last=16)
        counts = counts.to(torch.float64)
        out[str(p)] = {
            "kept_per_head": counts.tolist(),
            "padding": 1.0 - float(counts.sum() / (counts.numel() * counts.max())),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    ps = (0.9, 0.975)
    result = {"environment": environment("cpu"), "settings": vars(args) | {"p": ps}}
    for world in EMBEDDED_TASKS:
        for granularity in ("kv_head", "layer"):
            key = f"{world}/{granularity}"
            result[key] = world_padding(world, args.samples, args.batch, ps, granularity)
            print(key, json.dumps(result[key]), flush=True)
    for heads, length in ((4, 4096), (8, 4096), (4, 32768)):
        key = f"synthetic/{heads}_heads_{length}"
        result[key] = synthetic_padding(heads, length, (0.9, 0.95, 0.975))
        print(key, {p: round(r["padding"], 3) for p, r in result[key].items()}, flush=True)
    path = RESULTS / "ragged_budgets.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
