# Fused optimizer steps in Triton (AdamW and Lion with fp32 states, AdamW with 8-bit blockwise
# states): the kernels, then their launchers.
#
# Contract: csrc/include/ftk/optim.h (the math and its order of operations), computed as
# csrc/cpu/optim.cpp computes it, operation for operation; backends/reference.py is the oracle.
# The derived scalars (1 − lr·wd, 1 − β1, 1 − β2, lr / (1 − β1^t), √(1 − β2^t)) come from the
# host in double (_formats.optim_hyper) and reach the kernel as fp32 arguments, rounded once.
#
# Algorithm. One memory-bound pass: every byte of param, grad and the states is read once and
# written once; nothing is reduced across programs.
#   32-bit: a program owns BLOCK_32BIT consecutive elements (int64 base, int32 in-tile
#           offsets). AdamW moves 4 + 4 + 8 + 8 = 24 B an fp32 parameter (12 B of fp32 states
#           each way); Lion 4 + 4 + 8 = 16 B.
#   8-bit:  a program owns ROWS_8BIT whole 256-element state blocks as a [ROWS, 256] tile:
#           dequantize (code[q] · absmax, gathers from the 1 KiB L1-resident code), update m, v
#           and param in fp32, the block's new absmax per row (tl.max of |x|), then
#           x / absmax and common.py's code8_index (bitsandbytes' dQuantize<0>: 7 dependent
#           gathers, then the nearer bracketing entry). 4 + 4 + 2 + 2 B an fp32 parameter.
#
# Invariants: all tensors contiguous (the op layer guarantees it); n may pass 2^31 (program
# bases are int64); lanes past n are masked on every load and store, and in the 8-bit kernel
# their m and v are forced to 0.0 before the absmax, so a partial last block takes the absmax
# of its valid elements only (a masked code byte 0 would otherwise decode to code[0] · absmax,
# i.e. −absmax). A block whose absmax is 0 quantizes 0.0 (the code of 0) and stores absmax 0.
#
# NOTE (bit-exactness with the CPU kernels and torch): every launch passes
# enable_fp_fusion=False (common.LAUNCH), so m·β1 + g·(1 − β1) stays two rounded products and a
# rounded sum rather than an FMA; divisions are tl.math.div_rn and square roots tl.sqrt_rn,
# since Triton's `/` and tl.sqrt on fp32 may lower to approximate PTX (div.full, sqrt.approx).

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._formats import OPTIM_BLOCK  # the 8-bit state blocksize, 256: optim.h's kOptimBlock (bitsandbytes')
from .common import LAUNCH, code8_index, device_of, from_f32, to_f32

BLOCK_32BIT = 1024  # elements per program: 8 per thread at 4 warps (two 16-B fp32 loads)
WARPS_32BIT = 4
ROWS_8BIT = 4  # 256-element blocks per program: 1024 elements, 8 per thread at 4 warps
WARPS_8BIT = 4


# ---- kernels --------------------------------------------------------------------------------


@triton.jit
def _adamw_kernel(
    param,
    grad,
    state1,
    state2,
    n,
    beta2,
    eps,
    decay,
    one_minus_beta1,
    one_minus_beta2,
    step_size,
    bias_correction2_sqrt,
    BLOCK: tl.constexpr,
    EXACT_BF16: tl.constexpr,
):
    base = tl.program_id(0).to(tl.int64) * BLOCK
    rem = tl.minimum(n - base, BLOCK).to(tl.int32)
    offs = tl.arange(0, BLOCK)
    mask = offs < rem
    g = to_f32(tl.load(grad + base + offs, mask=mask, other=0.0), EXACT_BF16)
    x = to_f32(tl.load(param + base + offs, mask=mask, other=0.0), EXACT_BF16) * decay
    m = tl.load(state1 + base + offs, mask=mask, other=0.0)
    v = tl.load(state2 + base + offs, mask=mask, other=0.0)
    # torch's lerp(m, g, w): two formulas, the one with the smaller weight (w is uniform).
    w = one_minus_beta1
    m = tl.where(w < 0.5, m + w * (g - m), g - (g - m) * (1.0 - w))
    v = v * beta2 + (one_minus_beta2 * g) * g  # addcmul: (value · g) · g
    denom = tl.math.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    x = x + tl.math.div_rn((-step_size) * m, denom)  # addcdiv: (value · m) / denom
    tl.store(state1 + base + offs, m, mask=mask)
    tl.store(state2 + base + offs, v, mask=mask)
    tl.store(param + base + offs, from_f32(x, param.dtype.element_ty, EXACT_BF16), mask=mask)


