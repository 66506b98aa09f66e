"""``ftk doctor`` (also ``python -m ftkernels``): what a bug report needs, in one paste.

It prints the versions (ftkernels, Python, torch, CUDA runtime and driver, and the optional
packages, read from their metadata so that none is imported; Triton only where its backend
would import it anyway, to show that it does), the devices (each GPU; the CPU,
its instruction-set flags and the variants the CPU kernels run), the compiled modules with
their build facts, the backend each op runs by default on each device type here, and a
self-test of every op on every backend available here against the reference backend
(:mod:`ftkernels.apps.selftest`). Exit status 1 when a self-test row fails, else 0.

Nothing here may crash on a broken environment: every probe that can fail reports its error
in one line and the report goes on.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys

import torch

from .. import __version__, _native, _registry
from . import selftest
from .selftest import first_line

# (label, distribution names, module): the optional packages a report names.
OPTIONAL = (
    ("triton", ("triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu"), "triton"),
    ("transformers", ("transformers",), "transformers"),
    ("peft", ("peft",), "peft"),
    ("bitsandbytes", ("bitsandbytes",), "bitsandbytes"),
)
# The CPU flags the kernels (csrc/cpu) dispatch on, and those torch's own CPU kernels use for
# bf16 and int8 (the reference backend's matmuls).
CPU_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_bf16",
    "avx512_fp16",
    "amx_bf16",
    "amx_fp16",
)
ENV_VARS = ("FTK_BACKEND", "FTK_CPU_ISA", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")
SMI_TIMEOUT_S = 10
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # which ftkernels this is


def package_version(dists: tuple[str, ...], module: str) -> str:
    """The installed version from the package metadata (no import); a package without metadata
    is imported for its ``__version__``, and an import that fails is reported, not raised."""
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        except Exception as e:  # broken metadata
            return f"unreadable metadata ({first_line(e)})"
    try:
        if importlib.util.find_spec(module) is None:
            return "not installed"
        return str(getattr(importlib.import_module(module), "__version__", "installed, no version"))
    except Exception as e:
        return f"import failed: {first_line(e)}"


def _driver() -> str:
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            run = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=SMI_TIMEOUT_S,
            )
            lines = run.stdout.split()
            if run.returncode == 0 and lines:
                return f"{lines[0]} (nvidia-smi)"
            return f"nvidia-smi failed (exit {run.returncode}): {(run.stderr or run.stdout).strip()[:200]}"
        except (OSError, subprocess.SubprocessError) as e:
            return f"nvidia-smi failed: {first_line(e)}"
    try:
        if torch.cuda.is_available():
            return f"supports CUDA {_cuda_version(torch._C._cuda_getDriverVersion())} (torch; no nvidia-smi)"
    except Exception as e:
        return f"unknown ({first_line(e)})"
    return "none"


def _cuda_version(code: int) -> str:
    """12040 -> '12.4' (CUDA's 1000 * major + 10 * minor)."""
    return f"{code // 1000}.{code % 1000 // 10}"


def versions() -> dict[str, str]:
    out = {
        "ftkernels": f"{__version__} ({PACKAGE_DIR})",
        "python": f"{platform.python_version()} ({platform.python_implementation()}, {platform.platform()})",
        "torch": torch.__version__,
        "cuda runtime": torch.version.cuda or "none (torch built without CUDA)",
        "cuda driver": _driver(),
    }
    if getattr(torch.version, "hip", None):
        out["hip runtime"] = torch.version.hip
    for label, dists, module in OPTIONAL:
        out[label] = package_version(dists, module)
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        # The triton backend imports it here (on a GPU, or interpreted on the CPU): does it?
        try:
            importlib.import_module("triton.language")
        except Exception as e:
            out["triton"] += f" (import failed: {first_line(e)})"
    return out


def environment() -> dict[str, str]:
    out = {name: os.environ.get(name, "(unset)") for name in ENV_VARS}
    out["torch threads"] = str(torch.get_num_threads())
    return out


# ---- devices ---------------------------------------------------------------------------------


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return {}
    return fields


def gpus() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(
            {
                "index": i,
                "name": p.name,
                "capability": f"{p.major}.{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1),
            }
        )
    return out


def cpu() -> dict:
    info = _cpuinfo()
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    flags = set(info.get("flags", "").split()) if x86 else set()  # CPU_FLAGS are x86's
    out = {
        "model": info.get("model name") or platform.processor() or platform.machine() or "unknown",
        "logical_cores": os.cpu_count(),
        "flags": [f for f in CPU_FLAGS if f in flags],
        "flags_absent": [f for f in CPU_FLAGS if f not in flags] if flags else [],
        "flags_known": bool(flags),
    }
    try:
        out["torch_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception as e:
        out["torch_capability"] = f"unknown ({first_line(e)})"
    return out


# ---- the compiled modules ------------------------------------------------------------------


def arch_coverage(archs: str, capability: str) -> str:
    """How a GPU of ``capability`` ("9.0") runs kernels built for the CMake list ``archs``:
    SASS of the same major version and a minor at most its own, else PTX of an architecture at
    most its own compiled just in time, else not at all ("a" suffixes: that exact GPU only)."""
    major, minor = (int(x) for x in capability.split("."))
    sass, ptx = [], []
    for entry in archs.split(";"):
        m = re.fullmatch(r"(\d+)([af]?)(?:-(real|virtual))?", entry.strip())
        if m is None:
            continue
        a_major, a_minor = divmod(int(m.group(1)), 10)
        suffix, kind = m.group(2), m.group(3)
        if kind in (None, "real") and a_major == major and a_minor <= minor and (suffix != "a" or a_minor == minor):
            sass.append(entry)
        if kind in (None, "virtual") and not suffix and (a_major, a_minor) <= (major, minor):
            ptx.append(entry)
    if sass:
        return f"SASS ({sass[-1]})"
    if ptx:
        return f"PTX compiled at load time ({ptx[-1]}): slower first calls"
    if not any(re.fullmatch(r"\d+[af]?(-real|-virtual)?", e.strip()) for e in archs.split(";")):
        return f"unknown (architectures {archs!r})"
    return "NO kernel image for this GPU: rebuild with FTK_CUDA_ARCHITECTURES including it"


def native(gpu_list: list[dict]) -> dict:
    out = {}
    for name in _native.MODULES:
        try:
            mod, err = _native.load_status(name)
        except Exception as e:  # an import that fails with something other than ImportError
            mod, err = None, e
        entry: dict = {"built": mod is not None}
        if mod is None:
            entry["error"] = first_line(err) if err is not None else "not built"
            out[name] = entry
            continue
        entry["path"] = getattr(mod, "__file__", "")
        info = getattr(mod, "build_info", None)
        entry["build_info"] = dict(info) if info is not None else None
        try:
            if name == "_ftk_cpu":
                entry["cpu_isa"] = mod.cpu_isa()
                entry["cpu_isa_max"] = mod.cpu_isa_max()
                entry["lora_gemm16"] = sorted(str(dt).removeprefix("torch.") for dt in _native.cpu_gemm16_dtypes())
            else:
                entry["driver_version"] = mod.driver_version() if hasattr(mod, "driver_version") else None
                archs = (info or {}).get("cuda_architectures")
                entry["gpus"] = {str(g["index"]): arch_coverage(archs, g["capability"]) for g in gpu_list if archs}
        except Exception as e:
            entry["probe_error"] = first_line(e)
        out[name] = entry
    return out


def default_backends(device_types: list[str]) -> dict[str, dict[str, str]]:
    """{op: {device type: the backend its calls run on there now}}, FTK_BACKEND included."""
    out = {}
    for op, kernel in _registry.defined_ops().items():
        row = {}
        for dt in device_types:
            try:
                row[dt] = _registry.select_backend(kernel, dt)
            except Exception as e:  # a bad FTK_BACKEND, or a forced backend that cannot run here
                row[dt] = f"error: {first_line(e)}"
        out[op] = row
    return out


def collect(run_selftest: bool) -> dict:
    """The whole report as plain data (what --json writes)."""
    report: dict = {}
    for key, probe in (("versions", versions), ("environment", environment), ("gpus", gpus), ("cpu", cpu)):
        try:
            report[key] = probe()
        except Exception as e:
            report[key] = {"error": first_line(e)}
    gpu_list = report["gpus"] if isinstance(report["gpus"], list) else []
    report["native"] = native(gpu_list)
    device_types = ["cpu"] + (["cuda"] if gpu_list else [])
    report["device_types"] = device_types
    report["default_backends"] = default_backends(device_types)
    report["untested_ops"] = selftest.untested_ops()
    if run_selftest:
        result = selftest.run_selftest(device_types)
        report["selftest"] = {"seconds": result["seconds"], "rows": [r._asdict() for r in result["rows"]]}
    return report


def failed(report: dict) -> bool:
    return any(r["result"] == "fail" for r in report.get("selftest", {}).get("rows", ()))


# ---- printing --------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table (it renders in a GitHub issue), columns padded to line up as text."""
    rows = [[str(c).replace("|", "\\|") for c in row] for row in rows]  # a '|' in a message: escaped
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)]


