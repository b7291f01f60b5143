"""Accuracy and token ratio of a model at a list of thresholds p (greedy decoding through the
TopPCache; p = 1 keeps every token, i.e. the dense model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .rollout import rollout
from .tasks import TrainingTask


@torch.no_grad()
def evaluate(
    model,
    task: TrainingTask,
    policy_for,
    p_values,
    *,
    samples: int,
    batch_size: int = 32,
    max_new_tokens: int = 4,
    split: str = "heldout",
) -> dict:
    """{p: {accuracy, token_ratio, visual_token_ratio, layer_ratios}} over the first ``samples``
    samples of ``split``. policy_for(p) gives the TopPPolicy of a threshold."""
    from sparse_attn.attention import enable
    from sparse_attn.progress import progress

    enable(model.eval())
    device = next(model.parameters()).device
    results = {}
    bar = progress(
        total=len(p_values) * samples, desc=f"evaluate ({split})", unit="sample", leave=False
    )
    for p in p_values:
        correct, tau, visual, layers = [], [], [], []
        for start in range(0, samples, batch_size):
            bar.set_postfix_str(f"p={float(p):g}")
            batch = task.samples(split, start, min(batch_size, samples - start))
            inputs = {
                k: v.to(device) if isinstance(v, torch.Tensor) else v
                for k, v in task.encode(batch).items()
            }
            out = rollout(
                model,
                inputs,
                policy_for(p),
                max_new_tokens=max_new_tokens,
                eos_token_id=task.eos_token_id,
                pad_token_id=task.pad_token_id,
                temperature=None,
            )
            texts = task.decode(out.completions)
            correct += [
                task.is_correct(task.prompt(s), t, task.answer(s)) for s, t in zip(batch, texts)
            ]
            tau += out.token_ratio.tolist()
            weight = len(batch)
            if out.visual_token_ratio is not None:
                visual.append((out.visual_token_ratio, weight))
            layers.append((out.layer_ratios, weight))
            bar.update(weight)
        results[p] = {
            "accuracy": float(np.mean(correct)),
            "token_ratio": float(np.mean(tau)),
            "visual_token_ratio": float(
                np.average([v for v, _ in visual], weights=[w for _, w in visual])
            )
            if visual
            else None,
            "layer_ratios": np.average(
                [l for l, _ in layers], axis=0, weights=[w for _, w in layers]
            ).tolist(),
            "samples": samples,
        }
    bar.close()
    return results


def save_report(results: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({str(p): r for p, r in results.items()}, indent=2) + "\n")


def plot_reports(reports: dict[str, dict], path: str | Path) -> None:
    """Accuracy vs token ratio over p, and per-layer retention at each p, one line per report
    (e.g. {"before": ..., "after": ...})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_layer) = plt.subplots(1, 2, figsize=(11, 4))
    for name, results in reports.items():
        ps = sorted(results, key=float)
        ax_acc.plot(
            [results[p]["token_ratio"] for p in ps],
            [results[p]["accuracy"] for p in ps],
            "o-",
            label=name,
        )
        for p in ps:
            ax_acc.annotate(
                f"p={float(p):g}", (results[p]["token_ratio"], results[p]["accuracy"]), fontsize=7
            )
        deploy = ps[0] if len(ps) == 1 else [p for p in ps if float(p) < 1.0][-1]
        ax_layer.plot(results[deploy]["layer_ratios"], "o-", label=f"{name}, p={float(deploy):g}")
    # At least a 10-point accuracy span: a one-sample difference must not fill the axis.
    low, high = ax_acc.get_ylim()
    middle, half = (low + high) / 2, max((high - low) / 2, 0.05)
    ax_acc.set(
        xlabel="token ratio (kept / existing)",
        ylabel="accuracy",
        title="accuracy vs token ratio",
        xlim=(0, 1.05),
        ylim=(max(0.0, middle - half), min(1.0, middle + half) + 0.005),
    )
    ax_layer.set(xlabel="layer", ylabel="token ratio", title="per-layer retention", ylim=(0, 1.05))
    ax_layer.xaxis.get_major_locator().set_params(integer=True)
    ax_acc.legend()
    ax_layer.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