@triton.jit
def _lion_kernel(
    param,
    grad,
    state1,
    n,
    lr,
    beta1,
    beta2,
    decay,
    one_minus_beta1,
    one_minus_beta2,
    BLOCK: tl.constexpr,
    EXACT_BF16: tl.constexpr,
):
    base = tl.program_id(0).to(tl.int64) * BLOCK
    rem = tl.minimum(n - base, BLOCK).to(tl.int32)
    offs = tl.arange(0, BLOCK)
    mask = offs < rem
    g = to_f32(tl.load(grad + base + offs, mask=mask, other=0.0), EXACT_BF16)
    m = tl.load(state1 + base + offs, mask=mask, other=0.0)
    c = m * beta1 + g * one_minus_beta1
    sign = tl.where(c > 0.0, 1.0, tl.where(c < 0.0, -1.0, 0.0))  # NaN: 0, as optim.cpp
    x = to_f32(tl.load(param + base + offs, mask=mask, other=0.0), EXACT_BF16) * decay + (-lr) * sign
    tl.store(param + base + offs, from_f32(x, param.dtype.element_ty, EXACT_BF16), mask=mask)
    tl.store(state1 + base + offs, m * beta2 + one_minus_beta2 * g, mask=mask)


@triton.jit
def _requantize(x, code):
    """A [ROWS, 256] fp32 tile -> (its code indices, each row's absmax). A row whose absmax is
    0 quantizes 0.0 everywhere (the code of 0); x / absmax is an IEEE division, as optim.cpp."""
    amax = tl.max(tl.abs(x), axis=1)
    nonzero = amax > 0.0
    xn = tl.math.div_rn(x, tl.where(nonzero, amax, 1.0)[:, None])
    return code8_index(code, tl.where(nonzero[:, None], xn, 0.0)), amax


@triton.jit
def _adamw8bit_kernel(
    param,
    grad,
    state1,
    state2,
    absmax1,
    absmax2,
    code1,
    code2,
    n,
    beta1,
    beta2,
    eps,
    decay,
    one_minus_beta1,
    one_minus_beta2,
    step_size,
    bias_correction2_sqrt,
    BS: tl.constexpr,
    ROWS: tl.constexpr,
    EXACT_BF16: tl.constexpr,
):
    TILE: tl.constexpr = ROWS * BS
    pid = tl.program_id(0).to(tl.int64)
    base = pid * TILE
    rem = tl.minimum(n - base, TILE).to(tl.int32)
    rows = tl.arange(0, ROWS)
    rmask = rows * BS < rem
    offs = rows[:, None] * BS + tl.arange(0, BS)[None, :]
    mask = offs < rem
    a1 = tl.load(absmax1 + pid * ROWS + rows, mask=rmask, other=0.0)
    a2 = tl.load(absmax2 + pid * ROWS + rows, mask=rmask, other=0.0)
    q1 = tl.load(state1 + base + offs, mask=mask, other=0).to(tl.int32)
    q2 = tl.load(state2 + base + offs, mask=mask, other=0).to(tl.int32)
    g = to_f32(tl.load(grad + base + offs, mask=mask, other=0.0), EXACT_BF16)
    m = (tl.load(code1 + q1) * a1[:, None]) * beta1 + g * one_minus_beta1
    v = (tl.load(code2 + q2) * a2[:, None]) * beta2 + (g * g) * one_minus_beta2
    m = tl.where(mask, m, 0.0)  # lanes past n: out of the absmax (their code byte 0 is not 0.0)
    v = tl.where(mask, v, 0.0)
    x = to_f32(tl.load(param + base + offs, mask=mask, other=0.0), EXACT_BF16) * decay
    denom = tl.math.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    x = x - step_size * tl.math.div_rn(m, denom)
    tl.store(param + base + offs, from_f32(x, param.dtype.element_ty, EXACT_BF16), mask=mask)
    q1, amax1 = _requantize(m, code1)
    q2, amax2 = _requantize(v, code2)
    tl.store(state1 + base + offs, q1.to(tl.uint8), mask=mask)
    tl.store(state2 + base + offs, q2.to(tl.uint8), mask=mask)
    tl.store(absmax1 + pid * ROWS + rows, amax1, mask=rmask)
    tl.store(absmax2 + pid * ROWS + rows, amax2, mask=rmask)


