# Fused LoRA over a 4-bit (NF4/FP4) weight in Triton: the dropout kernel and the matmul
# kernel, then their launchers.
#
# Contract: csrc/include/ftk/lora.h (math, dropout hash, modes) and backends/reference.py (the
# oracle); backends/_lora.py composes the op from these two kernels and torch's rank-r GEMMs.
#
# Algorithm. One kernel shape serves both big products (FORWARD, a constexpr: the launcher's
# mode == _formats.LORA_FORWARD, ftk::LoraMatmulMode):
#   Forward   (LORA_FORWARD):    out (M x N) = X (M x K) · deq(W)ᵀ + bias + s · L (M x r) · Bᵀ
#   GradInput (LORA_GRAD_INPUT): out (M x K) = X (M x N) · deq(W)    + drop(s · L (M x r) · A)
# A program owns one BLOCK_M x BLOCK_O output tile (O = N forward, K backward) and loops over
# the reduction (K forward, N backward) in steps of BLOCK_RED. Per step it loads an X tile and
# the packed bytes of the matching W tile, decodes the nibbles, gathers the 16-entry code,
# multiplies by the block absmax (decoded from its 8-bit code in-register with double
# quantization), rounds to X's dtype and feeds tl.dot, accumulating in fp32. W is never
# dequantized to memory. The rank-r term is computed first, as tl.dot of an L tile
# (BLOCK_M x BLOCK_R fp32) with an R tile, scaled by s (and, GradInput, masked by the dropout
# hash of (row m, column k) and scaled by 1/(1-p)), and it is the accumulator's initial value,
# so no second accumulator is live during the main loop. Forward adds the bias last, and the
# tile is rounded once to X's dtype.
#
# Memory layout: every tensor contiguous, row-major (the op layer makes them dense). W (N x K)
# is flattened: element (n, k) is e = n*K + k, its nibble the high one of packed[e // 2] when e
# is even, the low one when odd; its block is e // BS, and blocks run across rows whenever
# K % BS != 0 (K may be odd). L is M x r fp32; R is B (N x r) forward, A (r x K) backward.
#
# Invariants:
#   * The W tile a program decodes is ROWS x COLS with COLS <= BS (COLS = BLOCK_RED forward,
#     BLOCK_O backward, both powers of two), so one row of it touches at most two quantization
#     blocks: two absmax values per row and a select per element. With K % BS == 0 (ALIGNED)
#     it touches exactly one, and the select disappears.
#   * EVEN_K (K even): every row starts on a byte, so the tile is loaded as ROWS x COLS/2
#     bytes (vectorised) and split into high/low nibbles; odd K loads the byte of each element.
#   * Every element outside (M, N, K) is masked: X loads 0, and the decoded W tile is forced
#     to 0 (a neighbouring block's absmax may be inf/NaN, and 0 * NaN would leak).
#   * Row offsets (m*K, n*K, ...) are int64: numel may pass 2^31; in-tile offsets are int32.
#   * r is padded with masks to BLOCK_R = next power of two >= 16, taken in chunks of at most
#     LORA_R_CHUNK (r <= 256), so the L and R tiles stay small in registers / shared memory.
#   * Dropout: common.py's hash of (row m, column k) of the M x K output (dropout_key once a
#     program, dropout_keep on the BLOCK_M x BLOCK_O tile), uint32 arithmetic with wrap-around;
#     the seed words and threshold cross as int32 bit patterns (seed_words, int32_bits).
#   * Precision: fp32 X uses tl.dot(input_precision="ieee") (fp32-accurate FMAs); fp16/bf16 X
#     use the tensor cores on (X, deq(W) rounded to X's dtype), fp32 accumulate. The rank-r
#     dot of 16-bit X runs in tf32 (L keeps fp32's range, where fp16 could overflow, and 3
#     more mantissa bits than bf16; a 16-bit R is exact in tf32); with fp32 X it is ieee. It is
#     r/K of the FLOPs (0.4% at r = 16, K = 4096), so the tf32 rate costs ~1%.
#   * Launches pass common.LAUNCH, enable_fp_fusion=False (the double-quant absmax is a product
#     then a sum, each rounded: common.decode_absmax).
#
# Tiles (_config). No GPU was at hand: sizes were chosen so that ptxas (sm_90a, compiled
# without a device) reports no register spills, and their speed is to be re-measured on an H100.
#   GEMM, fp16/bf16: BLOCK_M = 128, BLOCK_O = 128 (64 at odd K, whose per-element byte loads
#     spill at 128; backward at most BS), BLOCK_RED = 32, 8 warps, 4 stages; the main dots
#     lower to wgmma on sm_90. Dequantizing a W element costs ~8 ALU ops and one gather, once
#     per program, shared by its BLOCK_M rows: ~8/128 = 0.06 ALU clk per element per SM against
#     128/2048 = 0.06 tensor clk (an H100 SM: 128 ALU lanes, ~2048 dense bf16 FMA/clk), about
#     balanced. Fewer rows make the dequantization the bottleneck; more (or BLOCK_RED = 64)
#     spill, the 128 x 128 fp32 accumulator being 64 registers per thread already.
#   GEMM, fp32: 64 x 64, BLOCK_RED 16, 8 warps (the ieee dot runs on FMAs; registers limit it).
#   Decode (M <= DECODE_MAX_M): see DECODE_MAX_M.

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._formats import LORA_FORWARD, LORA_GRAD_INPUT
from .common import (
    LAUNCH,
    decode_absmax,
    device_of,
    dropout_keep,
    dropout_key,
    from_f32,
    int32_bits,
    seed_words,
    to_f32,
)

