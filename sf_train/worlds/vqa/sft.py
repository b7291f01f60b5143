"""Supervised training of the tiny Qwen2.5-VL on the synthetic task, from scratch.

    python -m sf_train.worlds.vqa.sft --out sf_train/worlds/vqa/checkpoint [--minutes 15] [--seed 0]
    python -m sf_train.worlds.vqa.sft --polish sf_train/worlds/vqa/checkpoint --out sf_train/worlds/vqa/checkpoint --threads 1

Dense attention (SDPA), loss on the answer token and the end-of-sequence token only, the loop of
sf_train/worlds/sft_loop.py (AdamW, warm-up and cosine decay, fresh samples every step, a curriculum; the
vision tower at a higher learning rate). Each image is asked several questions, one row each, so
the same pixels must give different answers. The curriculum grows the object count on small
boards, then the board to the task's 14x14 (see SFTConfig). At the end, greedy held-out accuracy
is measured and written next to the checkpoint.

--polish DIR continues a finished run on the full board alone (POLISH_CONFIG: 300 steps, the
learning rate re-warmed to 2e-4, train-split indices of run seed 7): the curriculum's last stage
gets only ~500 steps at a decayed learning rate, and the shipped base model is the curriculum run
(training_run.json) polished this way (polish_run.json).
"""

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass, replace

import torch

from ..common import is_correct
from ..sft_loop import Curriculum, add_run_arguments, save_run, train_curriculum
from . import scene
from .model import (
    TinyVLMConfig,
    build_model,
    build_processor,
    generate_answer,
    load_checkpoint,
    prompt_text,
    save_checkpoint,
)


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 2500
    images_per_step: int = 16
    questions_per_image: int = 2  # rows per image: the same board with different questions
    lr: float = 1e-3
    vision_lr_scale: float = 3.0  # the vision tower's learning rate is lr * vision_lr_scale
    min_lr_ratio: float = 0.05
    warmup_steps: int = 60
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    log_every: int = 25
    eval_every: int = 200
    eval_samples: int = 64
    final_eval_samples: int = 1024
    threads: int = 2
    # Curriculum: (grid, max objects) stages. The next stage starts once the teacher-forced answer
    # accuracy over the last log_every steps reaches advance_at, or after max_stage_steps. With a
    # few objects on a small board the vision tower learns shapes and colours first; the object
    # count then grows on small boards before the board grows to the task's full size.
    curriculum: tuple[tuple[int, int], ...] = (
        (2, 1),
        (3, 2),
        (3, 3),
        (4, 4),
        (4, 6),
        (5, 8),
        (7, 10),
        (10, scene.MAX_OBJECTS),
        (scene.GRID, scene.MAX_OBJECTS),
    )
    advance_at: float = 0.9
    max_stage_steps: int = 250


POLISH_CONFIG = SFTConfig(
    steps=300,
    lr=2e-4,
    warmup_steps=10,
    min_lr_ratio=0.1,
    curriculum=((scene.GRID, scene.MAX_OBJECTS),),
)
POLISH_SEED = 7  # train-split indices [7e8, ...): images the curriculum run (seed 0) never saw


def training_batch(processor, samples, questions_per_image: int = 1):
    """Left-padded rows "question image answer<eos>", questions_per_image rows per sample (its own
    question first); labels only on the answer and <eos>."""
    eos = processor.tokenizer.eos_token
    texts, images = [], []
    for s in samples:
        for question, answer in scene.training_questions(s, questions_per_image):
            texts.append(f"{prompt_text(question.text)} {answer}{eos}")
            images.append(s.image)
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    # Left padding: every row ends with its answer and <eos>, the only supervised tokens.
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -2:] = batch["input_ids"][:, -2:]
    batch["labels"] = labels
    return batch


