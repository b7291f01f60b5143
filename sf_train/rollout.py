"""Rollouts through the deployment pipeline: generate with a TopPCache at a threshold p."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationConfig

from sparse_attn.attention import cache_argument
from sparse_attn.cache import PromptSelection, TopPCache
from sparse_attn.policy import TopPPolicy


@dataclass
class Rollouts:
    """One completion per prompt of a batch, decoded with one TopPCache threshold ``p``."""

    p: float
    completions: Tensor  # int64 [B, T], pad after EOS
    mask: Tensor  # float [B, T]: 1 for completion tokens up to and including EOS
    logp: Tensor | None  # float [B, T]: log-probs the tokens were sampled with (None if greedy)
    token_ratio: Tensor  # float [B]: tau of each rollout
    visual_token_ratio: float | None
    layer_ratios: list[float]
    selections: list[PromptSelection]  # per layer: the prompt tokens kept, and the prefill mode


def completion_mask(completions: Tensor, eos_token_id: int) -> Tensor:
    """1 up to and including the first EOS of each row, 0 after it."""
    is_eos = completions == eos_token_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return (~after_eos).float()


def completion_distribution(
    logits: Tensor, temperature: float, suppressed: tuple[int, ...] = ()
) -> Tensor:
    """float [..., V]: log softmax(logits / temperature) with the ``suppressed`` token ids
    excluded (-inf) - the distribution rollouts sample from."""
    logits = logits.float() / temperature
    if suppressed:
        logits[..., list(suppressed)] = float("-inf")
    return F.log_softmax(logits, dim=-1)


def completion_logp(
    logits: Tensor, tokens: Tensor, temperature: float, suppressed: tuple[int, ...] = ()
):
    """(log pi(token), entropy) under the sampling distribution softmax(logits / temperature)
    with the ``suppressed`` token ids excluded - the distribution rollouts sample from."""
    logp_all = completion_distribution(logits, temperature, suppressed)
    entropy = -(logp_all.exp() * torch.where(torch.isinf(logp_all), 0.0, logp_all)).sum(-1)
    return logp_all.gather(-1, tokens[..., None]).squeeze(-1), entropy


@torch.no_grad()
def rollout(
    model,
    inputs: dict,
    policy: TopPPolicy,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float | None,
    suppressed: tuple[int, ...] = (),
    synced_gpus: bool = False,
) -> Rollouts:
    """Decode every prompt of ``inputs`` (left-padded) once through a TopPCache with ``policy``.

    temperature None decodes greedily (evaluation); otherwise tokens are sampled from
    softmax(logits / temperature) and their log-probs kept for the policy-gradient ratio.
    ``suppressed`` token ids are never generated (e.g. image placeholders a VLM must not emit).
    ``synced_gpus``: keep running forwards until every rank is done (a sharded model's forward
    is a collective; docs/scale.md#fsdp).
    """
    cache = TopPCache(policy, reserve=max_new_tokens)
    sample = temperature is not None
    generation = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_k=0 if sample else None,
        top_p=1.0 if sample else None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        output_logits=sample,
        return_dict_in_generate=True,
        suppress_tokens=list(suppressed) or None,
    )
    out = model.generate(
        **inputs,
        **{cache_argument(model): cache},
        generation_config=generation,
        synced_gpus=synced_gpus,
    )
    P = inputs["input_ids"].shape[1]
    completions = out.sequences[:, P:]
    logp = None
    if sample:  # out.logits are raw: the suppression is applied again, exactly as sampling did
        logp, _ = completion_logp(
            torch.stack(out.logits, dim=1), completions, temperature, suppressed
        )
    return Rollouts(
        p=policy.p,
        completions=completions,
        mask=completion_mask(completions, eos_token_id),
        logp=logp,
        token_ratio=cache.row_token_ratios.to(torch.float32),
        visual_token_ratio=cache.visual_token_ratio,
        layer_ratios=cache.layer_ratios,
        selections=cache.recorded_selections(P),
    )
