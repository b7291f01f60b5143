"""A differentiable token ratio: the top-p rule with its step function smoothed.

Why it exists: the token ratio tau is fixed by the prompt's probe attention before anything is
sampled (docs/design.md#the-prefill: one selection, in the prefill). On-policy, GRPO's efficiency term
therefore has zero expected gradient wherever the gate C is 1:
E[A(p) grad log pi_p(o)] = A(p) E[grad log pi_p(o)] = 0. The gradient of the expected reward has
a second, pathwise part - tau's own dependence on the weights - that the policy gradient leaves
out, and tau is a count (piecewise constant), so that part is zero almost everywhere too.
``soft_token_ratio`` makes it usable: the same rule as sparse_attn's top-p selection (forced
tokens count toward the target; candidates by decreasing score until the mass reaches p * total),
with "candidate r is taken" = [mass before r < p * total] replaced by a sigmoid of width
``temperature * total``. As temperature -> 0 it equals the token ratio the cache reports; its
gradient raises the scores of the tokens at the top and lowers those near the boundary, i.e.
concentrates the probes' attention - the direction the paper's efficiency reward asks for.
SFConfig.soft_tau_weight adds it to the loss (0 = the paper's objective, unchanged).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparse_attn.policy import TopPPolicy
from sparse_attn.reference import forced_positions


def probe_scores(model, inputs: dict, n_probe: int) -> Tensor:
    """float [n_layers, B, L]: each layer's cumulative attention score of every key from the
    prompt's last n_probe positions, summed over heads (the paper's per-layer budget), padding 0.
    Differentiable: one dense forward with the eager attention, which returns the probabilities."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        attentions = model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
    valid = inputs["attention_mask"].bool()
    return torch.stack(
        [a[:, :, -n_probe:, :].float().sum(dim=(1, 2)).masked_fill(~valid, 0.0) for a in attentions]
    )


def soft_topp_count(
    scores: Tensor, p: float, valid: Tensor, forced: Tensor, temperature: float
) -> Tensor:
    """float [R]: the smoothed size of the minimal top-p set of each row of scores [R, L].

    valid, forced: bool [R, L] (forced positions are kept whatever their score, and their mass
    counts toward p * total). The candidates' order is the exact rule's (decreasing score, ties by
    position); only the take-or-not decision is smoothed, so the gradient flows into the scores."""
    if p >= 1.0:
        return valid.sum(-1).to(scores.dtype)
    s = scores.masked_fill(~valid, 0.0)
    total = s.sum(-1, keepdim=True)
    candidates = valid & ~forced
    need = p * total - s.masked_fill(~forced, 0.0).sum(-1, keepdim=True)
    order = torch.sort(
        s.detach().masked_fill(~candidates, -1.0), dim=-1, descending=True, stable=True
    ).indices
    mass = s.masked_fill(~candidates, 0.0).gather(-1, order)
    before = mass.cumsum(-1) - mass  # mass of the candidates ranked above each one
    taken = torch.sigmoid((need - before) / (temperature * total.clamp_min(1e-30)))
    return forced.sum(-1).to(s.dtype) + (taken * candidates.gather(-1, order)).sum(-1)


def soft_token_ratio(
    scores: Tensor,
    valid: Tensor,
    policy: TopPPolicy,
    p_values,
    temperature: float = 0.01,
    candidate_mask: Tensor | None = None,
) -> Tensor:
    """float [B]: the smoothed token ratio of each prompt, averaged over layers and over p_values.

    scores: [n_layers, B, L] from probe_scores; valid: bool [B, L]; policy gives keep_first,
    keep_last and prune: with prune="all" every other valid token is a candidate, with
    prune="visual" only those of ``candidate_mask`` (bool [B, L], the visual tokens: the others
    are forced, as in the cache)."""
    if policy.granularity != "layer":
        raise ValueError(
            "soft_token_ratio supports TopPPolicy(granularity='layer'), "
            f"got granularity={policy.granularity!r}"
        )
    if policy.prune == "visual" and candidate_mask is None:
        raise ValueError(
            "soft_token_ratio with TopPPolicy(prune='visual') needs candidate_mask "
            "(bool [B, L], the visual tokens)"
        )
    if policy.prune == "all" and candidate_mask is not None:
        raise ValueError("soft_token_ratio: candidate_mask is for TopPPolicy(prune='visual')")
    if candidate_mask is not None and candidate_mask.shape != valid.shape:
        raise ValueError(
            f"candidate_mask must have valid's shape {tuple(valid.shape)}, "
            f"got {tuple(candidate_mask.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    n_layers, B, L = scores.shape
    rows = scores.reshape(n_layers * B, L)
    row_valid = valid.repeat(n_layers, 1)
    candidates = None if candidate_mask is None else candidate_mask.repeat(n_layers, 1)
    forced = forced_positions(row_valid, policy.keep_first, policy.keep_last, candidates)
    n_valid = row_valid.sum(-1).to(rows.dtype)
    ratios = torch.stack(
        [
            soft_topp_count(rows, float(p), row_valid, forced, temperature) / n_valid
            for p in p_values
        ]
    )
    return ratios.mean(0).view(n_layers, B).mean(0)
