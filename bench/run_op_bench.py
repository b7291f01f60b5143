"""Times the benchmark cases of bench/op_cases.py (each op against its PyTorch reference) and writes
bench/results/ops_<device>.json and the markdown table made from it, ops_<device>.md (with
--threads N: ops_<device>_threads<N>.json and .md).

    python bench/run_op_bench.py [--device cpu|cuda] [--quick] [--threads N]

CPU: time.perf_counter around each call after a warm-up, the median of the runs; the op, its
reference and the baseline take turns in rounds (see Repeats). CUDA: the same with CUDA events,
and the inputs rotated over enough copies to exceed twice the L2 cache. Each CUDA case also gets
its floors: the bytes it must move over the measured device-to-device copy bandwidth (read +
write), and the flops it must do over the measured bf16 matmul throughput.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from itertools import cycle, islice
from pathlib import Path

import torch
from op_cases import Case, Inputs, cases, dtype_name

import sparse_attn

RESULTS = Path(__file__).resolve().parent / "results"
MAX_INPUT_COPIES = 64


@dataclass(frozen=True)
class Repeats:
    """The implementations of a case take turns in rounds: in each, every implementation is warmed
    up, then timed over `runs` calls back to back. A change in the machine's load thus hits them
    alike, and a small op is not timed cold after its reference."""

    rounds: int
    warmup_s: float  # seconds of untimed calls before the timed ones, in each round
    runs: int  # timed calls per round: rounds * runs in all


@dataclass(frozen=True)
class DevicePeaks:
    copy_bytes_per_s: float  # bytes read + bytes written by a large device-to-device copy
    matmul_flops_per_s: float  # an 8192^3 bf16 matmul


def repeats_for(device: str, quick: bool) -> Repeats:
    if quick:
        return Repeats(rounds=1, warmup_s=0.1, runs=5)
    if device == "cuda":
        return Repeats(rounds=4, warmup_s=0.1, runs=50)
    return Repeats(rounds=3, warmup_s=0.25, runs=7)


def warm_up(copies: list[Callable], seconds: float, synchronize: Callable = lambda: None) -> None:
    """Calls for at least `seconds` (once at least). Seconds, not a count: on a small shared
    machine the first few hundred ms of a burst of calls were seen to run many times slower."""
    deadline = time.perf_counter() + seconds
    for call in cycle(copies):
        call()
        synchronize()
        if time.perf_counter() >= deadline:
            return


def times_ms_cpu(calls: dict[str, list[Callable]], repeats: Repeats) -> dict[str, list[float]]:
    """calls: for each implementation, one call per input copy, cycled through."""
    times = {name: [] for name in calls}
    for _ in range(repeats.rounds):
        for name, copies in calls.items():
            warm_up(copies, repeats.warmup_s)
            for call in islice(cycle(copies), repeats.runs):
                start = time.perf_counter()
                call()
                times[name].append(1e3 * (time.perf_counter() - start))
    return times


def times_ms_cuda(calls: dict[str, list[Callable]], repeats: Repeats) -> dict[str, list[float]]:
    """As times_ms_cpu, timed by CUDA events around each call."""
    events = {name: [] for name in calls}
    for _ in range(repeats.rounds):
        for name, copies in calls.items():
            warm_up(copies, repeats.warmup_s, torch.cuda.synchronize)
            for call in islice(cycle(copies), repeats.runs):
                start, end = (torch.cuda.Event(enable_timing=True) for _ in "se")
                start.record()
                call()
                end.record()
                events[name].append((start, end))
    torch.cuda.synchronize()
    return {
        name: [start.elapsed_time(end) for start, end in pairs] for name, pairs in events.items()
    }


def measure_cuda_peaks(repeats: Repeats) -> DevicePeaks:
    source = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    destination = torch.empty_like(source)
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in "ab")
    times = times_ms_cuda(
        {"copy": [partial(destination.copy_, source)], "matmul": [partial(torch.matmul, a, b)]},
        repeats,
    )
    copy_s, matmul_s = (1e-3 * statistics.median(times[name]) for name in ("copy", "matmul"))
    return DevicePeaks(2 * source.nbytes / copy_s, 2 * n**3 / matmul_s)


def input_copies(case: Case, device: str) -> list[Inputs]:
    """One set of inputs on CPU; on CUDA enough that cycling through them overflows the L2 cache."""
    first = case.make_inputs(device, 0)
    if device == "cpu":
        return [first]
    size = sum(x.nbytes for x in first[0] if isinstance(x, torch.Tensor))
    l2_size = torch.cuda.get_device_properties(device).L2_cache_size
    count = min(MAX_INPUT_COPIES, math.ceil(2 * l2_size / size))
    return [first] + [case.make_inputs(device, seed) for seed in range(1, count)]


def floors(case: Case, op_ms: float, peaks: DevicePeaks) -> dict:
    memory_ms = 1e3 * case.floor_bytes / peaks.copy_bytes_per_s
    compute_ms = 1e3 * case.flops / peaks.matmul_flops_per_s
    return {
        "floor_bytes": case.floor_bytes,
        "floor_note": case.floor_note,
        "memory_floor_ms": memory_ms,
        "flops": case.flops,
        "compute_floor_ms": compute_ms,
        "op_over_floor": op_ms / max(memory_ms, compute_ms),
    }


def measure(case: Case, device: str, repeats: Repeats, peaks: DevicePeaks | None) -> dict:
    """Median (the figure) and min (the run least disturbed by other processes) of each
    implementation; the op's speedups from the medians."""
    times_ms = times_ms_cuda if device == "cuda" else times_ms_cpu
    copies = input_copies(case, device)
    calls = {
        name: [partial(function, *args, **kwargs) for args, kwargs in copies]
        for name, function in case.implementations().items()
    }
    times = times_ms(calls, repeats)
    ms = {name: statistics.median(samples) for name, samples in times.items()}
    min_ms = {name: min(samples) for name, samples in times.items()}
    result = {
        "case": case.name,
        "shape": case.shape,
        "dtype": dtype_name(case.dtype),
        "op_ms": ms["op"],
        "op_min_ms": min_ms["op"],
        "reference_ms": ms["reference"],
        "reference_min_ms": min_ms["reference"],
        "speedup_vs_reference": ms["reference"] / ms["op"],
    }
    if case.baseline is not None:
        name = case.baseline.__name__
        result |= {
            "baseline": name,
            "baseline_ms": ms[name],
            "baseline_min_ms": min_ms[name],
            "speedup_vs_baseline": ms[name] / ms["op"],
        }
    if peaks is not None:
        result |= floors(case, ms["op"], peaks)
    return result


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_stall_s() -> float | None:
    """Seconds, since boot, that some task waited for a free core (Linux pressure stall
    information); None where the kernel does not report it."""
    try:
        first_line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return 1e-6 * int(first_line.rsplit("total=", 1)[1])


