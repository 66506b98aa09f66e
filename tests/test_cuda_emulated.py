"""The CUDA kernels of csrc/cuda run without a GPU: compiled for the host against the
emulation headers of tests/cuda_emu/ (build.py, include/ftk_emu.h) under AddressSanitizer and
UndefinedBehaviorSanitizer, then checked by the backend-parametrised tests of every kernel
family with the ``cuda`` backend on CPU tensors (tests/conftest.py, FTK_CUDA_EMU_MODULE), in a
process that preloads the sanitizer runtime. A sanitizer report, an emulation check (divergent
barrier, broken warp collective, misaligned wmma, deadlock) or a wrong result fails it.
What this cannot show (timing, the GPU's memory ordering, races, tensor-core rounding) is
listed in include/ftk_emu.h; that needs a GPU (benchmarks/gpu/verify.sh)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cuda_emu import build

ROOT = Path(__file__).resolve().parents[1]
BUILD_DIR = Path(os.environ.get("FTK_CUDA_EMU_BUILD", ROOT / "build" / "cuda-emu"))

# One module per kernel family; the emulated run takes ~50 s of the ~2 minutes this file costs.
FAMILIES = ["tests/test_nf4.py", "tests/test_lora.py", "tests/test_loreft.py", "tests/test_optim.py"]

needs_sanitizers = pytest.mark.skipif(
    shutil.which(build.compiler()) is None or build.sanitizer_runtime() is None,
    reason=f"{build.compiler()} with AddressSanitizer's shared runtime is needed",
)


def sanitized_env(**extra) -> dict:
    """The environment of a process that loads sanitized code: the ASan runtime first, then
    libstdc++ (without it, ASan cannot find __cxa_throw and aborts at the first C++ exception
    thrown inside torch); every bit of malloc'ed memory filled with 0xbe, so an output element
    a kernel never writes is a wrong value, not a lucky zero."""
    libstdcxx = subprocess.run(
        [build.compiler(), "-print-file-name=libstdc++.so.6"], capture_output=True, text=True
    ).stdout.strip()
    env = dict(os.environ)
    env.update(
        LD_PRELOAD=f"{build.sanitizer_runtime()}:{libstdcxx}",
        ASAN_OPTIONS="detect_leaks=0:max_malloc_fill_size=1073741824:abort_on_error=1",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
        **extra,
    )
    env.pop("FTK_BACKEND", None)
    return env


@pytest.fixture(scope="module")
def emulated():
    """(module path, selftest program path), built once per source change (~50 s on 2 cores)."""
    module = build.build(BUILD_DIR)
    selftest = build.build_program(ROOT / "tests" / "cuda_emu" / "selftest.cu", BUILD_DIR / "selftest")
    return module, selftest


def test_launches_are_rewritten_in_place():
    src = "  if (v) k<T, Cfg<M>::kN, true><<<grid, 256, 0, stream>>>(a,\n b);\n  ns::g<<<1, 2>>>();"
    out = build.rewrite_launches(src)
    assert out == (
        "  if (v) ::ftk_emu::launch<k<T, Cfg<M>::kN, true>>(grid, 256, 0, stream)(a,\n b);\n"
        "  ::ftk_emu::launch<ns::g>(1, 2)();"
    )
    assert out.count("\n") == src.count("\n")  # diagnostics keep their line numbers


@needs_sanitizers
def test_emulation_computes_known_results(emulated):
    r = subprocess.run([str(emulated[1]), "ok"], capture_output=True, text=True, env=sanitized_env())
    assert r.returncode == 0, r.stdout + r.stderr


@needs_sanitizers
@pytest.mark.parametrize(
    "bug, report",
    [
        ("divergent-barrier", "divergent __syncthreads"),
        ("deadlock", "deadlock: 32 threads have not returned"),
        ("returned-lane", "names lanes that have returned"),
        ("wmma-misaligned", "is not 32-byte aligned"),
        ("wmma-lead-dimension", "is not a multiple of 16 bytes"),
        ("misaligned-vector", "misaligned address"),
        ("out-of-bounds", "heap-buffer-overflow"),
    ],
)
def test_planted_bugs_are_reported(emulated, bug, report):
    r = subprocess.run([str(emulated[1]), bug], capture_output=True, text=True, env=sanitized_env())
    assert r.returncode != 0, f"{bug}: exit 0\n{r.stdout}{r.stderr}"
    assert report in r.stderr, r.stderr[-3000:]


@needs_sanitizers
def test_every_cuda_kernel_matches_the_reference(emulated, tmp_path):
    trace = tmp_path / "launched.txt"
    env = sanitized_env(FTK_CUDA_EMU_MODULE=str(emulated[0]), FTK_EMU_TRACE=str(trace))
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-m", "cuda_emulated"]
    cmd += [*FAMILIES, "tests/cuda_emu/paged_cases.py"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, tail
    assert re.search(r"\d+ passed", r.stdout) and " failed" not in r.stdout, tail
    kernels = set()
    for cu in (ROOT / "csrc" / "cuda").glob("*.cu"):
        kernels |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", cu.read_text()))
    launched = set(trace.read_text().split())
    assert kernels and kernels <= launched, f"never launched: {sorted(kernels - launched)}"
