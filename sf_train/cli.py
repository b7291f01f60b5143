"""sf-train / python -m sf_train: train, eval, baselines, main (the embedded default, end to end).

  sf-train train [--config run.yaml] [--set key=value ...] [--resume]
  sf-train eval  --model DIR [--p 0.975 1.0] [--samples 128] [--out report.json]  (+ report.png)
  sf-train baselines --model DIR [--after DIR] [--samples 32] [--out report.json]  (+ report.png)
  sf-train main  [--set key=value ...]   # base model -> measure -> Sparsity Forcing -> measure

task=embedded_vqa (default: synthetic VQA, tiny Qwen2.5-VL) or task=embedded_kv (text-only
long-context key-value retrieval, tiny Qwen2) runs an embedded world whose default model is its
packaged base checkpoint (sf_train/worlds/registry.py); task=package.module:factory brings your
own. `sf-train train --help` lists every SFConfig field with its default and meaning.

Runs unchanged under torchrun (one process per device; gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import argparse
import json

from . import experiments
from .baselines import format_table
from .config import SFConfig
from .distributed import init_distributed
from .worlds.registry import resolve_model


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML or JSON file of SFConfig fields")
    parser.add_argument(
        "--set", nargs="*", metavar="KEY=VALUE", help="override config fields (listed below)"
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="sf-train", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    fields_help = SFConfig.help_text()
    commands = {
        "train": "Sparsity Forcing on the config's model and task; final weights in out_dir/final",
        "eval": "accuracy and token ratio of a checkpoint at thresholds p",
        "baselines": "top-p against top-k, threshold and FastV pruning at a matched token ratio",
        "main": "the embedded default: base model -> measure -> Sparsity Forcing -> measure",
    }
    for name, description in commands.items():
        p = sub.add_parser(
            name,
            help=description,
            description=description,
            epilog=fields_help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _config_arguments(p)
        if name == "train":
            p.add_argument(
                "--resume",
                action="store_true",
                help="continue from out_dir's checkpoint, with its config",
            )
        if name in ("train", "main"):
            p.add_argument(
                "--overwrite",
                action="store_true",
                help="start over in an out_dir that holds an earlier run (deletes its metrics and "
                "checkpoint)",
            )
        if name == "eval":
            p.add_argument("--model", help="checkpoint directory (default: the config's model)")
            p.add_argument("--p", type=float, nargs="+", help="thresholds (default: config eval_p)")
            p.add_argument(
                "--samples", type=int, help="held-out samples (default: config eval_samples)"
            )
            p.add_argument("--out", help="write the report as JSON here")
        if name == "baselines":
            p.add_argument("--model", required=True, help="checkpoint directory ('before')")
            p.add_argument(
                "--after", help="a second checkpoint, e.g. after Sparsity Forcing ('after')"
            )
            p.add_argument(
                "--samples", type=int, default=32, help="held-out samples per evaluation"
            )
            p.add_argument(
                "--calibration", type=int, default=32, help="train samples that tune the knobs"
            )
            p.add_argument(
                "--target", type=float, help="token ratio to match (default: top-p's at deploy_p)"
            )
            p.add_argument(
                "--out", help="write the reports as JSON here (and the plot beside it, .png)"
            )
    args = ap.parse_args(argv)
    init_distributed()
    try:
        config = experiments.load_config(args, recipe=args.command == "main")
    except (TypeError, ValueError, FileNotFoundError) as e:  # a bad field or file: one line
        raise SystemExit(f"sf-train {args.command}: {e}") from None
    if args.command == "train":
        try:
            experiments.run_training(config, resume=args.resume, overwrite=args.overwrite)
        except FileExistsError as e:  # an earlier run in out_dir: say how to go on, no traceback
            raise SystemExit(f"sf-train train: {e}") from None
    elif args.command == "eval":
        results = experiments.run_eval(
            config,
            args.model or resolve_model(config).model,
            args.p or config.eval_p,
            args.samples or config.eval_samples,
            args.out,
        )
        print(json.dumps({str(p): r for p, r in results.items()}, indent=2))
    elif args.command == "baselines":
        checkpoints = {name: d for name, d in (("before", args.model), ("after", args.after)) if d}
        reports = experiments.compare_checkpoints(
            config,
            checkpoints,
            args.samples,
            calibration=args.calibration,
            target_ratio=args.target,
            out=args.out,
        )
        print(format_table(reports))
    else:
        try:
            experiments.run_embedded_default(config, overwrite=args.overwrite)
        except FileExistsError as e:
            raise SystemExit(f"sf-train main: {e}") from None


if __name__ == "__main__":
    main()
