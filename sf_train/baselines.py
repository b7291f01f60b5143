"""Top-p against other KV-selection rules at a matched token ratio (the paper's Table 3 ablation,
in miniature), all through the same TopPCache and evaluation harness (sf_train.evaluate).

  python -m sf_train baselines --model DIR [--after DIR] [--samples 32] [--out report.json]

Rules (TopPPolicy documents their exact semantics):
  top_p      the paper's rule, at the deploy threshold ``config.deploy_p``;
  top_k      a fixed ratio of the candidates per layer (knob: keep_ratio);
  threshold  candidates scoring >= threshold x the mean candidate score (knob: threshold);
  fastv      FastV: the last prompt token ranks the visual tokens at layer 2 (clipped to the
             model's last layer), a fixed ratio of them is kept for every later layer
             (knob: keep_ratio; fixed settings, TopPPolicy.fastv).
top_k and threshold use the config's policy fields (n_probe, keep_first, keep_last,
granularity, prune). Each knob is tuned on a calibration slice of the train split (bisection on
the token ratio, which the prefill's selection alone sets) to match ``target_ratio`` - by default
top-p's ratio at deploy_p on that slice - then every rule is evaluated on the held-out samples,
along with a small accuracy-vs-token-ratio curve per rule.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sparse_attn.policy import TopPPolicy
from sparse_attn.progress import progress

from .config import SFConfig
from .evaluate import evaluate


@dataclass(frozen=True)
class Rule:
    """One selection rule with a single knob: how to build its policy and search the knob."""

    name: str
    knob: str  # the TopPPolicy field the rule is tuned with
    make_policy: Callable[[SFConfig, float], TopPPolicy]
    bounds: tuple[float, float]  # knob search interval
    ratio_rises: bool  # the token ratio grows with the knob
    curve: tuple[float, ...]  # knob values of the accuracy-vs-token-ratio curve (+ the matched one)
    geometric: bool = False  # bisect the knob in log space


def _config_policy(config: SFConfig, **rule_fields) -> TopPPolicy:
    return dataclasses.replace(config.policy(config.deploy_p), **rule_fields)


RULES = {
    "top_p": Rule(
        "top_p", "p", lambda c, p: c.policy(p), (1e-3, 1.0), True, (0.5, 0.8, 0.9, 0.95, 0.99)
    ),
    "top_k": Rule(
        "top_k",
        "keep_ratio",
        lambda c, r: _config_policy(c, rule="top_k", keep_ratio=r),
        (1e-3, 1.0),
        True,
        (0.1, 0.25, 0.5, 0.75, 0.9),
    ),
    "threshold": Rule(
        "threshold",
        "threshold",
        lambda c, t: _config_policy(c, rule="threshold", threshold=t),
        (1e-3, 1e3),
        False,
        (2.0, 1.0, 0.75, 0.5, 0.25),
        geometric=True,
    ),
    "fastv": Rule(
        "fastv",
        "keep_ratio",
        lambda c, r: TopPPolicy.fastv(r, prefill=c.prefill),
        (1e-3, 1.0),
        True,
        (0.1, 0.25, 0.5, 0.75, 0.9),
    ),
}


def _has_visual_tokens(model) -> bool:
    from sparse_attn.attention import enable

    try:
        enable(model, TopPPolicy.fastv(0.5))  # checks prune="visual" against the model
    except ValueError:
        return False
    return True


def calibration_ratio(model, task, policy_for, knob: float, calibration: int) -> float:
    """Token ratio of one knob on the first ``calibration`` train samples. With reselect_every
    = 0 the only selection follows the prefill, so one decoded token is enough to see it."""
    result = evaluate(
        model, task, policy_for, [knob], samples=calibration, max_new_tokens=1, split="train"
    )
    return result[knob]["token_ratio"]


def match_knob(
    model,
    task,
    config: SFConfig,
    rule: Rule,
    target_ratio: float,
    *,
    calibration: int,
    steps: int = 12,
) -> dict:
    """The knob of ``rule`` whose calibration token ratio is closest to ``target_ratio``, among
    the interval's ends and ``steps`` bisection points: {knob, calibration_ratio}."""
    policy_for = lambda k: rule.make_policy(config, k)  # noqa: E731
    tried = {}  # knob -> calibration token ratio
    lo, hi = rule.bounds
    for knob in (lo, hi):
        tried[knob] = calibration_ratio(model, task, policy_for, knob, calibration)
    for _ in range(steps):
        knob = math.sqrt(lo * hi) if rule.geometric else (lo + hi) / 2
        tried[knob] = tau = calibration_ratio(model, task, policy_for, knob, calibration)
        if (tau < target_ratio) == rule.ratio_rises:
            lo = knob
        else:
            hi = knob
    knob, tau = min(tried.items(), key=lambda item: abs(item[1] - target_ratio))
    return {"knob": knob, "calibration_ratio": tau}


