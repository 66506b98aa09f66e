"""``ftk doctor`` (apps/doctor.py, apps/selftest.py): the report's sections, a self-test that
passes here and fails where a kernel is wrong or raises, ``python -m ftkernels``, the JSON
file, and the probes that must survive a broken environment."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from ftkernels import _registry
from ftkernels.apps import cli, doctor, selftest

SECTIONS = ("### versions", "### environment", "### devices", "### native modules", "### default backends")


def _rows(out: str, op: str, device: str, backend: str) -> list[list[str]]:
    """The self-test table's cells of op's rows on (device, backend)."""
    found = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:3] == [op, device, backend]:
            found.append(cells)
    return found


def test_the_doctor_reports_and_passes_here(capsys, tmp_path):
    path = tmp_path / "doctor.json"
    rc = cli.main(["doctor", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    for section in (*SECTIONS, "### self-test"):
        assert section in out
    assert f"torch          {torch.__version__}" in out
    assert re.search(r"^self-test: \d+ passed, 0 failed, \d+ unavailable in [\d.]+ s$", out, re.M)
    for case in selftest.CASES:  # every op ran on the cpu backend in both dtypes, and passed
        rows = _rows(out, case.op, "cpu", "cpu")
        assert [r[3] for r in rows] == ["float32", "bfloat16"], case.op
        assert all(r[4] == "pass" for r in rows), rows
    report = json.loads(path.read_text())
    assert set(report) >= {"versions", "gpus", "cpu", "native", "default_backends", "selftest"}
    rows = report["selftest"]["rows"]
    assert {r["result"] for r in rows} <= {"pass", "unavailable"}
    per_case = len(selftest.DTYPES) * sum(len(selftest.BACKENDS[d]) for d in report["device_types"])
    assert len(rows) == len(selftest.CASES) * per_case
    # The oracle rows hold a tolerance scaled by the dtype: bf16 looser than fp32.
    tol = {r["dtype"]: r["tolerance"] for r in rows if r["op"] == "lora_linear_4bit" and r["backend"] == "cpu"}
    assert 0 < tol["float32"] < 1e-5 < 1e-4 < tol["bfloat16"] < 1e-2


def test_every_defined_op_has_a_case_and_a_default_backend(capsys):
    assert selftest.untested_ops() == []
    assert cli.main(["doctor", "--no-selftest"]) == 0
    out = capsys.readouterr().out
    for op in _registry.defined_ops():
        assert re.search(rf"^\| {re.escape(op)} +\| cpu +\|", out, re.M), op
    assert "### self-test" not in out


def _off_by_a_little(kernel):
    """kernel, with one element of its output 2^-6 (relative) off: a bug no tolerance allows."""

    def wrong(*args, **kwargs):
        out = kernel(*args, **kwargs)
        flat = out.view(-1)
        flat[7] = (flat[7].float() * (1 + 2**-6) + 2**-6).to(out.dtype)
        return out

    return wrong


def _raises(*args, **kwargs):
    raise RuntimeError("injected failure\nwith a second line that the table leaves out")


def test_a_wrong_or_raising_kernel_fails_its_rows(monkeypatch, capsys):
    ops = ("dequantize_blockwise", "lion_step", "quantize_4bit")
    monkeypatch.setattr(selftest, "CASES", tuple(c for c in selftest.CASES if c.op in ops))
    wrong = _off_by_a_little(_registry._KERNELS[("dequantize_blockwise", "cpu")])
    monkeypatch.setitem(_registry._KERNELS, ("dequantize_blockwise", "cpu"), wrong)
    monkeypatch.setitem(_registry._KERNELS, ("lion_step", "cpu"), _raises)
    monkeypatch.setenv("FTK_BACKEND", "reference")  # the self-test forces each backend itself
    rc = cli.main(["doctor"])
    out = capsys.readouterr().out
    assert rc == 1
    for r in _rows(out, "dequantize_blockwise", "cpu", "cpu"):  # exact: any error fails
        assert r[4] == "fail" and float(r[5]) > 0 and r[6] == "0" and r[7] == "values", r
        assert r[8].startswith("values: error "), r
    for r in _rows(out, "lion_step", "cpu", "cpu"):
        assert r[4] == "fail" and r[8] == "RuntimeError: injected failure", r
    assert [r[4] for r in _rows(out, "quantize_4bit", "cpu", "cpu")] == ["pass", "pass"]
    if _registry.backend_available("triton", "cpu"):  # the other backend of the same ops is unharmed
        assert {r[4] for op in ops for r in _rows(out, op, "cpu", "triton")} == {"pass"}
    assert re.search(r"^self-test: \d+ passed, 4 failed", out, re.M)


def test_a_slightly_wrong_lora_fails_in_fp32(monkeypatch):
    kernel = _registry._KERNELS[("lora_linear_4bit", "cpu")]
    monkeypatch.setitem(_registry._KERNELS, ("lora_linear_4bit", "cpu"), lambda *a: kernel(*a) * (1 + 1e-4))
    monkeypatch.setattr(selftest, "CASES", tuple(c for c in selftest.CASES if c.op == "lora_linear_4bit"))
    rows = [r for r in selftest.run_selftest(["cpu"])["rows"] if r.backend == "cpu"]
    fp32 = next(r for r in rows if r.dtype == "float32")
    assert fp32.result == "fail" and fp32.worst == "y" and fp32.error > 5e-5 > fp32.tolerance, fp32


def test_python_m_ftkernels_runs_the_doctor():
    run = subprocess.run(
        [sys.executable, "-m", "ftkernels", "--no-selftest"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FTK_BACKEND": "not-a-backend"},
    )
    assert run.returncode == 0, run.stderr
    for section in SECTIONS:
        assert section in run.stdout
    # A bad FTK_BACKEND is reported in the backend table, not raised.
    assert "error: ValueError: FTK_BACKEND must be one of" in run.stdout
    assert "### self-test" not in run.stdout


def test_json_must_go_to_a_file_in_an_existing_directory(tmp_path, capsys):
    for bad in (tmp_path, tmp_path / "missing" / "doctor.json"):
        with pytest.raises(SystemExit):
            cli.main(["doctor", "--no-selftest", "--json", str(bad)])
        assert "--json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "archs, capability, want",
    [
        ("80-real;86-real;89-real;90-real;90-virtual", "9.0", "SASS (90-real)"),
        ("80-real;86-real;89-real;90-real;90-virtual", "8.7", "SASS (86-real)"),  # same major, lower minor
        ("80-real;86-real;89-real;90-real;90-virtual", "12.0", "PTX compiled at load time (90-virtual)"),
        ("80-real;86-real;89-real;90-real;90-virtual", "7.5", "NO kernel image"),
        ("90", "9.0", "SASS (90)"),
        ("90a-real", "9.0", "SASS (90a-real)"),
        ("86a-real", "8.9", "NO kernel image"),  # an arch-specific build runs on that GPU only
        ("native", "9.0", "unknown"),
    ],
)
def test_arch_coverage(archs, capability, want):
    assert doctor.arch_coverage(archs, capability).startswith(want)


def test_a_broken_or_missing_package_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "ftk_broken_pkg").mkdir()
    (tmp_path / "ftk_broken_pkg" / "__init__.py").write_text("raise ImportError('boom\\nmore')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert doctor.package_version(("ftk-broken-pkg",), "ftk_broken_pkg") == "import failed: ImportError: boom"
    assert doctor.package_version(("ftk-no-such-pkg",), "ftk_no_such_pkg") == "not installed"
    # The first distribution name that is installed gives the version.
    assert doctor.package_version(("ftk-no-such-dist", "torch"), "torch") == importlib.metadata.version("torch")


def test_the_error_measure():
    ref = torch.tensor([3.0, 4.0])
    assert selftest._error(ref.clone(), ref) == 0.0
    assert selftest._error(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert selftest._error(torch.tensor([3, 5], dtype=torch.uint8), ref.to(torch.uint8)) == 0.5  # codes: fraction
    assert selftest._error(torch.zeros(3), ref) == float("inf")  # shapes differ
    assert not selftest._error(torch.tensor([float("nan"), 4.0]), ref) <= 1.0  # NaN never passes
