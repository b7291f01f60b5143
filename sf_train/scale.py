"""Training at scale (docs/scale.md): LoRA adapters (peft), bf16 frozen weights, and the
trained state as full state dicts.

Nothing here is a home-made adapter or distribution scheme: LoRA is peft's; the FSDP2 sharding
(sf_train/distributed.py) is torch.distributed's; the full (unsharded) state dicts are gathered
with ``torch.distributed.checkpoint.state_dict``, the same calls for a plain, DDP or FSDP model,
so one checkpoint format serves every mode.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .config import SFConfig


def apply_lora(model: nn.Module, config: SFConfig):
    """peft LoRA adapters on ``config.lora_target_modules`` of ``model`` (in place: ``model``
    keeps its class, its targeted Linear layers gain adapters, every base weight is frozen).
    Returns the PeftModel, whose ``disable_adapter()`` gives the reference model."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError(
            "SFConfig.lora_rank > 0 needs peft: pip install 'sparse-attn[scale]' (or peft)"
        ) from e
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=list(config.lora_target_modules),
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(
            f"SFConfig.lora_target_modules={config.lora_target_modules}: {e}"
        ) from None
    return peft_model


def enable_checkpointing(model: nn.Module) -> None:
    """transformers' activation checkpointing of every decoder layer, non-reentrant (frozen
    inputs under LoRA and FSDP2 work). Its name since transformers 5.2x; before, gradient_..."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def freeze_to_dtype(model: nn.Module, config: SFConfig) -> None:
    """Frozen weights (a LoRA base, the full fine-tuning reference) stored and run in bf16 under
    dtype = "bfloat16": they are never updated, so fp32 copies would only cost memory. Trained
    weights stay fp32: LoRA adapters (peft runs them in fp32 on an fp32 cast of their input), and
    under FSDP the sharded master weights, whose bf16 copies only exist gathered for a forward
    (docs/scale.md#dtype)."""
    if config.dtype != "bfloat16":
        return
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def model_state(model: nn.Module, trainable_only: bool) -> dict:
    """The full (unsharded, CPU) state dict; with ``trainable_only``, just the trained tensors
    (LoRA: the adapters). A collective under FSDP: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options())
    if trainable_only:
        keep = trainable_names(model)
        state = {k: v for k, v in state.items() if k in keep}
    return state


def load_model_state(model: nn.Module, state: dict, trainable_only: bool) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    if trainable_only and set(state) != trainable_names(model):
        raise ValueError(
            "the checkpoint's trained tensors are not this model's trainable ones (another "
            "lora_rank or "
            f"lora_target_modules?): {sorted(set(state) ^ trainable_names(model))[:4]} ..."
        )
    set_model_state_dict(model, state, options=_options(strict=not trainable_only))


def optimizer_state(model: nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options())


@contextlib.contextmanager
def adapters_disabled(peft_model):
    """The reference model: the policy with its LoRA adapters off (no second copy in memory)."""
    with peft_model.disable_adapter():
        yield
