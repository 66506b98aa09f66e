# Blockwise 4-bit (NF4/FP4) and 8-bit quantization in Triton: the kernels, then their launchers.
#
# Format: csrc/include/ftk/quant.h (the contract) and backends/reference.py (the oracle);
# the bytes written here equal the reference's bytes.
#
# Algorithm. Every kernel is one pass over memory. A program owns one tile of TILE = ROWS * BS
# consecutive elements of the flattened tensor, i.e. ROWS whole quantization blocks (blocks
# never straddle programs, so no cross-program reduction exists), loaded as a [ROWS, BS]
# register tile:
#   quantize:   |x| max per row -> rcp = 1/absmax (one IEEE fp32 division per block)
#               -> xn = x * rcp -> index (NF4: 4-level compare/select tree over the 15 fp32
#               midpoints; FP4: 3-level tree over the 7 magnitude thresholds; 8-bit: the
#               bitsandbytes 7-step binary search over the 256-entry code, gathered from L1:
#               common.py's code8_index)
#               -> [ROWS, BS/2, 2] split into even/odd -> one byte per pair.
#   dequantize: bytes -> code gathered from a 16- or 256-entry fp32 table (64 B / 1 KiB,
#               L1-resident) -> * absmax -> cast once -> interleave hi/lo -> store.
# Tiles: 4096 elements per program for the 4-bit kernels and 8-bit dequantize (ROWS = 128 at
# blocksize 32 ... 1 at 4096), max(2048, BS) for 8-bit quantize, whose seven dependent gathers
# keep ~7 live registers per element. With 4 warps, dequantize_4bit reads 16 B of packed
# bytes per thread (one 128-bit load) and writes 32 outputs; quantize_4bit (8 warps) reads
# 16 inputs per thread. Memory-bound: per element 2.5 B moved (bf16 in or out, 0.5 B packed),
# ~6 elements/clock/SM at H100 bandwidth, so per-element work stays at ~20 integer/float ops
# (hence trees, not 15 compare-and-add; gathers, not 15-way select chains).
#
# Memory layout: input flattened row-major, block b = elements [b*BS, min((b+1)*BS, n));
# packed byte i = (q[2i] << 4) | q[2i+1]; absmax fp32[ceil(n/BS)] (or uint8 codes with double
# quantization, decoded per block inside dequantize_4bit). All tensors contiguous (the op
# layer guarantees it, 16-byte aligned, so loads vectorise).
#
# Invariants: BS is a power of two in 32..4096 (so TILE % BS == 0 and BS is even: the pad
# element of an odd n sits in the last element's block); the tile base is int64 (n may pass
# 2^31), in-tile offsets are int32 (< 4096); masked lanes load 0.0, which is exactly the pad
# element the format quantizes into the last low nibble (0 * rcp: index 7 for NF4, 0 for FP4,
# 0 when the block's absmax is 0 or NaN); every launch passes common.LAUNCH (enable_fp_fusion=
# False: see common.decode_absmax). Launchers allocate nothing: outputs and code
# tables come from the caller. quant_type is _formats.QUANT_TYPE_CODE's value (ftk::QuantType),
# turned into the kernel's constexpr NF4 by the launcher.

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._formats import NESTED_BLOCKSIZE, QUANT_TYPE_CODE
from .common import LAUNCH, code8_index, decode_absmax, device_of, from_f32, to_f32

TILE_4BIT = 4096  # elements per program: quantize_4bit, dequantize_4bit
TILE_8BIT_DEQUANT = 4096
TILE_8BIT_QUANT = 2048  # raised to the blocksize at 4096
WARPS_QUANT_4BIT = 8
WARPS_DEQUANT_4BIT = 4
WARPS_QUANT_8BIT = 8
WARPS_DEQUANT_8BIT = 4


# ---- per-element math (quant.h) -----------------------------------------------------------


