"""sparse_attn: top-p pruned KV caches for (vision-)language model decoding.

Ops (torch.ops.sparse_attn.*, CPU and CUDA): cumulative_scores, topp_select, gather_kv,
scatter_kv, decode_attention. Plain-PyTorch definitions of each: sparse_attn.reference.
Drop-in for transformers: TopPPolicy, TopPCache and enable(model, policy) (importing sparse_attn
registers the "sparse_topp" attention implementation); cache_argument(model) names the keyword
the installed transformers takes the cache under. Baseline selection rules for ablations
(TopPPolicy(rule="top_k" / "threshold"), FastV-style shared_from_layer): sparse_attn.rules.
"""

from ._extension import cuda_kernels_built
from ._extension import load as _load

_load()

from . import reference  # noqa: E402
from .attention import cache_argument, enable  # noqa: E402
from .cache import TopPCache  # noqa: E402
from .ops import cumulative_scores, decode_attention, gather_kv, scatter_kv, topp_select  # noqa: E402
from .policy import TopPPolicy  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "cumulative_scores",
    "topp_select",
    "gather_kv",
    "scatter_kv",
    "decode_attention",
    "TopPPolicy",
    "TopPCache",
    "enable",
    "cache_argument",
    "reference",
    "cuda_kernels_built",
]
