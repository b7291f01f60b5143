"""A tiny Qwen2.5-VL built entirely by our code: model, word-level tokenizer and processor.

The model is transformers' own Qwen2_5_VLForConditionalGeneration (vision tower with window
attention, patch merger, mRoPE language model) at a small config, so everything sparse_attn and
sf_train do to it they do to the real architecture. The vision tower uses 8-pixel patches so a
224x224 image of the synthetic world (sf_train/worlds/vqa/scene.py) becomes 28x28 patches and, after the 2x2
merge, 14x14 = 196 visual tokens: one per board cell.

The processor is a minimal equivalent of transformers' Qwen2_5_VLProcessor for images and text:
transformers' Qwen2_5_VLProcessor cannot be built without torchvision (it insists on a video
processor), which we do not depend on. It uses the real Qwen2-VL image processor (PIL backend)
and produces the same input_ids, attention_mask, mm_token_type_ids, pixel_values and
image_grid_thw as the real processor would.
"""

from dataclasses import dataclass

import torch
from transformers import (
    BatchFeature,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..common import (
    EOS,
    PAD,
    UNK,
    generate_greedy,
    load_tiny_checkpoint,
    save_tiny_checkpoint,
    set_greedy_generation,
    word_level_tokenizer,
)
from . import scene

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
SPECIAL_TOKENS = (PAD, EOS, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, UNK)
TINY_CONFIG_FILE = "tiny_vlm.json"


@dataclass(frozen=True)
class TinyVLMConfig:
    text_hidden: int = 128
    text_intermediate: int = 384
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    # mRoPE splits head_dim / 2 rotary frequencies into (temporal, height, width) sections.
    mrope_section: tuple[int, int, int] = (4, 6, 6)
    vision_hidden: int = 64
    vision_intermediate: int = 128
    vision_depth: int = 2
    vision_heads: int = 2
    patch_size: int = 8
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    # Window attention over 7x7 merged tokens (112 px); the last block attends over the image.
    window_size: int = 112
    image_size: int = scene.IMAGE_SIZE

    @property
    def visual_tokens_per_image(self) -> int:
        return (self.image_size // (self.patch_size * self.spatial_merge_size)) ** 2


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the task's words plus the special tokens Qwen-VL needs.

    Left padding, so the prompts of a batch all end where generation starts.
    """
    return word_level_tokenizer(
        SPECIAL_TOKENS,
        scene.vocabulary(),
        extra_special_tokens={
            "image_token": IMAGE_PAD,
            "video_token": VIDEO_PAD,
            "vision_start_token": VISION_START,
            "vision_end_token": VISION_END,
        },
    )


def build_image_processor(config: TinyVLMConfig) -> Qwen2VLImageProcessorPil:
    # Images whose sides are multiples of patch * merge (all task images) keep their own size,
    # from 2x2 merged tokens (as Qwen's default minimum) up to the full task image.
    unit = config.patch_size * config.spatial_merge_size
    return Qwen2VLImageProcessorPil(
        patch_size=config.patch_size,
        merge_size=config.spatial_merge_size,
        temporal_patch_size=config.temporal_patch_size,
        size={"shortest_edge": (2 * unit) ** 2, "longest_edge": config.image_size**2},
    )


class TinyVLProcessor:
    """Images + text -> model inputs, as transformers' Qwen2_5_VLProcessor produces them."""

    def __init__(
        self, image_processor: Qwen2VLImageProcessorPil, tokenizer: PreTrainedTokenizerFast
    ):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    def __call__(
        self, text: list[str], images=None, padding=True, return_tensors="pt"
    ) -> BatchFeature:
        text = list(text)
        data = {}
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors))
            # Each <|image_pad|> stands for its image's merged patches: t * h * w / merge^2 tokens.
            merge = self.image_processor.merge_size**2
            counts = iter((data["image_grid_thw"].prod(-1) // merge).tolist())
            if sum(t.count(IMAGE_PAD) for t in text) != len(data["image_grid_thw"]):
                raise ValueError(f"the prompts must hold one {IMAGE_PAD} per image")
            expanded = []
            for t in text:
                head, *tails = t.split(IMAGE_PAD)
                expanded.append(head + "".join(IMAGE_PAD * next(counts) + tail for tail in tails))
            text = expanded
        encoded = self.tokenizer(text, padding=padding, return_tensors=return_tensors)
        data.update(encoded)
        data["mm_token_type_ids"] = (encoded["input_ids"] == self.image_token_id).to(
            encoded["input_ids"].dtype
        )
        return BatchFeature(data, tensor_type=return_tensors)

    def batch_decode(self, token_ids, skip_special_tokens=True) -> list[str]:
        return self.tokenizer.batch_decode(token_ids, skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, directory) -> None:
        self.image_processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory) -> "TinyVLProcessor":
        return cls(
            Qwen2VLImageProcessorPil.from_pretrained(directory),
            PreTrainedTokenizerFast.from_pretrained(directory),
        )


def build_processor(config: TinyVLMConfig) -> TinyVLProcessor:
    return TinyVLProcessor(build_image_processor(config), build_tokenizer())


def build_model(config: TinyVLMConfig, tokenizer: PreTrainedTokenizerFast, seed: int = 0):
    """A freshly initialised tiny Qwen2.5-VL whose vocabulary is `tokenizer`'s."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    model_config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=config.text_hidden,
            intermediate_size=config.text_intermediate,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            num_key_value_heads=config.text_kv_heads,
            max_position_embeddings=1024,
            rope_parameters=dict(
                rope_type="default", rope_theta=10000.0, mrope_section=list(config.mrope_section)
            ),
            bos_token_id=None,
            eos_token_id=ids[EOS],
            pad_token_id=ids[PAD],
        ),
        vision_config=dict(
            depth=config.vision_depth,
            hidden_size=config.vision_hidden,
            intermediate_size=config.vision_intermediate,
            num_heads=config.vision_heads,
            patch_size=config.patch_size,
            spatial_merge_size=config.spatial_merge_size,
            temporal_patch_size=config.temporal_patch_size,
            window_size=config.window_size,
            fullatt_block_indexes=[config.vision_depth - 1],
            out_hidden_size=config.text_hidden,
        ),
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(model_config)
    set_greedy_generation(model, ids[EOS], ids[PAD])
    return model


def save_checkpoint(directory, model, processor: TinyVLProcessor, config: TinyVLMConfig) -> None:
    """Model weights (safetensors), tokenizer, image processor and our config, in one directory."""
    save_tiny_checkpoint(directory, model, processor, config, TINY_CONFIG_FILE)


def load_checkpoint(directory, attn_implementation: str = "sdpa", dtype=torch.float32):
    """(model in eval mode, processor, TinyVLMConfig) from a directory written by save_checkpoint."""
    model, processor, fields = load_tiny_checkpoint(
        directory,
        Qwen2_5_VLForConditionalGeneration,
        TinyVLProcessor,
        TINY_CONFIG_FILE,
        attn_implementation,
        dtype,
    )
    config = TinyVLMConfig(**{**fields, "mrope_section": tuple(fields["mrope_section"])})
    return model, processor, config


def prompt_text(question: str) -> str:
    """The prompt for one question and one image; the answer follows it directly.

    The question comes first, so through causal attention every visual token already knows what
    is asked and can mark whether it matters; the answer then only has to read the marked tokens.
    """
    return f"{question}{VISION_START}{IMAGE_PAD}{VISION_END}"


def encode_prompts(processor, samples) -> BatchFeature:
    """Left-padded prompts (question + image) for a batch of task samples."""
    return processor(
        text=[prompt_text(s.question.text) for s in samples],
        images=[s.image for s in samples],
        padding=True,
        return_tensors="pt",
    )


def generate_answer(model, processor, samples, max_new_tokens: int = 4) -> list[str]:
    """Greedy answers (decoded text, special tokens removed) for a batch of task samples."""
    return generate_greedy(model, processor, encode_prompts(processor, samples), max_new_tokens)
