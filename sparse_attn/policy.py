"""TopPPolicy: what a TopPCache keeps (SPEC section 2 and 4)."""

from __future__ import annotations

from dataclasses import dataclass

GRANULARITIES = ("layer", "kv_head")
PRUNE_MODES = ("all", "visual")


@dataclass(frozen=True)
class TopPPolicy:
    """Top-p KV selection rule, applied to every layer after the prefill.

    p: keep the minimal set of tokens holding a fraction ``p`` of the probe queries' attention
        mass; 1.0 keeps every token (exactly the dense model).
    n_probe: probe queries, the last ``n_probe`` prompt positions (fewer if the prompt is shorter).
    keep_first / keep_last: the first / last valid tokens always kept (attention sinks, local
        window); their mass counts toward ``p``.
    granularity: "layer" - one budget per layer, scores summed over KV heads (the paper's rule);
        "kv_head" - one budget per KV head, so heads keep different numbers of tokens.
    reselect_every: 0 selects once, after the prefill; N > 0 re-runs the selection over the cache
        every N decoded tokens, probing with the queries decoded since the previous selection
        (at most ``n_probe`` of them).
    prune: "all" - every token is a candidate; "visual" - only image / video tokens are
        candidates, text is always kept.
    """

    p: float = 0.975
    n_probe: int = 64
    keep_first: int = 4
    keep_last: int = 16
    granularity: str = "layer"
    reselect_every: int = 0
    prune: str = "all"

    def __post_init__(self):
        # bool is an int subclass: reject it so that True cannot silently mean 1.
        def require_int(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"TopPPolicy.{name} must be an int >= {minimum}, got {value!r}")

        if (
            isinstance(self.p, bool)
            or not isinstance(self.p, (int, float))
            or not 0.0 < self.p <= 1.0
        ):
            raise ValueError(f"TopPPolicy.p must be a number in (0, 1], got {self.p!r}")
        require_int("n_probe", 1)
        require_int("keep_first", 0)
        require_int("keep_last", 0)
        require_int("reselect_every", 0)
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"TopPPolicy.granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if self.prune not in PRUNE_MODES:
            raise ValueError(f"TopPPolicy.prune must be one of {PRUNE_MODES}, got {self.prune!r}")
