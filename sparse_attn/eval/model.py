"""Load a model directory (any causal LM, or Qwen2-VL / Qwen2.5-VL with its image processor) and
turn task samples into model inputs of an exact token length."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .tasks import IMAGE, Sample

VLM_TYPES = ("qwen2_vl", "qwen2_5_vl")
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class EvalError(ValueError):
    """A bad argument of sparse-attn eval, with a message that names it."""


def read_config(model_dir: str | Path):
    """The model's transformers config; EvalError when ``model_dir`` is no model directory."""
    from transformers import AutoConfig

    path = Path(model_dir)
    if not path.is_dir():
        raise EvalError(
            f"--model {str(model_dir)!r}: no such directory (expected a transformers "
            "checkpoint directory with config.json)"
        )
    if not (path / "config.json").is_file():
        raise EvalError(
            f"--model {str(model_dir)!r}: no config.json in this directory (expected a "
            "transformers checkpoint directory)"
        )
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as error:
        raise EvalError(
            f"--model {str(model_dir)!r}: transformers cannot read its config.json: {error}"
        ) from error


def max_positions(config) -> int | None:
    return getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = AutoTokenizer.from_pretrained(path)
    # A tokenizer.json of its own (the tiny models' word-level ones) may be mapped by AutoTokenizer
    # to the model type's class, which then encodes nothing: load the file as it is instead.
    if (
        not tokenizer("a b 1", add_special_tokens=False)["input_ids"]
        and (path / "tokenizer.json").is_file()
    ):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    if getattr(tokenizer, "chat_template", None) is None:
        # Qwen-VL checkpoints keep the chat template with the processor, beside the tokenizer.
        if (path / "chat_template.jinja").is_file():
            tokenizer.chat_template = (path / "chat_template.jinja").read_text()
        elif (path / "chat_template.json").is_file():
            tokenizer.chat_template = json.loads((path / "chat_template.json").read_text()).get(
                "chat_template"
            )
    tokenizer.padding_side = "left"  # every prompt of a batch ends where generation starts
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_image_processor(path: Path):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path)
    except (ImportError, ValueError, OSError):
        # The fast image processor needs torchvision; the PIL one does not.
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        return Qwen2VLImageProcessorPil.from_pretrained(path)


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    image_processor: object | None
    max_positions: int | None
    chat: bool  # the prompt goes through the tokenizer's chat template

    @property
    def is_vlm(self) -> bool:
        return self.image_processor is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eos_token_id(self):
        return self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id

    # --- prompts ------------------------------------------------------------------------------

    def text(self, sample: Sample, n: int) -> str:
        """The prompt of ``sample`` with haystack size n (one IMAGE_PAD per image)."""
        body = sample.body(n).replace(IMAGE, f"{VISION_START}{IMAGE_PAD}{VISION_END}")
        user = f"{body}\n{sample.question}".strip()
        if self.chat:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
            )
            return text + sample.answer_prefix
        return f"{user} {sample.answer_prefix}".rstrip()

    def image_inputs(self, sample: Sample) -> dict:
        if sample.image is None:
            return {}
        if not self.is_vlm:
            raise EvalError(
                f"task {sample.task!r} needs a vision-language model (Qwen2-VL / Qwen2.5-VL)"
            )
        return dict(self.image_processor([sample.image], return_tensors="pt"))

    def image_tokens(self, image_inputs: dict) -> int:
        if not image_inputs:
            return 0
        merge = getattr(self.image_processor, "merge_size", 2) ** 2
        return int(image_inputs["image_grid_thw"].prod(-1).sum()) // merge

    def count(self, text: str, image_tokens: int) -> int:
        ids = self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"]
        return len(ids) + (image_tokens - 1 if image_tokens else 0)

    def fit(self, sample: Sample, length: int) -> dict:
        """The largest haystack whose prompt holds at most ``length`` tokens (image tokens
        included): {text, tokens, image_inputs, image_tokens}."""
        image_inputs = self.image_inputs(sample)
        image_tokens = self.image_tokens(image_inputs)
        size = lambda n: self.count(self.text(sample, n), image_tokens)  # noqa: E731
        if size(0) > length:
            raise EvalError(
                f"--lengths {length}: too short for task {sample.task!r}, whose prompt needs "
                f"{size(0)} tokens without any haystack"
            )
        lo, hi = 0, 1
        while size(hi) <= length:  # the haystack grows with n: double, then bisect
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if size(mid) <= length else (lo, mid)
        text = self.text(sample, lo)
        return {
            "text": text,
            "tokens": self.count(text, image_tokens),
            "image_inputs": image_inputs,
            "image_tokens": image_tokens,
        }

    def batch(self, fitted: list[dict]) -> dict:
        """Left-padded model inputs for prompts from ``fit``."""
        texts = [
            f["text"].replace(IMAGE_PAD, IMAGE_PAD * f["image_tokens"])
            if f["image_tokens"]
            else f["text"]
            for f in fitted
        ]
        inputs = dict(
            self.tokenizer(
                texts, padding=True, return_tensors="pt", add_special_tokens=not self.chat
            )
        )
        images = [f["image_inputs"] for f in fitted if f["image_inputs"]]
        if images:
            inputs["pixel_values"] = torch.cat([i["pixel_values"] for i in images])
            inputs["image_grid_thw"] = torch.cat([i["image_grid_thw"] for i in images])
        if self.is_vlm:
            image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == image_id).to(
                inputs["input_ids"].dtype
            )
        return {k: v.to(self.device) for k, v in inputs.items()}


def load_model(
    model_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str = "auto",
    chat_template: str = "auto",
) -> LoadedModel:
    """The model (eval mode, on ``device``, in ``dtype``), its tokenizer and, for Qwen2-VL /
    Qwen2.5-VL, its image processor."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    from ..progress import enabled as progress_enabled

    path = Path(model_dir)
    config = read_config(path)
    if dtype != "auto" and dtype not in DTYPES:
        raise EvalError(f"--dtype {dtype!r}: expected one of auto, {', '.join(DTYPES)}")
    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
    is_vlm = config.model_type in VLM_TYPES
    loader = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    # transformers' own loading bar follows the project's progress display (quiet off a terminal).
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress_enabled():
        hf_logging.disable_progress_bar()
    try:
        model = loader.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa")
    except (ValueError, OSError) as error:
        raise EvalError(
            f"--model {str(model_dir)!r}: cannot load it as a "
            f"{'Qwen-VL model' if is_vlm else 'causal LM'}: {error}"
        ) from error
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    tokenizer = _load_tokenizer(path)
    if chat_template not in ("auto", "on", "off"):
        raise EvalError(f"--chat-template {chat_template!r}: expected auto, on or off")
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat_template == "on" and not has_template:
        raise EvalError("--chat-template on: the tokenizer has no chat template")
    return LoadedModel(
        name=path.resolve().name,
        model=model.to(device).eval(),
        tokenizer=tokenizer,
        image_processor=_load_image_processor(path) if is_vlm else None,
        max_positions=max_positions(config),
        chat=has_template and chat_template != "off",
    )
