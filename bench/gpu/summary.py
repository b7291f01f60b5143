"""The summary table of a bench/gpu/run.sh run, from the files it wrote (standard library only, so
that it runs whatever else is broken):

    python bench/gpu/summary.py OUTDIR STAGES_TSV

Prints the table and writes it to OUTDIR/summary.txt: each stage's outcome, the test counts and
failures (tests.xml), each sanitizer's verdict (sanitizer.log), every benchmark figure next to its
floor and target (bench.json).
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

MAX_FAILURES_LISTED = 15
TAIL_LINES = 8  # of a failed stage's log


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def stages_part(out: Path, stages_tsv: Path) -> list[str]:
    rows = []
    if stages_tsv.exists():
        rows = [line.split("\t") for line in stages_tsv.read_text().splitlines() if line.strip()]
    lines = ["Stages", *table(["stage", "status", "seconds", "detail"], rows)]
    for name, status, _, detail in (r for r in rows if len(r) == 4):
        log = re.search(r"log (\S+)$", detail)
        if status in ("failed", "timeout") and log and (out / log.group(1)).exists():
            tail = (out / log.group(1)).read_text(errors="replace").splitlines()[-TAIL_LINES:]
            lines += [f"  {name} log, last lines:"] + [f"    {l[:160]}" for l in tail]
    return lines + [""]


def tests_part(xml_path: Path) -> list[str]:
    if not xml_path.exists():
        return ["Tests: no tests.xml (the stage did not run or was stopped before the end)", ""]
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        return [f"Tests: tests.xml unreadable ({e})", ""]
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    cuda = {"passed": 0, "failed": 0}
    failures = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                message = (child.get("message") or child.text or "").strip().splitlines()
                failures.append(
                    f"  {outcome.upper()} {name}: {message[0][:160] if message else ''}"
                )
            elif child.tag == "skipped":
                outcome = "skipped"
        counts[outcome] += 1
        if "cuda" in case.get("name", "") and outcome in ("passed", "failed", "error"):
            cuda["passed" if outcome == "passed" else "failed"] += 1
    lines = [
        "Tests: "
        + ", ".join(f"{n} {k}" for k, n in counts.items())
        + f" (parametrised on cuda: {cuda['passed']} passed, {cuda['failed']} failed or errors)"
    ]
    lines += failures[:MAX_FAILURES_LISTED]
    if len(failures) > MAX_FAILURES_LISTED:
        lines.append(f"  ... {len(failures) - MAX_FAILURES_LISTED} more in tests.log")
    return lines + [""]


def sanitizer_part(log: Path) -> list[str]:
    if not log.exists():
        return ["Sanitizer: no sanitizer.log", ""]
    lines = ["Sanitizer / ops smoke (sanitizer.log)"]
    sections = re.split(r"^== (\w+): ", log.read_text(errors="replace"), flags=re.M)
    for tool, body in zip(sections[1::2], sections[2::2]):
        verdicts = [l.strip("= ").strip() for l in body.splitlines() if "SUMMARY" in l]
        smoke = [l for l in body.splitlines() if l.startswith("ops_smoke on")]
        fails = [l for l in body.splitlines() if l.startswith("FAIL")]
        found = "; ".join(verdicts + smoke) or "no verdict (stopped or failed to start)"
        lines.append(f"  {tool}: {found}")
        lines += [f"    {l[:160]}" for l in fails[:5]]
    return lines + [""]


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def bench_part(path: Path) -> list[str]:
    if not path.exists():
        return ["Benchmarks: no bench.json", ""]
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return [f"Benchmarks: bench.json unreadable ({e})", ""]
    env, sections = report.get("environment", {}), report.get("sections", {})
    lines = [
        f"Benchmarks on {env.get('device')} (torch {env.get('torch')}, CUDA {env.get('cuda')}, "
        f"transformers {env.get('transformers')}, commit {str(env.get('git_commit'))[:12]})"
    ]
    if report.get("device") == "cpu":
        lines.append(
            "(--cpu: small sizes, few runs, no warm-up: these figures test the script, "
            "they are not results)"
        )
    peaks = sections.get("peaks")
    if peaks:
        lines.append(
            f"Floors from: copy {peaks['copy_bytes_per_s'] / 1e9:.0f} GB/s (read + write), "
            f"matmul {peaks['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s"
        )
    rows = []
    for _name, section in sections.items():
        if not isinstance(section, list):
            continue
        for r in section:
            ms = r["ms"]
            base = r.get("baseline")
            how = r.get("fa2_gqa")  # FA2 took GQA natively, or ran over repeated K/V
            base_label = f"{base} ({how})" if how and how != "enable_gqa" else base
            rows.append(
                [
                    r["bench"],
                    r["case"],
                    fmt(ms["op"]),
                    f"{base_label} {fmt(ms[base])}" if base else "",
                    fmt(r["floor_ms"]),
                    fmt(r.get("op_over_floor")),
                    fmt(r.get("speedup_vs_baseline")) + "x",
                    (r.get("target") or "")
                    + ("" if r.get("met") is None else f": {fmt(r['met'])}"),
                ]
            )
    if rows:
        lines += table(
            [
                "op",
                "case",
                "op ms",
                "baseline ms",
                "floor ms",
                "op/floor",
                "vs baseline",
                "target: met",
            ],
            rows,
        )
    model = sections.get("model")
    if isinstance(model, dict) and "rows" in model:
        lines += [
            "",
            f"Model ({model['settings']}); p for tau ~25%: {model['p_for_tau_25']}; "
            f"{model['target']}: {fmt(model['met'])}",
        ]
        lines += table(
            [
                "method",
                "p",
                "prefill",
                "tok/s",
                "x dense",
                "TTFT ms",
                "TTFT x",
                "KV MiB",
                "KV x",
                "tau",
            ],
            [
                [
                    r["method"],
                    fmt(r["p"]),
                    fmt(r["prefill"]),
                    fmt(r["decode_tokens_per_s"], 4),
                    fmt(r["speedup"]),
                    fmt(r["prefill_ms"], 4),
                    fmt(r["ttft_vs_dense"]),
                    fmt(r["kv_bytes"] / 2**20, 4),
                    fmt(r["kv_fraction"]),
                    fmt(r["token_ratio"]),
                ]
                for r in model["rows"]
            ],
        )
    for name, section in sections.items():
        if isinstance(section, dict) and "skipped" in section:
            lines.append(f"{name}: skipped ({section['skipped']})")
    for name, error in report.get("errors", {}).items():
        lines.append(f"{name}: ERROR {error[:200]}")
    return lines + [""]


def main() -> int:
    out, stages = Path(sys.argv[1]), Path(sys.argv[2])
    lines = ["", "==================== sparse_attn GPU check: summary ===================="]
    for part in (
        stages_part(out, stages),
        tests_part(out / "tests.xml"),
        sanitizer_part(out / "sanitizer.log"),
        bench_part(out / "bench.json"),
    ):
        lines += part
    text = "\n".join(lines)
    (out / "summary.txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
