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
# The big products run tile by tile: _TILE_BYTES of the weight dequantized by the C++ kernels
# (dequantize_4bit_range, _cols), straight into torch's GEMM. The tile stays in the 32 MiB L3
# while the GEMM streams it, so no weight-sized copy is ever made (64 MiB in fp32 at 4096 x
# 4096) and the dequantize costs ~1 ms against ~100 ms for each 512 x 4096 x 4096 fp32 GEMM.
# The GEMM is torch's (oneDNN/MKL at ~165 GFLOP/s in fp32 on 2 cores, near the FMA peak): a
# hand-written one here could only lose. Measured (512 x 4096 x 4096 fp32, benchmarks/
# bench_lora.py): 8 MiB tiles were as fast as one whole-weight GEMM, and 4 MiB ones within 2%.
#
# Which GEMM a 16-bit input gets is chosen once per process from the CPU (_native.cpu_gemm16_dtypes):
# - with AVX512-BF16 or AMX-BF16 (AVX512-FP16 or AMX-FP16 for fp16) torch's 16-bit GEMM runs on
#   them, 3x faster than fp32 here (512 x 4096 x 4096 bf16: 39-45 ms against 112-160 ms). The
#   tiles are then dequantized to the input's dtype, as bitsandbytes and the GPU kernels round W,
#   each output element comes out of one GEMM (column tiles of W for dY·W, so no partial sums
#   are rounded to 16 bits), which adds it to the rank-r term already there (addmm_, beta 1);
# - without them torch's 16-bit CPU GEMM is ~400x slower than fp32 (fp16 3x even on this
#   AVX512-BF16 machine), so x and dY are widened to fp32 once and everything runs in fp32.
# FTK_CPU_ISA below avx512 turns the 16-bit GEMMs off too, as on a CPU without AVX-512.

_TILE_BYTES = 8 << 20


def _tiles(w, dtype, by_cols: bool):
    """(first index, tile) over the weight in ``dtype``: rows x K row tiles (by_cols False) or
    N x width column tiles, a multiple of the block size wide; one reused buffer (so one params
    struct: every tile starts at the buffer's start)."""
    n, k = w.shape
    item = torch.empty((), dtype=dtype).element_size()
    mod = _native.cpu()
    if by_cols:
        step = max(1, _TILE_BYTES // (item * max(n, 1)))
        step = min(k, max(w.blocksize, step // w.blocksize * w.blocksize))
        buf = torch.empty(n * step, dtype=dtype)
    else:
        step = max(1, min(n, _TILE_BYTES // (item * max(k, 1))))
        buf = torch.empty(step * k, dtype=dtype)
    params = _native.dequantize_4bit_params(mod, w, buf)
    threads = torch.get_num_threads()
    for i0 in range(0, k if by_cols else n, step):
        if by_cols:
            width = min(step, k - i0)
            mod.dequantize_4bit_cols(params, i0, i0 + width, threads)
            yield i0, buf[: n * width].view(n, width)
        else:
            rows = min(step, n - i0)
            mod.dequantize_4bit_range(params, i0 * k, (i0 + rows) * k, threads)
            yield i0, buf[: rows * k].view(rows, k)


def _lora_dropout(t: torch.Tensor, p: float, seed, out: torch.Tensor | None = None) -> torch.Tensor:
    """drop(t) as fp32 (lora.h); out may be t itself when t is fp32."""
    if out is None:
        out = torch.empty(t.shape, dtype=torch.float32)
    mod = _native.cpu()
    mod.lora_dropout(_native.lora_dropout_params(mod, t, p, seed, out), torch.get_num_threads())
    return out


def _lora_matmul(mode, X, w, bias, L, R, scaling, p, seed):
    """The big product and its rank-r epilogue: X fp32 (widened), or 16-bit with tiles of W in
    X's dtype (_native.cpu_gemm16_dtypes). The epilogue's s·L·Rᵀ (+ bias), or s·drop'(L·R),
    starts out in X's dtype, a GEMM of its own (L rounded to X's dtype, as torch's own 16-bit
    layer rounds x·Aᵀ), and every tile's GEMM accumulates into it."""
    dt = X.dtype
    if mode == _formats.LORA_FORWARD:
        Rt = R.T.to(dt)
        out = (
            torch.addmm(bias.to(dt), L.to(dt), Rt, alpha=scaling)
            if bias is not None
            else torch.mm(L.mul(scaling).to(dt), Rt)
        )
    elif seed is None:
        out = torch.mm(L.mul(scaling).to(dt), R.to(dt))
    else:  # the dropout mask applies to the fp32 product (lora.h), then one rounding
        out = torch.mm(L, R.float()).mul_(scaling)
        _lora_dropout(out, p, seed, out=out)
        out = out if dt == torch.float32 else out.to(dt)
    if mode == _formats.LORA_FORWARD:  # out[:, n0:n1] += X · W[n0:n1]ᵀ
        for n0, tile in _tiles(w, X.dtype, by_cols=False):
            out[:, n0 : n0 + tile.shape[0]].addmm_(X, tile.T)
    elif X.dtype == torch.float32:  # out += X[:, n0:n1] · W[n0:n1], fp32 partial sums
        for n0, tile in _tiles(w, X.dtype, by_cols=False):
            out.addmm_(X[:, n0 : n0 + tile.shape[0]], tile)
    else:  # out[:, k0:k1] += X · W[:, k0:k1]: one GEMM, one rounding, an element
        for k0, tile in _tiles(w, X.dtype, by_cols=True):
            out[:, k0 : k0 + tile.shape[1]].addmm_(X, tile)
    return out


_lora.register(
    "cpu", dropout=_lora_dropout, matmul=_lora_matmul, widen=lambda dtype: dtype not in _native.cpu_gemm16_dtypes()
)


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
