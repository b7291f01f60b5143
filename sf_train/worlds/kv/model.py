"""A tiny Qwen2 language model built by our code, with a word-level tokenizer, for the text-only
key-value retrieval world (sf_train/worlds/kv/retrieval.py).

The model is transformers' own Qwen2ForCausalLM (RoPE, grouped-query attention) at a small
config, so everything sparse_attn and sf_train do to it they do to the real architecture. The
checkpoint directory holds the weights (safetensors), the tokenizer and our config (tiny_lm.json),
as the VQA world's model (sf_train/worlds/vqa/model.py) does for the VLM.
"""

from dataclasses import dataclass

import torch
from transformers import BatchEncoding, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

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
from . import retrieval

SPECIAL_TOKENS = (PAD, EOS, UNK)
TINY_CONFIG_FILE = "tiny_lm.json"


@dataclass(frozen=True)
class TinyLMConfig:
    hidden: int = 128
    intermediate: int = 384
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    max_positions: int = 1024
    rope_theta: float = 10000.0


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the task's words plus PAD / EOS / UNK; left padding, so the
    prompts of a batch all end where generation starts."""
    return word_level_tokenizer(
        SPECIAL_TOKENS, retrieval.vocabulary(), model_input_names=["input_ids", "attention_mask"]
    )


def build_model(
    config: TinyLMConfig, tokenizer: PreTrainedTokenizerFast, seed: int = 0
) -> Qwen2ForCausalLM:
    """A freshly initialised tiny Qwen2 whose vocabulary is `tokenizer`'s."""
    eos, pad = tokenizer.convert_tokens_to_ids([EOS, PAD])
    model_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.max_positions,
        rope_parameters=dict(rope_type="default", rope_theta=config.rope_theta),
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(model_config)
    set_greedy_generation(model, eos, pad)
    return model


def save_checkpoint(
    directory, model, tokenizer: PreTrainedTokenizerFast, config: TinyLMConfig
) -> None:
    """Model weights (safetensors), tokenizer and our config, in one directory."""
    save_tiny_checkpoint(directory, model, tokenizer, config, TINY_CONFIG_FILE)


def load_checkpoint(directory, attn_implementation: str = "sdpa", dtype=torch.float32):
    """(model in eval mode, tokenizer, TinyLMConfig) from a directory written by save_checkpoint."""
    model, tokenizer, fields = load_tiny_checkpoint(
        directory,
        Qwen2ForCausalLM,
        PreTrainedTokenizerFast,
        TINY_CONFIG_FILE,
        attn_implementation,
        dtype,
    )
    return model, tokenizer, TinyLMConfig(**fields)


def encode_prompts(tokenizer, samples) -> BatchEncoding:
    """Left-padded prompts for a batch of retrieval samples."""
    return tokenizer([s.prompt for s in samples], padding=True, return_tensors="pt")


def generate_answer(model, tokenizer, samples, max_new_tokens: int = 4) -> list[str]:
    """Greedy completions (decoded text, special tokens removed) for a batch of retrieval samples."""
    return generate_greedy(model, tokenizer, encode_prompts(tokenizer, samples), max_new_tokens)