def environment(device: str) -> dict:
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else cpu_model(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_at_start": os.getloadavg()[0],  # other processes sharing the cores
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "sparse_attn": sparse_attn.__version__,
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def format_ms(ms: float) -> str:
    return f"{ms:.3g}"


def median_and_min(result: dict, name: str) -> str:
    return f"{format_ms(result[f'{name}_ms'])} ({format_ms(result[f'{name}_min_ms'])})"


COLUMNS = {
    "case": lambda r: r["case"],
    "shape": lambda r: r["shape"],
    "op ms": lambda r: median_and_min(r, "op"),
    "reference ms": lambda r: median_and_min(r, "reference"),
    "op vs reference": lambda r: f"{r['speedup_vs_reference']:.2f}x",
    "baseline ms": lambda r: (
        f"{median_and_min(r, 'baseline')} {r['baseline']}" if "baseline" in r else ""
    ),
    "op vs baseline": lambda r: f"{r['speedup_vs_baseline']:.2f}x" if "baseline" in r else "",
}
FLOOR_COLUMNS = {
    "memory floor ms": lambda r: f"{format_ms(r['memory_floor_ms'])} ({r['floor_note']})",
    "compute floor ms": lambda r: format_ms(r["compute_floor_ms"]) if r["flops"] else "",
    "op / floor": lambda r: f"{r['op_over_floor']:.2f}",
}


def contention(env: dict) -> str:
    share = env.get("share_of_run_waiting_for_a_core")
    if share is None:
        return ""
    return f"; some task waited for a core during {100 * share:.0f}% of the run (Linux PSI)"


def markdown(report: dict) -> str:
    env, repeats, peaks = report["environment"], report["repeats"], report["peaks"]
    lines = [
        f"# sparse_attn ops on {env['device']}",
        "",
        f"torch {env['torch']}, sparse_attn {env['sparse_attn']}, commit {env['git_commit'][:12]}, "
        f"{env['date']}. {env['cpu_cores']} CPU cores ({env['cpu']}, {env['cpu_capability']}), "
        f"torch threads: {env['torch_threads']}; 1-minute load average "
        f"{env['load_average_at_start']:.2f} at the start, {env['load_average_at_end']:.2f} at the end"
        + contention(env)
        + ".",
        f"Median of {repeats['rounds'] * repeats['runs']} runs (rounds: {repeats['rounds']}, each "
        f"after {repeats['warmup_s']} s of warm-up). Times: median (min) in ms; the op's speedups "
        "from the medians, above 1x = op faster.",
    ]
    columns = COLUMNS
    if peaks is not None:
        columns = COLUMNS | FLOOR_COLUMNS
        lines.append(
            f"Floors: device-to-device copy {peaks['copy_bytes_per_s'] / 1e9:.0f} GB/s "
            f"(read + write), bf16 matmul {peaks['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s."
        )
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += [
        "| " + " | ".join(cell(r) for cell in columns.values()) + " |" for r in report["cases"]
    ]
    return "\n".join(lines) + "\n"


def run(device: str, repeats: Repeats) -> dict:
    """Every case of the device, with the environment it ran in."""
    env = environment(device)
    stall_at_start, start = cpu_stall_s(), time.perf_counter()
    peaks = measure_cuda_peaks(repeats) if device == "cuda" else None
    results = []
    for case in cases(device):
        results.append(measure(case, device, repeats, peaks))
        print(
            f"{case.name}: op {format_ms(results[-1]['op_ms'])} ms, "
            f"reference {format_ms(results[-1]['reference_ms'])} ms",
            flush=True,
        )
    env["load_average_at_end"] = os.getloadavg()[0]
    if stall_at_start is not None:  # near 0 on a machine to ourselves
        waited_s = cpu_stall_s() - stall_at_start
        env["share_of_run_waiting_for_a_core"] = waited_s / (time.perf_counter() - start)
    return {
        "environment": env,
        "repeats": asdict(repeats),
        "peaks": None if peaks is None else asdict(peaks),
        "cases": results,
    }


def main() -> None:
    gpu_ready = torch.cuda.is_available() and sparse_attn.cuda_kernels_built()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if gpu_ready else "cpu")
    parser.add_argument(
        "--quick", action="store_true", help="fewer runs: a smoke test, not figures"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's). On a machine whose cores "
        "other processes also use, 1 avoids timing the waits of the thread pool for a busy core",
    )
    args = parser.parse_args()
    if args.device == "cuda" and not gpu_ready:
        parser.error("--device cuda needs a GPU and sparse_attn built with its CUDA kernels")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    report = run(args.device, repeats_for(args.device, args.quick))
    RESULTS.mkdir(exist_ok=True)
    stem = f"ops_{args.device}" + ("" if args.threads is None else f"_threads{args.threads}")
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (RESULTS / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
