"""Loads the compiled ops (sparse_attn._C), refusing a build made against another torch."""

from pathlib import Path

import torch

_REBUILD = (
    "Rebuild it against the installed torch from the source checkout:\n"
    "    pip install --no-build-isolation --force-reinstall --no-deps ."
)


def load() -> None:
    try:
        from . import _build_info
    except ImportError as e:
        raise ImportError(
            f"sparse_attn is not built (no compiled extension found). {_REBUILD}"
        ) from e
    # Compare before loading the library: a mismatched libtorch ABI fails with an undefined
    # symbol at best and crashes at worst.
    built, running = _build_info.TORCH_VERSION, torch.__version__
    if built != running:
        raise ImportError(
            f"sparse_attn was built against torch {built} but torch {running} is installed. {_REBUILD}"
        )
    try:
        from . import _C  # noqa: F401  (registers torch.ops.sparse_attn.*)
    except ImportError as e:
        raise ImportError(
            f"sparse_attn imported from {Path(__file__).parent} has no compiled extension: a source "
            "checkout shadows the installed package (run from another directory) or the build "
            f"failed. {_REBUILD}  (or `pip install --no-build-isolation -e .` to build in place)"
        ) from e


def cuda_kernels_built() -> bool:
    from . import _build_info

    return bool(_build_info.WITH_CUDA)