def _num(x) -> str:
    if x is None:
        return ""
    return "0" if x == 0 else f"{x:.2g}" if math.isfinite(x) else str(x)


def _native_lines(name: str, entry: dict, gpu_list: list[dict]) -> list[str]:
    if not entry["built"]:
        return [f"{name:<14} not importable: {entry['error']}"]
    info = entry.get("build_info")
    lines = [f"{name:<14} {entry['path']}"]
    if info is None:
        return [*lines, f"{'':<14} built without build_info (an older build): rebuild to see its build facts"]
    if name == "_ftk_cpu":
        lines.append(
            f"{'':<14} {info['compiler']}, {info['build_type']}, flags {info['flags']!r}, "
            f"OpenMP {'yes' if info['openmp'] else 'no'}"
        )
    else:
        cudart = _cuda_version(info["cudart_version"])
        lines.append(f"{'':<14} {info['compiler']}, {info['build_type']}, CUDA runtime {cudart} (static)")
        lines.append(f"{'':<14} architectures {info['cuda_architectures']}")
        driver = entry.get("driver_version") or 0
        if driver and driver < info["cudart_version"]:
            lines.append(
                f"{'':<14} WARNING: the driver supports CUDA {_cuda_version(driver)}, older than the module's "
                f"runtime {cudart}: update the driver (within one major version the SASS still runs, PTX does not)"
            )
        for g in gpu_list:
            sm = g["capability"].replace(".", "")
            lines.append(
                f"{'':<14} GPU {g['index']} (sm_{sm}): {entry.get('gpus', {}).get(str(g['index']), 'unknown')}"
            )
    if "probe_error" in entry:
        lines.append(f"{'':<14} probing it failed: {entry['probe_error']}")
    return lines


