"""What each command of ``python -m sf_train`` does, end to end: load, train, evaluate, compare,
report. The face (sf_train/cli.py) parses the arguments and calls these.

  train     run_training: the Sparsity Forcing loop (sf_train/trainer.py), then the final weights
  eval      run_eval: accuracy and token ratio at thresholds p (sf_train/evaluate.py)
  baselines compare_checkpoints: top-p against other selection rules at a matched token ratio
            (sf_train/baselines.py)
  main      run_embedded_default: base model -> measure -> Sparsity Forcing -> measure, the
            embedded default (docs/design.md#the-embedded-default)

Everything is local: the synthetic worlds (sf_train/worlds/, known by name only to
sf_train/worlds/registry.py), their tiny models' shipped base checkpoints (retrained if
missing) and the Sparsity Forcing run. ``main`` prints a before/after table, writes report.json
and plots.png into the run's out_dir, and compares top-p with top-k, fixed-threshold and
FastV-style pruning at matched token ratio before and after (baselines.json, baselines.png).
"""

from __future__ import annotations

import importlib
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from .baselines import compare_rules, format_table, plot_rules
from .config import SFConfig, parse_overrides
from .distributed import device_for_rank
from .evaluate import evaluate, plot_reports, save_report
from .trainer import SparsityForcingTrainer, check_fresh_out_dir, checkpoint_config
from .worlds.registry import EMBEDDED_TASKS, load_models_and_task, resolve_model


def load_config(args, recipe: bool = False) -> SFConfig:
    """SFConfig from --config and --set; with ``recipe``, an embedded task's main_recipe under both.
    With --resume, the checkpoint's config under both (trainer.resume refuses a changed field)."""
    overrides = parse_overrides(args.set or [])
    if getattr(args, "resume", False):
        given = {**(SFConfig.file_values(args.config) if args.config else {}), **overrides}
        stored = checkpoint_config(given.get("out_dir", SFConfig.out_dir))
        known = set(SFConfig().to_dict())
        return SFConfig(**{**{k: v for k, v in stored.items() if k in known}, **given})
    config = SFConfig.from_file(args.config, **overrides) if args.config else SFConfig(**overrides)
    if recipe and config.task in EMBEDDED_TASKS:
        given = set(overrides) | (set(SFConfig.file_values(args.config)) if args.config else set())
        config = replace(
            config,
            **{k: v for k, v in EMBEDDED_TASKS[config.task].main_recipe.items() if k not in given},
        )
    return config


def run_training(config: SFConfig, resume: bool = False, overwrite: bool = False):
    config = resolve_model(config)
    if not resume:  # before loading any model
        check_fresh_out_dir(Path(config.out_dir), overwrite, delete=False)
    torch.manual_seed(config.seed)
    policy, reference, task = load_models_and_task(config)
    if (
        config.lora_rank
    ):  # the reference is the policy with its adapters disabled (docs/scale.md#lora)
        del reference
        reference = None
    trainer = SparsityForcingTrainer(config, policy, reference, task, device=device_for_rank())
    if resume:
        trainer.resume()
    trainer.train(overwrite=overwrite)
    save_final(
        trainer.final_model(),
        config.model,
        Path(config.out_dir) / "final",
        state_dict=trainer.final_state_dict(),
        write=trainer.rank == 0,
    )
    return trainer


def save_final(
    model, base_dir: str, out: Path, state_dict: dict | None = None, write: bool = True
) -> None:
    """A checkpoint directory like the base one: its tokenizer / processor / config files, the
    trained weights (``state_dict``: gathered from a sharded model; a PeftModel saves its adapter)."""
    if not write:
        return
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(base_dir).iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".bin"):
            shutil.copy(f, out / f.name)
    model.save_pretrained(out, **({"state_dict": state_dict} if state_dict is not None else {}))


def run_eval(config: SFConfig, model_dir: str, p_values, samples: int, out: str | None):
    model, _, task = load_models_and_task(config, model_dir)
    results = evaluate(
        model.to(device_for_rank()),
        task,
        config.policy,
        p_values,
        samples=samples,
        max_new_tokens=config.max_new_tokens,
    )
    if out:
        save_report(results, out)
        plot_reports({Path(model_dir).name: results}, Path(out).with_suffix(".png"))
    return results


