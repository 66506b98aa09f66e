"""Puts the host-emulated CUDA module (build.py) behind the ``cuda`` backend, for CPU tensors.

Used by tests/conftest.py when FTK_CUDA_EMU_MODULE names a built module, in a process that
preloads the AddressSanitizer runtime (tests/test_cuda_emulated.py starts it). Everything above
the native module is the package's own: the op checks, backends/cuda.py's allocations and
struct building, _native's structs, the bindings and the launchers; only three things change:
  - ``ftkernels._ftk_cuda`` is the emulated module;
  - the ``cuda`` backend is available on CPU tensors (and only there: nothing here is a GPU);
  - ``torch.cuda.device(...)`` and the stream handle, which need a CUDA build of torch, are a
    no-op and 0 (the emulated launches complete before they return).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys

import torch


def install(path: str) -> object:
    spec = importlib.util.spec_from_file_location("ftkernels._ftk_cuda", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"FTK_CUDA_EMU_MODULE: cannot load {path!r}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["ftkernels._ftk_cuda"] = mod

    from ftkernels import _native, _registry
    from ftkernels.backends import cuda as cuda_backend

    _native._modules["_ftk_cuda"] = mod
    _native._errors.pop("_ftk_cuda", None)
    torch.cuda.device = lambda device: contextlib.nullcontext()
    cuda_backend._stream = lambda device: 0
    _registry.register_backend("cuda", lambda device_type: device_type == "cpu")
    return mod