def _cpu_kernel_lines(c: dict, entry: dict) -> list[str]:
    info = entry.get("build_info") if entry.get("built") else None
    if info is None:
        return []
    level, widest = entry.get("cpu_isa") or "unknown", entry.get("cpu_isa_max") or "unknown"
    capped = f" (capped by FTK_CPU_ISA; this CPU has {widest})" if level != widest else ""
    gemm16 = entry.get("lora_gemm16")
    lines = [
        f"{'CPU kernels':<14} compiled for {info['isa_baseline']} and the levels {info['isa_levels']}",
        f"{'':<14} running at: {level}{capped}",
    ]
    if gemm16 is not None:
        say = ", ".join(gemm16) if gemm16 else "none (16-bit inputs widened to fp32)"
        lines.append(f"{'':<14} 16-bit GEMMs (lora_linear_4bit, LinearNF4): {say}")
    return lines


def print_report(report: dict, out=None) -> None:
    out = out or sys.stdout

    def say(text: str = "") -> None:
        print(text, file=out)

    say("## ftkernels doctor")
    say("\n### versions")
    for k, v in report["versions"].items():
        say(f"{k:<14} {v}")
    say("\n### environment")
    say(", ".join(f"{k}={v}" for k, v in report["environment"].items()))
    say("\n### devices")
    gpu_list = report["gpus"] if isinstance(report["gpus"], list) else []
    if isinstance(report["gpus"], dict):
        say(f"{'GPU':<14} error: {report['gpus']['error']}")
    elif not gpu_list:
        say(f"{'GPU':<14} none (torch.cuda.is_available() is False)")
    for g in gpu_list:
        say(f"{'GPU ' + str(g['index']):<14} {g['name']}, compute capability {g['capability']}, {g['memory_gib']} GiB")
    c = report["cpu"]
    if "error" in c:
        say(f"{'CPU':<14} error: {c['error']}")
    else:
        cores, capability = c["logical_cores"], c["torch_capability"]
        say(f"{'CPU':<14} {c['model']}, {cores} logical cores, torch CPU capability {capability}")
        if c["flags_known"]:
            absent = f" (absent: {' '.join(c['flags_absent'])})" if c["flags_absent"] else ""
            say(f"{'CPU flags':<14} {' '.join(c['flags']) or 'none of ' + ' '.join(CPU_FLAGS)}{absent}")
        else:
            say(f"{'CPU flags':<14} unknown ({platform.machine()}: no x86 flags in /proc/cpuinfo)")
        for line in _cpu_kernel_lines(c, report["native"]["_ftk_cpu"]):
            say(line)
    say("\n### native modules")
    for name, entry in report["native"].items():
        for line in _native_lines(name, entry, gpu_list):
            say(line)
    say("\n### default backends")
    dts = report["device_types"]
    backends = [[op, *(row[d] for d in dts)] for op, row in report["default_backends"].items()]
    say("\n".join(_table(["op", *dts], backends)))
    if report["untested_ops"]:
        say(f"ops without a self-test case: {', '.join(report['untested_ops'])}")
    if "selftest" in report:
        _print_selftest(report["selftest"], say)


