"""A synthetic long-context key-value retrieval world: many pairs in the prompt, one that matters.

A prompt lists N key-value pairs of word tokens, each key followed by its value, then asks for
the value of one listed key:

    k17 v103 k4 v88 k90 v5 ... k33 v61 what is k4

and the model answers "answer v88" (then its end-of-sequence token). Keys are distinct within a
prompt (drawn without replacement from NUM_KEYS), values are drawn with replacement from
NUM_VALUES, and the queried pair is uniform over the list, so the answer can sit anywhere in it.
With MIN_PAIRS..MAX_PAIRS pairs a prompt is 195 to 259 tokens, of which the one pair asked about
decides the answer.

Why this layout. The answer starts with a lead word, ANSWER_LEAD: the prefill is dense, so the
first generated token never sees the pruned cache; the value word, decoded after the lead, does.
Values follow their keys directly and the prompt ends with the asked key, so a two-layer model
answers with one previous-token head (at the lead word it reads the asked key; at each value it
reads that value's key) and one matching head that copies the value whose key is the asked one,
reading the listing through the cache at the decode step. Separators between pairs
("k17 = v103 ;") made that circuit far slower to learn for the tiny model (sf_train.worlds.kv.sft).

Correctness is sf_train.worlds.common.is_correct against ``Sample.answer`` = "answer <value>": exact match
of both words, case and punctuation ignored, anything after them ignored. Samples are pure
functions of (split, index), like the VQA world's: the train split uses seeds [0, 1e9), the
held-out split seeds [1e9, 2e9), so the two never share a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..common import SPLIT_SEED_OFFSET, SPLIT_SIZE

NUM_KEYS = 160
NUM_VALUES = 128
MIN_PAIRS, MAX_PAIRS = 96, 128
KEYS = tuple(f"k{i}" for i in range(NUM_KEYS))
VALUES = tuple(f"v{i}" for i in range(NUM_VALUES))
QUESTION = ("what", "is")  # the prompt ends with "what is <key>"
ANSWER_LEAD = "answer"  # the completion is f"{ANSWER_LEAD} <value>"
# A seed stream of its own, so a kv sample never reuses the random numbers of the visual sample
# of the same (split, index).
_STREAM = 7


def completion_text(value: str) -> str:
    """What the model is trained to generate for a value (before its end-of-sequence token)."""
    return f"{ANSWER_LEAD} {value}"


@dataclass(frozen=True)
class Sample:
    split: str
    index: int
    pairs: tuple[tuple[str, str], ...]  # (key, value) in prompt order
    query: str  # the key asked about
    value: str  # its value

    @property
    def prompt(self) -> str:
        return prompt_text(self.pairs, self.query)

    @property
    def answer(self) -> str:
        """The expected completion, "answer <value>" (what common.is_correct compares against)."""
        return completion_text(self.value)


def listing_text(pairs) -> str:
    return " ".join(f"{k} {v}" for k, v in pairs)


def question_text(key: str) -> str:
    return " ".join((*QUESTION, key))


def prompt_text(pairs, query: str) -> str:
    return f"{listing_text(pairs)} {question_text(query)}"


def make_sample(
    split: str,
    index: int,
    min_pairs: int = MIN_PAIRS,
    max_pairs: int = MAX_PAIRS,
    num_keys: int = NUM_KEYS,
) -> Sample:
    """Sample `index` of `split`: the same pairs, query and answer on every machine.

    The task has MIN_PAIRS..MAX_PAIRS pairs with keys from all NUM_KEYS; fewer pairs, or keys from
    only the first `num_keys`, exist only for the curriculum of sf_train.worlds.kv.sft, which starts on
    short lists over few keys.
    """
    if split not in SPLIT_SEED_OFFSET:
        raise ValueError(f"split must be one of {list(SPLIT_SEED_OFFSET)}, got {split!r}")
    if not 0 <= index < SPLIT_SIZE:
        raise ValueError(f"index must be in [0, {SPLIT_SIZE}), got {index}")
    if not 1 <= min_pairs <= max_pairs <= num_keys <= NUM_KEYS:
        raise ValueError(
            f"need 1 <= min_pairs <= max_pairs <= num_keys <= {NUM_KEYS}, "
            f"got {min_pairs}, {max_pairs}, {num_keys}"
        )
    rng = np.random.default_rng([SPLIT_SEED_OFFSET[split] + index, _STREAM])
    n = int(rng.integers(min_pairs, max_pairs + 1))
    keys = rng.choice(num_keys, size=n, replace=False)
    values = rng.integers(NUM_VALUES, size=n)
    pairs = tuple((KEYS[k], VALUES[v]) for k, v in zip(keys, values))
    target = int(rng.integers(n))
    return Sample(split, index, pairs, pairs[target][0], pairs[target][1])


def make_samples(
    split: str,
    start: int,
    count: int,
    min_pairs: int = MIN_PAIRS,
    max_pairs: int = MAX_PAIRS,
    num_keys: int = NUM_KEYS,
) -> list[Sample]:
    return [
        make_sample(split, i, min_pairs, max_pairs, num_keys) for i in range(start, start + count)
    ]


def vocabulary() -> list[str]:
    """Every word a prompt or a completion can contain, in a fixed order (for the tokenizer)."""
    return [*QUESTION, ANSWER_LEAD, *KEYS, *VALUES]
