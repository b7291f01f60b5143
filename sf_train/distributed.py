"""Rank, world size, the device of a rank, and metric averaging over ranks.

Everything runs unchanged under torchrun: one process per device, gloo on CPU, nccl on GPU.
Without torch.distributed (a plain ``python`` run) there is one rank, rank 0.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    if world()[1] == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world()[1] for k, v in zip(keys, t, strict=True)}


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(device_for_rank())


def all_gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order ([obj] without torch.distributed)."""
    if world()[1] == 1:
        return [obj]
    out = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


# --- FSDP (docs/scale.md#fsdp) ---------------------------------------------------------------------


def ensure_process_group(device: torch.device) -> None:
    """A one-process group when none is running (FSDP needs one; under torchrun, init_distributed
    has made the real one)."""
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            store=dist.HashStore(),
            rank=0,
            world_size=1,
        )


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers model (the text model's, for a VLM): the modules
    transformers itself marks as _no_split_modules, less the vision tower's blocks."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names and hasattr(m, "self_attn")]
    if not layers:
        raise ValueError(
            f"SFConfig.distributed='fsdp': found no decoder layers ({sorted(names)}) in {type(model).__name__}"
        )
    return layers


def shard(model: nn.Module, bf16: bool) -> None:
    """FSDP2: fully_shard every decoder layer, then the root (embeddings, norms, head, vision
    tower), over all ranks. With ``bf16`` (SFConfig.dtype), bf16 gathered parameters, fp32
    for the gradient reduction and the sharded master weights."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    precision = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=precision)
    fully_shard(model, mesh=mesh, mp_policy=precision)
