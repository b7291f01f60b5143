"""The embedded worlds by name, and task="package.module:factory" for any other.

The one place that knows the worlds: the library (sf_train/*.py) trains and evaluates any
TrainingTask, and the face (sf_train/cli.py, sf_train/experiments.py) finds a task and its models
here, from SFConfig.task and SFConfig.model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import SFConfig
from .kv.world import KV_BASE_CHECKPOINT, _load_embedded_kv
from .vqa.world import BASE_CHECKPOINT, _load_embedded_vqa


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
    # here (its efficiency gradient is zero in expectation); the pathwise term does, and under the
    # sparse prefill distillation plus the selection gradient keep the answers. The prompt puts
    # the image last, so the rule's default probes (the last 64 positions) are image tokens; the
    # recipe probes with the last position alone, the one that answers
    # (docs/embedded_default.md#sparse-prefill).
    "embedded_vqa": EmbeddedTask(
        _load_embedded_vqa,
        BASE_CHECKPOINT,
        "sf_train.worlds.vqa.sft",
        dict(
            soft_tau_weight=5.0,
            soft_tau_target=0.3,
            efficiency_weight=0.0,
            distill_weight=3.0,
            distill_dense=True,
            selection_gradient=True,
            n_probe=1,
            lr=1e-4,
            lr_schedule="cosine",
            p_grid=(0.94, 0.95, 0.965, 0.975),
            steps=300,
            stable_ratio=0.5,
            prompts_per_step=16,
            temperature=0.7,
            eval_samples=1024,
            baseline_samples=128,
        ),
    ),
    # text-only long-context key-value retrieval, tiny Qwen2. Here answers are decoded through the
    # pruned cache; the straight-through selection gradient makes them hold under pruning.
    "embedded_kv": EmbeddedTask(
        _load_embedded_kv,
        KV_BASE_CHECKPOINT,
        "sf_train.worlds.kv.sft",
        dict(selection_gradient=True, lr=5e-5, steps=150, eval_samples=1024, baseline_samples=256),
    ),
}


def resolve_model(config: SFConfig) -> SFConfig:
    """The config, with SFConfig.model's default ("": none named) replaced by the packaged base
    checkpoint of its embedded task (found wherever sf_train is installed); any other model path
    is kept as given."""
    if config.model == SFConfig.model and config.task in EMBEDDED_TASKS:
        return replace(config, model=str(EMBEDDED_TASKS[config.task].checkpoint))
    return config


def load_models_and_task(config: SFConfig, model_dir: str | None = None):
    """(policy, reference, TrainingTask). An embedded task (EMBEDDED_TASKS: "embedded_vqa",
    "embedded_kv") loads its tiny model's checkpoint; "jsonl" reads SFConfig.data with the model
    directory's processor (sf_train/worlds/jsonl.py); any other task is "package.module:factory",
    factory(model_dir) -> (policy, reference, TrainingTask): importing and calling it runs code
    of the user's choosing, like any Python module they import (docs/scale.md#what-is-trusted)."""
    model_dir = model_dir or resolve_model(config).model
    if config.task in EMBEDDED_TASKS:
        return EMBEDDED_TASKS[config.task].load(model_dir)
    if config.task == "jsonl" and model_dir:  # your own data (sf_train/worlds/jsonl.py)
        from .jsonl import load_jsonl

        return load_jsonl(
            config.data, model_dir, config.correctness, reference=not config.lora_rank
        )
    if not model_dir:
        raise ValueError(
            f"SFConfig.model is empty: task {config.task!r} is not an embedded task "
            f"({sorted(EMBEDDED_TASKS)}), so name its checkpoint directory with model=DIR"
        )
    module, _, factory = config.task.partition(":")
    return getattr(importlib.import_module(module), factory)(model_dir)
