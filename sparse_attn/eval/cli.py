"""sparse-attn eval / python -m sparse_attn.eval: accuracy against token ratio of any checkpoint
on long-context tasks generated with its own tokenizer (docs/eval.md).

  sparse-attn eval --model DIR [--tasks niah_single ...] [--lengths 1k 4k 32k]
                   [--rules dense top_p:0.9,0.975 top_k:0.25 threshold:1 fastv:0.5]
                   [--prefill dense sparse] [--samples 20] [--batch-size 1] [--device cuda]
                   [--dtype bfloat16] [--out DIR] [--resume]
"""

from __future__ import annotations

import argparse
import sys

from ..policy import GRANULARITIES, TopPPolicy
from .model import EvalError
from .rules import DEFAULT_RULES, FAMILIES
from .tasks import TASKS


def add_eval_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--model",
        required=True,
        help="checkpoint directory (any causal LM, or Qwen2-VL / "
        "Qwen2.5-VL with its image processor)",
    )
    ap.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        help=f"of {', '.join(TASKS)} (default: every text task, + visual_needle on a VLM)",
    )
    ap.add_argument(
        "--lengths",
        nargs="+",
        default=["1k", "4k"],
        metavar="N",
        help="prompt lengths in the model's tokens, e.g. 1k 4k 32k (default: 1k 4k)",
    )
    ap.add_argument(
        "--rules",
        nargs="+",
        metavar="RULE",
        help=f"family[:v1,v2] with family of {', '.join(FAMILIES)} (default: "
        f"{' '.join(DEFAULT_RULES)}; fastv only on a VLM)",
    )
    ap.add_argument(
        "--prefill",
        nargs="+",
        dest="prefills",
        metavar="MODE",
        help="dense and/or sparse (default: every mode this sparse_attn supports)",
    )
    ap.add_argument(
        "--samples", type=int, default=20, help="prompts per task and length (default 20)"
    )
    ap.add_argument("--seed", type=int, default=0, help="task generation seed (default 0)")
    ap.add_argument(
        "--batch-size", type=int, default=1, help="prompts per generate call (default 1)"
    )
    ap.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)"
    )
    ap.add_argument(
        "--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float16, float32"
    )
    ap.add_argument(
        "--max-new-tokens", type=int, help="tokens generated per prompt (default: per task)"
    )
    ap.add_argument(
        "--out",
        default="sparse_attn_eval",
        help="output directory: results.jsonl / .json / .md, accuracy_vs_token_ratio.png",
    )
    ap.add_argument(
        "--resume", action="store_true", help="skip the cells already in OUT/results.jsonl"
    )
    ap.add_argument("--n-probe", type=int, default=TopPPolicy.n_probe, help="TopPPolicy.n_probe")
    ap.add_argument(
        "--keep-first", type=int, default=TopPPolicy.keep_first, help="TopPPolicy.keep_first"
    )
    ap.add_argument(
        "--keep-last", type=int, default=TopPPolicy.keep_last, help="TopPPolicy.keep_last"
    )
    ap.add_argument("--granularity", default=TopPPolicy.granularity, choices=GRANULARITIES)
    ap.add_argument(
        "--chat-template",
        default="auto",
        choices=("auto", "on", "off"),
        help="wrap prompts in the tokenizer's chat template (auto: when it has one)",
    )
    ap.add_argument(
        "--image-size", type=int, default=448, help="visual_needle image side in pixels"
    )
    ap.add_argument("--grid", type=int, default=8, help="visual_needle grid cells per side")


def config_from_args(args):
    from .runner import EvalConfig

    return EvalConfig(
        model=args.model,
        tasks=args.tasks,
        lengths=args.lengths,
        rules=args.rules,
        prefills=args.prefills,
        samples=args.samples,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        max_new_tokens=args.max_new_tokens,
        out=args.out,
        resume=args.resume,
        n_probe=args.n_probe,
        keep_first=args.keep_first,
        keep_last=args.keep_last,
        granularity=args.granularity,
        chat_template=args.chat_template,
        image_size=args.image_size,
        grid=args.grid,
    )


def run_eval(args, ap: argparse.ArgumentParser) -> int:
    from .report import markdown_table
    from .runner import run

    try:
        rows = run(config_from_args(args))
    except EvalError as error:
        ap.error(str(error))  # exits 2 with "usage ... error: <message>"
    print(markdown_table(rows))
    if args.out:
        print(
            f"\nwritten to {args.out}/ (results.jsonl, results.json, results.md, accuracy_vs_token_ratio.png)",
            file=sys.stderr,
        )
    return 0


def main(argv=None) -> int:
    """The sparse-attn console script: sparse-attn eval ..."""
    ap = argparse.ArgumentParser(prog="sparse-attn", description="sparse_attn command line")
    sub = ap.add_subparsers(dest="command", required=True)
    ev = sub.add_parser(
        "eval",
        help="accuracy vs token ratio on generated long-context tasks",
        description=__doc__.split("\n\n")[0],
    )
    add_eval_arguments(ev)
    args = ap.parse_args(argv)
    return run_eval(args, ev)


def eval_main(argv=None) -> int:
    """python -m sparse_attn.eval ... (the eval subcommand's options)."""
    ap = argparse.ArgumentParser(
        prog="python -m sparse_attn.eval", description=__doc__.split("\n\n")[0]
    )
    add_eval_arguments(ap)
    return run_eval(ap.parse_args(argv), ap)