# Decode path threshold. The op reads N*K/2 bytes of W (plus 1/32 to 1/8 of that in absmax) and
# does 2*M*N*K FLOPs: 4*M FLOP per byte of W. An H100 streams ~3.35 TB/s and does ~990 bf16
# TFLOP/s, a ridge at ~295 FLOP/B, so for small M the op is bound by reading W once (8 MiB,
# ~2.5 us at K = N = 4096) and the tile shape only has to keep the tensor work well under that.
# A GEMM tile pads M to BLOCK_M: at 128 rows the tensor work is 4*128 = 512 FLOP/B, ~1.7x the
# memory time (plus dequantizing each W tile once per M-tile); padded only to 16, the height
# of one mma.m16n8k16 fragment, it is 64 FLOP/B, ~22% of the memory time, so W streams at
# bandwidth. So for M <= 16 the decode configuration holds all M rows in one 16-row tile
# (grid_m = 1: every packed byte is read and decoded by exactly one program), splits the
# programs over the output columns only (narrow BLOCK_O: N/16 = 256 programs at N = 4096
# forward, K/32 = 128 backward) and loops over the reduction. Above 16 rows a second fragment
# is needed anyway and the GEMM tiles (128 rows) amortise the dequantization over more rows.
# NOTE: at full bandwidth an H100 receives 6.7e12 weights/s and has ~3e13 ALU lane-ops/s
# (132 SMs x 128 x 1.75 GHz; half that for integer ops), ~4 ops per weight, while decoding
# one costs ~8 (shift/mask, code gather, absmax select, multiply, mask, cast). So the decode
# path may be ALU-bound below the bandwidth; a 256-entry table of (high, low) value pairs
# indexed by the byte would halve that work.
# TODO(gpu): re-measure the threshold and the decode tiles on an H100 (benchmarks/bench_lora).
DECODE_MAX_M = 16
# The rank-r dot runs in chunks of at most this many columns of L: with 64, the fp32 (FMA) dot
# spilled hundreds of bytes and the tf32 one took 160 KiB of shared memory (sm_90a).
LORA_R_CHUNK = {torch.float32: 16, torch.float16: 32, torch.bfloat16: 32}


# ---- dropout (lora.h; the hash is common.py's) -----------------------------------------------


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])
def _lora_dropout_kernel(
    inp,
    out,
    rows,
    cols,
    seed_lo,
    seed_hi,
    threshold,
    scale,
    ENABLED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    EXACT_BF16: tl.constexpr,
):
    rr = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rr < rows)[:, None] & (rc < cols)[None, :]
    offs = rr[:, None] * cols + rc[None, :]
    x = to_f32(tl.load(inp + offs, mask=mask, other=0.0), EXACT_BF16)
    if ENABLED:
        keep = dropout_keep(dropout_key(seed_lo, seed_hi), rr, rc, threshold)
        x = tl.where(keep, x * scale, 0.0)  # fp32 product, as the reference
    tl.store(out + offs, x, mask=mask)


# ---- the 4-bit weight tile --------------------------------------------------------------------


