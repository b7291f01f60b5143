"""Benchmark cases shared by test_bench_ops.py (pytest-benchmark) and run_op_bench.py.

Each case times one op of sparse_attn against its plain-PyTorch reference (sparse_attn.reference,
same signature) at the Qwen2.5-7B attention shape: 28 query heads, 4 KV heads, d = 128.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import sparse_attn
from sparse_attn import reference

Q_HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128
N_PROBES = 64
KEEP_FRACTION = 0.25  # tau: the share of the context a compact cache keeps

Inputs = tuple[tuple, dict]  # positional and keyword arguments of one call


def sort_cumsum_searchsorted(scores: torch.Tensor, p: float) -> torch.Tensor:
    """The bare top-p count of docs/design.md#targets: sort each row descending, cumsum, and find where
    the running mass reaches p * total. Returns how many tokens each row keeps (no indices)."""
    cumulative = scores.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    return torch.searchsorted(cumulative, p * cumulative[:, -1:]) + 1


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, eq=False)
class Case:
    op: str  # name of the op in both sparse_attn and sparse_attn.reference
    params: str  # what tells this case apart from the others of its op
    shape: str  # shape of the main input, for the result tables
    dtype: torch.dtype
    make_inputs: Callable[[str, int], Inputs]  # (device, seed) -> arguments of one call
    floor_bytes: int  # bytes the op must at least move, as floor_note says
    floor_note: str
    flops: int = 0  # floating-point operations the op must at least do; 0 for data movement
    baseline: Callable | None = None  # a further comparison taking the op's arguments

    @property
    def name(self) -> str:
        return f"{self.op}[{self.params},{dtype_name(self.dtype)}]"

    def implementations(self) -> dict[str, Callable]:
        """The functions timed for this case, by the name the results give them."""
        functions = {"op": getattr(sparse_attn, self.op), "reference": getattr(reference, self.op)}
        if self.baseline is not None:
            functions[self.baseline.__name__] = self.baseline
        return functions


def peaked_scores(rows: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Rows shaped like cumulative attention scores: the softmaxes of 16 probes over gaussian
    logits of std 4, summed. p = 0.975 keeps about 30% of a row, p = 0.9 about 9%."""
    logits = 4.0 * torch.randn(rows, 16, length, generator=gen)
    return torch.softmax(logits, dim=-1).sum(dim=1)


def topp_select_case(rows: int, length: int, p: float) -> Case:
    def make_inputs(device: str, seed: int) -> Inputs:
        gen = torch.Generator().manual_seed(seed)
        return (peaked_scores(rows, length, gen).to(device), p), {}

    return Case(
        "topp_select",
        f"{rows}x{length},p={p}",
        f"[{rows}, {length}]",
        torch.float32,
        make_inputs,
        floor_bytes=rows * length * 4,
        floor_note="one read of the scores (docs/design.md#targets: within 2x)",
        baseline=sort_cumsum_searchsorted,
    )


def cumulative_scores_case(keys: int, dtype: torch.dtype) -> Case:
    def make_inputs(device: str, seed: int) -> Inputs:
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(1, Q_HEADS, N_PROBES, HEAD_DIM, generator=gen)
        k = torch.randn(1, KV_HEADS, keys, HEAD_DIM, generator=gen)
        return (q.to(device, dtype), k.to(device, dtype)), {}

    read = (Q_HEADS * N_PROBES + KV_HEADS * keys) * HEAD_DIM * dtype.itemsize
    return Case(
        "cumulative_scores",
        f"Lk={keys}",
        f"q [1, {Q_HEADS}, {N_PROBES}, {HEAD_DIM}], k [1, {KV_HEADS}, {keys}, {HEAD_DIM}]",
        dtype,
        make_inputs,
        floor_bytes=read + KV_HEADS * keys * 4,
        floor_note="q and k read, fp32 scores written",
        flops=2 * Q_HEADS * N_PROBES * keys * HEAD_DIM,  # q . k once (the kernel does two passes)
    )


def gather_kv_case(length: int, dtype: torch.dtype) -> Case:
    """Per-head budget: one index row per KV head, tau of the positions kept in each."""
    kept = int(KEEP_FRACTION * length)

    def make_inputs(device: str, seed: int) -> Inputs:
        gen = torch.Generator().manual_seed(seed)
        k, v = (torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=gen).to(dtype) for _ in "kv")
        positions = torch.rand(KV_HEADS, length, generator=gen).argsort(dim=-1)[:, :kept]
        indices = torch.full((KV_HEADS, length), -1, dtype=torch.int32)  # as topp_select returns
        indices[:, :kept] = positions.sort(dim=-1).values
        counts = torch.full((KV_HEADS,), kept, dtype=torch.int32)
        return tuple(x.to(device) for x in (k, v, indices, counts)), {}

    return Case(
        "gather_kv",
        f"L={length}",
        f"[1, {KV_HEADS}, {length}, {HEAD_DIM}]",
        dtype,
        make_inputs,
        floor_bytes=2 * 2 * KV_HEADS * kept * HEAD_DIM * dtype.itemsize,
        floor_note="kept k and v read and written",
    )


def scatter_kv_case(batch: int, capacity: int, dtype: torch.dtype) -> Case:
    """Appending one decoded token at each row's current length."""

    def make_inputs(device: str, seed: int) -> Inputs:
        gen = torch.Generator().manual_seed(seed)
        cache_shape = (batch, KV_HEADS, capacity, HEAD_DIM)
        k_cache, v_cache = (torch.zeros(cache_shape, dtype=dtype) for _ in "kv")
        k, v = (torch.randn(batch, KV_HEADS, 1, HEAD_DIM, generator=gen).to(dtype) for _ in "kv")
        lengths = torch.randint(  # tokens each row holds: the slot of the new one
            capacity // 2, capacity, (batch, 1), generator=gen, dtype=torch.int32
        )
        return tuple(x.to(device) for x in (k_cache, v_cache, k, v, lengths)), {}

    return Case(
        "scatter_kv",
        f"B={batch},C={capacity}",
        f"[{batch}, {KV_HEADS}, {capacity}, {HEAD_DIM}]",
        dtype,
        make_inputs,
        floor_bytes=2 * 2 * batch * KV_HEADS * HEAD_DIM * dtype.itemsize,
        floor_note="the new k and v token read and written",
    )


def cases(device: str) -> list[Case]:
    """CPU: contexts a 2-core machine times in seconds; CUDA: the sizes of docs/design.md#targets, in bf16."""
    on_gpu = device == "cuda"
    context = 32768 if on_gpu else 4096
    model_dtype = torch.bfloat16 if on_gpu else torch.float32
    probe_keys = (4096, 16384, 32768) if on_gpu else (2048, 4096)
    return [
        *(topp_select_case(32, 16384, p) for p in (0.975, 0.9)),
        *(cumulative_scores_case(keys, model_dtype) for keys in probe_keys),
        *(gather_kv_case(context, dtype) for dtype in (torch.bfloat16, torch.float32)),
        *(scatter_kv_case(batch, int(KEEP_FRACTION * context), model_dtype) for batch in (1, 8)),
    ]
