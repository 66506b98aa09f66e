"""Loads the compiled modules lazily; a clear error only when one is used but absent.

The modules take parameter structs of integer pointers, sizes and enum codes (never torch
tensors): each module binds every struct of csrc/include/ftk/*.h as a class built by keyword,
its fields named as the C++ members (csrc/bindings_params.h). The functions below build those
structs by name from checked tensors, for either module (each has its own classes, so the
module comes first); the codes are ftkernels._formats' (tests/test_native_abi.py checks them
against each module's ``constants``).
"""

from __future__ import annotations

import importlib
import os
import threading

import torch

from ._formats import DTYPE_CODE, QUANT_TYPE_CODE, OptimHyper, dropout_args, reft_slots

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
        if name == "_ftk_cpu":
            mod.set_isa_limit(cpu_isa_limit_from_env())
        _modules[name] = mod
        return mod


# FTK_CPU_ISA: the widest instruction-set level the CPU kernels may use (csrc/include/ftk/
# cpu_isa.h), for measuring each level on one machine and for working around a CPU or an
# emulator that misreports its features. "native" (the default) is the widest this CPU has; a
# level above that runs the widest there is.
CPU_ISA_LEVELS = {"baseline": 0, "avx2": 1, "avx512": 2, "native": 2}


def cpu_isa_limit_from_env() -> int:
    raw = os.environ.get("FTK_CPU_ISA", "")
    value = raw.strip().lower() or "native"
    if value not in CPU_ISA_LEVELS:
        raise ValueError(f"FTK_CPU_ISA must be one of {', '.join(CPU_ISA_LEVELS)}, got {raw!r}")
    return CPU_ISA_LEVELS[value]


MODULES = ("_ftk_cpu", "_ftk_cuda")


def load_status(name: str) -> tuple[object | None, BaseException | None]:
    """``(module, None)`` when the compiled module ``name`` imports, else ``(None, its import
    error)``: what ``ftk doctor`` reports."""
    if name not in MODULES:
        raise ValueError(f"name must be one of {MODULES}, got {name!r}")
    mod = _load(name)
    return mod, (None if mod is not None else _errors.get(name))


def cpu_available() -> bool:
    return _load("_ftk_cpu") is not None


def cuda_available() -> bool:
    return _load("_ftk_cuda") is not None and torch.cuda.is_available()


def cpu():
    mod = _load("_ftk_cpu")
    if mod is None:
        raise RuntimeError(
            f"ftkernels' CPU module is not built; reinstall from source (pip install .): {_errors.get('_ftk_cpu')}"
        )
    return mod


# dtype -> the CPU features any one of which makes torch's GEMM in that dtype fast.
_GEMM16_FEATURES = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}
_gemm16: frozenset | None = None


def cpu_gemm16_dtypes() -> frozenset:
    """The 16-bit dtypes whose CPU matmuls (lora_linear_4bit's, LinearNF4's) run as torch GEMMs
    in that dtype here: those with AVX512-BF16/AMX-BF16 (AVX512-FP16/AMX-FP16 for fp16) at the
    avx512 level. The others are widened to fp32: torch's 16-bit CPU GEMM is ~400x slower than
    fp32 without them. Fixed on first use; what `ftk doctor` reports; empty without the module."""
    global _gemm16
    if _gemm16 is None:
        mod = _load("_ftk_cpu")
        at_avx512 = mod is not None and mod.cpu_isa() == "avx512"
        _gemm16 = frozenset(
            dt for dt, feats in _GEMM16_FEATURES.items() if at_avx512 and any(mod.cpu_has(f) for f in feats)
        )
    return _gemm16


def cuda():
    mod = _load("_ftk_cuda")
    if mod is None:
        raise RuntimeError(
            "ftkernels was built without its CUDA module (no nvcc was found at build time, or "
            "FTK_CUDA=OFF); rebuild with a CUDA toolkit, or use FTK_BACKEND=triton|reference: "
            f"{_errors.get('_ftk_cuda')}"
        )
    return mod


# ---- the parameter structs of the native functions -----------------------------------------
# Every function takes the module whose launcher will run the struct (cpu() or cuda()).


def ptr(t: torch.Tensor | None) -> int:
    """A tensor's data pointer, or 0 (null) for an absent optional tensor."""
    return 0 if t is None else t.data_ptr()


