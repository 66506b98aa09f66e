"""CUDA C++ kernels (csrc/cuda/): torch allocates, the native module enqueues, pointers cross.

Each kernel runs with its tensors' device current (``torch.cuda.device``) and on torch's
current stream of that device, so it orders with the surrounding torch work, never blocks the
host and can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from .. import _native
from .._ops import quantize_4bit_outputs, quantize_blockwise_outputs, register_kernel


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@register_kernel("quantize_4bit", "cuda")
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    packed, absmax = quantize_4bit_outputs(A, blocksize)
    with torch.cuda.device(A.device):
        _native.cuda().quantize_4bit(*_native.quantize_4bit_args(A, blocksize, quant_type, packed, absmax),
                                     _stream(A.device))
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
        out = A.new_empty(shape, dtype=dtype)
    with torch.cuda.device(A.device):
        _native.cuda().dequantize_4bit(*_native.dequantize_4bit_args(A, absmax, blocksize, quant_type, nested_absmax,
                                                                      nested_code, offset, nested_blocksize, out),
                                       _stream(A.device))
    return out


@register_kernel("quantize_blockwise", "cuda")
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    out, absmax = quantize_blockwise_outputs(A, blocksize)
    with torch.cuda.device(A.device):
        _native.cuda().quantize_blockwise(*_native.quantize_blockwise_args(A, code, blocksize, out, absmax),
                                          _stream(A.device))
    return out, absmax


@register_kernel("dequantize_blockwise", "cuda")
def dequantize_blockwise(A, absmax, code, blocksize, dtype):
    out = A.new_empty(A.shape, dtype=dtype)
    with torch.cuda.device(A.device):
        _native.cuda().dequantize_blockwise(*_native.dequantize_blockwise_args(A, absmax, code, blocksize, out),
                                            _stream(A.device))
    return out
