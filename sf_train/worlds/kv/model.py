"""A tiny Qwen2 language model built by our code, with a word-level tokenizer, for the text-only
key-value retrieval world (sf_train/worlds/kv/retrieval.py).

The model is transformers' own Qwen2ForCausalLM (RoPE, grouped-query attention) at a small
config, so everything sparse_attn and sf_train do to it they do to the real architecture. The
checkpoint directory holds the weights (safetensors), the tokenizer and our config (tiny_lm.json),
as the VQA world's model (sf_train/worlds/vqa/model.py) does for the VLM.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BatchEncoding, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from ..common import EOS, PAD, UNK
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
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *retrieval.vocabulary()])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # "k4?" -> "k4", "?"
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=UNK,
        pad_token=PAD,
        eos_token=EOS,
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
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
    model.generation_config.update(
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=None,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    return model


def save_checkpoint(
    directory, model, tokenizer: PreTrainedTokenizerFast, config: TinyLMConfig
) -> None:
    """Model weights (safetensors), tokenizer and our config, in one directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / TINY_CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")


def load_checkpoint(directory, attn_implementation: str = "sdpa", dtype=torch.float32):
    """(model in eval mode, tokenizer, TinyLMConfig) from a directory written by save_checkpoint."""
    directory = Path(directory)
    config = TinyLMConfig(**json.loads((directory / TINY_CONFIG_FILE).read_text()))
    model = Qwen2ForCausalLM.from_pretrained(
        directory, attn_implementation=attn_implementation, dtype=dtype
    )
    return model.eval(), PreTrainedTokenizerFast.from_pretrained(directory), config


def encode_prompts(tokenizer, samples) -> BatchEncoding:
    """Left-padded prompts for a batch of retrieval samples."""
    return tokenizer([s.prompt for s in samples], padding=True, return_tensors="pt")


@torch.no_grad()
def generate_answer(model, tokenizer, samples, max_new_tokens: int = 4) -> list[str]:
    """Greedy completions (decoded text, special tokens removed) for a batch of retrieval samples."""
    batch = encode_prompts(tokenizer, samples).to(model.device)
    output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.batch_decode(
        output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
    )
