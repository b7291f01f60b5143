"""sparse_attn: top-p pruned KV caches for (vision-)language model decoding.

Ops (torch.ops.sparse_attn.*, CPU and CUDA): cumulative_scores, topp_select, gather_kv,
scatter_kv. Plain-PyTorch definitions of each: sparse_attn.reference.
"""
from ._extension import cuda_kernels_built, load as _load

_load()

from . import reference  # noqa: E402
from .ops import cumulative_scores, gather_kv, scatter_kv, topp_select  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "cumulative_scores",
    "topp_select",
    "gather_kv",
    "scatter_kv",
    "reference",
    "cuda_kernels_built",
]