def rows_cols(shape) -> tuple[int, int]:
    """The rows x cols view of a 4-bit tensor of this shape (ftk::Weight4bit): cols the last
    dimension, rows the product of the others; 1 x n for a 0-d or 1-d tensor."""
    shape = [int(s) for s in shape]
    if not shape:
        return 1, 1
    rows = 1
    for s in shape[:-1]:
        rows *= s
    return rows, shape[-1]


DROPOUT_FIELDS = ("enabled", "seed", "threshold", "scale")  # ftk::Dropout, _formats.dropout_args' order
OPTIM_HYPER_FIELDS = OptimHyper._fields  # ftk::OptimHyper's members, in order


def dropout_params(mod, p: float, seed: int | None):
    """ftk::Dropout: disabled when seed is None."""
    return mod.Dropout(**dict(zip(DROPOUT_FIELDS, dropout_args(p, seed))))


def optim_hyper_params(mod, hyper: OptimHyper):
    """ftk::OptimHyper of a _formats.OptimHyper."""
    return mod.OptimHyper(**hyper._asdict())


def quantize_4bit_params(mod, A, blocksize, quant_type, packed, absmax):
    return mod.Quantize4bitParams(
        A=A.data_ptr(),
        n=A.numel(),
        dtype=DTYPE_CODE[A.dtype],
        blocksize=blocksize,
        quant_type=QUANT_TYPE_CODE[quant_type],
        packed=packed.data_ptr(),
        absmax=absmax.data_ptr(),
    )


def weight_4bit(mod, w):
    """ftk::Weight4bit of an _ops.quant.Weight4bit; with double quantization absmax holds the
    uint8 codes and goes in absmax_q."""
    nested = w.nested_absmax is not None
    rows, cols = rows_cols(w.shape)
    return mod.Weight4bit(
        packed=w.packed.data_ptr(),
        rows=rows,
        cols=cols,
        blocksize=w.blocksize,
        quant_type=QUANT_TYPE_CODE[w.quant_type],
        absmax=0 if nested else w.absmax.data_ptr(),
        absmax_q=w.absmax.data_ptr() if nested else 0,
        nested_absmax=ptr(w.nested_absmax),
        nested_code=ptr(w.nested_code),
        offset=ptr(w.offset),
        nested_blocksize=w.nested_blocksize,
    )


def dequantize_4bit_params(mod, w, out):
    """ftk::Dequantize4bitParams of an _ops.quant.Weight4bit into out (for dequantize_4bit_range,
    out holds the range only)."""
    return mod.Dequantize4bitParams(w=weight_4bit(mod, w), dtype=DTYPE_CODE[out.dtype], out=out.data_ptr())


def quantize_blockwise_params(mod, A, code, blocksize, out, absmax):
    return mod.QuantizeBlockwiseParams(
        A=A.data_ptr(),
        n=A.numel(),
        dtype=DTYPE_CODE[A.dtype],
        code=code.data_ptr(),
        blocksize=blocksize,
        out=out.data_ptr(),
        absmax=absmax.data_ptr(),
    )


def dequantize_blockwise_params(mod, A, absmax, code, blocksize, out):
    return mod.DequantizeBlockwiseParams(
        A=A.data_ptr(),
        n=A.numel(),
        absmax=absmax.data_ptr(),
        code=code.data_ptr(),
        blocksize=blocksize,
        dtype=DTYPE_CODE[out.dtype],
        out=out.data_ptr(),
    )


# ---- fused LoRA (csrc/include/ftk/lora.h) --------------------------------------------------


def lora_dropout_params(mod, t, p: float, seed: int | None, out):
    """ftk::LoraDropoutParams: t (rows, cols) into out (fp32), which may be t itself."""
    return mod.LoraDropoutParams(
        **{"in": t.data_ptr()},
        dtype=DTYPE_CODE[t.dtype],
        rows=t.shape[0],
        cols=t.shape[1],
        dropout=dropout_params(mod, p, seed),
        out=out.data_ptr(),
    )


