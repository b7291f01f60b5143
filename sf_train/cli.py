"""sf-train / python -m sf_train: train, eval, and main (the embedded default end to end).

  sf-train train [--config run.yaml] [--set key=value ...] [--resume]
  sf-train eval  --model DIR [--p 0.975 1.0] [--samples 128] [--out report.json]  (+ report.png)
  sf-train main  [--set key=value ...]   # base model -> measure -> Sparsity Forcing -> measure

task=embedded_vqa (default: synthetic VQA, tiny Qwen2.5-VL) or task=embedded_kv (text-only
long-context key-value retrieval, tiny Qwen2) runs an embedded task whose default model is its
packaged base checkpoint (EMBEDDED_TASKS); task=package.module:factory brings your own.

Runs unchanged under torchrun (one process per device; gloo on CPU, nccl on GPU).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from .config import SFConfig

BASE_CHECKPOINT = Path(__file__).parent / "checkpoints" / "base"
KV_BASE_CHECKPOINT = Path(__file__).parent / "checkpoints" / "kv_base"


def parse_overrides(pairs: list[str]) -> dict:
    """key=value pairs; values are read as JSON when they parse (numbers, lists, null)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def load_config(args, recipe: bool = False) -> SFConfig:
    """SFConfig from --config and --set; with ``recipe``, an embedded task's main_recipe under both.
    With --resume, the checkpoint's config under both (trainer.resume refuses a changed field)."""
    overrides = parse_overrides(args.set or [])
    if getattr(args, "resume", False):
        from .trainer import checkpoint_config

        given = {**(SFConfig.file_values(args.config) if args.config else {}), **overrides}
        stored = checkpoint_config(given.get("out_dir", SFConfig.out_dir))
        known = {f for f in SFConfig().to_dict()}
        return SFConfig(**{**{k: v for k, v in stored.items() if k in known}, **given})
    config = SFConfig.from_file(args.config, **overrides) if args.config else SFConfig(**overrides)
    if recipe and config.task in EMBEDDED_TASKS:
        given = set(overrides) | (set(SFConfig.file_values(args.config)) if args.config else set())
        config = replace(config, **{k: v for k, v in EMBEDDED_TASKS[config.task].main_recipe.items() if k not in given})
    return config


def _load_embedded_vqa(model_dir: str):
    from .datasets import embedded_vqa
    from .tiny_vlm import load_checkpoint

    policy, processor, _ = load_checkpoint(model_dir)
    reference, _, _ = load_checkpoint(model_dir)
    return policy, reference, embedded_vqa(processor)


def _load_embedded_kv(model_dir: str):
    from .datasets import embedded_kv
    from .tiny_lm import load_checkpoint

    policy, tokenizer, _ = load_checkpoint(model_dir)
    reference, _, _ = load_checkpoint(model_dir)
    return policy, reference, embedded_kv(tokenizer)


@dataclass(frozen=True)
class EmbeddedTask:
    """A task that ships with sf_train: load(model_dir) -> (policy, reference, TrainingTask), its
    packaged base checkpoint, the module whose main(["--out", dir]) trains that checkpoint, and
    the SFConfig fields `main` runs it with (under --config and --set; measured in
    bench/sparsity_forcing_experiments.md)."""

    load: Callable[[str], tuple]
    checkpoint: Path
    trainer: str
    main_recipe: dict = field(default_factory=dict)

    @property
    def train_command(self) -> str:
        return f"python -m {self.trainer} --out {self.checkpoint}"


EMBEDDED_TASKS = {
    # synthetic visual QA, tiny Qwen2.5-VL. The paper's objective does not move the token ratio
    # here (its efficiency gradient is zero in expectation); the pathwise term does.
    "embedded_vqa": EmbeddedTask(_load_embedded_vqa, BASE_CHECKPOINT, "sf_train.sft", dict(
        soft_tau_weight=3.0, lr=1e-4, steps=150, prompts_per_step=16, temperature=0.7, eval_samples=1024,
        baseline_samples=128)),
    # text-only long-context key-value retrieval, tiny Qwen2. Here answers are decoded through the
    # pruned cache; the straight-through selection gradient makes them hold under pruning.
    "embedded_kv": EmbeddedTask(_load_embedded_kv, KV_BASE_CHECKPOINT, "sf_train.kv_sft", dict(
        selection_gradient=True, lr=5e-5, steps=150, eval_samples=1024, baseline_samples=256)),
}


