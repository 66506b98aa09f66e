"""C++ CPU kernels (csrc/cpu/): torch allocates, the native module fills, pointers cross."""

from __future__ import annotations

import torch

from .. import _formats, _native
from .._checks import need_no_float64
from .._registry import register_backend, register_kernel
from . import _lora

register_backend("cpu", lambda device_type: device_type == "cpu" and _native.cpu_available())


@register_kernel("quantize_4bit", "cpu")
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    packed, absmax = _formats.quantize_4bit_outputs(A, blocksize)
    mod = _native.cpu()
    mod.quantize_4bit(
        _native.quantize_4bit_params(mod, A, blocksize, quant_type, packed, absmax), torch.get_num_threads()
    )
    return packed, absmax


@register_kernel("dequantize_4bit", "cpu")
def dequantize_4bit(w, dtype, out=None):
    if out is None:
        out = w.packed.new_empty(w.shape, dtype=dtype)
    mod = _native.cpu()
    mod.dequantize_4bit(_native.dequantize_4bit_params(mod, w, out), torch.get_num_threads())
    return out


@register_kernel("quantize_blockwise", "cpu")
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    out, absmax = _formats.quantize_blockwise_outputs(A, blocksize)
    mod = _native.cpu()
    mod.quantize_blockwise(
        _native.quantize_blockwise_params(mod, A, code, blocksize, out, absmax), torch.get_num_threads()
    )
    return out, absmax


@register_kernel("dequantize_blockwise", "cpu")
def dequantize_blockwise(A, absmax, code, blocksize, dtype):
    out = A.new_empty(A.shape, dtype=dtype)
    mod = _native.cpu()
    mod.dequantize_blockwise(
        _native.dequantize_blockwise_params(mod, A, absmax, code, blocksize, out), torch.get_num_threads()
    )
    return out


# ---- fused LoRA over a 4-bit weight ----------------------------------------------------------
# The big products run tile by tile: _TILE_BYTES of weight rows dequantized to fp32 by the C++
# kernel (dequantize_4bit_range), straight into torch's fp32 GEMM. The tile stays in the
# 32 MiB L3 while the GEMM streams it, so no weight-sized fp32 copy is ever made (64 MiB at
# 4096 x 4096) and the dequantize costs ~1 ms against ~100 ms for each 512 x 4096 x 4096 GEMM.
# The GEMM is torch's (oneDNN/MKL sgemm at ~165 GFLOP/s on 2 cores, near the FMA peak): a
# hand-written one here could only lose. Measured (512 x 4096 x 4096 fp32, benchmarks/
# bench_lora.py): 8 MiB tiles were as fast as one whole-weight GEMM, and 4 MiB ones within 2%.
# bf16/fp16 inputs are widened to fp32 first: torch's 16-bit CPU GEMM is
# ~400x slower than fp32 on CPUs without AVX512-BF16/AMX, and fp16 is 3x slower even here.
# NOTE: on this machine (AVX512-BF16) torch's bf16 GEMM is 3x faster than fp32 (512 x 4096 x
# 4096: 39 ms against 112 ms), so PEFT+bitsandbytes in bf16 (~100 ms a step) beats this path
# (~200 ms). A bf16-tile variant was tried: 139 ms, still slower (the fp32 rank-r terms and the
# widening of x and dY cost ~40 ms) and W rounded to bf16; see the README.

_TILE_BYTES = 8 << 20


