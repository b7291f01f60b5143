"""What the trainer needs from a dataset: the TrainingTask protocol. The embedded worlds
(sf_train/worlds/) and any task a user brings (task="package.module:factory") take this form."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


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
