"""Builds csrc/'s CUDA module for the host, against the emulation headers in include/.

The real sources are compiled as C++ (``-x c++``) with ``include/`` ahead of everything, so
``<cuda_runtime.h>``, ``<cuda_fp16.h>``, ``<cuda_bf16.h>`` and ``<mma.h>`` are the emulation's, and
``ftk_emu.h`` force-included. One change is made to the text: a launch
``kernel<<<grid, block, smem, stream>>>(args)``, which no C++ compiler parses, becomes
``::ftk_emu::launch<kernel>(grid, block, smem, stream)(args)``; a ``#line`` directive
keeps every diagnostic on the original file and line. bindings_cuda.cpp is compiled unchanged,
so the result is the ``_ftk_cuda`` module Python loads, with the same functions and structs.

Everything is built with AddressSanitizer and UndefinedBehaviorSanitizer (any report aborts),
-O1, no fp contraction (the kernels' __f*_rn intrinsics forbid it on the GPU) and no strict
aliasing (the kernels reinterpret shared and global memory as vectors, as CUDA allows).

Run as a script to build into a folder: ``python tests/cuda_emu/build.py OUT_DIR``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
MODULE = "_ftk_cuda"

FLAGS = [
    "-std=c++17",
    "-O0",
    "-g1",  # line tables: enough for the sanitizers to name file and line
    "-fPIC",
    "-pthread",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
    "-fno-strict-aliasing",
    "-ffp-contract=off",
    "-Wall",
    "-Wno-unknown-pragmas",
    "-Wno-unused-function",
    "-fvisibility=hidden",  # as pybind11 modules are built (pybind11_add_module)
]

# kernel (a name, maybe qualified, maybe with template arguments one level deep) <<<config>>>(
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<(?:[^<>;]|<[^<>;]*>)*>)?)\s*<<<(.*?)>>>\s*\(", re.S)


def rewrite_launches(text: str) -> str:
    """``k<<<cfg>>>(args)`` -> ``::ftk_emu::launch<k>(cfg)(args)``, line count unchanged."""
    return _LAUNCH.sub(lambda m: f"::ftk_emu::launch<{m.group(1)}>({m.group(2)})(", text)


def compiler() -> str:
    return os.environ.get("CXX", "g++")


def sanitizer_runtime() -> str | None:
    """The shared AddressSanitizer runtime the compiler links, which a Python process that
    loads the module must preload; None when the compiler has none."""
    out = subprocess.run([compiler(), "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return out if out and os.path.isabs(out) and os.path.exists(out) else None


def _includes() -> list[str]:
    import pybind11  # the build requirement; in the test extra as well

    return [
        f"-I{HERE / 'include'}",
        "-include",
        "ftk_emu.h",
        "-I{src}/include",
        "-I{src}",
        f"-I{pybind11.get_include()}",
        f"-I{sysconfig.get_paths()['include']}",
    ]


def _sources() -> list[Path]:
    return sorted(CSRC.rglob("*.cu")) + [CSRC / "bindings_cuda.cpp"]


def _key() -> str:
    h = hashlib.sha256()
    for p in sorted(list(CSRC.rglob("*")) + list(HERE.rglob("*.h")) + [Path(__file__)]):
        if p.is_file():
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    h.update(" ".join([compiler(), *FLAGS, sys.version]).encode())
    return h.hexdigest()[:16]


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}\n{r.stdout}{r.stderr}")


def _copy_rewritten(dst: Path) -> None:
    """csrc/ into dst, each file with its launches rewritten and a #line to the original."""
    for p in CSRC.rglob("*"):
        if not p.is_file():
            continue
        out = dst / p.relative_to(CSRC)
        out.parent.mkdir(parents=True, exist_ok=True)
        text = p.read_text()
        if p.suffix in (".cu", ".cuh", ".h", ".cpp"):
            text = f'#line 1 "{p.relative_to(ROOT)}"\n' + rewrite_launches(text)
        out.write_text(text)


def build(out_dir: Path, jobs: int | None = None) -> Path:
    """Builds the emulated module into out_dir (reused while no input changed); returns its path."""
    out_dir = Path(out_dir)
    module = out_dir / (MODULE + sysconfig.get_config_var("EXT_SUFFIX"))
    key = _key()
    stamp = out_dir / "key"
    if module.exists() and stamp.exists() and stamp.read_text() == key:
        return module
    if out_dir.exists():
        shutil.rmtree(out_dir)
    src = out_dir / "src"
    _copy_rewritten(src)
    includes = [i.replace("{src}", str(src)) for i in _includes()]
    objects, cmds = [], []
    for s in _sources():
        rel = s.relative_to(CSRC)
        obj = out_dir / "obj" / (str(rel).replace("/", "_") + ".o")
        obj.parent.mkdir(parents=True, exist_ok=True)
        cmds.append([compiler(), "-x", "c++", *FLAGS, *includes, "-c", str(src / rel), "-o", str(obj)])
        objects.append(str(obj))
    with concurrent.futures.ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
        for f in [pool.submit(_run, c) for c in cmds]:
            f.result()
    _run([compiler(), "-shared", *FLAGS, *objects, "-o", str(module)])
    stamp.write_text(key)
    return module


def build_program(source: Path, out: Path) -> Path:
    """A stand-alone program (tests/cuda_emu/selftest.cu) against the emulation headers."""
    out.parent.mkdir(parents=True, exist_ok=True)
    text = f'#line 1 "{source.relative_to(ROOT)}"\n' + rewrite_launches(source.read_text())
    rewritten = out.with_suffix(".cpp")
    rewritten.write_text(text)
    include = [f"-I{HERE / 'include'}", "-include", "ftk_emu.h"]
    _run([compiler(), "-x", "c++", *FLAGS, *include, str(rewritten), "-o", str(out)])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to build into")
    args = parser.parse_args(argv)
    print(build(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
