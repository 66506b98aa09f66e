"""C++ CPU kernels (csrc/cpu/): torch allocates, the native module fills, pointers cross."""

from __future__ import annotations

import torch

from .. import _native
from .._native import DTYPE_CODE, QUANT_TYPE_CODE
from .._ops import register_kernel


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


@register_kernel("quantize_4bit", "cpu")
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    n = A.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.empty((-(-n // blocksize),), dtype=torch.float32)
    _native.cpu().quantize_4bit(A.data_ptr(), n, DTYPE_CODE[A.dtype], blocksize, QUANT_TYPE_CODE[quant_type],
                                packed.data_ptr(), absmax.data_ptr(), torch.get_num_threads())
    return packed, absmax


@register_kernel("dequantize_4bit", "cpu")
def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype,
                    nested_absmax=None, nested_code=None, offset=None, nested_blocksize=256, out=None):
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    nested = nested_absmax is not None
    _native.cpu().dequantize_4bit(
        A.data_ptr(), out.numel(), blocksize, QUANT_TYPE_CODE[quant_type],
        0 if nested else absmax.data_ptr(), absmax.data_ptr() if nested else 0,
        _ptr(nested_absmax), _ptr(nested_code), _ptr(offset), nested_blocksize,
        DTYPE_CODE[dtype], out.data_ptr(), torch.get_num_threads())
    return out


@register_kernel("quantize_blockwise", "cpu")
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    n = A.numel()
    out = torch.empty(A.shape, dtype=torch.uint8)
    absmax = torch.empty((-(-n // blocksize),), dtype=torch.float32)
    _native.cpu().quantize_blockwise(A.data_ptr(), n, DTYPE_CODE[A.dtype], code.data_ptr(), blocksize,
                                     out.data_ptr(), absmax.data_ptr(), torch.get_num_threads())
    return out, absmax


@register_kernel("dequantize_blockwise", "cpu")
def dequantize_blockwise(A, absmax, code, blocksize, dtype):
    out = torch.empty(A.shape, dtype=dtype)
    _native.cpu().dequantize_blockwise(A.data_ptr(), A.numel(), absmax.data_ptr(), code.data_ptr(), blocksize,
                                       DTYPE_CODE[dtype], out.data_ptr(), torch.get_num_threads())
    return out
