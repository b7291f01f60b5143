"""task=jsonl: your own data (docs/scale.md#your-own-data).

SFConfig.data names a JSONL file, one record a line:

  {"images": ["a.png", ...], "question": "...", "answer": "..."}   one or more images
  {"video": "clip.mp4", "question": "...", "answer": "..."}        a video (full processor)
  {"question": "...", "answer": "..."}                             text only

with paths relative to the file, and an optional "split": "train" | "heldout" (a record without
one belongs to both: evaluate on another file with ``sf-train eval --set data=...``).
SFConfig.model names a transformers checkpoint directory of Qwen2-VL, Qwen2.5-VL or Qwen2 (any
causal LM) with its processor or tokenizer saved there. SFConfig.correctness picks the judge by
name from CORRECTNESS.

Prompts use the tokenizer's chat template when it has one (instruct checkpoints); without one
(e.g. a base model) a prompt is the question followed by one <|vision_start|><|image_pad|>
<|vision_end|> per image, the layout of the embedded VQA world.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..tasks import TrainingTask
from .common import normalise

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


# --- correctness ----------------------------------------------------------------------------------


def exact_match(prompt: str, completion: str, answer: str) -> int:
    """The whole completion is the answer, ignoring case, punctuation and spacing."""
    return int(bool(normalise(answer)) and normalise(completion) == normalise(answer))


_NUMBER = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def _first_number(text: str) -> float | None:
    match = _NUMBER.search(text)
    return None if match is None else float(match.group().replace(",", ""))


def numeric_match(prompt: str, completion: str, answer: str) -> int:
    """The completion's first number equals the answer's (relative tolerance 1e-6)."""
    got, want = _first_number(completion), _first_number(answer)
    return int(
        got is not None and want is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want))
    )


_CHOICE = re.compile(r"(?<![A-Za-z])\(?([A-Z])\)?(?![A-Za-z])")


def _letter(text: str) -> str | None:
    """The first standalone capital letter ("B", "(B)", "B." or "B) ..."), or the text itself
    when it is one letter of either case ("b."); a lower-case word like "a" is not a choice."""
    words = normalise(text)
    if len(words) == 1 and len(words[0]) == 1 and words[0].isalpha():
        return words[0].upper()
    match = _CHOICE.search(text)
    return None if match is None else match.group(1)


def choice_match(prompt: str, completion: str, answer: str) -> int:
    """The completion's multiple-choice letter is the answer's."""
    got, want = _letter(completion), _letter(answer)
    return int(got is not None and got == want)


CORRECTNESS = {"exact": exact_match, "numeric": numeric_match, "choice": choice_match}


# --- records --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    question: str
    answer: str
    images: tuple[Path, ...] = ()
    video: Path | None = None
    split: str | None = None


def read_records(path: str | Path) -> list[Record]:
    """The records of a JSONL file, checked: every error names the file, the line and the field."""
    if not str(path):
        raise ValueError("task=jsonl needs SFConfig.data: the JSONL file of records")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFConfig.data: no JSONL file at {path}")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: a record is a JSON object, got {type(raw).__name__}")
        unknown = set(raw) - {"images", "video", "question", "answer", "split"}
        if unknown:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
        if not isinstance(raw.get("question"), str) or not raw["question"].strip():
            raise ValueError(f'{where}: "question" must be a non-empty string')
        answer = raw.get("answer")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f'{where}: "answer" must be a non-empty string or a number')
        if "images" in raw and "video" in raw:
            raise ValueError(f'{where}: a record holds "images" or "video", not both')
        images = raw.get("images", [])
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise ValueError(f'{where}: "images" must be a list of paths')
        video = raw.get("video")
        if video is not None and not isinstance(video, str):
            raise ValueError(f'{where}: "video" must be a path')
        files = [path.parent / i for i in images] + ([path.parent / video] if video else [])
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{where}: no such file {missing[0]}")
        split = raw.get("split")
        if split not in (None, "train", "heldout"):
            raise ValueError(f'{where}: "split" must be "train" or "heldout", got {split!r}')
        records.append(
            Record(
                raw["question"],
                answer,
                tuple(path.parent / i for i in images),
                path.parent / video if video else None,
                split,
            )
        )
    if not records:
        raise ValueError(f"SFConfig.data: {path} holds no records")
    return records


# --- model, processor, task -----------------------------------------------------------------------


def load_model(model_dir: str):
    """A Qwen2-VL / Qwen2.5-VL (image-text-to-text) or causal LM checkpoint, fp32, sdpa."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_dir)
    auto = (
        AutoModelForImageTextToText if config.model_type in VL_MODEL_TYPES else AutoModelForCausalLM
    )
    return auto.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()


