"""What the trainer needs from a dataset, and the embedded synthetic tasks (visual QA, text-only
key-value retrieval) in that form."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class TrainingTask:
    """A dataset of (prompt, checkable answer) for Sparsity Forcing.

    samples(split, start, count): deterministic samples ("train" / "heldout"), so every rank and
        a resumed run see the same data; encode(samples): left-padded model inputs of their
        prompts; prompt / answer: text of a sample; is_correct(prompt, completion, answer) -> 0/1;
        decode(token ids [B, T]) -> texts; suppressed_token_ids: never generated (a VLM's image
        placeholders: a completion holding one would break the model's image bookkeeping).
    """

    name: str
    samples: Callable[[str, int, int], list]
    encode: Callable[[list], Any]
    prompt: Callable[[Any], str]
    answer: Callable[[Any], str]
    is_correct: Callable[[str, str, str], int]
    decode: Callable[[Any], list[str]]
    eos_token_id: int
    pad_token_id: int
    suppressed_token_ids: tuple[int, ...] = ()


def embedded_vqa(processor) -> TrainingTask:
    """The synthetic visual QA world (sf_train.task) read by the tiny VLM's processor."""
    from . import task, tiny_vlm

    tokenizer = processor.tokenizer
    return TrainingTask(
        name="embedded_vqa",
        samples=task.make_samples,
        encode=lambda samples: tiny_vlm.encode_prompts(processor, samples),
        prompt=lambda s: s.question.text,
        answer=lambda s: s.answer,
        is_correct=task.is_correct,
        decode=lambda ids: processor.batch_decode(ids, skip_special_tokens=True),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        suppressed_token_ids=tuple(tokenizer.convert_tokens_to_ids(list(tiny_vlm.SPECIAL_TOKENS[2:]))),
    )


def embedded_kv(tokenizer) -> TrainingTask:
    """The text-only key-value retrieval world (sf_train.kv_task) read by the tiny Qwen2's tokenizer.

    The expected completion is "answer <value>" (kv_task.Sample.answer), judged by the same
    task.is_correct as embedded_vqa. Nothing to suppress: every token is plain text. There are
    no visual tokens, so only TopPPolicy(prune="all") applies (the SFConfig default).
    """
    from . import kv_task, task, tiny_lm

    return TrainingTask(
        name="embedded_kv",
        samples=kv_task.make_samples,
        encode=lambda samples: tiny_lm.encode_prompts(tokenizer, samples),
        prompt=lambda s: s.prompt,
        answer=lambda s: s.answer,
        is_correct=task.is_correct,
        decode=lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
