import os

import pytest
import torch

import sparse_attn

# Every op test runs on CPU, and on CUDA when a GPU and the CUDA kernels are both present.
DEVICES = ["cpu"] + (
    ["cuda"] if torch.cuda.is_available() and sparse_attn.cuda_kernels_built() else []
)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def gen():
    """Fresh random inputs on every run; the seed is printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little") >> 1
    print(f"random seed: {seed}")
    return torch.Generator().manual_seed(seed)
