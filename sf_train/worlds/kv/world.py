"""The text-only key-value retrieval world as a TrainingTask, and its shipped base checkpoint."""

from __future__ import annotations

from pathlib import Path

from ...tasks import TrainingTask
from ..common import is_correct
from . import model, retrieval

KV_BASE_CHECKPOINT = Path(__file__).parent / "checkpoint"


def embedded_kv(tokenizer) -> TrainingTask:
    """The text-only key-value retrieval world (retrieval.py) read by the tiny Qwen2's tokenizer.

    The expected completion is "answer <value>" (retrieval.Sample.answer), judged by the same
    common.is_correct as embedded_vqa. Nothing to suppress: every token is plain text. There are
    no visual tokens, so only TopPPolicy(prune="all") applies (the SFConfig default).
    """
    return TrainingTask(
        name="embedded_kv",
        samples=retrieval.make_samples,
        encode=lambda samples: model.encode_prompts(tokenizer, samples),
        prompt=lambda s: s.prompt,
        answer=lambda s: s.answer,
        is_correct=is_correct,
        decode=lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _load_embedded_kv(model_dir: str):
    policy, tokenizer, _ = model.load_checkpoint(model_dir)
    reference, _, _ = model.load_checkpoint(model_dir)
    return policy, reference, embedded_kv(tokenizer)
