"""CUDA C++ kernels (csrc/cuda/): torch allocates, the native module enqueues, pointers cross.

Each kernel runs with its tensors' device current (``torch.cuda.device``) and on torch's
current stream of that device, so it orders with the surrounding torch work, never blocks the
host and can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from .. import _native
from .._native import DTYPE_CODE, QUANT_TYPE_CODE
from .._ops import register_kernel


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@register_kernel("quantize_4bit", "cuda")
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    n = A.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=A.device)
    absmax = torch.empty((-(-n // blocksize),), dtype=torch.float32, device=A.device)
    with torch.cuda.device(A.device):
        _native.cuda().quantize_4bit(A.data_ptr(), n, DTYPE_CODE[A.dtype], blocksize, QUANT_TYPE_CODE[quant_type],
                                     packed.data_ptr(), absmax.data_ptr(), _stream(A.device))
    return packed, absmax


@register_kernel("dequantize_4bit", "cuda")
def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype,
                    nested_absmax=None, nested_code=None, offset=None, nested_blocksize=256, out=None):
    if out is not None and out.data_ptr() % 16:
        # The kernel stores 16-byte vectors; a misaligned out (a view into a larger buffer)
        # gets the result through an aligned temporary rather than an error.
        out.copy_(dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype,
                                  nested_absmax, nested_code, offset, nested_blocksize))
        return out
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=A.device)
    nested = nested_absmax is not None
    with torch.cuda.device(A.device):
        _native.cuda().dequantize_4bit(
            A.data_ptr(), out.numel(), blocksize, QUANT_TYPE_CODE[quant_type],
            0 if nested else absmax.data_ptr(), absmax.data_ptr() if nested else 0,
            _ptr(nested_absmax), _ptr(nested_code), _ptr(offset), nested_blocksize,
            DTYPE_CODE[dtype], out.data_ptr(), _stream(A.device))
    return out


@register_kernel("quantize_blockwise", "cuda")
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    n = A.numel()
    out = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
    absmax = torch.empty((-(-n // blocksize),), dtype=torch.float32, device=A.device)
    with torch.cuda.device(A.device):
        _native.cuda().quantize_blockwise(A.data_ptr(), n, DTYPE_CODE[A.dtype], code.data_ptr(), blocksize,
                                          out.data_ptr(), absmax.data_ptr(), _stream(A.device))
    return out, absmax


@register_kernel("dequantize_blockwise", "cuda")
def dequantize_blockwise(A, absmax, code, blocksize, dtype):
    out = torch.empty(A.shape, dtype=dtype, device=A.device)
    with torch.cuda.device(A.device):
        _native.cuda().dequantize_blockwise(A.data_ptr(), A.numel(), absmax.data_ptr(), code.data_ptr(), blocksize,
                                            DTYPE_CODE[dtype], out.data_ptr(), _stream(A.device))
    return out