def compare_rules(
    model,
    task,
    config: SFConfig,
    target_ratio: float | None = None,
    samples: int = 32,
    *,
    calibration: int = 32,
    rules: tuple[str, ...] = tuple(RULES),
) -> dict:
    """Accuracy and token ratio of each rule at a matched token ratio, and per-rule curves.

    target_ratio: the token ratio to match; None: top-p's at config.deploy_p on the calibration
    slice. ``samples`` held-out samples are evaluated, ``calibration`` train samples tune the
    knobs. FastV is skipped on models without image / video tokens. Returns a JSON-able dict:
    {target_ratio, deploy_p, samples, calibration_samples, rules: {name: {knob, matched, curve,
    policy}}}; matched / curve points carry accuracy, token_ratio, visual_token_ratio,
    layer_ratios and the knob value; each curve (ascending token ratio) includes its matched
    point.
    """
    if "fastv" in rules and not _has_visual_tokens(model):
        rules = tuple(r for r in rules if r != "fastv")
    top_p_ratio = calibration_ratio(model, task, config.policy, config.deploy_p, calibration)
    if target_ratio is None:
        target_ratio = top_p_ratio
    report = {
        "target_ratio": target_ratio,
        "deploy_p": config.deploy_p,
        "samples": samples,
        "calibration_samples": calibration,
        "rules": {},
    }
    for name in progress(rules, desc="baselines", unit="rule"):
        rule = RULES[name]
        if name == "top_p":
            matched = {"knob": config.deploy_p, "calibration_ratio": top_p_ratio}
        else:
            matched = match_knob(model, task, config, rule, target_ratio, calibration=calibration)
        knobs = sorted({*rule.curve, matched["knob"]})
        results = evaluate(
            model,
            task,
            lambda k: rule.make_policy(config, k),  # noqa: B023 (called in this iteration)
            knobs,
            samples=samples,
            max_new_tokens=config.max_new_tokens,
        )
        point = lambda k: {
            "knob": k,
            **{key: v for key, v in results[k].items() if key != "samples"},  # noqa: B023
        }  # noqa: E731
        report["rules"][name] = {
            "knob": rule.knob,
            "matched": {
                **point(matched["knob"]),
                "calibration_ratio": matched["calibration_ratio"],
            },
            "curve": sorted((point(k) for k in knobs), key=lambda r: r["token_ratio"]),
            "policy": dataclasses.asdict(rule.make_policy(config, matched["knob"])),
        }
    return report


def plot_rules(reports: dict[str, dict], path: str | Path) -> None:
    """Accuracy vs token ratio, one colour per rule, one line style per report ("before" solid,
    "after" dashed); stars mark each rule's matched point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"before": "-", "after": "--"}
    colours = {name: f"C{i}" for i, name in enumerate(RULES)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for report_name, report in reports.items():
        style = styles.get(report_name, ":")
        for name, rule in report["rules"].items():
            curve, matched = rule["curve"], rule["matched"]
            ax.plot(
                [c["token_ratio"] for c in curve],
                [c["accuracy"] for c in curve],
                style,
                marker="o",
                markersize=3,
                color=colours[name],
                label=f"{name} ({report_name})",
            )
            ax.plot(
                matched["token_ratio"], matched["accuracy"], "*", markersize=11, color=colours[name]
            )
        ax.axvline(report["target_ratio"], color="grey", linestyle=style, linewidth=0.8)
    ax.set(
        xlabel="token ratio (kept / existing)",
        ylabel="accuracy",
        title="KV selection rules (stars: matched token ratio)",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(reports: dict[str, dict]) -> str:
    lines = [
        "| model | rule | knob | accuracy | token ratio | visual ratio |",
        "|---|---|---|---|---|---|",
    ]
    for report_name, report in reports.items():
        for name, rule in report["rules"].items():
            m = rule["matched"]
            visual = "-" if m["visual_token_ratio"] is None else f"{m['visual_token_ratio']:.3f}"
            lines.append(
                f"| {report_name} | {name} | {rule['knob']}={m['knob']:.4g} | {m['accuracy']:.3f} | "
                f"{m['token_ratio']:.3f} | {visual} |"
            )
    return "\n".join(lines)
