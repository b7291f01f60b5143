"""The synthetic visual QA world as a TrainingTask, and its shipped base checkpoint."""

from __future__ import annotations

from pathlib import Path

from ...tasks import TrainingTask
from ..common import is_correct
from . import model, scene

BASE_CHECKPOINT = Path(__file__).parent / "checkpoint"


def embedded_vqa(processor) -> TrainingTask:
    """The synthetic visual QA world (scene.py) read by the tiny VLM's processor."""
    tokenizer = processor.tokenizer
    return TrainingTask(
        name="embedded_vqa",
        samples=scene.make_samples,
        encode=lambda samples: model.encode_prompts(processor, samples),
        prompt=lambda s: s.question.text,
        answer=lambda s: s.answer,
        is_correct=is_correct,
        decode=lambda ids: processor.batch_decode(ids, skip_special_tokens=True),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        suppressed_token_ids=tuple(tokenizer.convert_tokens_to_ids(list(model.SPECIAL_TOKENS[2:]))),
    )


def _load_embedded_vqa(model_dir: str):
    policy, processor, _ = model.load_checkpoint(model_dir)
    reference, _, _ = model.load_checkpoint(model_dir)
    return policy, reference, embedded_vqa(processor)
