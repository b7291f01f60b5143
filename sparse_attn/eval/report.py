"""sparse-attn eval's outputs: results.json (rows + run info), results.md (a table) and
accuracy_vs_token_ratio.png (one panel per task)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

# Per-sample lists stay in results.jsonl; the summary files keep one number per cell.
_DETAIL = ("scores", "completions")


def summary(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in _DETAIL}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| model | task | length | rule | prefill | accuracy | token ratio | visual ratio | KV MiB | tokens/s |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        kv = None if r.get("kv_bytes") is None else r["kv_bytes"] / 2**20
        lines.append(
            f"| {r.get('model_name', r['model'])} | {r['task']} | {r['length']} | {r['rule']} | "
            f"{r['prefill']} | {_fmt(r['accuracy'], '.3f')} | {_fmt(r['token_ratio'], '.3f')} | "
            f"{_fmt(r.get('visual_token_ratio'), '.3f')} | {_fmt(kv, '.2f')} | "
            f"{_fmt(r.get('tokens_per_s'), '.1f')} |"
        )
    return "\n".join(lines)


def pivot_table(rows: list[dict]) -> str:
    """One line per (length, rule, prefill), one column per task: "accuracy / token ratio"."""
    task_names = list(dict.fromkeys(r["task"] for r in rows))
    cells = {(r["length"], r["rule"], r["prefill"], r["task"]): r for r in rows}
    lines = [
        "| length | rule | prefill | " + " | ".join(task_names) + " |",
        "|---:|---|---|" + "---|" * len(task_names),
    ]
    for length, rule, prefill in dict.fromkeys(
        (r["length"], r["rule"], r["prefill"]) for r in rows
    ):
        values = [cells.get((length, rule, prefill, t)) for t in task_names]
        lines.append(
            f"| {length} | {rule} | {prefill} | "
            + " | ".join(
                "-"
                if v is None
                else f"{_fmt(v['accuracy'], '.2f')} / {_fmt(v['token_ratio'], '.2f')}"
                for v in values
            )
            + " |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str | Path) -> bool:
    """Accuracy against token ratio, one panel per task: one line per rule family, prefill and
    length (the knob values along it), dense as a star. False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_names = list(dict.fromkeys(r["task"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    families = list(dict.fromkeys(r["family"] for r in rows))
    markers = "osD^v<>px"
    cols = min(3, len(task_names))
    nrows = -(-len(task_names) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 4 * nrows), squeeze=False)
    for ax, task in zip(axes.flat, task_names):
        for family in families:
            colour = f"C{families.index(family)}"
            for prefill in ("dense", "sparse"):
                for length in lengths:
                    line = sorted(
                        (
                            r
                            for r in rows
                            if r["task"] == task
                            and r["family"] == family
                            and r["prefill"] == prefill
                            and r["length"] == length
                        ),
                        key=lambda r: r["token_ratio"],
                    )
                    if not line:
                        continue
                    marker = (
                        "*" if family == "dense" else markers[lengths.index(length) % len(markers)]
                    )
                    ax.plot(
                        [r["token_ratio"] for r in line],
                        [r["accuracy"] for r in line],
                        linestyle="-" if prefill == "dense" else "--",
                        marker=marker,
                        color=colour,
                        markersize=9 if family == "dense" else 5,
                        label=f"{family}{'' if prefill == 'dense' else ' (sparse prefill)'} @ {length}",
                    )
        ax.set(
            title=task,
            xlabel="token ratio (kept / existing)",
            ylabel="accuracy",
            xlim=(0, 1.05),
            ylim=(-0.03, 1.03),
        )
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(task_names) :]:
        ax.set_visible(False)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_reports(rows: list[dict], out: str | Path) -> dict[str, Path]:
    """results.json, results.md and the plot under ``out``; returns their paths."""
    from .. import __version__

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    import transformers

    info = {
        "sparse_attn": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device_name": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor(),
    }
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    paths["json"].write_text(
        json.dumps({"info": info, "rows": [summary(r) for r in rows]}, indent=2) + "\n"
    )
    paths["markdown"].write_text(
        markdown_table(rows) + "\n\nAccuracy / token ratio per task:\n\n" + pivot_table(rows) + "\n"
    )
    if rows and plot(rows, out / "accuracy_vs_token_ratio.png"):
        paths["plot"] = out / "accuracy_vs_token_ratio.png"
    return paths
