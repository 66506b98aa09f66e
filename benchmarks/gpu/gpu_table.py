"""README's GPU table from a results folder of benchmarks/gpu/verify.sh, printed as markdown.

    python benchmarks/gpu/gpu_table.py benchmarks/results/gpu-2026-12-01

Reads what the folder holds (each file is optional; a missing one is reported as such):
  verify.log       each step's outcome and wall time ("== step 3/9 build: ok (74 s)"), the GPU
  pytest-cuda.txt  the pytest summary line of each part ("2 failed, 1040 passed in 61.2s")
  sanitizer.txt    compute-sanitizer's ERROR SUMMARY (memcheck) and RACECHECK SUMMARY lines, and
                   sanitize_cases.py's "N ok, M failed"
  report.json      `ftk bench`'s report: ftkernels' rows (median, GB/s, TFLOP/s, the ratios to the
                   baselines and to the ceilings measured in the same run)
and prints two tables: what was verified, and ftkernels' GPU figures.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

STEP_LINE = re.compile(r"^== step (\d+)/(\d+) (\S+): (.+) \((\d+) s\)$")
COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)\b")
PYTEST_SUMMARY = re.compile(r"^[= ]*(?:\d+ \w+(?:, )?)+ in [\d.]+s")
MEMCHECK = re.compile(r"ERROR SUMMARY: (\d+) errors?")
RACECHECK = re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")
CASES = re.compile(r"sanitize_cases: (\d+) ok, (\d+) failed")
CHECKS = (
    ("build", "build, CUDA module for this GPU"),
    ("doctor", "`ftk doctor`"),
    ("pytest", "tests marked cuda"),
    ("memcheck", "compute-sanitizer memcheck"),
    ("racecheck", "compute-sanitizer racecheck"),
    ("bench", "`ftk bench --device cuda`"),
)


def steps(log: str) -> dict[str, dict]:
    """step name -> {"status": "ok" | "FAILED (exit 1)" | ..., "seconds": int} from verify.log."""
    out = {}
    for line in log.splitlines():
        m = STEP_LINE.match(line.strip())
        if m:
            out[m.group(3)] = {"status": m.group(4), "seconds": int(m.group(5))}
    return out


def pytest_counts(text: str) -> dict[str, int]:
    """passed/failed/skipped/errors summed over the summary lines of every pytest part."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if PYTEST_SUMMARY.match(line):
            for n, what in COUNT.findall(line):
                key = "errors" if what.startswith("error") else what
                counts[key] = counts.get(key, 0) + int(n)
    return counts


def sanitizer_results(text: str) -> dict[str, str]:
    """memcheck / racecheck -> a one-line result, from sanitizer.txt's sections."""
    out = {}
    for section in re.split(r"^==== ", text, flags=re.M)[1:]:
        tool, _, body = section.partition("\n")
        tool = tool.strip()
        cases = CASES.findall(body)
        ran = (
            f"{int(cases[-1][0]) + int(cases[-1][1])} cases, {cases[-1][1]} failed"
            if cases
            else "the cases did not finish"
        )
        if tool == "memcheck":
            m = MEMCHECK.findall(body)
            out[tool] = f"{m[-1]} errors ({ran})" if m else f"no ERROR SUMMARY ({ran})"
        elif tool == "racecheck":
            m = RACECHECK.findall(body)
            out[tool] = (
                f"{m[-1][0]} hazards: {m[-1][1]} errors, {m[-1][2]} warnings ({ran})"
                if m
                else f"no RACECHECK SUMMARY ({ran})"
            )
    return out


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def bench_rows(report: dict) -> list[list[str]]:
    """One row a benchmark of ours: op, name, median ms, GB/s, TFLOP/s, ratios, ceiling, notes."""
    rows = []
    for op, results in report.get("results", {}).items():
        for name, e in results.items():
            if "ftk" not in name:  # ours (bench.is_ours); the baselines are in the ratios
                continue
            ratios = ", ".join(
                f"{e[k]:.2f}x {k.removeprefix('speedup_vs_')}"
                for k in sorted(e)
                if k.startswith("speedup_vs_") and k != "speedup_vs_dense"
            )
            ceiling = ", ".join(
                f"{e[k]:.2f} of {what}"
                for k, what in (("fraction_of_copy_bandwidth", "copy bandwidth"), ("fraction_of_matmul", "the matmuls"))
                if k in e
            )
            skip = {"group", "median_ms", "spread_ms", "GB/s", "TFLOP/s"}
            notes = ", ".join(
                f"{k} {_num(v)}"
                for k, v in sorted(e.items())
                if k not in skip
                and not k.startswith(("speedup_vs_", "fraction_of_"))
                and isinstance(v, (int, float, str))
            )
            rows.append(
                [
                    op,
                    name,
                    _num(e["median_ms"]),
                    _num(e["GB/s"]) if e.get("GB/s") else "",
                    _num(e["TFLOP/s"]) if "TFLOP/s" in e else "",
                    ratios,
                    ceiling,
                    notes,
                ]
            )
    return rows


