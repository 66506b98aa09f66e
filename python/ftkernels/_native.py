"""Loads the compiled modules lazily; a clear error only when one is used but absent.

The modules take integer pointers, sizes and a dtype code (never torch tensors), so this file
also holds the dtype table that mirrors ``ftk::DType`` in csrc/include/ftk/common.h.
"""

from __future__ import annotations

import importlib
import threading

import torch

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
QUANT_TYPE_CODE = {"nf4": 0, "fp4": 1}

_lock = threading.Lock()
_modules: dict[str, object] = {}
_errors: dict[str, BaseException] = {}


def _load(name: str):
    with _lock:
        if name in _modules:
            return _modules[name]
        if name in _errors:
            return None
        try:
            mod = importlib.import_module(f"ftkernels.{name}")
        except ImportError as e:  # not built, or its shared libraries are missing
            _errors[name] = e
            return None
        _modules[name] = mod
        return mod


def cpu_available() -> bool:
    return _load("_ftk_cpu") is not None


def cuda_available() -> bool:
    return _load("_ftk_cuda") is not None and torch.cuda.is_available()


def cpu():
    mod = _load("_ftk_cpu")
    if mod is None:
        raise RuntimeError(
            "ftkernels' CPU module is not built; reinstall from source "
            f"(pip install .): {_errors.get('_ftk_cpu')}"
        )
    return mod


def cuda():
    mod = _load("_ftk_cuda")
    if mod is None:
        raise RuntimeError(
            "ftkernels was built without its CUDA module (no nvcc was found at build time, or "
            "FTK_CUDA=OFF); rebuild with a CUDA toolkit, or use FTK_BACKEND=triton|reference: "
            f"{_errors.get('_ftk_cuda')}"
        )
    return mod
