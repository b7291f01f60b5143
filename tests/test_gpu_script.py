"""bench/gpu/run.sh, the one-command GPU check (docs/gpu.md), in its --cpu mode: every stage and
every benchmark section runs (small sizes, no sanitizer), so that the script a lent GPU machine
runs once has already run here."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sparse_attn

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "bench" / "gpu" / "run.sh"
FILES = {
    "env.txt",
    "build.log",
    "tests.log",
    "tests.xml",
    "bench.json",
    "bench.log",
    "sanitizer.log",
    "summary.txt",
}


def run_script(out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(RUN), str(out), "--cpu", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_script")
    return out, run_script(out)


def test_cpu_run_passes_every_stage(cpu_run):
    out, result = cpu_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == FILES  # the device tool brings back at most 8
    summary = (out / "summary.txt").read_text()
    assert summary.strip() in result.stdout  # printed last, as the device reply keeps the tail
    for stage in ("env", "build", "tests", "bench", "ops_smoke"):
        assert any(line.split()[:2] == [stage, "ok"] for line in summary.splitlines()), summary
    assert "ops_smoke on cpu: 0 failed" in (out / "sanitizer.log").read_text()
    assert "0 failed" in summary and "passed" in summary


def test_cpu_run_fills_every_benchmark_section(cpu_run):
    out, _ = cpu_run
    report = json.loads((out / "bench.json").read_text())
    assert report["errors"] == {}
    env, sections = report["environment"], report["sections"]
    assert env["git_commit"] and env["torch"] and env["transformers"]
    assert sections["peaks"]["copy_bytes_per_s"] > 0 and sections["peaks"]["matmul_flops_per_s"] > 0
    for name, baseline in (
        ("topp_select", "sort_cumsum"),
        ("gather_kv", "d2d_copy"),
        ("cumulative_scores", "fa2_forward"),
    ):
        rows = sections[name]
        assert rows and all(
            r["baseline"] == baseline
            and r["ms"]["op"] > 0
            and r["ms"][baseline] > 0
            and r["floor_ms"] > 0
            for r in rows
        ), rows
    # Identical calls select identically (on CPU always; the GPU run reports its own count).
    assert all(r["repeat_calls_differing"] == 0 for r in sections["topp_select"])
    if hasattr(sparse_attn, "decode_attention"):
        assert {r["case"].split(" tau=")[1] for r in sections["decode_attention"]} == {
            "0.1",
            "0.25",
            "0.5",
        }
    else:
        assert "skipped" in sections["decode_attention"]
    model = sections["model"]
    methods = [(r["method"], r["p"]) for r in model["rows"]]
    assert methods[0] == ("dense_fa2", None) and ("topp", model["p_for_tau_25"]) in methods
    assert all(r["kv_bytes"] > 0 and r["decode_tokens_per_s"] > 0 for r in model["rows"])
    dense_kv = model["rows"][0]["kv_bytes"]
    assert any(r["kv_bytes"] < dense_kv for r in model["rows"] if r["p"] == model["p_for_tau_25"])


def test_a_failing_stage_fails_the_run_and_the_summary_still_prints(tmp_path):
    """No budget left: every stage is skipped, the run does not pass, the table is still printed."""
    result = run_script(tmp_path, "--budget", "1", timeout=120)
    assert result.returncode != 0
    assert "sparse_attn GPU check: summary" in result.stdout
    assert "skipped" in (tmp_path / "summary.txt").read_text()


def test_summary_reads_failures_and_sanitizer_verdicts(tmp_path):
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_x" name="test_a[cuda]">'
        '<failure message="assert 1 == 2">trace</failure></testcase>'
        '<testcase classname="tests.test_x" name="test_a[cpu]"/></testsuite></testsuites>'
    )
    (tmp_path / "sanitizer.log").write_text(
        "== memcheck: sanitize memcheck (limit 60 s)\n========= ERROR SUMMARY: 2 errors\n"
        "FAIL gather_kv x\nops_smoke on cuda: 1 failed, 3.0 s\n"
        "== racecheck: sanitize racecheck (limit 90 s)\n"
    )
    stages = tmp_path / "stages.tsv"
    stages.write_text("tests\tfailed\t12\texit 1\nmemcheck\tfailed\t30\texit 3\n")
    script = ROOT / "bench" / "gpu" / "summary.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(stages)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert (
        "1 passed, 1 failed" in text and "FAILED tests.test_x::test_a[cuda]: assert 1 == 2" in text
    )
    assert "memcheck: ERROR SUMMARY: 2 errors; ops_smoke on cuda: 1 failed" in text
    assert "racecheck: no verdict" in text and "FAIL gather_kv x" in text
    assert "Benchmarks: no bench.json" in text


def stand_in_decode_attention(query, key, value, lengths, *, scale=None):
    """Plain SDPA with the decode op's semantics (query t of a row sees its slots
    < lengths - (T - 1 - t)), so the decode paths of the script run before the op exists."""
    T, C = query.shape[2], key.shape[2]
    group = query.shape[1] // key.shape[1]
    k, v = (x.repeat_interleave(group, 1).float() for x in (key, value))
    limit = lengths.repeat_interleave(group, 1)[..., None] - (T - 1 - torch.arange(T))  # [B, Hq, T]
    mask = torch.arange(C) < limit[..., None]
    out = torch.nn.functional.scaled_dot_product_attention(
        query.float(), k, v, attn_mask=mask, scale=scale
    )
    return out.to(query.dtype)


def test_decode_attention_paths(monkeypatch, tmp_path):
    """The decode benchmark and smoke check, with the real op when sparse_attn has it."""
    sys.path.insert(0, str(ROOT / "bench" / "gpu"))
    import bench_gpu
    import ops_smoke

    if not hasattr(sparse_attn, "decode_attention"):
        monkeypatch.setattr(
            sparse_attn, "decode_attention", stand_in_decode_attention, raising=False
        )
    bench = bench_gpu.Bench("cpu", tmp_path / "bench.json", deadline=time.monotonic() + 600)
    bench_gpu.peaks_section(bench)
    rows = bench_gpu.decode_section(bench)
    assert [r["case"] for r in rows] == [
        f"B={b} context=1024 tau={tau}" for b in (1, 2) for tau in (0.1, 0.25, 0.5)
    ]
    assert all(
        r["ms"]["op"] > 0 and r["ms"]["fa2_full"] > 0 and 0 < r["floor_ms"] < r["fa2_floor_ms"]
        for r in rows
    )
    monkeypatch.setattr(ops_smoke, "FAILURES", [])
    ops_smoke.smoke_decode_attention("cpu", torch.Generator().manual_seed(0))
    assert ops_smoke.FAILURES == []