def parameter_groups(model, config: SFTConfig) -> list[dict]:
    """AdamW groups: weight decay on matrices only; the vision tower at its own learning rate."""
    groups = []
    for vision in (False, True):
        for matrix in (False, True):
            params = [
                p
                for n, p in model.named_parameters()
                if ("visual." in n) == vision and (p.ndim >= 2) == matrix
            ]
            groups.append(
                {
                    "params": params,
                    "weight_decay": config.weight_decay if matrix else 0.0,
                    "lr": config.lr * (config.vision_lr_scale if vision else 1.0),
                }
            )
    return groups


def heldout_accuracy(model, processor, count: int, batch_size: int = 64) -> dict[str, float]:
    """Greedy exact-match accuracy on held-out samples [0, count), overall and per question type."""
    model.eval()
    correct = defaultdict(list)
    for start in range(0, count, batch_size):
        samples = scene.make_samples("heldout", start, min(batch_size, count - start))
        for s, completion in zip(samples, generate_answer(model, processor, samples)):
            correct[s.question.kind].append(is_correct(s.question.text, completion, s.answer))
    model.train()
    result = {kind: sum(v) / len(v) for kind, v in sorted(correct.items())}
    result["overall"] = sum(map(sum, correct.values())) / count
    return result


def train(
    out: str,
    config: SFTConfig,
    model_config: TinyVLMConfig,
    seed: int,
    minutes: float,
    init: str | None = None,
) -> dict:
    """Train from scratch, or from the checkpoint ``init`` (its model config then wins)."""
    torch.set_num_threads(config.threads)
    if init:
        model, processor, model_config = load_checkpoint(init)
    else:
        processor = build_processor(model_config)
        model = build_model(model_config, processor.tokenizer, seed=seed)
    model.config._attn_implementation = "sdpa"
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=config.lr)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"tiny Qwen2.5-VL: {n_params:,} parameters, {model_config.visual_tokens_per_image} visual tokens/image"
    )

    def batch(first_index, stage):
        grid, max_objects = stage
        samples = scene.make_samples(
            "train", first_index, config.images_per_step, grid, max_objects
        )
        return training_batch(processor, samples, config.questions_per_image)

    def loss(model, batch):
        output = model(**batch)
        # Teacher-forced accuracy of the answer word (the second-last token): free to compute.
        predicted = output.logits[:, -3].argmax(-1)
        return output.loss, (predicted == batch["labels"][:, -2]).float().mean().item(), 1

    curriculum = Curriculum(
        stages=config.curriculum,
        batch_size=config.images_per_step,
        batch=batch,
        loss=loss,
        heldout=lambda model: heldout_accuracy(model, processor, config.eval_samples)["overall"],
        stage_fields=lambda index, stage: {"grid": stage[0], "max_objects": stage[1]},
        stage_max_steps=lambda stage: config.max_stage_steps,
        accuracy_name="train_answer_acc",
    )
    run = train_curriculum(model, optimizer, config, curriculum, seed, minutes)

    accuracy = heldout_accuracy(model, processor, config.final_eval_samples)
    print(
        f"held-out greedy accuracy on {config.final_eval_samples} samples: {json.dumps(accuracy)}"
    )
    return save_run(
        out,
        lambda d: save_checkpoint(d, model, processor, model_config),
        "polish_run.json" if init else "training_run.json",
        run,
        model,
        config,
        model_config,
        seed,
        accuracy,
        "images_seen",
        config.images_per_step,
        init=init,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, SFTConfig)
    parser.add_argument(
        "--polish", metavar="DIR", help="continue this checkpoint with POLISH_CONFIG"
    )
    args = parser.parse_args(argv)
    if args.polish:
        config = replace(POLISH_CONFIG, threads=args.threads)
        train(args.out, config, TinyVLMConfig(), POLISH_SEED, args.minutes, init=args.polish)
    else:
        train(
            args.out,
            SFTConfig(steps=args.steps, threads=args.threads),
            TinyVLMConfig(),
            args.seed,
            args.minutes,
        )


if __name__ == "__main__":
    main()
