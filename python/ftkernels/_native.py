"""Loads the compiled modules lazily; a clear error only when one is used but absent.

The modules take integer pointers, sizes and a dtype code (never torch tensors), so this file
also holds the dtype table that mirrors ``ftk::DType`` in csrc/include/ftk/common.h, and the
``*_args`` functions that turn checked tensors into those integers for both modules (the CPU
and CUDA functions take the same arguments but the last: threads or a stream), as
csrc/include/ftk/quant_args.h turns them back into parameter structs.
"""

from __future__ import annotations

import importlib
import threading

import torch

from ._formats import DTYPE_CODE, QUANT_TYPE_CODE, dropout_args

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


# ---- arguments of the native functions -----------------------------------------------------


def ptr(t: torch.Tensor | None) -> int:
    """A tensor's data pointer, or 0 (null) for an absent optional tensor."""
    return 0 if t is None else t.data_ptr()


def quantize_4bit_args(A, blocksize, quant_type, packed, absmax) -> tuple:
    return (A.data_ptr(), A.numel(), DTYPE_CODE[A.dtype], blocksize, QUANT_TYPE_CODE[quant_type],
            packed.data_ptr(), absmax.data_ptr())


def dequantize_4bit_args(A, absmax, blocksize, quant_type, nested_absmax, nested_code, offset,
                         nested_blocksize, out) -> tuple:
    # With double quantization absmax holds uint8 codes and goes in the absmax_q slot.
    nested = nested_absmax is not None
    return (A.data_ptr(), out.numel(), blocksize, QUANT_TYPE_CODE[quant_type],
            0 if nested else absmax.data_ptr(), absmax.data_ptr() if nested else 0,
            ptr(nested_absmax), ptr(nested_code), ptr(offset), nested_blocksize,
            DTYPE_CODE[out.dtype], out.data_ptr())


def quantize_blockwise_args(A, code, blocksize, out, absmax) -> tuple:
    return (A.data_ptr(), A.numel(), DTYPE_CODE[A.dtype], code.data_ptr(), blocksize, out.data_ptr(),
            absmax.data_ptr())


def dequantize_blockwise_args(A, absmax, code, blocksize, out) -> tuple:
    return (A.data_ptr(), A.numel(), absmax.data_ptr(), code.data_ptr(), blocksize, DTYPE_CODE[out.dtype],
            out.data_ptr())


# ---- fused LoRA (csrc/include/ftk/lora.h, lora_args.h) -------------------------------------

def lora_dropout_args(t, p: float, seed: int | None, out) -> tuple:
    return (t.data_ptr(), DTYPE_CODE[t.dtype], t.shape[0], t.shape[1], *dropout_args(p, seed), out.data_ptr())


def weight_4bit_args(w) -> tuple:
    """ftk::Weight4bit of an _ops.Weight4bit; with double quantization absmax holds uint8 codes."""
    nested = w.nested_absmax is not None
    return (w.packed.data_ptr(), w.shape[0], w.shape[1], w.blocksize, QUANT_TYPE_CODE[w.quant_type],
            0 if nested else w.absmax.data_ptr(), w.absmax.data_ptr() if nested else 0,
            ptr(w.nested_absmax), ptr(w.nested_code), ptr(w.offset), w.nested_blocksize)


def lora_matmul_args(mode: int, X, w, bias, L, R, scaling: float, p: float, seed: int | None, out) -> tuple:
    """ftk::LoraMatmulParams (lora.h): X (M x K or M x N), L (M x r fp32), R (B or A)."""
    return (mode, X.data_ptr(), DTYPE_CODE[X.dtype], X.shape[0], *weight_4bit_args(w), ptr(bias),
            DTYPE_CODE[bias.dtype] if bias is not None else 0, L.data_ptr(), R.data_ptr(), DTYPE_CODE[R.dtype],
            L.shape[1], scaling, *dropout_args(p, seed), out.data_ptr())


def dequantize_4bit_range_args(w, begin: int, end: int, out) -> tuple:
    """CPU dequantize_4bit_range of elements [begin, end) of weight w into out (fp32 here)."""
    wa = weight_4bit_args(w)  # packed, rows, cols, blocksize, quant type, absmax, absmax_q, nested...
    return (wa[0], wa[1] * wa[2], *wa[3:], DTYPE_CODE[out.dtype], out.data_ptr(), begin, end)


# ---- fused ReFT edits (csrc/include/ftk/reft.h, reft_args.h) -------------------------------


def reft_forward_args(h2, P, Q, b, rows, p: float, seed: int | None, out, z) -> tuple:
    """ftk::ReftForwardParams: h2 and out (n_rows, d), P and Q (r, d) fp32, rows int64 or None."""
    n_slots = rows.numel() if rows is not None else h2.shape[0]
    return (h2.data_ptr(), DTYPE_CODE[h2.dtype], h2.shape[0], h2.shape[1], P.shape[0], ptr(rows), n_slots,
            P.data_ptr(), Q.data_ptr(), b.data_ptr(), *dropout_args(p, seed), out.data_ptr(), z.data_ptr())


def reft_backward_args(g2, h2, P, Q, z, rows, p: float, seed: int | None, dh, dP, dQ, db,
                       workspace=None) -> tuple:
    """ftk::ReftBackwardParams; dh / (dP, dQ, db) are None when not wanted, workspace CUDA only."""
    n_slots = rows.numel() if rows is not None else g2.shape[0]
    return (g2.data_ptr(), h2.data_ptr(), DTYPE_CODE[g2.dtype], g2.shape[0], g2.shape[1], P.shape[0], ptr(rows),
            n_slots, P.data_ptr(), Q.data_ptr(), z.data_ptr(), *dropout_args(p, seed), ptr(dh), ptr(dP), ptr(dQ),
            ptr(db), ptr(workspace), 0 if workspace is None else workspace.numel())


# ---- fused optimizer steps (csrc/include/ftk/optim.h, optim_args.h) -----------------------

def optim_32bit_args(kind: int, param, grad, state1, state2) -> tuple:
    return (kind, param.data_ptr(), DTYPE_CODE[param.dtype], grad.data_ptr(), DTYPE_CODE[grad.dtype], param.numel(),
            state1.data_ptr(), ptr(state2))


def optim_8bit_args(param, grad, state1, state2, absmax1, absmax2, code1, code2) -> tuple:
    return (param.data_ptr(), DTYPE_CODE[param.dtype], grad.data_ptr(), DTYPE_CODE[grad.dtype], param.numel(),
            state1.data_ptr(), state2.data_ptr(), absmax1.data_ptr(), absmax2.data_ptr(), code1.data_ptr(),
            code2.data_ptr())
