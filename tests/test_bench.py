"""`ftk bench`: the report's arithmetic on synthetic timings, its markdown and charts, and
`ftk bench --quick` end to end on the CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ftkernels.apps import bench, cli, plots


def _record(name, median_s, group="g", iqr_s=0.0, **extra_info):
    return {"name": name, "group": group, "extra_info": extra_info, "stats": {"median": median_s, "iqr": iqr_s}}


def test_summarize_arithmetic():
    records = [
        _record(
            "ftk",
            0.002,
            iqr_s=0.0001,
            bytes_moved=8_000_000,
            flops=4_000_000_000,
            compare={"bnb": "bnb", "dense": "dense"},
            ceiling="copy",
        ),
        _record("bnb", 0.006, bytes_moved=8_000_000),
        _record("dense", 0.0018, flops=4_000_000_000),
        _record("copy", 0.001, bytes_moved=16_000_000),
        _record("gpu", 1.0, bytes_moved=1_000_000_000, device_ms=250.0, compare={"old": "bnb"}),
        _record("reported", 0.5, report=["peak_rss_mib"], peak_rss_mib=123.0),
    ]
    s = bench.summarize(records)
    ftk = s["ftk"]
    assert ftk["median_ms"] == pytest.approx(2.0) and ftk["spread_ms"] == pytest.approx(0.1)
    assert ftk["GB/s"] == pytest.approx(4.0)  # 8 MB in 2 ms
    assert ftk["TFLOP/s"] == pytest.approx(2.0)  # 4 GFLOP in 2 ms
    assert ftk["speedup_vs_bnb"] == pytest.approx(3.0)
    assert ftk["speedup_vs_dense"] == ftk["fraction_of_matmul"] == pytest.approx(0.9)
    assert ftk["fraction_of_copy_bandwidth"] == pytest.approx(4.0 / 16.0)
    gpu = s["gpu"]  # CUDA-event time wins over the host median
    assert gpu["median_ms"] == pytest.approx(250.0) and gpu["GB/s"] == pytest.approx(4.0)
    assert gpu["speedup_vs_old"] == pytest.approx(0.006 / 0.25)
    assert s["reported"]["peak_rss_mib"] == 123.0
    assert "speedup_vs_bnb" not in s["bnb"]
    missing = bench.summarize([_record("ftk", 0.002, compare={"bnb": "not-run"})])
    assert not any(k.startswith("speedup") for k in missing["ftk"])


def test_markdown_and_charts(tmp_path):
    results = {
        "nf4": bench.summarize(
            [
                _record("ftk-q", 0.001, bytes_moved=10**6, compare={"bnb": "bnb-q"}),
                _record("bnb-q", 0.003, bytes_moved=10**6),
            ]
        ),
        "optim": {},
    }
    header = {
        "device": "cpu",
        "date": "2026-01-01",
        "torch": "2.x",
        "threads": 2,
        "command": "ftk bench",
        "quick": True,
    }
    text = bench.markdown(results, {"bitsandbytes": True, "torchao": False}, header)
    assert "| **ftk-q** | 1 |" in text and "| bnb-q | 3 |" in text
    assert "- torchao: **absent**" in text and "- bitsandbytes: present" in text
    assert "quick mode" in text and "(no results" in text
    pytest.importorskip("matplotlib")
    paths = bench.charts(results, tmp_path)
    assert [p.name for p in paths] == ["speedup.png", "ceiling.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_charts_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(plots.PlotsUnavailable, match=r"not installed \(pip install matplotlib\)"):
        bench.charts({"nf4": {}}, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_bad_options_are_usage_errors(tmp_path, capsys):
    for args, match in ((["--ops", "nf4,nope"], "--ops must be"), (["--ops", ","], "--ops must be")):
        with pytest.raises(SystemExit):
            cli.main(["bench", *args, "--out", str(tmp_path / "o")])
        assert match in capsys.readouterr().err
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(SystemExit):
        cli.main(["bench", "--out", str(f)])
    assert "is a file" in capsys.readouterr().err


def test_benchmarks_dir_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FTK_BENCH_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no benchmark suites"):
        bench.benchmarks_dir()
    monkeypatch.delenv("FTK_BENCH_DIR")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # a checkout's root
    assert bench.benchmarks_dir() == Path.cwd() / "benchmarks"


@pytest.mark.slow
def test_ftk_bench_quick_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("pytest_benchmark")
    monkeypatch.setenv("FTK_BENCH_DIR", str(Path(__file__).resolve().parents[1] / "benchmarks"))
    out = tmp_path / "report"
    assert cli.main(["bench", "--quick", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["failed"] == [] and set(report["results"]) == set(bench.OPS)
    for op, rows in report["results"].items():
        assert rows, f"{op}: no results"
        assert any(bench.is_ours(name) for name in rows), op
    present = report["baselines_present"]
    if present["bitsandbytes"]:
        nf4 = report["results"]["nf4"].values()
        assert any("speedup_vs_bitsandbytes" in e and "fraction_of_copy_bandwidth" in e for e in nf4)
    if present["bitsandbytes"] and present["peft"]:
        lora = report["results"]["lora"].values()
        assert any("speedup_vs_peft-bnb" in e and "fraction_of_matmul" in e for e in lora)
    text = (out / "report.md").read_text()
    assert "quick mode" in text and all(f"## {op}" in text for op in bench.OPS)
    assert (out / "raw" / "nf4.json").is_file()
    if report["charts"]:
        assert (out / "speedup.png").is_file() and (out / "ceiling.png").is_file()


def test_cpu_isa_levels_cap_ours_and_torchs_kernels(tmp_path, monkeypatch):
    # --cpu-isa all: one run a level this CPU has, each suite with FTK_CPU_ISA and torch's own
    # caps in its environment, the level and the CPU's flags in each report.
    seen = []

    def fake_suite(cmd, cwd, env, timeout):
        seen.append({k: env.get(k) for k in ("FTK_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")})
        return 0, ""

    monkeypatch.setattr(bench, "_run_suite", fake_suite)
    monkeypatch.setattr(bench, "charts", lambda results, out: [])
    assert cli.main(["bench", "--ops", "nf4", "--cpu-isa", "all", "--out", str(tmp_path)]) == 0
    levels = bench.cpu_isa_levels_here()
    assert [s["FTK_CPU_ISA"] for s in seen] == levels
    if "avx2" in levels:
        assert seen[levels.index("avx2")]["ATEN_CPU_CAPABILITY"] == "avx2"
        assert seen[levels.index("avx2")]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    for level in levels:
        header = json.loads((tmp_path / level / "report.json").read_text())["header"]
        assert header["cpu_isa"] == level and isinstance(header["cpu_flags"], list)
        assert f"CPU kernels at {level}" in (tmp_path / level / "report.md").read_text()
    with pytest.raises(SystemExit):
        cli.main(["bench", "--ops", "nf4", "--cpu-isa", "sse9", "--out", str(tmp_path)])
