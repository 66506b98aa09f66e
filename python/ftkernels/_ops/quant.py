"""The quantization ops: NF4/FP4 4-bit and 8-bit blockwise (csrc/include/ftk/quant.h).

``quantize_4bit``, ``dequantize_4bit`` (and its ``.out`` overload), ``quantize_blockwise`` and
``dequantize_blockwise``: schema, argument check and fake of each. They take and give
quantized data and have no autograd. :class:`Weight4bit` is the checked form of a 4-bit
weight that the LoRA ops pass to their kernels (one value for the nine schema arguments).
The format, byte for byte, is in docs/ARCHITECTURE.md, "Formats".
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._checks import (
    dense,
    fake_same_device,
    need_blocksize,
    need_device,
    need_dtype,
    need_float_dtype,
    need_numel,
    need_quant_type,
    need_tensor,
)
from .._formats import (
    BLOCKSIZES_8BIT,
    FLOAT_DTYPES,
    NESTED_BLOCKSIZE,
    quantize_4bit_outputs,
    quantize_blockwise_outputs,
)
from .._registry import arguments, define


class Weight4bit(NamedTuple):
    """A checked 4-bit tensor (a weight of shape (N, K) for the LoRA ops): the packed data and
    everything dequantize_4bit needs, in one value that every backend receives."""

    packed: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    quant_type: str
    shape: list
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    offset: torch.Tensor | None
    nested_blocksize: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.ops.ftk.dequantize_4bit(*self[:5], dtype, *self[5:])


def _check_quantize_4bit(A, blocksize, quant_type):
    need_tensor("A", A)
    need_dtype("A", A, FLOAT_DTYPES)
    need_blocksize(blocksize)
    need_quant_type(quant_type)
    return dense(A), blocksize, quant_type


def check_4bit(A, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset, nested_blocksize):
    """The checked Weight4bit of a packed 4-bit tensor of this shape and its statistics."""
    need_tensor("A", A)
    need_tensor("absmax", absmax)
    need_dtype("A", A, (torch.uint8,))
    need_blocksize(blocksize)
    need_quant_type(quant_type)
    shape = [int(s) for s in shape]
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must not have negative sizes, got {shape}")
    n = math.prod(shape)
    need_numel("A", A, (n + 1) // 2, f"shape {shape} ((numel + 1) // 2 packed bytes)")
    nblocks = -(-n // blocksize)
    need_numel("absmax", absmax, nblocks, f"shape {shape} at blocksize {blocksize}")
    need_device("absmax", absmax, A.device)
    nested = (nested_absmax, nested_code, offset)
    if all(t is None for t in nested):
        need_dtype("absmax", absmax, (torch.float32,))
    elif any(t is None for t in nested):
        raise ValueError("nested_absmax, nested_code and offset come together (double quantization)")
    else:
        need_dtype("absmax", absmax, (torch.uint8,))
        for name, t in zip(("nested_absmax", "nested_code", "offset"), nested):
            need_tensor(name, t)
            need_dtype(name, t, (torch.float32,))
            need_device(name, t, A.device)
        need_blocksize(nested_blocksize, BLOCKSIZES_8BIT, "nested_blocksize")
        need_numel(
            "nested_absmax",
            nested_absmax,
            -(-nblocks // nested_blocksize),
            f"{nblocks} absmax codes at nested_blocksize {nested_blocksize}",
        )
        need_numel("nested_code", nested_code, 256, "an 8-bit code")
        need_numel("offset", offset, 1, "double quantization")
        nested = tuple(dense(t) for t in nested)
    return Weight4bit(dense(A), dense(absmax), blocksize, quant_type, shape, *nested, nested_blocksize)


def check_weight_4bit(a) -> Weight4bit:
    """The 4-bit weight of a LoRA op's arguments ``a`` (fields packed ... nested_blocksize):
    2-D (out_features, in_features), no zero dimension."""
    if len(a.shape) != 2:
        raise ValueError(f"the 4-bit weight must be 2-D (out_features, in_features), got shape {list(a.shape)}")
    if any(int(s) == 0 for s in a.shape):
        raise ValueError(f"the 4-bit weight must have non-zero dimensions, got shape {list(a.shape)}")
    return check_4bit(
        a.packed,
        a.absmax,
        a.blocksize,
        a.quant_type,
        a.shape,
        a.nested_absmax,
        a.nested_code,
        a.offset,
        a.nested_blocksize,
    )


# dequantize_4bit's kernels take (w: Weight4bit, dtype) and, for the .out overload, out=.
def _check_dequantize_4bit(*args):
    a = arguments("dequantize_4bit")(*args)
    need_float_dtype("dtype", a.dtype)
    return check_4bit(a.A, a.absmax, a.blocksize, a.quant_type, a.shape, *a[6:]), a.dtype


def _check_dequantize_4bit_out(*args, out):
    w, dtype = _check_dequantize_4bit(*args)
    need_tensor("out", out)
    if list(out.shape) != w.shape or out.dtype != dtype:
        raise ValueError(f"out must have shape {w.shape} and dtype {dtype}; got {list(out.shape)} {out.dtype}")
    need_device("out", out, w.packed.device)
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    return w, dtype, out


def _check_quantize_blockwise(A, code, blocksize):
    need_tensor("A", A)
    need_tensor("code", code)
    need_dtype("A", A, FLOAT_DTYPES)
    need_dtype("code", code, (torch.float32,))
    need_numel("code", code, 256, "an 8-bit code")
    need_device("code", code, A.device)
    need_blocksize(blocksize, BLOCKSIZES_8BIT)
    return dense(A), dense(code), blocksize


def _check_dequantize_blockwise(A, absmax, code, blocksize, dtype):
    need_tensor("A", A)
    need_tensor("absmax", absmax)
    need_tensor("code", code)
    need_dtype("A", A, (torch.uint8,))
    need_dtype("absmax", absmax, (torch.float32,))
    need_dtype("code", code, (torch.float32,))
    need_blocksize(blocksize, BLOCKSIZES_8BIT)
    need_float_dtype("dtype", dtype)
    need_numel("absmax", absmax, -(-A.numel() // blocksize), f"{A.numel()} codes at blocksize {blocksize}")
    need_numel("code", code, 256, "an 8-bit code")
    need_device("absmax", absmax, A.device)
    need_device("code", code, A.device)
    return dense(A), dense(absmax), dense(code), blocksize, dtype


def _fake_quantize_4bit(A, blocksize, quant_type):
    return quantize_4bit_outputs(A, blocksize)


def _fake_dequantize_4bit(*args):
    a = arguments("dequantize_4bit")(*args)
    fake_same_device(a.A, absmax=a.absmax, nested_absmax=a.nested_absmax, nested_code=a.nested_code, offset=a.offset)
    return a.A.new_empty(a.shape, dtype=a.dtype)


def _fake_dequantize_4bit_out(*args, out):
    a = arguments("dequantize_4bit")(*args)
    fake_same_device(a.A, absmax=a.absmax, out=out)


def _fake_quantize_blockwise(A, code, blocksize):
    fake_same_device(A, code=code)
    return quantize_blockwise_outputs(A, blocksize)


def _fake_dequantize_blockwise(A, absmax, code, blocksize, dtype):
    fake_same_device(A, absmax=absmax, code=code)
    return A.new_empty(A.shape, dtype=dtype)


define(
    "quantize_4bit",
    "(Tensor A, int blocksize, str quant_type) -> (Tensor, Tensor)",
    _fake_quantize_4bit,
    _check_quantize_4bit,
)
define(
    "dequantize_4bit",
    "(Tensor A, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, ScalarType dtype, "
    "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, "
    f"int nested_blocksize={NESTED_BLOCKSIZE}) -> Tensor",
    _fake_dequantize_4bit,
    _check_dequantize_4bit,
)
define(
    "dequantize_4bit.out",
    "(Tensor A, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, ScalarType dtype, "
    "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, "
    f"int nested_blocksize={NESTED_BLOCKSIZE}, *, Tensor(a!) out) -> ()",
    _fake_dequantize_4bit_out,
    _check_dequantize_4bit_out,
)
define(
    "quantize_blockwise",
    "(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)",
    _fake_quantize_blockwise,
    _check_quantize_blockwise,
)
define(
    "dequantize_blockwise",
    "(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor",
    _fake_dequantize_blockwise,
    _check_dequantize_blockwise,
)