@triton.jit
def _block_absmax(x):
    """max |x| over each row of x ([ROWS, BS] fp32), NaN-propagating.

    NOTE: tl.max on floats ignores NaN on the GPU (max.f32), but the format gives a block
    holding a NaN absmax NaN. |x| as an int32 bit pattern orders like |x| for every
    non-negative float and puts each NaN (> 0x7F800000) above +inf, so an integer max keeps
    NaN with no second reduction and stays on the fast reduction path of the interpreter.
    """
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.max(bits, axis=1).to(tl.float32, bitcast=True)


@triton.jit
def _nf4_index(x):
    """quantize_nf4: how many NF4 midpoints x is strictly above (NaN: 0).

    A 4-level tree over the same fp32 midpoints (sorted, so the count is the tree's path):
    4 compares and 11 selects instead of 15 compares and adds. NaN fails every compare.
    """
    b3 = x > 0.03979014977812767  # m7
    t = tl.where(b3, 0.3893125355243683, -0.33967941999435425)  # m11 | m3
    b2 = x > t
    t = tl.where(
        b3,
        tl.where(b2, 0.6427869200706482, 0.2035212516784668),  # m13 | m9
        tl.where(b2, -0.13791173696517944, -0.6106328964233398),  # m5 | m1
    )
    b1 = x > t
    t = tl.where(
        b3,
        tl.where(
            b2,
            tl.where(b1, 0.8614784479141235, 0.5016634464263916),  # m14 | m12
            tl.where(b1, 0.2920137643814087, 0.120255246758461),  # m10 | m8
        ),
        tl.where(
            b2,
            tl.where(b1, -0.045525018125772476, -0.23460739850997925),  # m6 | m4
            tl.where(b1, -0.4599952697753906, -0.8480963706970215),  # m2 | m0
        ),
    )
    b0 = x > t
    return (b3.to(tl.int32) << 3) | (b2.to(tl.int32) << 2) | (b1.to(tl.int32) << 1) | b0.to(tl.int32)


@triton.jit
def _fp4_index(x):
    """quantize_fp4: sign bit 8 for x < 0, magnitude rank k over bitsandbytes' thresholds
    (a 3-level tree: t3, then t1/t5, then t0/t2/t4/t6), bit pattern (0x32547610 >> 4k) & 15."""
    a = tl.abs(x)  # NaN stays NaN and ranks 0
    b2 = a > 0.29166667  # t3
    b1 = a > tl.where(b2, 0.583333, 0.0859375)  # t5 | t1
    t = tl.where(b2, tl.where(b1, 0.8333333, 0.4166667), tl.where(b1, 0.20833333, 0.00260417))
    b0 = a > t
    k = (b2.to(tl.int32) << 2) | (b1.to(tl.int32) << 1) | b0.to(tl.int32)
    sign = tl.where(x < 0.0, 8, 0)
    return sign | ((0x32547610 >> (k * 4)) & 0xF)


@triton.jit
def _load_blocks(A, n, BS: tl.constexpr, ROWS: tl.constexpr, EXACT_BF16: tl.constexpr):
    """This program's [ROWS, BS] fp32 tile (0.0 past n), its absmax and 1/absmax per row."""
    TILE: tl.constexpr = ROWS * BS
    pid = tl.program_id(0).to(tl.int64)
    rem = tl.minimum(n - pid * TILE, TILE).to(tl.int32)  # valid elements in this tile
    offs = tl.arange(0, ROWS)[:, None] * BS + tl.arange(0, BS)[None, :]
    x = to_f32(tl.load(A + pid * TILE + offs, mask=offs < rem, other=0.0), EXACT_BF16)
    absmax = _block_absmax(x)
    # NOTE: an IEEE division (div_rn), once per block: Triton's `/` on fp32 may lower to an
    # approximate division on the GPU, and x * (1/absmax) must equal the reference's bits.
    # absmax 0 gives rcp inf and xn NaN (index 0), as the reference does.
    rcp = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), absmax)
    return x * rcp[:, None], absmax, offs, rem


# ---- kernels --------------------------------------------------------------------------------