@triton.jit
def _w_tile(
    packed,
    absmax,
    nested_absmax,
    nested_code,
    offset,
    code,
    rows,
    col0,
    N,
    K,
    nblocks,
    COLS: tl.constexpr,
    BS: tl.constexpr,
    NESTED_BS: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    EVEN_K: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """deq(W)[rows, col0:col0+COLS] in fp32 ([len(rows), COLS]), 0 outside N x K. COLS <= BS."""
    HALF: tl.constexpr = COLS // 2
    rmask = rows < N
    kk = tl.arange(0, COLS)
    cmask = (col0 + kk) < K
    first = rows.to(tl.int64) * K + col0  # flat index of each row's first element
    b0 = first // BS
    a0 = decode_absmax(absmax, nested_absmax, nested_code, offset, b0, rmask, DOUBLE_QUANT, NESTED_BS)
    if ALIGNED:  # K % BS == 0 and COLS | BS: the row segment is inside block b0
        amax = a0[:, None]
    else:  # the segment may cross into block b0 + 1 (COLS <= BS: never further)
        a1 = decode_absmax(
            absmax, nested_absmax, nested_code, offset, b0 + 1, rmask & (b0 + 1 < nblocks), DOUBLE_QUANT, NESTED_BS
        )
        local = (first % BS).to(tl.int32)[:, None] + kk[None, :]
        amax = tl.where(local >= BS, a1[:, None], a0[:, None])
    if EVEN_K:  # first is even: byte j of the row segment holds columns 2j (high) and 2j+1 (low)
        j = tl.arange(0, HALF)
        bmask = rmask[:, None] & ((col0 + 2 * j) < K)[None, :]
        byte = tl.load(packed + (first >> 1)[:, None] + j[None, :], mask=bmask, other=0).to(tl.int32)
        q = tl.interleave(tl.load(code + (byte >> 4)), tl.load(code + (byte & 0xF)))
    else:  # element e = first + kk: byte e >> 1, high nibble when e is even
        par = (first & 1).to(tl.int32)[:, None] + kk[None, :]
        byte = tl.load(packed + (first >> 1)[:, None] + (par >> 1), mask=rmask[:, None] & cmask[None, :], other=0).to(
            tl.int32
        )
        q = tl.load(code + ((byte >> ((1 - (par & 1)) * 4)) & 0xF))
    return tl.where(rmask[:, None] & cmask[None, :], q * amax, 0.0)


@triton.jit
def _dot(x, w, acc, EXACT_BF16: tl.constexpr):
    """acc += x · w, w an fp32 tile rounded here to x's dtype (the GEMM's inputs)."""
    if x.dtype == tl.float32:
        return tl.dot(x, w, acc, input_precision="ieee")
    elif EXACT_BF16 and x.dtype == tl.bfloat16:
        # NOTE: the interpreter's tl.dot multiplies bf16 tiles as their uint16 bit patterns;
        # bf16 -> fp32 is exact, so the fp32 dot of the widened tiles is the tensor-core product.
        wq = to_f32(from_f32(w, tl.bfloat16, EXACT_BF16), EXACT_BF16)
        return tl.dot(to_f32(x, EXACT_BF16), wq, acc, input_precision="ieee")
    else:
        return tl.dot(x, w.to(x.dtype), acc)


# ---- the matmul -----------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])
def _lora_matmul_kernel(
    X,
    packed,
    absmax,
    nested_absmax,
    nested_code,
    offset,
    code,
    bias,
    L,
    R,
    out,
    M,
    N,
    K,
    r,
    nblocks,
    scaling,
    seed_lo,
    seed_hi,
    threshold,
    drop_scale,
    FORWARD: tl.constexpr,
    BS: tl.constexpr,
    NESTED_BS: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    EVEN_K: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_RED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    LORA_PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr,
    EXACT_BF16: tl.constexpr,
):
    if FORWARD:
        OUT = N
        RED = K
    else:
        OUT = K
        RED = N
    # Grouped program order: GROUP_M row tiles share each W column tile while it is in L2.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_o = tl.cdiv(OUT, BLOCK_O)
    width = GROUP_M * grid_o
    first_m = (pid // width) * GROUP_M
    group_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    pid_o = (pid % width) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ro = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mmask = rm < M
    omask = ro < OUT
    rm64 = rm.to(tl.int64)

    # Rank-r term first: it is the accumulator's initial value.
    lora = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    for r0 in range(0, r, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        rmask = rr < r
        l_tile = tl.load(L + rm64[:, None] * r + rr[None, :], mask=mmask[:, None] & rmask[None, :], other=0.0)
        if FORWARD:  # B (N x r): rows ro, transposed to BLOCK_R x BLOCK_O
            rt = tl.load(
                R + ro.to(tl.int64)[:, None] * r + rr[None, :], mask=omask[:, None] & rmask[None, :], other=0.0
            )
            rt = tl.trans(to_f32(rt, EXACT_BF16))
        else:  # A (r x K): columns ro
            rt = tl.load(
                R + rr.to(tl.int64)[:, None] * K + ro[None, :], mask=rmask[:, None] & omask[None, :], other=0.0
            )
            rt = to_f32(rt, EXACT_BF16)
        lora = tl.dot(l_tile, rt, lora, input_precision=LORA_PRECISION)
    acc = lora * scaling
    if not FORWARD:
        if DROPOUT:  # drop(s · L·A) at (row m, column k) of the M x K output
            keep = dropout_keep(dropout_key(seed_lo, seed_hi), rm64, ro, threshold)
            acc = tl.where(keep, acc * drop_scale, 0.0)

    # Main loop over the reduction dimension; W decoded tile by tile.
    x_rows = X + rm64[:, None] * RED
    for red0 in range(0, RED, BLOCK_RED):
        rk = red0 + tl.arange(0, BLOCK_RED)
        x = tl.load(x_rows + rk[None, :], mask=mmask[:, None] & (rk < RED)[None, :], other=0.0)
        if FORWARD:  # W rows ro (output), columns red0.. (reduction): use its transpose
            w = _w_tile(
                packed,
                absmax,
                nested_absmax,
                nested_code,
                offset,
                code,
                ro,
                red0,
                N,
                K,
                nblocks,
                BLOCK_RED,
                BS,
                NESTED_BS,
                DOUBLE_QUANT,
                EVEN_K,
                ALIGNED,
            )
            acc = _dot(x, tl.trans(w), acc, EXACT_BF16)
        else:  # W rows red0.. (reduction), columns of this output tile
            w = _w_tile(
                packed,
                absmax,
                nested_absmax,
                nested_code,
                offset,
                code,
                rk,
                pid_o * BLOCK_O,
                N,
                K,
                nblocks,
                BLOCK_O,
                BS,
                NESTED_BS,
                DOUBLE_QUANT,
                EVEN_K,
                ALIGNED,
            )
            acc = _dot(x, w, acc, EXACT_BF16)

    if FORWARD:
        if HAS_BIAS:
            acc += to_f32(tl.load(bias + ro, mask=omask, other=0.0), EXACT_BF16)[None, :]
    y = from_f32(acc, out.dtype.element_ty, EXACT_BF16)
    tl.store(out + rm64[:, None] * OUT + ro[None, :], y, mask=mmask[:, None] & omask[None, :])


# ---- launchers ------------------------------------------------------------------------------
# Torch tensors (contiguous, on one device) and plain numbers in; results written into the
# caller's tensors; nothing allocated. Launches go on the current stream of the tensors' device.

DROPOUT_TILE = (16, 256)  # rows x cols per program: 4096 elements, 16 per thread (memory-bound)
WARPS_DROPOUT = 8  # 78 registers on sm_90a; at 4 warps (32 hashes per thread) 118


def lora_dropout(t: torch.Tensor, out: torch.Tensor, enabled: bool, seed: int, threshold: int, scale: float) -> None:
    """out (rows x cols fp32) = drop(t), t 2-D fp32/fp16/bf16; with enabled False, t as fp32.
    (enabled, seed, threshold, scale) as _formats.dropout_args gives them (ftk::Dropout)."""
    rows, cols = t.shape
    if rows * cols == 0:
        return
    lo, hi = seed_words(seed)
    grid = (triton.cdiv(rows, DROPOUT_TILE[0]), triton.cdiv(cols, DROPOUT_TILE[1]))
    with device_of(t):
        _lora_dropout_kernel[grid](
            t,
            out,
            rows,
            cols,
            lo,
            hi,
            int32_bits(threshold),
            float(scale),
            ENABLED=bool(enabled),
            BLOCK_R=DROPOUT_TILE[0],
            BLOCK_C=DROPOUT_TILE[1],
            num_warps=WARPS_DROPOUT,
            **LAUNCH,
        )


def _config(mode: int, M: int, K: int, dtype: torch.dtype, blocksize: int) -> dict:
    """Tile sizes (see the header and DECODE_MAX_M). The W tile's column width (BLOCK_RED
    forward, BLOCK_O backward) is capped at the blocksize (the two-block invariant)."""
    if M <= DECODE_MAX_M:
        red = 32 if dtype == torch.float32 else 64  # the fp32 (FMA) dot spills at 64
        if mode == LORA_FORWARD:  # a program per 16 W rows, looping over K
            c = dict(BLOCK_M=16, BLOCK_O=16, BLOCK_RED=min(red, blocksize))
        else:  # a program per 32 columns of W, looping over N
            c = dict(BLOCK_M=16, BLOCK_O=min(32, blocksize), BLOCK_RED=red)
        c.update(num_warps=4, num_stages=4)
    elif dtype == torch.float32:
        if mode == LORA_FORWARD:
            c = dict(BLOCK_M=64, BLOCK_O=64, BLOCK_RED=16)
        else:
            c = dict(BLOCK_M=64, BLOCK_O=min(64, blocksize), BLOCK_RED=16)
        c.update(num_warps=8, num_stages=2)
    else:  # fp16/bf16 GEMM; at odd K the per-element byte loads spill at 128 wide
        wide = 128 if K % 2 == 0 else 64
        if mode == LORA_FORWARD:
            c = dict(BLOCK_M=128, BLOCK_O=wide, BLOCK_RED=32)
        else:
            c = dict(BLOCK_M=128, BLOCK_O=min(wide, blocksize), BLOCK_RED=32)
        c.update(num_warps=8, num_stages=4)
    c["GROUP_M"] = 8
    return c


def lora_matmul(
    mode: int,
    X: torch.Tensor,
    w,
    code: torch.Tensor,
    bias: torch.Tensor | None,
    L: torch.Tensor,
    R: torch.Tensor,
    scaling: float,
    enabled: bool,
    seed: int,
    threshold: int,
    drop_scale: float,
    out: torch.Tensor,
    *,
    config: dict | None = None,
) -> None:
    """ftk::LoraMatmulParams (lora.h) in Triton.

    mode: LORA_FORWARD (X M x K, R = B (N x r), bias optional, out M x N) or LORA_GRAD_INPUT
    (X M x N, R = A (r x K), out M x K, dropout (enabled, seed, threshold, drop_scale) as
    _formats.dropout_args gives them; Forward ignores them). w: an _ops.quant.Weight4bit (N x K);
    code: its 16-entry fp32 table. L: M x r fp32. out has X's dtype. config overrides the tile
    sizes of _config (tests use it to cover several tiles with small shapes)."""
    n, k = w.shape
    M = X.shape[0]
    r = L.shape[1]
    out_cols = n if mode == LORA_FORWARD else k
    if M * out_cols == 0:
        return
    cfg = _config(mode, M, k, X.dtype, w.blocksize)
    if config:
        cfg.update(config)
    if cfg["BLOCK_RED" if mode == LORA_FORWARD else "BLOCK_O"] > w.blocksize:
        raise ValueError("the W tile's column width must be <= the blocksize (lora.py, Invariants)")
    double_quant = w.nested_absmax is not None
    nested_absmax, nested_code, offset = (
        (w.nested_absmax, w.nested_code, w.offset) if double_quant else (w.absmax, w.absmax, w.absmax)
    )  # the plain variant never reads these pointers
    lo, hi = seed_words(seed)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(out_cols, cfg["BLOCK_O"]),)
    with device_of(X):
        _lora_matmul_kernel[grid](
            X,
            w.packed,
            w.absmax,
            nested_absmax,
            nested_code,
            offset,
            code,
            bias if bias is not None else L,
            L,
            R,
            out,
            M,
            n,
            k,
            r,
            triton.cdiv(n * k, w.blocksize),
            float(scaling),
            lo,
            hi,
            int32_bits(threshold),
            float(drop_scale),
            FORWARD=mode == LORA_FORWARD,
            BS=w.blocksize,
            NESTED_BS=w.nested_blocksize,
            DOUBLE_QUANT=double_quant,
            HAS_BIAS=bias is not None and mode == LORA_FORWARD,
            DROPOUT=bool(enabled) and mode == LORA_GRAD_INPUT,
            EVEN_K=k % 2 == 0,
            ALIGNED=k % w.blocksize == 0,
            BLOCK_R=min(LORA_R_CHUNK[X.dtype], max(16, triton.next_power_of_2(r))),
            LORA_PRECISION="ieee" if X.dtype == torch.float32 else "tf32",
            **cfg,
            **LAUNCH,
        )