def _read(folder: Path, name: str) -> str | None:
    path = folder / name
    return path.read_text(errors="replace") if path.is_file() else None


def table(folder: Path) -> str:
    """The markdown: a line on the machine and the run, the checks, ftkernels' figures."""
    log = _read(folder, "verify.log") or ""
    report_text = _read(folder, "report.json")
    report = json.loads(report_text) if report_text else {}
    header = report.get("header", {})
    gpu = next((line.removeprefix("gpu: ") for line in log.splitlines() if line.startswith("gpu: ")), None)
    done = steps(log)
    minutes = sum(s["seconds"] for s in done.values()) / 60
    lines = [
        f"GPU run of {folder.name}: {gpu or header.get('device') or 'GPU unknown'}"
        + (f", {header['date']}" if header.get("date") else "")
        + f"; `benchmarks/gpu/verify.sh`, {minutes:.1f} minutes.",
        "",
        "| check | result | wall time |",
        "|---|---|---|",
    ]
    pytest_text = _read(folder, "pytest-cuda.txt")
    sanitizer_text = _read(folder, "sanitizer.txt")
    sanitizers = sanitizer_results(sanitizer_text) if sanitizer_text else {}
    for name, what in CHECKS:
        step = done.get(name)
        status = step["status"] if step else "not run"
        if name == "pytest" and pytest_text:
            c = pytest_counts(pytest_text)
            status += "; " + ", ".join(f"{c.get(k, 0):,} {k}" for k in ("passed", "failed", "errors", "skipped"))
        if name in sanitizers:
            status += "; " + sanitizers[name]
        if name == "bench" and header.get("past_budget"):
            skipped = sum(header["past_budget"].values())
            status += f"; {skipped} tests past its {header['budget_s']:.0f} s budget"
        wall = f"{step['seconds']} s" if step else ""
        lines.append(f"| {what} | {status} | {wall} |")
    lines.append("")
    rows = bench_rows(report)
    if not rows:
        lines.append("No benchmark figures: " + ("report.json has no rows of ours." if report else "no report.json."))
        return "\n".join(lines) + "\n"
    cols = ["op", "benchmark", "median ms", "GB/s", "TFLOP/s", "against the baselines", "ceiling", "notes"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    absent = [k for k, v in report.get("baselines_present", {}).items() if not v]
    if absent:
        lines += ["", "Absent baselines (no ratio against them): " + ", ".join(absent) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="README's GPU table from a results folder of verify.sh.")
    parser.add_argument("folder", metavar="DIR", help="the folder verify.sh --out wrote")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if not folder.is_dir():
        parser.error(f"DIR: {args.folder!r} is not a directory")
    if not any((folder / f).is_file() for f in ("verify.log", "report.json")):
        parser.error(f"DIR: {args.folder!r} holds neither verify.log nor report.json (not a verify.sh results folder)")
    print(table(folder), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
