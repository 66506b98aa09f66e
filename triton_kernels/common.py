# What the Triton kernels share: launch options, dtype conversions, the 8-bit code search and
# the dropout hash. nf4.py, lora.py, optim.py and reft.py import these helpers from here and
# nothing from one another (as csrc's kernels share csrc/include/ftk/common.h).
#
# Launching.
#   * INTERPRETED is True when TRITON_INTERPRET=1 was set as this module was imported: numpy
#     then runs the kernels on the CPU (how the tests run without a GPU).
#   * LAUNCH = {EXACT_BF16: INTERPRETED, enable_fp_fusion: False}: the options of every launch
#     whose result is specified bit for bit (nf4.py, lora.py, optim.py). No FMA contraction: the
#     double-quant absmax code8[q] * nested_absmax + offset and AdamW's m*b1 + g*(1 - b1) are
#     each a rounded product and a rounded sum, as bitsandbytes, csrc/cpu and the reference
#     compute them (an FMA rounds once and changes the low bit for ~1 block in a few). reft.py,
#     whose math is not specified bit for bit, passes EXACT_BF16=INTERPRETED and keeps fusion.
#   * device_of(t) is the launch context: t's CUDA device made current (Triton launches on the
#     current stream of the current device); under the interpreter, numpy quiet about the 1/0
#     and 0*inf that an all-zero or masked-off block defines (index 0, as the format says).
#   * Launchers take torch tensors (contiguous, on one device) and plain numbers, write into the
#     caller's tensors and allocate nothing; a launch of 0 elements is skipped. Grids are 1-D or
#     2-D tuples of triton.cdiv(extent, tile); program bases are int64 (numel may pass 2^31),
#     in-tile offsets int32 (tiles hold at most 4096 elements).
#
# fp32 conversions. Every kernel computes in fp32 and rounds once on the way out.
#   * to_f32(x, EXACT_BF16): fp32/fp16/bf16 -> fp32, exact.
#   * from_f32(y, ty, EXACT_BF16): fp32 -> ty, round to nearest even; a bf16 NaN becomes 0xFFFF.
#   NOTE: Triton 3.9's interpreter converts bf16 <-> fp32 with its own bit code, which mangles
#   bf16 subnormals and truncates instead of rounding to nearest even. Under the interpreter
#   (EXACT_BF16) the conversions are done on the bits, as the hardware does them: widening is
#   u16 << 16; rounding is (u + 0x7FFF + ((u >> 16) & 1)) >> 16, NaN -> 0xFFFF (torch's CPU
#   conversion). On the GPU the native conversions are exact / round to nearest even already.
#
# 8-bit code search. code8_index(code, x) is bitsandbytes' dQuantize<0> (quant.h's
# quantize_8bit): a 7-step binary search over the sorted 256-entry fp32 code (pivots 127, then
# +/- 64, 32, ..., 1; 7 dependent gathers, L1-resident: 1 KiB), then the nearer of the two
# bracketing entries by the fp32 midpoint, ties to the pivot. nf4.py's quantize_blockwise and
# optim.py's 8-bit AdamW requantization use it.
#
# Dropout hash (csrc/include/ftk/dropout.h; lora.py's GradInput epilogue and dropout kernel,
# reft.py's edit): with mix32 = lowbias32 (h ^= h >> 16; h *= 0x7FEB352D; h ^= h >> 15;
# h *= 0x846CA68B; h ^= h >> 16) on uint32,
#   key         = mix32(lo32(seed) ^ mix32(hi32(seed)))        (dropout_key, once a launch)
#   row_key     = mix32(key ^ lo32(row))                        (row: the flat int64 row index)
#   keep(r, c)  = (mix32(row_key ^ mix32(lo32(c))) >> 8) >= floor(p * 2^24)
# so 24 bits of hash meet a 24-bit threshold (_formats.dropout_threshold), and a kept value is
# multiplied by fp32(1 / (1 - p)) (_formats.dropout_scale) in fp32 by the caller.
#   * The hash is uint32 arithmetic with wrap-around. Triton types a literal in [2^31, 2^32)
#     (0x846CA68B) as uint32 and one below 2^31 (0x7FEB352D) as int32, and uint32 op int32
#     promotes to uint32 (C rules): the frontend, shared by the compiler and the interpreter,
#     types the whole mix as uint32, so the products wrap modulo 2^32 (numpy uint32
#     interpreted; mul.lo.s32 in the sm_90a PTX, the same low word, with 0x846CA68B as the
#     immediate -2073254261) and `>>` is a logical shift (shr.u32, no shr.s32).
#   * The seed words and the threshold cross as int32 bit patterns (seed_words, int32_bits): an
#     int argument in [2^31, 2^32) would be i64 compiled but uint32 interpreted. The kernels
#     bitcast them back to uint32. Kernels taking them mark them do_not_specialize: a seed
#     equal to 1 or divisible by 16 would otherwise compile another variant of the kernel.

from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton
import triton.language as tl

# ---- fp32 conversions -----------------------------------------------------------------------


@triton.jit
def to_f32(x, EXACT_BF16: tl.constexpr):
    """Widen a loaded fp32/fp16/bf16 tile to fp32 (exact; see the header's NOTE)."""
    if EXACT_BF16 and x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def from_f32(y, ty: tl.constexpr, EXACT_BF16: tl.constexpr):
    """Round an fp32 tile once to the output dtype (nearest even; see the header's NOTE)."""
    if EXACT_BF16 and ty == tl.bfloat16:
        u = y.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(y != y, 0xFFFF, r)  # NaN: torch's CPU conversion gives 0xFFFF
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(ty)