def lora_matmul_params(mod, mode: int, X, w, bias, L, R, scaling: float, p: float, seed: int | None, out):
    """ftk::LoraMatmulParams: X (M x K or M x N), L (M x r fp32), R (B or A), w an _ops.quant.Weight4bit."""
    return mod.LoraMatmulParams(
        mode=mode,
        X=X.data_ptr(),
        dtype=DTYPE_CODE[X.dtype],
        M=X.shape[0],
        W=weight_4bit(mod, w),
        bias=ptr(bias),
        bias_dtype=DTYPE_CODE[bias.dtype] if bias is not None else 0,
        L=L.data_ptr(),
        R=R.data_ptr(),
        R_dtype=DTYPE_CODE[R.dtype],
        r=L.shape[1],
        scaling=scaling,
        dropout=dropout_params(mod, p, seed),
        out=out.data_ptr(),
    )


# ---- fused ReFT edits (csrc/include/ftk/reft.h) --------------------------------------------


def reft_forward_params(mod, h, P, Q, b, rows, p: float, seed: int | None, out, z):
    """ftk::ReftForwardParams: h and out (..., d) seen as (n_rows, d), P and Q (r, d) fp32, rows
    int64 or None."""
    d = h.shape[-1]
    return mod.ReftForwardParams(
        h=h.data_ptr(),
        dtype=DTYPE_CODE[h.dtype],
        n_rows=h.numel() // d,
        d=d,
        r=P.shape[0],
        rows=ptr(rows),
        n_slots=reft_slots(h, rows),
        P=P.data_ptr(),
        Q=Q.data_ptr(),
        b=b.data_ptr(),
        dropout=dropout_params(mod, p, seed),
        out=out.data_ptr(),
        z=z.data_ptr(),
    )


def reft_backward_params(mod, grad, h, P, Q, z, rows, p: float, seed, grads, need_h, need_params, workspace=None):
    """ftk::ReftBackwardParams: grads is (dh, dP, dQ, db) as reft_backward_outputs made them; the
    ones not wanted cross as null. workspace: CUDA only."""
    d = h.shape[-1]
    dh, dP, dQ, db = (t if wanted else None for t, wanted in zip(grads, (need_h,) + (need_params,) * 3))
    return mod.ReftBackwardParams(
        grad=grad.data_ptr(),
        h=h.data_ptr(),
        dtype=DTYPE_CODE[grad.dtype],
        n_rows=h.numel() // d,
        d=d,
        r=P.shape[0],
        rows=ptr(rows),
        n_slots=z.shape[0],
        P=P.data_ptr(),
        Q=Q.data_ptr(),
        z=z.data_ptr(),
        dropout=dropout_params(mod, p, seed),
        dh=ptr(dh),
        dP=ptr(dP),
        dQ=ptr(dQ),
        db=ptr(db),
        workspace=ptr(workspace),
        workspace_floats=0 if workspace is None else workspace.numel(),
    )


# ---- fused optimizer steps (csrc/include/ftk/optim.h) ------------------------------------


def optim_32bit_params(mod, kind: int, param, grad, state1, state2, hyper: tuple):
    """ftk::Optim32bitParams; hyper is _formats.optim_hyper(...), state2 None for Lion."""
    return mod.Optim32bitParams(
        kind=kind,
        param=param.data_ptr(),
        param_dtype=DTYPE_CODE[param.dtype],
        grad=grad.data_ptr(),
        grad_dtype=DTYPE_CODE[grad.dtype],
        n=param.numel(),
        state1=state1.data_ptr(),
        state2=ptr(state2),
        hyper=optim_hyper_params(mod, hyper),
    )


def optim_8bit_params(mod, param, grad, state1, state2, absmax1, absmax2, code1, code2, hyper: tuple):
    """ftk::Optim8bitParams; hyper is _formats.optim_hyper(...)."""
    return mod.Optim8bitParams(
        param=param.data_ptr(),
        param_dtype=DTYPE_CODE[param.dtype],
        grad=grad.data_ptr(),
        grad_dtype=DTYPE_CODE[grad.dtype],
        n=param.numel(),
        state1=state1.data_ptr(),
        state2=state2.data_ptr(),
        absmax1=absmax1.data_ptr(),
        absmax2=absmax2.data_ptr(),
        code1=code1.data_ptr(),
        code2=code2.data_ptr(),
        hyper=optim_hyper_params(mod, hyper),
    )
