"""pytest-benchmark suite: each op of sparse_attn next to its PyTorch reference (one benchmark
group per case), on CPU and, when a GPU and the CUDA kernels are present, on CUDA.

Not part of the test run (testpaths = ["tests"], --benchmark-disable). Run it with
    pytest bench/test_bench_ops.py --benchmark-enable
bench/run_op_bench.py times the same cases with CUDA events and writes bench/results/.
"""

import functools

import pytest
import torch
from op_cases import cases

import sparse_attn

DEVICES = ["cpu"] + (
    ["cuda"] if torch.cuda.is_available() and sparse_attn.cuda_kernels_built() else []
)
RUNS = [
    pytest.param(device, case, name, id=f"{device}-{case.name}-{name}")
    for device in DEVICES
    for case in cases(device)
    for name in case.implementations()
]


@functools.lru_cache(maxsize=1)  # the runs of a case follow each other: one input set alive
def inputs_of(device, case):
    """Made once per case, outside the timed calls, and shared by its op, reference and baseline."""
    return case.make_inputs(device, 0)


@pytest.mark.parametrize("device, case, implementation", RUNS)
def test_op_vs_reference(benchmark, device, case, implementation):
    function = case.implementations()[implementation]
    args, kwargs = inputs_of(device, case)
    benchmark.group = f"{device} {case.name}"
    if device == "cuda":  # time the kernels, not their launch
        benchmark(lambda: (function(*args, **kwargs), torch.cuda.synchronize()))
    else:
        benchmark(function, *args, **kwargs)
