"""The embedded default (SPEC section 6): base model -> measure -> Sparsity Forcing -> measure.

Everything is local: the synthetic VQA task, the tiny Qwen2.5-VL trained on it by sf_train.sft
(shipped in sf_train/checkpoints/base, retrained if missing), and the Sparsity Forcing run.
task=embedded_kv runs the text-only variant the same way (long-context key-value retrieval, a
tiny Qwen2 trained by sf_train.kv_sft, shipped in sf_train/checkpoints/kv_base).
Prints a before/after table and writes report.json and plots.png into the run's out_dir, and
compares top-p with top-k, fixed-threshold and FastV-style pruning at matched token ratio
before and after (sf_train.baselines: baselines.json, baselines.png).
"""
from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

from .baselines import compare_checkpoints, format_table
from .cli import EMBEDDED_TASKS, resolve_model, run_eval, run_training
from .config import SFConfig
from .evaluate import plot_reports


def ensure_base_checkpoint(path: Path, trainer: str = "sf_train.sft") -> None:
    """Train the base checkpoint at `path` with `trainer` (a module with main(argv)) if missing."""
    if (path / "config.json").exists():
        return
    print(f"no base checkpoint at {path}: training it ({trainer})")
    importlib.import_module(trainer).main(["--out", str(path)])


def run_embedded_default(config: SFConfig, overwrite: bool = False) -> dict:
    from .trainer import check_fresh_out_dir

    out_dir = Path(config.out_dir)
    check_fresh_out_dir(out_dir, overwrite, delete=False)  # before the first evaluation, not after it
    # The default names the packaged base checkpoint of an embedded task (found wherever sf_train
    # is installed, trained if missing); any other path is used as given, and a missing one is an
    # error, not a silent substitute.
    config = resolve_model(config)
    model = Path(config.model)
    if config.task in EMBEDDED_TASKS and model == EMBEDDED_TASKS[config.task].checkpoint:
        ensure_base_checkpoint(model, EMBEDDED_TASKS[config.task].trainer)
    elif not (model / "config.json").exists():
        raise FileNotFoundError(f"no checkpoint at {model} (SFConfig.model)")
    p_values = sorted(set(config.eval_p) | {config.deploy_p, min(config.p_grid), 1.0})
    defaults = SFConfig().to_dict()
    print("Sparsity Forcing run, SFConfig fields off their defaults:",
          {k: v for k, v in config.to_dict().items() if v != defaults[k]})

    started = time.perf_counter()
    before = run_eval(config, str(model), p_values, config.eval_samples, str(out_dir / "before.json"))
    run_training(config, overwrite=overwrite)
    after = run_eval(config, str(out_dir / "final"), p_values, config.eval_samples, str(out_dir / "after.json"))
    # The paper's Table 3 in miniature: other selection rules at top-p's token ratio, before and after.
    rules = compare_checkpoints(config, {"before": str(model), "after": str(out_dir / "final")},
                                config.baseline_samples, out=out_dir / "baselines.json")
    minutes = (time.perf_counter() - started) / 60

    print(f"\nSparsity Forcing on the embedded task ({config.eval_samples} held-out samples, {minutes:.1f} min)")
    print(f"{'p':>6} | {'accuracy before':>15} {'after':>7} | {'token ratio before':>18} {'after':>7}")
    for p in p_values:
        b, a = before[p], after[p]
        print(f"{p:>6g} | {b['accuracy']:>15.3f} {a['accuracy']:>7.3f} | {b['token_ratio']:>18.3f} {a['token_ratio']:>7.3f}")
    d = config.deploy_p
    reduction = before[d]["token_ratio"] / max(after[d]["token_ratio"], 1e-9)
    print(f"at p = {d:g}: token ratio {before[d]['token_ratio']:.3f} -> {after[d]['token_ratio']:.3f} "
          f"({reduction:.2f}x fewer tokens), accuracy {before[d]['accuracy']:.3f} -> {after[d]['accuracy']:.3f}")
    print(f"selection rules at top-p's token ratio ({config.baseline_samples} held-out samples):")
    print(format_table(rules))
    report = {
        "config": config.to_dict(),
        "minutes": minutes,
        "before": {str(p): r for p, r in before.items()},
        "after": {str(p): r for p, r in after.items()},
        "token_ratio_reduction_at_deploy_p": reduction,
        "baselines": {name: {rule: r["matched"] for rule, r in report["rules"].items()} for name, report in rules.items()},
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_reports({"before": before, "after": after}, out_dir / "plots.png")
    print(f"report: {out_dir / 'report.json'}, plots: {out_dir / 'plots.png'}, baselines: {out_dir / 'baselines.png'}")
    return report
