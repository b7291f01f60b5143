"""The supervised training loop of the embedded base models (sf_train.worlds.vqa.sft: the tiny
Qwen2.5-VL; sf_train.worlds.kv.sft: the tiny Qwen2), and the report written next to each checkpoint.

AdamW with linear warm-up and cosine decay over a fixed number of steps; every step draws fresh
train samples (the worlds are infinite: no epoch, no overfitting to a fixed set). A curriculum of
stages advances once the teacher-forced accuracy over the last log_every steps reaches
advance_at, or after the stage's step limit; the last stage runs to the end. The step count, not
the clock, defines a run, so the same command gives the same checkpoint; ``minutes`` only stops
a run early on a slower machine, and the report says so.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..config import lr_factor

TRAIN_INDEX_STRIDE = 100_000_000  # run seed k trains on train-split indices [k * stride, ...)


def cpu_pressure() -> str | None:
    """The machine's CPU pressure line (Linux PSI "some avg10= avg60= avg300="), to tell a slow
    run on a busy machine from a slow run; None where it cannot be read."""
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class Curriculum:
    """What the loop needs from a task. ``batch(first_index, stage)``: a training batch of
    ``batch_size`` train samples from that index on; ``loss(model, batch)``: (loss, hits, count)
    of the teacher-forced accuracy; ``heldout(model)``: greedy held-out accuracy (float)."""

    stages: tuple
    batch_size: int
    batch: Callable[[int, Any], Any]
    loss: Callable[[Any, Any], tuple[torch.Tensor, float, int]]
    heldout: Callable[[Any], float]
    stage_fields: Callable[[int, Any], dict]  # (stage index, stage) -> fields of a log record
    stage_max_steps: Callable[[Any], int]
    accuracy_name: str  # the log record's name for the teacher-forced accuracy


@dataclass
class CurriculumRun:
    history: list = field(default_factory=list)
    steps_done: int = 0
    stage_starts: list = field(default_factory=lambda: [0])
    train_minutes: float = 0.0
    started: float = 0.0
    cpu_pressure_at_start: str | None = None


def train_curriculum(
    model, optimizer, config, curriculum: Curriculum, seed: int, minutes: float
) -> CurriculumRun:
    """Run config.steps optimizer steps (fewer if ``minutes`` run out) through the curriculum."""
    # cosine decay to min_lr_ratio at step config.steps (one past the last: the last update keeps
    # a little more than the minimum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step,
            warmup_steps=config.warmup_steps,
            decay_steps=config.steps - config.warmup_steps,
            min_lr_ratio=config.min_lr_ratio,
            schedule="cosine",
        ),
    )
    run = CurriculumRun(cpu_pressure_at_start=cpu_pressure(), started=time.time())
    deadline = run.started + 60 * minutes
    running_loss, hits, count = 0.0, 0, 0
    stage_index, stage_start = 0, 0
    for step in range(config.steps):
        if time.time() > deadline:
            print(f"time budget of {minutes} min reached at step {step}: stopping early")
            break
        stage = curriculum.stages[stage_index]
        batch = curriculum.batch(seed * TRAIN_INDEX_STRIDE + step * curriculum.batch_size, stage)
        loss, batch_hits, batch_count = curriculum.loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        run.steps_done = step + 1
        running_loss += loss.item()
        hits, count = hits + batch_hits, count + batch_count
        if (step + 1) % config.log_every == 0:
            train_acc = hits / max(count, 1)
            record = {
                "step": step + 1,
                **curriculum.stage_fields(stage_index, stage),
                "minutes": (time.time() - run.started) / 60,
                "loss": running_loss / config.log_every,
                curriculum.accuracy_name: train_acc,
                "lr": scheduler.get_last_lr()[0],
            }
            if (step + 1) % config.eval_every == 0:
                record["heldout_acc"] = curriculum.heldout(model)
            run.history.append(record)
            print(
                json.dumps(
                    {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}
                ),
                flush=True,
            )
            running_loss, hits, count = 0.0, 0, 0
            last_stage = stage_index == len(curriculum.stages) - 1
            if not last_stage and (
                train_acc >= config.advance_at
                or step + 1 - stage_start >= curriculum.stage_max_steps(stage)
            ):
                stage_index, stage_start = stage_index + 1, step + 1
                run.stage_starts.append(stage_start)
    run.train_minutes = (time.time() - run.started) / 60
    return run


def add_run_arguments(parser, config_class) -> None:
    """The command-line options both SFT scripts take."""
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument(
        "--minutes", type=float, default=15.0, help="stop training early after this long"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=config_class.steps)
    parser.add_argument("--threads", type=int, default=config_class.threads)


def save_run(
    out: str,
    save_checkpoint: Callable[[str], None],
    report_name: str,
    run: CurriculumRun,
    model,
    config,
    model_config,
    seed: int,
    heldout_accuracy,
    samples_name: str,
    batch_size: int,
    **extra,
) -> dict:
    """Write the checkpoint (``save_checkpoint(out)``) and the run's JSON report beside it."""
    report = run_report(
        run, model, config, model_config, seed, heldout_accuracy, samples_name, batch_size, **extra
    )
    save_checkpoint(out)
    with open(f"{out}/{report_name}", "w") as f:
        json.dump(report, f, indent=2)
    return report


def run_report(
    run: CurriculumRun,
    model,
    config,
    model_config,
    seed: int,
    heldout_accuracy,
    samples_name: str,
    batch_size: int,
    **extra,
) -> dict:
    """The JSON report of a finished run (written next to its checkpoint)."""
    return {
        "steps": run.steps_done,
        "stopped_early": run.steps_done < config.steps,
        "train_minutes": run.train_minutes,
        "total_minutes": (time.time() - run.started) / 60,
        samples_name: run.steps_done * batch_size,
        "stage_start_steps": run.stage_starts,
        "parameters": sum(p.numel() for p in model.parameters()),
        "heldout_accuracy": heldout_accuracy,
        "heldout_samples": config.final_eval_samples,
        "seed": seed,
        **extra,
        "threads": config.threads,
        "cpu_pressure": {"start": run.cpu_pressure_at_start, "end": cpu_pressure()},
        "torch": torch.__version__,
        "sft_config": asdict(config),
        "model_config": asdict(model_config),
        "history": run.history,
    }