class _PlaceholderProcessor:
    """Image processor + tokenizer where the checkpoint saves no full processor (or transformers
    cannot build it here, e.g. without torchvision): each <|image_pad|> is expanded to its
    image's merged patches, as Qwen2-VL's processor does."""

    def __init__(self, model_dir: str, tokenizer):
        from transformers import AutoImageProcessor

        self.image_processor = AutoImageProcessor.from_pretrained(model_dir)
        self.tokenizer = tokenizer

    def __call__(self, text, images=None, videos=None, padding=True, return_tensors="pt"):
        from transformers import BatchFeature

        if videos:
            raise ValueError(
                "video records need the checkpoint's full processor (transformers' AutoProcessor, "
                "which needs torchvision): it could not be loaded"
            )
        data = {}
        if images:
            data.update(self.image_processor(images, return_tensors=return_tensors))
            merge = self.image_processor.merge_size**2
            counts = iter((data["image_grid_thw"].prod(-1) // merge).tolist())
            text = [
                t.split(IMAGE_PAD)[0]
                + "".join(IMAGE_PAD * next(counts) + tail for tail in t.split(IMAGE_PAD)[1:])
                for t in text
            ]
        encoded = self.tokenizer(text, padding=padding, return_tensors=return_tensors)
        data.update(encoded)
        image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        data["mm_token_type_ids"] = (encoded["input_ids"] == image_id).to(
            encoded["input_ids"].dtype
        )
        return BatchFeature(data, tensor_type=return_tensors)


def load_processor(model_dir: str, vision: bool):
    """(processor or None, tokenizer), prompts left-padded."""
    from transformers import AutoProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not vision:
        return None, tokenizer
    try:
        processor = AutoProcessor.from_pretrained(model_dir)
        processor.tokenizer.padding_side = "left"
        if processor.tokenizer.pad_token_id is None:
            processor.tokenizer.pad_token = processor.tokenizer.eos_token
        return processor, processor.tokenizer
    except (ImportError, OSError, ValueError, TypeError, AttributeError):
        return _PlaceholderProcessor(model_dir, tokenizer), tokenizer


def prompt_text(tokenizer, record: Record) -> str:
    if tokenizer.chat_template:
        visual = [{"type": "image"}] * len(record.images) + (
            [{"type": "video"}] if record.video else []
        )
        messages = [
            {"role": "user", "content": [*visual, {"type": "text", "text": record.question}]}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pads = VISION_START + IMAGE_PAD + VISION_END
    return (
        record.question
        + pads * len(record.images)
        + (VISION_START + VIDEO_PAD + VISION_END if record.video else "")
    )


def jsonl_task(
    records: list[Record], processor, tokenizer, correctness: str = "exact"
) -> TrainingTask:
    if correctness not in CORRECTNESS:
        raise ValueError(
            f"SFConfig.correctness must be one of {sorted(CORRECTNESS)}, got {correctness!r}"
        )
    splits = {
        name: [r for r in records if r.split in (None, name)] for name in ("train", "heldout")
    }

    def samples(split: str, start: int, count: int) -> list[Record]:
        pool = splits[split]
        if not pool:
            raise ValueError(f"SFConfig.data holds no {split!r} records")
        return [
            pool[(start + i) % len(pool)] for i in range(count)
        ]  # the train split cycles (epochs)

    def encode(batch: list[Record]):
        from PIL import Image

        text = [prompt_text(tokenizer, r) for r in batch]
        if processor is None:
            if any(r.images or r.video for r in batch):
                raise ValueError(
                    f"{tokenizer.name_or_path} is a text model: the records hold images or a video"
                )
            return tokenizer(text, padding=True, return_tensors="pt")
        images = [Image.open(p).convert("RGB") for r in batch for p in r.images]
        videos = [str(r.video) for r in batch if r.video]
        return processor(
            text=text,
            images=images or None,
            videos=videos or None,
            padding=True,
            return_tensors="pt",
        )

    vocab = tokenizer.get_vocab()
    return TrainingTask(
        name="jsonl",
        samples=samples,
        encode=encode,
        prompt=lambda r: r.question,
        answer=lambda r: r.answer,
        is_correct=CORRECTNESS[correctness],
        decode=lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # a completion holding a visual placeholder would break the model's image bookkeeping
        suppressed_token_ids=tuple(
            vocab[t] for t in (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END) if t in vocab
        ),
    )


def load_jsonl(data: str, model_dir: str, correctness: str = "exact", reference: bool = True):
    """(policy, reference or None, TrainingTask) for task=jsonl. Without ``reference`` (LoRA: the
    reference is the policy with its adapters disabled) the model is loaded once."""
    records = read_records(data)  # before loading any model: a bad file fails fast
    from transformers import AutoConfig

    vision = AutoConfig.from_pretrained(model_dir).model_type in VL_MODEL_TYPES
    processor, tokenizer = load_processor(model_dir, vision)
    task = jsonl_task(records, processor, tokenizer, correctness)
    return load_model(model_dir), load_model(model_dir) if reference else None, task