# ---- 4-bit block scales (quant.h) -----------------------------------------------------------


@triton.jit
def decode_absmax(
    absmax, nested_absmax, nested_code, offset, b, mask, DOUBLE_QUANT: tl.constexpr, NESTED_BS: tl.constexpr
):
    """The fp32 absmax of blocks b (masked lanes: 0, or with double quantization the offset).
    Double-quantized: code8[q] * nested_absmax[b / NESTED_BS] + offset with the product and the
    sum each rounded to fp32, as bitsandbytes and the reference: a fused multiply-add rounds
    once and changes the low bit of absmax for ~1 block in a few, which then scales every
    element of the block, so every launch passes LAUNCH (enable_fp_fusion=False)."""
    if DOUBLE_QUANT:
        q = tl.load(absmax + b, mask=mask, other=0).to(tl.int32)
        a = tl.load(nested_code + q) * tl.load(nested_absmax + b // NESTED_BS, mask=mask, other=0.0)
        return a + tl.load(offset)
    else:
        return tl.load(absmax + b, mask=mask, other=0.0)


# ---- 8-bit code search (quant.h) ------------------------------------------------------------


@triton.jit
def code8_index(code, x):
    """quantize_8bit: bitsandbytes' dQuantize<0> search over the sorted 256-entry code, step
    for step (the same fp32 compares and midpoints), vectorised with selects."""
    pivot = tl.full(x.shape, 127, tl.int32)
    upper_pivot = tl.full(x.shape, 255, tl.int32)
    lower_pivot = tl.zeros(x.shape, tl.int32)
    lower = tl.full(x.shape, -1.0, tl.float32)
    upper = tl.full(x.shape, 1.0, tl.float32)
    val = tl.broadcast_to(tl.load(code + 127), x.shape)
    for i in tl.static_range(7):
        gt = x > val
        lower_pivot = tl.where(gt, pivot, lower_pivot)
        lower = tl.where(gt, val, lower)
        upper_pivot = tl.where(gt, upper_pivot, pivot)
        upper = tl.where(gt, upper, val)
        pivot = tl.where(gt, pivot + (64 >> i), pivot - (64 >> i))
        val = tl.load(code + pivot)  # pivot stays in [0, 254]: no mask needed
    upper = tl.where(upper_pivot == 255, tl.load(code + 255), upper)
    lower = tl.where(lower_pivot == 0, tl.load(code), lower)
    up = tl.where(x > (upper + val) * 0.5, upper_pivot, pivot)
    down = tl.where(x < (lower + val) * 0.5, lower_pivot, pivot)
    return tl.where(x > val, up, down)


# ---- dropout hash (dropout.h) ---------------------------------------------------------------


@triton.jit
def mix32(h):
    """lowbias32 on a uint32 tensor: products and shifts wrap modulo 2^32 (see the header)."""
    h ^= h >> 16
    h = h * 0x7FEB352D
    h ^= h >> 15
    h = h * 0x846CA68B
    h ^= h >> 16
    return h


@triton.jit
def dropout_key(seed_lo, seed_hi):
    """key = mix32(lo32(seed) ^ mix32(hi32(seed))); the words arrive as int32 bit patterns."""
    return mix32(seed_lo.to(tl.uint32, bitcast=True) ^ mix32(seed_hi.to(tl.uint32, bitcast=True)))


@triton.jit
def dropout_keep(key, rows, cols, threshold):
    """[len(rows), len(cols)] keep mask: (mix32(row_key ^ mix32(lo32(col))) >> 8) >= threshold,
    row_key = mix32(key ^ lo32(row)); threshold = floor(p * 2^24) as an int32 bit pattern."""
    row_key = mix32(key ^ rows.to(tl.uint32))  # lo32(row): truncation of the int64 index
    col_hash = mix32(cols.to(tl.uint32))
    h = mix32(row_key[:, None] ^ col_hash[None, :])
    return (h >> 8) >= threshold.to(tl.uint32, bitcast=True)


def int32_bits(v: int) -> int:
    """The low 32 bits of v as a signed int32 value (an i32 kernel argument either way)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= (1 << 31) else v


def seed_words(seed: int) -> tuple[int, int]:
    """(lo32(seed), hi32(seed)) as int32 bit patterns, the kernels' seed_lo and seed_hi."""
    return int32_bits(seed), int32_bits(seed >> 32)


# ---- launching ------------------------------------------------------------------------------

INTERPRETED = type(to_f32).__name__ == "InterpretedFunction"

LAUNCH = dict(EXACT_BF16=INTERPRETED, enable_fp_fusion=False)


def device_of(t: torch.Tensor) -> contextlib.ExitStack:
    """The launch context: t's CUDA device current; under the interpreter, numpy quiet about
    the 1/0 and 0*inf that an all-zero (or masked-off) block defines (index 0, as specified)."""
    stack = contextlib.ExitStack()
    if t.is_cuda:
        stack.enter_context(torch.cuda.device(t.device))
    if INTERPRETED:
        stack.enter_context(np.errstate(divide="ignore", over="ignore", invalid="ignore"))
    return stack
