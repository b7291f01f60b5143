"""TopPPolicy: what a TopPCache keeps (docs/design.md#top-p-selection, #the-prefill), and the
baseline rules it can name instead of top-p (the paper's Table 3 ablation: fixed ratio, fixed
threshold, FastV)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

GRANULARITIES = ("layer", "kv_head")
PRUNE_MODES = ("all", "visual")
RULES = ("top_p", "top_k", "threshold")
PREFILL_MODES = ("sparse", "dense")


@dataclass(frozen=True)
class TopPPolicy:
    """KV selection rule, applied to every layer in the prefill (docs/sparse_prefill.md).

    prefill: how a layer's prompt attention relates to its selection.
        "sparse" (default; ZipVL Algorithm 1, Sparsity Forcing Eq. 2): in every layer, in this
        order, the probe queries score all valid prompt keys, the rule below selects the set T
        (per layer, or per KV head), the layer's attention runs only among T (a query position in
        T attends causally to the keys in T; a query position outside T gets a zero attention
        output in that layer, its residual stream and MLP still run), and the cache keeps
        K[T], V[T]. Every layer selects again from all tokens. The last prompt position must be
        in T (it produces the first generated token), so ``keep_last`` must be >= 1; padding is
        never in T. Cost: scoring O(n_probe * L), attention O(|T|^2) instead of O(L^2).
        "dense": the prefill attention is exact and dense, then each layer selects and compacts
        its cache (kvpress-style cache compression): the first generated token does not depend
        on the selection.
        p = 1 keeps every valid token, and then both modes equal the dense model exactly. With
        ``granularity="kv_head"`` the query heads of KV head h's group use T_h for their queries
        and keys; ``shared_from_layer`` layers < K attend densely and later layers use layer K's
        set.

    Every rule ranks the same cumulative attention scores of the probe queries (docs/design.md#top-p-selection)
    and goes through the same cache compaction and stats. Within one budget row (a layer, or a
    KV head with granularity="kv_head"):

    - forced tokens F are always kept: the first ``keep_first`` and last ``keep_last`` valid
      tokens, and with prune="visual" every text token;
    - the candidates C are the row's other valid tokens (n = |C|); the rule picks among them.

    rule: which candidates are kept (sparse_attn.rules implements them).
        "top_p" (default, the paper's rule): the highest-scoring candidates until F and them
        hold a fraction ``p`` of the row's attention mass (the topp_select op).
        "top_k" (fixed ratio): the ``ceil(keep_ratio * n)`` highest-scoring candidates, the
        ceiling of the float64 product as Python computes it; k counts candidates only, so a
        row keeps exactly ``|F| + ceil(keep_ratio * n)`` tokens. Ties: lower position first.
        "threshold" (fixed threshold): every candidate whose score is >= ``threshold`` times
        the row's mean candidate score (sum over C / n, float64): a threshold relative to
        uniform attention over the candidates, so one value means the same at every length.
        The ``p`` field is ignored by "top_k" and "threshold" (still validated).
    p: keep the minimal set of tokens holding a fraction ``p`` of the probe queries' attention
        mass; 1.0 keeps every token (exactly the dense model).
    keep_ratio: "top_k" only (required there), in (0, 1]; 1.0 keeps every token.
    threshold: "threshold" only (required there), > 0 and finite.
    n_probe: probe queries, the last ``n_probe`` prompt positions (fewer if the prompt is shorter).
    keep_first / keep_last: the first / last valid tokens always kept (attention sinks, local
        window); under "top_p" their mass counts toward ``p``.
    granularity: "layer" - one budget per layer, scores summed over KV heads (the paper's rule);
        "kv_head" - one budget per KV head, so heads keep different numbers of tokens. Every
        rule supports both.
    reselect_every: 0 selects once, after the prefill; N > 0 re-runs the selection over the cache
        every N decoded tokens, probing with the queries decoded since the previous selection
        (at most ``n_probe`` of them).
    prune: "all" - every token is a candidate; "visual" - only image / video tokens are
        candidates, text is always kept.
    shared_from_layer: None - every layer selects for itself. K - FastV-style pruning: layers
        < K keep every token (token ratio 1), layer K selects with ``rule``, and every layer > K
        keeps exactly the positions layer K kept (and, with reselect_every, keeps what layer K
        keeps at each reselection). K is clipped to the model's last layer (num_layers - 1,
        read from the attention modules' config.num_hidden_layers), so a shallow model still
        prunes: FastV's K = 2 is layer 1 on a 2-layer model.

    ``TopPPolicy.fastv(keep_ratio)`` builds FastV (Chen et al. 2024): the last prompt token's
    attention at layer 2 ranks the visual tokens, a fixed fraction of them is kept for all later
    layers.
    """

    p: float = 0.975
    n_probe: int = 64
    keep_first: int = 4
    keep_last: int = 16
    granularity: str = "layer"
    reselect_every: int = 0
    prune: str = "all"
    rule: str = "top_p"
    keep_ratio: float | None = None
    threshold: float | None = None
    shared_from_layer: int | None = None
    prefill: str = "sparse"

    @classmethod
    def fastv(cls, keep_ratio: float, *, layer: int = 2, **overrides) -> TopPPolicy:
        """FastV: after ``layer`` (clipped to the model's last layer), keep the ``keep_ratio``
        highest-attended visual tokens (ranked by the last prompt token) in every later layer;
        text is always kept, nothing else is forced by position (under the sparse prefill the last
        prompt position is, as every sparse prefill needs)."""
        prefill = overrides.get("prefill", "sparse")
        fields = dict(
            rule="top_k",
            keep_ratio=keep_ratio,
            n_probe=1,
            prune="visual",
            shared_from_layer=layer,
            keep_first=0,
            keep_last=int(prefill == "sparse"),
            granularity="layer",
        )
        return cls(**{**fields, **overrides})

    def __post_init__(self):
        # bool is an int subclass: reject it so that True cannot silently mean 1. Numbers of
        # other types (numpy scalars) count as the Python numbers they equal, and are stored as
        # those (_as_python_numbers).
        def require_int(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Integral)
                or value < minimum
            ):
                raise ValueError(f"TopPPolicy.{name} must be an int >= {minimum}, got {value!r}")

        def is_number(value) -> bool:
            return not isinstance(value, bool) and isinstance(value, numbers.Real)

        if not is_number(self.p) or not 0.0 < self.p <= 1.0:
            raise ValueError(f"TopPPolicy.p must be a number in (0, 1], got {self.p!r}")
        require_int("n_probe", 1)
        require_int("keep_first", 0)
        require_int("keep_last", 0)
        require_int("reselect_every", 0)
        if self.shared_from_layer is not None:
            require_int("shared_from_layer", 0)
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"TopPPolicy.granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if self.prune not in PRUNE_MODES:
            raise ValueError(f"TopPPolicy.prune must be one of {PRUNE_MODES}, got {self.prune!r}")
        if self.prefill not in PREFILL_MODES:
            raise ValueError(
                f"TopPPolicy.prefill must be one of {PREFILL_MODES}, got {self.prefill!r}"
            )
        if self.prefill == "sparse" and self.keep_last < 1:
            # The last prompt position produces the first generated token: outside T its
            # attention output would be zero in every layer (docs/sparse_prefill.md).
            raise ValueError(
                "TopPPolicy.keep_last must be >= 1 with prefill='sparse' (the last prompt "
                f"position must attend), got keep_last={self.keep_last}; use prefill='dense' "
                "to keep nothing by position"
            )
        if self.rule not in RULES:
            raise ValueError(f"TopPPolicy.rule must be one of {RULES}, got {self.rule!r}")
        # Each knob belongs to one rule: a knob another rule would silently ignore is an error.
        for name, rule in (("keep_ratio", "top_k"), ("threshold", "threshold")):
            value = getattr(self, name)
            if self.rule != rule:
                if value is not None:
                    raise ValueError(
                        f"TopPPolicy.{name} is used only by rule={rule!r}, got {name}={value!r} "
                        f"with rule={self.rule!r}"
                    )
            elif value is None:
                raise ValueError(f"TopPPolicy.{name} is required with rule={rule!r}")
        if self.keep_ratio is not None and (
            not is_number(self.keep_ratio) or not 0.0 < self.keep_ratio <= 1.0
        ):
            raise ValueError(
                f"TopPPolicy.keep_ratio must be a number in (0, 1], got {self.keep_ratio!r}"
            )
        if self.threshold is not None and (
            not is_number(self.threshold)
            or not math.isfinite(self.threshold)
            or self.threshold <= 0
        ):
            raise ValueError(
                f"TopPPolicy.threshold must be a finite number > 0, got {self.threshold!r}"
            )
        self._as_python_numbers()

    def _as_python_numbers(self) -> None:
        """Store numpy (or other numbers.Real) scalars as Python int / float, so that the policy
        compares, hashes and prints as one built from Python numbers."""
        for name in ("n_probe", "keep_first", "keep_last", "reselect_every", "shared_from_layer"):
            value = getattr(self, name)
            if value is not None and type(value) is not int:
                object.__setattr__(self, name, int(value))
        for name in ("p", "keep_ratio", "threshold"):
            value = getattr(self, name)
            if value is not None and type(value) is not float:
                object.__setattr__(self, name, float(value))
