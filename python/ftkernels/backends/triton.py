"""Triton kernels (ftkernels.triton_kernels), registered for the ops they implement.

Triton is optional: nothing here imports it until a kernel runs, and :func:`available` says
False (never raises) where it is missing. On the CPU, Triton runs only under its interpreter
(``TRITON_INTERPRET=1``, set before Triton is first imported), which is how the tests run.

Each kernel receives the arguments its op's check (``_ops/<family>.py``) returned (dense tensors,
valid blocksizes and dtypes), allocates its outputs with torch and returns what the reference
kernel returns: same shapes, dtypes and bytes.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from .. import _formats
from .._checks import need_no_float64
from .._registry import register_backend, register_kernel
from . import _lora


@functools.cache
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # missing, or broken in this environment: the backend is just absent
        return False
    return True


def available(device_type: str) -> bool:
    """Whether the Triton kernels can run on ``device_type`` tensors here."""
    if device_type == "cuda":
        return _triton_imports() and torch.cuda.is_available()
    if device_type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1" and _triton_imports()
    return False


register_backend("triton", available)


def _kernels(name: str):
    """ftkernels.triton_kernels.<name>, imported on first use (it imports triton). By name, as
    the subpackage is a namespace package (see pyproject.toml's import-linter comment)."""
    return importlib.import_module(f"{_PACKAGE}.triton_kernels.{name}")


_PACKAGE = __name__.split(".")[0]


@functools.cache
def _code_4bit(quant_type: str, device: torch.device) -> torch.Tensor:
    # The 16-entry table the dequantize kernel gathers from, made once per device (the first
    # call, like Triton's own compile, belongs before any CUDA graph capture).
    return _formats.code_4bit(quant_type, device)


@register_kernel("quantize_4bit", "triton")
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    packed, absmax = _formats.quantize_4bit_outputs(A, blocksize)
    _kernels("nf4").quantize_4bit(A, packed, absmax, blocksize, _formats.QUANT_TYPE_CODE[quant_type])
    return packed, absmax


@register_kernel("dequantize_4bit", "triton")
def dequantize_4bit(w, dtype, out=None):
    if out is None:
        out = w.packed.new_empty(w.shape, dtype=dtype)
    code = _code_4bit(w.quant_type, w.packed.device)
    _kernels("nf4").dequantize_4bit(
        w.packed, w.absmax, code, out, w.blocksize, w.nested_absmax, w.nested_code, w.offset, w.nested_blocksize
    )
    return out


@register_kernel("quantize_blockwise", "triton")
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    out, absmax = _formats.quantize_blockwise_outputs(A, blocksize)
    _kernels("nf4").quantize_blockwise(A, code, out, absmax, blocksize)
    return out, absmax


@register_kernel("dequantize_blockwise", "triton")
def dequantize_blockwise(A, absmax, code, blocksize, dtype):
    out = A.new_empty(A.shape, dtype=dtype)
    _kernels("nf4").dequantize_blockwise(A, absmax, code, out, blocksize)
    return out


# ---- fused LoRA (triton_kernels/lora.py, composed by backends/_lora.py) ----------------------


def _lora_dropout(t: torch.Tensor, p: float, seed: int | None) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=torch.float32, device=t.device)
    _kernels("lora").lora_dropout(t, out, *_formats.dropout_args(p, seed))
    return out


def _lora_matmul(mode, X, w, bias, L, R, scaling, p, seed):
    n, k = w.shape
    out = X.new_empty((X.shape[0], n if mode == _formats.LORA_FORWARD else k))
    _kernels("lora").lora_matmul(
        mode,
        X,
        w,
        _code_4bit(w.quant_type, X.device),
        bias,
        L.contiguous(),
        R,
        scaling,
        *_formats.dropout_args(p, seed),
        out,
    )
    return out


_lora.register("triton", dropout=_lora_dropout, matmul=_lora_matmul)


# ---- fused ReFT edits (triton_kernels/reft.py) ------------------------------------------------


@register_kernel("reft_forward", "triton")
def reft_forward(h, P, Q, b, rows, dropout_p, seed):
    need_no_float64(h=h, P=P, Q=Q, b=b)
    n_slots = _formats.reft_slots(h, rows)
    out, z = _formats.reft_forward_outputs(h, P.shape[0], n_slots)
    if rows is not None:
        out.copy_(h)  # rows no slot selects keep h; the kernel writes the selected ones
    _kernels("reft").reft_forward(h, P, Q, b, rows, *_formats.dropout_args(dropout_p, seed), out, z)
    return out, z


@register_kernel("reft_backward", "triton")
def reft_backward(grad, h, P, Q, z, rows, dropout_p, seed, need_h, need_params):
    need_no_float64(grad=grad, h=h, P=P, Q=Q, z=z)
    kernels = _kernels("reft")
    r, d = P.shape
    dh, dP, dQ, db = _formats.reft_backward_outputs(h, r, need_h, need_params)
    if rows is not None and need_h:
        dh.copy_(grad)  # rows no slot selects: dh = grad
    workspace = torch.empty(
        kernels.backward_workspace_shape(z.shape[0], r, d, h.device, need_params), dtype=torch.float32, device=h.device
    )
    kernels.reft_backward(
        grad,
        h,
        P,
        Q,
        z,
        rows,
        *_formats.dropout_args(dropout_p, seed),
        dh if need_h else None,
        *((dP, dQ, db) if need_params else (None, None, None)),
        workspace,
    )
    return dh, dP, dQ, db


# ---- fused optimizer steps (triton_kernels/optim.py) -------------------------------------------


@register_kernel("adamw_step", "triton")
def adamw_step(param, grad, exp_avg, exp_avg_sq, hyper):
    _kernels("optim").adamw_step(param, grad, exp_avg, exp_avg_sq, hyper)


@register_kernel("lion_step", "triton")
def lion_step(param, grad, exp_avg, hyper):
    _kernels("optim").lion_step(param, grad, exp_avg, hyper)


@register_kernel("adamw8bit_step", "triton")
def adamw8bit_step(param, grad, state1, state2, absmax1, absmax2, code1, code2, hyper):
    _kernels("optim").adamw8bit_step(param, grad, state1, state2, absmax1, absmax2, code1, code2, hyper)