def resolve_model(config: SFConfig) -> SFConfig:
    """The config, with SFConfig.model's default replaced by the packaged base checkpoint of its
    embedded task (found wherever sf_train is installed); any other model path is kept as given."""
    if config.model == SFConfig.model and config.task in EMBEDDED_TASKS:
        return replace(config, model=str(EMBEDDED_TASKS[config.task].checkpoint))
    return config


def load_models_and_task(config: SFConfig, model_dir: str | None = None):
    """(policy, reference, TrainingTask). An embedded task (EMBEDDED_TASKS: "embedded_vqa",
    "embedded_kv") loads its tiny model's checkpoint; any other task is "package.module:factory",
    factory(model_dir) -> (policy, reference, TrainingTask)."""
    model_dir = model_dir or resolve_model(config).model
    if config.task in EMBEDDED_TASKS:
        return EMBEDDED_TASKS[config.task].load(model_dir)
    module, _, factory = config.task.partition(":")
    return getattr(importlib.import_module(module), factory)(model_dir)


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(device_for_rank())


def run_training(config: SFConfig, resume: bool = False, overwrite: bool = False):
    from .trainer import SparsityForcingTrainer, check_fresh_out_dir

    config = resolve_model(config)
    if not resume:  # before loading any model
        check_fresh_out_dir(Path(config.out_dir), overwrite, delete=False)
    torch.manual_seed(config.seed)
    policy, reference, task = load_models_and_task(config)
    if config.lora_rank:  # the reference is the policy with its adapters disabled (docs/scale.md#lora)
        del reference
        reference = None
    trainer = SparsityForcingTrainer(config, policy, reference, task, device=device_for_rank())
    if resume:
        trainer.resume()
    trainer.train(overwrite=overwrite)
    save_final(trainer.final_model(), config.model, Path(config.out_dir) / "final",
               state_dict=trainer.final_state_dict(), write=trainer.rank == 0)
    return trainer


def save_final(model, base_dir: str, out: Path, state_dict: dict | None = None, write: bool = True) -> None:
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
    from .evaluate import evaluate, plot_reports, save_report

    model, _, task = load_models_and_task(config, model_dir)
    results = evaluate(model.to(device_for_rank()), task, config.policy, p_values, samples=samples,
                       max_new_tokens=config.max_new_tokens)
    if out:
        save_report(results, out)
        plot_reports({Path(model_dir).name: results}, Path(out).with_suffix(".png"))
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="sf-train", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("train", "eval", "main"):
        p = sub.add_parser(name)
        p.add_argument("--config", help="YAML or JSON file of SFConfig fields")
        p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override config fields")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue from out_dir's checkpoint, with its config")
        if name in ("train", "main"):
            p.add_argument("--overwrite", action="store_true",
                           help="start over in an out_dir that holds an earlier run (its metrics and checkpoint are deleted)")
        if name == "eval":
            p.add_argument("--model", help="checkpoint directory (default: the config's model)")
            p.add_argument("--p", type=float, nargs="+", help="thresholds (default: config eval_p)")
            p.add_argument("--samples", type=int, help="held-out samples (default: config eval_samples)")
            p.add_argument("--out", help="write the report as JSON here")
    args = ap.parse_args(argv)
    init_distributed()
    try:
        config = load_config(args, recipe=args.command == "main")
    except (TypeError, ValueError, FileNotFoundError) as e:  # a bad field or file: say which, no traceback
        raise SystemExit(f"sf-train {args.command}: {e}") from None
    if args.command == "train":
        run_training(config, resume=args.resume, overwrite=args.overwrite)
    elif args.command == "eval":
        results = run_eval(config, args.model or resolve_model(config).model, args.p or config.eval_p,
                           args.samples or config.eval_samples, args.out)
        print(json.dumps({str(p): r for p, r in results.items()}, indent=2))
    else:
        from .embedded_default import run_embedded_default

        run_embedded_default(config, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
