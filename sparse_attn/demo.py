"""A short demonstration of the four ops on a real model's attention (no downloads).

Builds a small random-init Qwen2 with transformers, runs one prompt, and for every layer takes
the post-RoPE queries and keys that attention really saw: cumulative scores of the last n_probe
queries, top-p selection per layer, compaction of K/V with gather_kv, and a check that attention
over the compact cache equals dense attention with the dropped tokens masked out.

    python -m sparse_attn.demo [--tokens 1024] [--p 0.9 0.975 1.0]

A random-init model attends diffusely, so it keeps most tokens: the numbers here show the
mechanics, not the sparsity a trained (or Sparsity-Forced) model reaches.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import sparse_attn


def capture_attention_inputs(model, input_ids):
    """Runs the model once; returns per layer the (q, k, v) its attention received."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    captured = {}

    def capturing_sdpa(module, query, key, value, attention_mask, **kwargs):
        captured[module.layer_idx] = (query.detach(), key.detach(), value.detach())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("sparse_attn_demo_capture", capturing_sdpa)
    model.set_attn_implementation("sparse_attn_demo_capture")
    with torch.no_grad():
        model(input_ids)
    return [captured[i] for i in sorted(captured)]


def tiny_qwen2(seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=8192,
    )
    return Qwen2ForCausalLM(config).eval()


def last_query_attention(q_last, k, v, keep=None):
    """Attention output of the last query over k/v (GQA), optionally restricted to `keep`."""
    g = q_last.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    mask = None if keep is None else keep[:, None, None, :]
    return F.scaled_dot_product_attention(q_last, k, v, attn_mask=mask)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--n-probe", type=int, default=64)
    ap.add_argument("--p", type=float, nargs="+", default=[0.9, 0.975, 1.0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    model = tiny_qwen2(args.seed)
    input_ids = torch.randint(
        model.config.vocab_size,
        (1, args.tokens),
        generator=torch.Generator().manual_seed(args.seed),
    )
    layers = capture_attention_inputs(model, input_ids)
    print(
        f"tiny random-init Qwen2: {len(layers)} layers, {model.config.num_attention_heads} query / "
        f"{model.config.num_key_value_heads} KV heads; prompt of {args.tokens} tokens, "
        f"{args.n_probe} probe queries, keep_first=4, keep_last=16\n"
    )
    rows = []
    print(
        f"{'p':>6} {'layer':>5} {'kept':>6} {'ratio':>6} {'KV bytes dense':>15} {'compact':>9} {'max |dense-compact|':>20}"
    )
    for p in args.p:
        ratios = []
        for layer, (q, k, v) in enumerate(layers):
            scores = sparse_attn.cumulative_scores(q[:, :, -args.n_probe :], k)  # [B, Hkv, L]
            indices, counts = sparse_attn.topp_select(scores.sum(1), p, keep_first=4, keep_last=16)
            k_kept, v_kept = sparse_attn.gather_kv(k, v, indices, counts)
            # Exactness of the compaction: the last query over the compact cache equals dense
            # attention that masks the dropped tokens.
            keep = torch.zeros(k.shape[0], k.shape[2], dtype=torch.bool)
            keep[0, indices[0, : counts[0]].long()] = True
            q_last = q[:, :, -1:]
            err = (
                (
                    last_query_attention(q_last, k_kept, v_kept)
                    - last_query_attention(q_last, k, v, keep)
                )
                .abs()
                .max()
            )
            ratio = counts[0].item() / k.shape[2]
            ratios.append(ratio)
            rows.append(
                dict(p=p, layer=layer, kept=counts[0].item(), ratio=ratio, max_error=err.item())
            )
            dense_bytes = 2 * k.numel() * k.element_size()
            compact_bytes = 2 * k_kept.numel() * k_kept.element_size()
            print(
                f"{p:>6} {layer:>5} {counts[0].item():>6} {ratio:>6.3f} {dense_bytes:>15,} {compact_bytes:>9,} {err.item():>20.2e}"
            )
        print(f"{p:>6} token ratio (mean over layers) = {sum(ratios) / len(ratios):.3f}\n")
    return rows


if __name__ == "__main__":
    main()
