"""The embedded default (SPEC section 6): base model -> measure -> Sparsity Forcing -> measure.

Everything is local: the synthetic VQA task, the tiny Qwen2.5-VL trained on it by sf_train.sft
(shipped in sf_train/checkpoints/base, retrained if missing), and the Sparsity Forcing run.
Prints a before/after table and writes report.json and plots.png into the run's out_dir.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from .cli import BASE_CHECKPOINT, run_eval, run_training
from .config import SFConfig
from .evaluate import plot_reports


def ensure_base_checkpoint(path: Path) -> None:
    if (path / "config.json").exists():
        return
    from . import sft

    print(f"no base checkpoint at {path}: training it (sf_train.sft)")
    sft.main(["--out", str(path)])


def run_embedded_default(config: SFConfig) -> dict:
    out_dir = Path(config.out_dir)
    # The default names the packaged base checkpoint (found wherever sf_train is installed);
    # any other path is used as given, and a missing one is an error, not a silent substitute.
    if config.model == SFConfig.model:
        model = BASE_CHECKPOINT
        ensure_base_checkpoint(model)
    else:
        model = Path(config.model)
        if not (model / "config.json").exists():
            raise FileNotFoundError(f"no checkpoint at {model} (SFConfig.model)")
    config = replace(config, model=str(model))
    p_values = sorted(set(config.eval_p) | {config.deploy_p, min(config.p_grid), 1.0})

    started = time.perf_counter()
    before = run_eval(config, str(model), p_values, config.eval_samples, str(out_dir / "before.json"))
    run_training(config)
    after = run_eval(config, str(out_dir / "final"), p_values, config.eval_samples, str(out_dir / "after.json"))
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
    report = {
        "config": config.to_dict(),
        "minutes": minutes,
        "before": {str(p): r for p, r in before.items()},
        "after": {str(p): r for p, r in after.items()},
        "token_ratio_reduction_at_deploy_p": reduction,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_reports({"before": before, "after": after}, out_dir / "plots.png")
    print(f"report: {out_dir / 'report.json'}, plots: {out_dir / 'plots.png'}")
    return report
