"""What both embedded worlds share: the split seeds, the exact-match judge, the special tokens,
and the tiny models' tokenizer / save / load / generate code.

Samples are pure functions of (split, index): the train split uses seeds [0, 1e9), the held-out
split seeds [1e9, 2e9), so the two never share a sample. Answers are judged by is_correct, the
same rule in both worlds. The tiny models' tokenizers share PAD / EOS / UNK (Qwen's spelling)
and are word-level over their world's vocabulary; a tiny model's checkpoint directory holds its
weights (safetensors), its tokenizer or processor and our config of it (a JSON file per world).
"""

import json
import re
import string
from dataclasses import asdict
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

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


def word_level_tokenizer(special_tokens, words, **options) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``special_tokens`` then ``words`` (ids in that order), UNK for
    any other word, splitting at whitespace and punctuation ("k4?" -> "k4", "?"); left padding,
    so the prompts of a batch all end where generation starts. ``options``: further
    PreTrainedTokenizerFast arguments of a world."""
    vocab = {token: i for i, token in enumerate([*special_tokens, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=UNK,
        pad_token=PAD,
        eos_token=EOS,
        padding_side="left",
        **options,
    )


def set_greedy_generation(model, eos: int, pad: int) -> None:
    """A tiny model's generation defaults: greedy, no BOS, ending at EOS, padding with PAD."""
    model.generation_config.update(
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=None,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
    )


def save_tiny_checkpoint(directory, model, processor, config, config_file: str) -> None:
    """Model weights (safetensors), ``processor`` (a tokenizer, or anything with
    save_pretrained) and our ``config`` dataclass as JSON in ``config_file``, in one directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    (directory / config_file).write_text(json.dumps(asdict(config), indent=2) + "\n")


def load_tiny_checkpoint(
    directory, model_class, processor_class, config_file: str, attn_implementation: str, dtype
):
    """(model in eval mode, processor, our config's fields as a dict) from a directory written
    by save_tiny_checkpoint."""
    directory = Path(directory)
    fields = json.loads((directory / config_file).read_text())
    model = model_class.from_pretrained(
        directory, attn_implementation=attn_implementation, dtype=dtype
    )
    return model.eval(), processor_class.from_pretrained(directory), fields


@torch.no_grad()
def generate_greedy(model, processor, batch, max_new_tokens: int) -> list[str]:
    """Greedy completions of an encoded, left-padded ``batch`` of prompts (decoded text, special
    tokens removed)."""
    batch = batch.to(model.device)
    output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(
        output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
    )