@triton.jit
def _quantize_4bit_kernel(
    A, packed, absmax, n, nbytes, BS: tl.constexpr, ROWS: tl.constexpr, NF4: tl.constexpr, EXACT_BF16: tl.constexpr
):
    TILE: tl.constexpr = ROWS * BS
    HALF: tl.constexpr = BS // 2
    pid = tl.program_id(0).to(tl.int64)
    xn, amax, offs, rem = _load_blocks(A, n, BS, ROWS, EXACT_BF16)
    if NF4:
        q = _nf4_index(xn)
    else:
        q = _fp4_index(xn)
    hi, lo = tl.split(tl.reshape(q, [ROWS, HALF, 2]))  # even element -> high nibble
    byte = ((hi << 4) | lo).to(tl.uint8)
    rows = tl.arange(0, ROWS)
    boffs = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    # nbytes = (n + 1) // 2 keeps the byte whose low nibble is the pad of an odd n (a kernel
    # argument, not computed here, so Triton sees its divisibility by 16 and vectorises).
    rem_b = tl.minimum(nbytes - pid * (TILE // 2), TILE // 2).to(tl.int32)
    tl.store(packed + pid * (TILE // 2) + boffs, byte, mask=boffs < rem_b)
    tl.store(absmax + pid * ROWS + rows, amax, mask=rows * BS < rem)


@triton.jit
def _dequantize_4bit_kernel(
    packed,
    absmax,
    nested_absmax,
    nested_code,
    offset,
    code,
    out,
    n,
    nbytes,
    BS: tl.constexpr,
    ROWS: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    NESTED_BS: tl.constexpr,
    EXACT_BF16: tl.constexpr,
):
    TILE: tl.constexpr = ROWS * BS
    HALF: tl.constexpr = BS // 2
    pid = tl.program_id(0).to(tl.int64)
    rem = tl.minimum(n - pid * TILE, TILE).to(tl.int32)
    rows = tl.arange(0, ROWS)
    rmask = rows * BS < rem
    blk = pid * ROWS + rows
    amax = decode_absmax(absmax, nested_absmax, nested_code, offset, blk, rmask, DOUBLE_QUANT, NESTED_BS)
    boffs = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    rem_b = tl.minimum(nbytes - pid * (TILE // 2), TILE // 2).to(tl.int32)  # nbytes: see quantize
    b = tl.load(packed + pid * (TILE // 2) + boffs, mask=boffs < rem_b, other=0).to(tl.int32)
    ty = out.dtype.element_ty
    hi = from_f32(tl.load(code + (b >> 4)) * amax[:, None], ty, EXACT_BF16)
    lo = from_f32(tl.load(code + (b & 0xF)) * amax[:, None], ty, EXACT_BF16)
    offs = rows[:, None] * BS + tl.arange(0, BS)[None, :]
    tl.store(out + pid * TILE + offs, tl.interleave(hi, lo), mask=offs < rem)


@triton.jit
def _quantize_8bit_kernel(A, code, out, absmax, n, BS: tl.constexpr, ROWS: tl.constexpr, EXACT_BF16: tl.constexpr):
    TILE: tl.constexpr = ROWS * BS
    pid = tl.program_id(0).to(tl.int64)
    xn, amax, offs, rem = _load_blocks(A, n, BS, ROWS, EXACT_BF16)
    q = code8_index(code, xn)
    tl.store(out + pid * TILE + offs, q.to(tl.uint8), mask=offs < rem)
    rows = tl.arange(0, ROWS)
    tl.store(absmax + pid * ROWS + rows, amax, mask=rows * BS < rem)


@triton.jit
def _dequantize_8bit_kernel(A, absmax, code, out, n, BS: tl.constexpr, ROWS: tl.constexpr, EXACT_BF16: tl.constexpr):
    TILE: tl.constexpr = ROWS * BS
    pid = tl.program_id(0).to(tl.int64)
    rem = tl.minimum(n - pid * TILE, TILE).to(tl.int32)
    rows = tl.arange(0, ROWS)
    amax = tl.load(absmax + pid * ROWS + rows, mask=rows * BS < rem, other=0.0)
    offs = rows[:, None] * BS + tl.arange(0, BS)[None, :]
    mask = offs < rem
    a = tl.load(A + pid * TILE + offs, mask=mask, other=0).to(tl.int32)
    y = from_f32(tl.load(code + a) * amax[:, None], out.dtype.element_ty, EXACT_BF16)
    tl.store(out + pid * TILE + offs, y, mask=mask)


# ---- launchers ------------------------------------------------------------------------------
# Torch tensors (contiguous, on one device) and plain ints in; results written into the
# caller's tensors; nothing allocated. Triton launches on the current stream of the tensors'
# device (common.device_of). n == 0 launches nothing.


def _grid(n: int, blocksize: int, tile: int) -> tuple[int, tuple[int]]:
    """(ROWS, grid): ROWS whole blocks per program, enough programs to cover n elements."""
    rows = max(1, tile // blocksize)
    return rows, (triton.cdiv(n, rows * blocksize),)


def quantize_4bit(A: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: int) -> None:
    """A (n fp32/fp16/bf16) -> packed (uint8, (n + 1) // 2), absmax (fp32, ceil(n / blocksize)).
    quant_type: _formats.QUANT_TYPE_CODE["nf4"] or ["fp4"] (ftk::QuantType)."""
    if quant_type not in QUANT_TYPE_CODE.values():
        raise ValueError(f"quant_type must be one of {QUANT_TYPE_CODE} (ftk::QuantType), got {quant_type!r}")
    n = A.numel()
    if n == 0:
        return
    rows, grid = _grid(n, blocksize, TILE_4BIT)
    with device_of(A):
        _quantize_4bit_kernel[grid](
            A,
            packed,
            absmax,
            n,
            (n + 1) // 2,
            BS=blocksize,
            ROWS=rows,
            NF4=quant_type == QUANT_TYPE_CODE["nf4"],
            num_warps=WARPS_QUANT_4BIT,
            **LAUNCH,
        )


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    out: torch.Tensor,
    blocksize: int,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    nested_blocksize: int = NESTED_BLOCKSIZE,
) -> None:
    """packed (uint8, (n + 1) // 2) -> out (n elements of its dtype). code: the 16-entry fp32
    table indexed by nibble. absmax: fp32 per block; or, with nested_absmax, nested_code (256
    fp32) and offset (1 fp32) all given, one uint8 code per block (double quantization)."""
    n = out.numel()
    if n == 0:
        return
    double_quant = nested_absmax is not None
    if not double_quant:  # the plain variant never reads these pointers
        nested_absmax = nested_code = offset = absmax
    rows, grid = _grid(n, blocksize, TILE_4BIT)
    with device_of(out):
        _dequantize_4bit_kernel[grid](
            packed,
            absmax,
            nested_absmax,
            nested_code,
            offset,
            code,
            out,
            n,
            (n + 1) // 2,
            BS=blocksize,
            ROWS=rows,
            DOUBLE_QUANT=double_quant,
            NESTED_BS=nested_blocksize,
            num_warps=WARPS_DEQUANT_4BIT,
            **LAUNCH,
        )


def quantize_blockwise(
    A: torch.Tensor, code: torch.Tensor, out: torch.Tensor, absmax: torch.Tensor, blocksize: int
) -> None:
    """A (n fp32/fp16/bf16) -> out (uint8, n), absmax (fp32, ceil(n / blocksize)); code: 256
    fp32, sorted ascending."""
    n = A.numel()
    if n == 0:
        return
    rows, grid = _grid(n, blocksize, TILE_8BIT_QUANT)
    with device_of(A):
        _quantize_8bit_kernel[grid](
            A, code, out, absmax, n, BS=blocksize, ROWS=rows, num_warps=WARPS_QUANT_8BIT, **LAUNCH
        )


def dequantize_blockwise(
    A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, out: torch.Tensor, blocksize: int
) -> None:
    """A (uint8, n) -> out (n elements of its dtype): code[A] * absmax[block], cast once."""
    n = A.numel()
    if n == 0:
        return
    rows, grid = _grid(n, blocksize, TILE_8BIT_DEQUANT)
    with device_of(A):
        _dequantize_8bit_kernel[grid](
            A, absmax, code, out, n, BS=blocksize, ROWS=rows, num_warps=WARPS_DEQUANT_8BIT, **LAUNCH
        )