def compare_checkpoints(
    config: SFConfig,
    checkpoints: dict[str, str],
    samples: int,
    *,
    calibration: int = 32,
    target_ratio: float | None = None,
    out: str | Path | None = None,
) -> dict[str, dict]:
    """compare_rules for each named checkpoint ({"before": dir, "after": dir}); with ``out``,
    writes the reports as JSON there and the plot beside it (.png)."""
    reports = {}
    for name, model_dir in checkpoints.items():
        model, _, task = load_models_and_task(config, model_dir)
        reports[name] = compare_rules(
            model.to(device_for_rank()),
            task,
            config,
            target_ratio,
            samples,
            calibration=calibration,
        )
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(reports, indent=2) + "\n")
        plot_rules(reports, Path(out).with_suffix(".png"))
    return reports


def ensure_base_checkpoint(path: Path, trainer: str) -> None:
    """Train the base checkpoint at `path` with `trainer` (a module with main(argv)) if missing."""
    if (path / "config.json").exists():
        return
    print(f"no base checkpoint at {path}: training it ({trainer})")
    importlib.import_module(trainer).main(["--out", str(path)])


def run_embedded_default(config: SFConfig, overwrite: bool = False) -> dict:
    out_dir = Path(config.out_dir)
    check_fresh_out_dir(
        out_dir, overwrite, delete=False
    )  # before the first evaluation, not after it
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
    print(
        "Sparsity Forcing run, SFConfig fields off their defaults:",
        {k: v for k, v in config.to_dict().items() if v != defaults[k]},
    )

    started = time.perf_counter()
    before = run_eval(
        config, str(model), p_values, config.eval_samples, str(out_dir / "before.json")
    )
    run_training(config, overwrite=overwrite)
    after = run_eval(
        config, str(out_dir / "final"), p_values, config.eval_samples, str(out_dir / "after.json")
    )
    # The paper's Table 3 in miniature: other selection rules at top-p's token ratio, before and after.
    rules = compare_checkpoints(
        config,
        {"before": str(model), "after": str(out_dir / "final")},
        config.baseline_samples,
        out=out_dir / "baselines.json",
    )
    minutes = (time.perf_counter() - started) / 60

    print(
        f"\nSparsity Forcing on the embedded task ({config.eval_samples} held-out samples, {minutes:.1f} min)"
    )
    print(
        f"{'p':>6} | {'accuracy before':>15} {'after':>7} | {'token ratio before':>18} {'after':>7}"
    )
    for p in p_values:
        b, a = before[p], after[p]
        print(
            f"{p:>6g} | {b['accuracy']:>15.3f} {a['accuracy']:>7.3f} | {b['token_ratio']:>18.3f} {a['token_ratio']:>7.3f}"
        )
    d = config.deploy_p
    reduction = before[d]["token_ratio"] / max(after[d]["token_ratio"], 1e-9)
    print(
        f"at p = {d:g}: token ratio {before[d]['token_ratio']:.3f} -> {after[d]['token_ratio']:.3f} "
        f"({reduction:.2f}x fewer tokens), accuracy {before[d]['accuracy']:.3f} -> {after[d]['accuracy']:.3f}"
    )
    print(f"selection rules at top-p's token ratio ({config.baseline_samples} held-out samples):")
    print(format_table(rules))
    report = {
        "config": config.to_dict(),
        "minutes": minutes,
        "before": {str(p): r for p, r in before.items()},
        "after": {str(p): r for p, r in after.items()},
        "token_ratio_reduction_at_deploy_p": reduction,
        "baselines": {
            name: {rule: r["matched"] for rule, r in report["rules"].items()}
            for name, report in rules.items()
        },
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_reports({"before": before, "after": after}, out_dir / "plots.png")
    print(
        f"report: {out_dir / 'report.json'}, plots: {out_dir / 'plots.png'}, baselines: {out_dir / 'baselines.png'}"
    )
    return report