def _print_selftest(st: dict, say) -> None:
    say("\n### self-test (against the reference backend; error: ||out-ref||/||ref||, codes: fraction differing)")
    rows, absent = [], {}
    for r in st["rows"]:
        if r["result"] == "unavailable" and r["note"] != "no kernel":  # the whole backend: one row, last
            absent[r["device"], r["backend"]] = [
                "every op",
                r["device"],
                r["backend"],
                "",
                r["result"],
                "",
                "",
                "",
                r["note"],
            ]
            continue
        error, tolerance = _num(r["error"]), _num(r["tolerance"])
        rows.append(
            [r["op"], r["device"], r["backend"], r["dtype"], r["result"], error, tolerance, r["worst"], r["note"]]
        )
    header = ["op", "device", "backend", "dtype", "result", "worst error", "tolerance", "output", "note"]
    say("\n".join(_table(header, rows + list(absent.values()))))
    counts = {k: sum(r["result"] == k for r in st["rows"]) for k in ("pass", "fail", "unavailable")}
    say(
        f"\nself-test: {counts['pass']} passed, {counts['fail']} failed, {counts['unavailable']} unavailable "
        f"in {st['seconds']:.1f} s"
    )


def _json_safe(x):
    """inf and NaN as strings (JSON has neither), everything else as it is."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


# ---- the command -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-selftest", action="store_true", help="only the report, no self-test")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the whole report as JSON to PATH")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.json is not None:
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json) or not os.path.isdir(folder):
            parser.error(f"--json: {args.json!r} must be a file path in an existing directory")
    report = collect(run_selftest=not args.no_selftest)
    print_report(report)
    if args.json is not None:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(_json_safe(report), f, indent=1, allow_nan=False)
            f.write("\n")
    return 1 if failed(report) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ftkernels", description="ftk doctor: versions, devices, builds and a self-test"
    )
    add_arguments(parser)
    return run(parser.parse_args(argv), parser)