# ---- launchers ------------------------------------------------------------------------------
# Torch tensors (contiguous, on one device) and the host-computed hyperparameters in; param and
# states updated in place; nothing allocated. hyper is _formats.optim_hyper's tuple, the fields
# of ftk::OptimHyper in order: (lr, beta1, beta2, eps, decay, 1 − β1, 1 − β2, step_size,
# √(1 − β2^t)). n == 0 launches nothing.


def adamw_step(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, hyper: tuple
) -> None:
    """param (n fp32/fp16/bf16), grad (n, any of those), exp_avg and exp_avg_sq (n fp32)."""
    n = param.numel()
    if n == 0:
        return
    _lr, _b1, b2, eps, decay, omb1, omb2, step_size, bc2_sqrt = hyper
    with device_of(param):
        _adamw_kernel[(triton.cdiv(n, BLOCK_32BIT),)](
            param,
            grad,
            exp_avg,
            exp_avg_sq,
            n,
            b2,
            eps,
            decay,
            omb1,
            omb2,
            step_size,
            bc2_sqrt,
            BLOCK=BLOCK_32BIT,
            num_warps=WARPS_32BIT,
            **LAUNCH,
        )


def lion_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, hyper: tuple) -> None:
    """param (n fp32/fp16/bf16), grad (n, any of those), exp_avg (n fp32)."""
    n = param.numel()
    if n == 0:
        return
    lr, b1, b2, _eps, decay, omb1, omb2, _step_size, _bc2 = hyper
    with device_of(param):
        _lion_kernel[(triton.cdiv(n, BLOCK_32BIT),)](
            param, grad, exp_avg, n, lr, b1, b2, decay, omb1, omb2, BLOCK=BLOCK_32BIT, num_warps=WARPS_32BIT, **LAUNCH
        )


def adamw8bit_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor,
    absmax1: torch.Tensor,
    absmax2: torch.Tensor,
    code1: torch.Tensor,
    code2: torch.Tensor,
    hyper: tuple,
) -> None:
    """param (n fp32/fp16/bf16), grad (n, any of those), state1/state2 (uint8, n), absmax1/absmax2
    (fp32, ceil(n / 256)); code1 the signed, code2 the unsigned 256-entry map (fp32, sorted)."""
    n = param.numel()
    if n == 0:
        return
    _lr, b1, b2, eps, decay, omb1, omb2, step_size, bc2_sqrt = hyper
    grid = (triton.cdiv(n, ROWS_8BIT * OPTIM_BLOCK),)
    with device_of(param):
        _adamw8bit_kernel[grid](
            param,
            grad,
            state1,
            state2,
            absmax1,
            absmax2,
            code1,
            code2,
            n,
            b1,
            b2,
            eps,
            decay,
            omb1,
            omb2,
            step_size,
            bc2_sqrt,
            BS=OPTIM_BLOCK,
            ROWS=ROWS_8BIT,
            num_warps=WARPS_8BIT,
            **LAUNCH,
        )