def _tile_rows(rows: int, cols: int) -> int:
    return max(1, min(rows, _TILE_BYTES // (4 * max(cols, 1))))


def _weight_tiles(w):
    """(first row, fp32 rows x K tile) over the weight, one reused buffer (so one params struct:
    every tile starts at the buffer's start)."""
    n, k = w.shape
    step = _tile_rows(n, k)
    buf = torch.empty(step * k, dtype=torch.float32)
    mod = _native.cpu()
    params = _native.dequantize_4bit_params(mod, w, buf)
    for n0 in range(0, n, step):
        rows = min(step, n - n0)
        tile = buf[: rows * k]
        mod.dequantize_4bit_range(params, n0 * k, (n0 + rows) * k, torch.get_num_threads())
        yield n0, tile.view(rows, k)


def _lora_dropout(t: torch.Tensor, p: float, seed, out: torch.Tensor | None = None) -> torch.Tensor:
    """drop(t) as fp32 (lora.h); out may be t itself when t is fp32."""
    if out is None:
        out = torch.empty(t.shape, dtype=torch.float32)
    mod = _native.cpu()
    mod.lora_dropout(_native.lora_dropout_params(mod, t, p, seed, out), torch.get_num_threads())
    return out


def _lora_matmul(mode, X, w, bias, L, R, scaling, p, seed):
    """The big product and its rank-r epilogue in fp32 (X is fp32: the kernels below widen it).
    The epilogue's s·L·Rᵀ (or s·drop'(L·R)) starts out, and every tile's GEMM accumulates into it."""
    R32 = R.float()
    if mode == _formats.LORA_FORWARD:
        out = (
            torch.addmm(bias.float(), L, R32.T, alpha=scaling) if bias is not None else torch.mm(L, R32.T).mul_(scaling)
        )
        for n0, tile in _weight_tiles(w):
            out[:, n0 : n0 + tile.shape[0]].addmm_(X, tile.T)
    else:
        out = torch.mm(L, R32).mul_(scaling)
        if seed is not None:
            _lora_dropout(out, p, seed, out=out)
        for n0, tile in _weight_tiles(w):
            out.addmm_(X[:, n0 : n0 + tile.shape[0]], tile)
    return out


_lora.register("cpu", dropout=_lora_dropout, matmul=_lora_matmul, widen_to_fp32=True)


# ---- fused ReFT edits (csrc/cpu/reft.cpp) ----------------------------------------------------


@register_kernel("reft_forward", "cpu")
def reft_forward(h, P, Q, b, rows, dropout_p, seed):
    need_no_float64(h=h)
    out, z = _formats.reft_forward_outputs(h, P.shape[0], _formats.reft_slots(h, rows))
    if rows is not None:
        out.copy_(h)  # rows no slot selects pass through; the kernel writes the selected ones
    mod = _native.cpu()
    mod.reft_forward(
        _native.reft_forward_params(mod, h, P, Q, b, rows, dropout_p, seed, out, z), torch.get_num_threads()
    )
    return out, z


@register_kernel("reft_backward", "cpu")
def reft_backward(grad, h, P, Q, z, rows, dropout_p, seed, need_h, need_params):
    need_no_float64(grad=grad, h=h)
    grads = _formats.reft_backward_outputs(h, P.shape[0], need_h, need_params)
    if need_h and rows is not None:
        grads[0].copy_(grad)  # rows no slot selects: dh = grad
    mod = _native.cpu()
    params = _native.reft_backward_params(mod, grad, h, P, Q, z, rows, dropout_p, seed, grads, need_h, need_params)
    mod.reft_backward(params, torch.get_num_threads())
    return grads


# ---- fused optimizer steps (csrc/cpu/optim.cpp) ----------------------------------------------


@register_kernel("adamw_step", "cpu")
def adamw_step(param, grad, exp_avg, exp_avg_sq, hyper):
    mod = _native.cpu()
    params = _native.optim_32bit_params(mod, _formats.OPTIM_ADAMW, param, grad, exp_avg, exp_avg_sq, hyper)
    mod.optim_32bit_step(params, torch.get_num_threads())


@register_kernel("lion_step", "cpu")
def lion_step(param, grad, exp_avg, hyper):
    mod = _native.cpu()
    params = _native.optim_32bit_params(mod, _formats.OPTIM_LION, param, grad, exp_avg, None, hyper)
    mod.optim_32bit_step(params, torch.get_num_threads())


@register_kernel("adamw8bit_step", "cpu")
def adamw8bit_step(param, grad, state1, state2, absmax1, absmax2, code1, code2, hyper):
    mod = _native.cpu()
    params = _native.optim_8bit_params(mod, param, grad, state1, state2, absmax1, absmax2, code1, code2, hyper)
    mod.optim_8bit_step(params, torch.get_num_threads())
