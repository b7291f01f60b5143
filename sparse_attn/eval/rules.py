"""The KV selection rules sparse-attn eval compares, as "family:value" specs (docs/eval.md#rules):

  dense            the model with transformers' own cache: every token kept (token ratio 1)
  top_p:P          TopPPolicy(p=P), the paper's rule
  top_k:R          TopPPolicy(rule="top_k", keep_ratio=R): a fixed share of the candidates
  threshold:T      TopPPolicy(rule="threshold", threshold=T): candidates scoring >= T x the mean
  fastv:R          TopPPolicy.fastv(R): FastV, visual tokens only (VLMs)

"top_p:0.9,0.975" is two rules. top_p / top_k / threshold take the run's common policy fields
(--n-probe, --keep-first, --keep-last, --granularity); FastV has its own fixed settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..policy import TopPPolicy
from .model import EvalError

FAMILIES = ("dense", "top_p", "top_k", "threshold", "fastv")
DEFAULT_RULES = (
    "dense",
    "top_p:0.9,0.95,0.975,1",
    "top_k:0.1,0.25,0.5",
    "threshold:0.5,1,2",
    "fastv:0.25,0.5",
)
PREFILLS = ("dense", "sparse")


def supported_prefills() -> tuple[str, ...]:
    """The prefill modes this sparse_attn offers: "sparse" only where TopPPolicy has a
    ``prefill`` field (feature-detected, so eval runs before and after sparse prefill exists)."""
    names = {f.name for f in dataclasses.fields(TopPPolicy)}
    return PREFILLS if "prefill" in names else ("dense",)


@dataclass(frozen=True)
class Rule:
    family: str
    value: float | None = None

    @property
    def name(self) -> str:
        return self.family if self.value is None else f"{self.family}:{self.value:g}"

    @property
    def visual_only(self) -> bool:
        return self.family == "fastv"

    def policy(self, prefill: str, fields: dict) -> TopPPolicy | None:
        """The TopPPolicy of this rule (None for dense) with prefill ``prefill``."""
        if self.family == "dense":
            return None
        extra = {"prefill": prefill} if "sparse" in supported_prefills() else {}
        if prefill not in supported_prefills():
            raise EvalError(
                f"--prefill {prefill}: this sparse_attn has no sparse prefill "
                "(TopPPolicy has no 'prefill' field); use --prefill dense"
            )
        try:
            if self.family == "fastv":
                return TopPPolicy.fastv(self.value, **extra)
            knob = {
                "top_p": {"p": self.value},
                "top_k": {"rule": "top_k", "keep_ratio": self.value},
                "threshold": {"rule": "threshold", "threshold": self.value},
            }[self.family]
            return TopPPolicy(**{**fields, **knob, **extra})
        except ValueError as error:
            raise EvalError(f"--rules {self.name}: {error}") from error


def parse_rules(specs: list[str]) -> list[Rule]:
    """Rules from "family[:v1,v2,...]" specs, in the order given, duplicates dropped."""
    rules: list[Rule] = []
    for spec in specs:
        family, sep, values = spec.partition(":")
        family = family.strip()
        if family not in FAMILIES:
            raise EvalError(
                f"--rules {spec!r}: unknown rule {family!r}; known: {', '.join(FAMILIES)} "
                "(e.g. top_p:0.9,0.975)"
            )
        if family == "dense":
            if sep:
                raise EvalError(f"--rules {spec!r}: dense takes no value")
            parsed = [Rule("dense")]
        else:
            if not values:
                raise EvalError(f"--rules {spec!r}: {family} needs values, e.g. {family}:0.5")
            try:
                parsed = [Rule(family, float(v)) for v in values.split(",") if v.strip()]
            except ValueError:
                raise EvalError(
                    f"--rules {spec!r}: values must be numbers separated by commas"
                ) from None
        for rule in parsed:
            if rule not in rules:
                rules.append(rule)
    return rules
