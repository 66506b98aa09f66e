"""C++ CPU kernels (csrc/cpu/): torch allocates, the native module fills, pointers cross."""

from __future__ import annotations

import torch

from .. import _native
from .._ops import quantize_4bit_outputs, quantize_blockwise_outputs, register_kernel


@register_kernel("quantize_4bit", "cpu")
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    packed, absmax = quantize_4bit_outputs(A, blocksize)
    _native.cpu().quantize_4bit(*_native.quantize_4bit_args(A, blocksize, quant_type, packed, absmax),
                                torch.get_num_threads())
    return packed, absmax


@register_kernel("dequantize_4bit", "cpu")
def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype,
                    nested_absmax=None, nested_code=None, offset=None, nested_blocksize=256, out=None):
    if out is None:
        out = A.new_empty(shape, dtype=dtype)
    _native.cpu().dequantize_4bit(*_native.dequantize_4bit_args(A, absmax, blocksize, quant_type, nested_absmax,
                                                                 nested_code, offset, nested_blocksize, out),
                                  torch.get_num_threads())
    return out


@register_kernel("quantize_blockwise", "cpu")
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    out, absmax = quantize_blockwise_outputs(A, blocksize)
    _native.cpu().quantize_blockwise(*_native.quantize_blockwise_args(A, code, blocksize, out, absmax),
                                     torch.get_num_threads())
    return out, absmax


@register_kernel("dequantize_blockwise", "cpu")
def dequantize_blockwise(A, absmax, code, blocksize, dtype):
    out = A.new_empty(A.shape, dtype=dtype)
    _native.cpu().dequantize_blockwise(*_native.dequantize_blockwise_args(A, absmax, code, blocksize, out),
                                       torch.get_num_threads())
    return out
