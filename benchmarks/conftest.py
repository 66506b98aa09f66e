"""Benchmark plumbing: devices, L2 flushing and device-side timing, and a closing summary
that turns the timings of one run into ratios (against the baselines, the copy floor and
dense matmuls measured in the same run), printed and saved under benchmarks/results/."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import pytest
import torch

RESULTS = Path(os.environ.get("FTK_BENCH_RESULTS") or Path(__file__).parent / "results")
HAS_CUDA = torch.cuda.is_available()
# `ftk bench --quick` (FTK_BENCH_QUICK=1): small shapes and two rounds, to check that every suite
# and the report run end to end in a minute or two; its figures are not the measurements.
QUICK = os.environ.get("FTK_BENCH_QUICK") == "1"

# `ftk bench --device` (FTK_BENCH_DEVICE=cpu|cuda): only that device's benchmarks run. On a GPU
# machine the CPU suites would otherwise take most of the time (~11 minutes on 2 cores).
ONLY_DEVICE = os.environ.get("FTK_BENCH_DEVICE", "").strip().lower() or None
if ONLY_DEVICE not in (None, "cpu", "cuda"):
    raise ValueError(f"FTK_BENCH_DEVICE must be cpu or cuda, got {os.environ['FTK_BENCH_DEVICE']!r}")
# `ftk bench --budget` (FTK_BENCH_DEADLINE, seconds since the epoch): a test that would start
# after it is skipped, so a suite stops within one test of its share of the budget and keeps
# the records of the tests that ran.
_deadline = os.environ.get("FTK_BENCH_DEADLINE", "").strip()
try:
    DEADLINE = float(_deadline) if _deadline else None
except ValueError:
    raise ValueError(f"FTK_BENCH_DEADLINE must be seconds since the epoch, got {_deadline!r}") from None
PAST_BUDGET = "past the time budget (ftk bench --budget)"


def device_marks(device: str) -> list:
    """Skip marks for a benchmark on ``device``: no GPU, or another device asked for."""
    marks = []
    if device == "cuda":
        marks.append(pytest.mark.skipif(not HAS_CUDA, reason="no GPU"))
    if ONLY_DEVICE is not None and device != ONLY_DEVICE:
        marks.append(pytest.mark.skip(reason=f"FTK_BENCH_DEVICE={ONLY_DEVICE}"))
    return marks


DEVICES = [pytest.param(d, id=d, marks=device_marks(d)) for d in ("cpu", "cuda")]


def pytest_runtest_setup(item):
    if DEADLINE is not None and time.time() > DEADLINE:
        pytest.skip(PAST_BUDGET)


# NOTE: the CPU's last-level cache is 32 MiB here, as large as the 4096x4096 bf16 weight: an
# unflushed copy_ of it ran from cache at 85 GB/s in one run and from DRAM at ~35 GB/s in the
# next. Every timed call therefore starts cold, on the CPU as on the GPU.
CPU_FLUSH_BYTES = 128 << 20


class Timer:
    """Runs ``fn`` under pytest-benchmark, each round after a write of a buffer twice the
    last-level cache (L2 on a GPU, 128 MiB on the CPU) so no input is served from cache. On a
    GPU it also times with CUDA events (recorded as device_ms)."""

    def __init__(self, benchmark, device: str):
        self.benchmark, self.device = benchmark, device
        if device == "cuda":
            l2 = torch.cuda.get_device_properties(0).L2_cache_size
            self._scratch = torch.empty(2 * l2 // 4, dtype=torch.int32, device="cuda")
        else:
            self._scratch = torch.empty(CPU_FLUSH_BYTES // 4, dtype=torch.int32)

    def flush(self):
        self._scratch.add_(1)  # read and write: evicts both clean and dirty lines

    def __call__(self, fn, *, bytes_moved: int = 0, flops: int = 0, rounds: int = 20, warmup_rounds: int = 1):
        if QUICK:
            rounds, warmup_rounds = min(rounds, 2), 1  # one warm-up: first-call costs swamp two rounds
        info = self.benchmark.extra_info
        info["bytes_moved"] = int(bytes_moved)
        info["flops"] = int(flops)
        if self.device == "cuda":
            times = []
            for _ in range(rounds):
                self.flush()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            info["device_ms"] = statistics.median(times)

            def synced():
                fn()
                torch.cuda.synchronize()

            return self.benchmark.pedantic(synced, setup=self.flush, rounds=rounds, warmup_rounds=2)
        return self.benchmark.pedantic(fn, setup=self.flush, rounds=rounds, warmup_rounds=warmup_rounds)


@pytest.fixture
def timer(benchmark, request):
    device = request.node.callspec.params.get("device", "cpu")
    return Timer(benchmark, device)


def pytest_terminal_summary(terminalreporter, config):
    from ftkernels.apps.bench import summarize

    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    records = [
        {
            "name": b.name,
            "group": b.group,
            "extra_info": b.extra_info,
            "stats": {"median": b.stats.median, "iqr": b.stats.iqr},
        }
        for b in session.benchmarks
    ]
    summary = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if HAS_CUDA else None,
        "results": summarize(records),
    }
    rows = list(summary["results"].items())
    terminalreporter.write_sep("-", "ftkernels: ratios measured in this run")
    for name, entry in rows:
        extras = "  ".join(
            f"{k}={v:.3g}"
            for k, v in entry.items()
            if k not in ("median_ms", "GB/s", "group", "spread_ms") and isinstance(v, (int, float))
        )
        terminalreporter.write_line(f"{name:<60} {entry['median_ms']:9.3f} ms {entry['GB/s']:8.2f} GB/s  {extras}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "-".join(sorted({Path(b.fullname.split("::")[0]).stem for b in session.benchmarks}))
    out = RESULTS / f"{stem}-{'cuda' if HAS_CUDA else 'cpu'}-summary.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    terminalreporter.write_line(f"saved {out}")
