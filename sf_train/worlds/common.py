"""What both embedded worlds share: the split seeds, the exact-match judge, the special tokens.

Samples are pure functions of (split, index): the train split uses seeds [0, 1e9), the held-out
split seeds [1e9, 2e9), so the two never share a sample. Answers are judged by is_correct, the
same rule in both worlds. The tiny models' tokenizers share PAD / EOS / UNK (Qwen's spelling).
"""

import re
import string

SPLIT_SEED_OFFSET = {"train": 0, "heldout": 1_000_000_000}
SPLIT_SIZE = 1_000_000_000

PAD, EOS, UNK = "<|endoftext|>", "<|im_end|>", "<unk>"


_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise(text: str) -> list[str]:
    """Lower-cased words with punctuation removed: "Red." -> ["red"]."""
    return _PUNCTUATION.sub(" ", text.lower()).split()


def is_correct(prompt: str, completion: str, answer: str) -> int:
    """1 if the completion's first words are exactly the answer's words, else 0.

    Case, surrounding whitespace and punctuation are ignored ("Red." and " red " are right for
    "red"); words must match whole ("reddish" is wrong) and words after the answer are ignored
    ("red blue" counts as "red"), so a model that answers and then rambles without an
    end-of-sequence token is judged on its answer. `prompt` is unused: it is part of the
    signature every reward function of sf_train shares.
    """
    del prompt
    words, expected = normalise(completion), normalise(answer)
    return int(bool(expected) and words[: len(expected)] == expected)
