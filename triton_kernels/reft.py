# Fused ReFT edits (LoReFT, DiReFT) in Triton: forward, backward, and the backward's reduction.
#
# Contract: csrc/include/ftk/reft.h (math, row selection, dropout) and backends/reference.py
# (reft_forward / reft_backward, the oracle). Per slot, with h its row of the hidden states:
#   forward   z = Q·h + b (r fp32, stored),  out = h + drop(Pᵀz)
#   backward  g' = drop(g),  s = P·g',  dh = g + Qᵀs,  dP += z ⊗ g',  dQ += s ⊗ h,  db += s
#
# Algorithm. A program owns a tile of TILE slots (rows of h gathered through `rows`) and walks
# d in chunks of BLOCK_D columns, twice:
#   pass 1: the rank-r reduction over the whole row (z = Q·h forward, s = P·g' backward);
#   pass 2: the per-column output (out = h + drop(Pᵀz); dh = g + Qᵀs and the dP/dQ terms).
# So each selected row is read from HBM once and written once, but read twice by the program:
# pass 2 re-reads the tile's rows (TILE x d: 128 KiB of bf16 at TILE = 16, d = 4096) from L2
# (pass-2 loads are evict_first; pass 1 leaves them cached). Holding a tile's whole rows in
# registers instead (16 x 4096 fp32: 256 a thread at 8 warps) would spill.
# Rank products (_project, _expand, _accumulate_outer), fp32 on FMAs:
#   BLOCK_R = next power of two >= r below 16: a static loop over the ranks (j >= r masked), P[j]
#     and Q[j] loaded as [BLOCK_D] vectors, broadcast-multiply + tl.sum. tl.dot needs r padded
#     to 16: 4x the FMAs at r = 4, about the memory time of an H100.
#   BLOCK_R >= 16: tl.dot(input_precision="ieee") on [BLOCK_R, BLOCK_D] tiles of P, Q (tf32
#     would give z ~1e-3 relative error where torch's fp32 matmul gives ~1e-6).
# P and Q (r x d fp32: 128 KiB together at r = 4, d = 4096) are read once per tile from L1/L2:
# 2r/TILE bytes of L2 per byte of h moved (0.5 at r = 4, TILE = 16).
# Backward accumulates dP, dQ, db over slots. A persistent grid of n_programs (the SM count,
# fewer when the workspace would pass WORKSPACE_BYTES, not below SMs / 4) gives program i the
# tiles i, i + n_programs, ...; it sums its tiles' terms into its own row of the fp32 workspace
# [n_programs, 2·r·d + r padded to 16] = [dP (r x d) | dQ (r x d) | db (r) | pad] (the first
# tile stores, later ones read-add-write: 2.7·r/TILE of the tile's HBM bytes in L2 traffic; at
# r = 4, d = 4096 a row is 128 KiB, ~17 MB on 132 SMs, hot in the 50 MB L2), and
# _reft_reduce_kernel sums the rows in program order: deterministic, no atomics.
#
# Memory layout: h, grad, out, dh n_rows x d row-major (the op layer makes them dense); P, Q
# r x d fp32; b, db r fp32; z n_slots x r fp32; rows n_slots int64 flat row indices or absent.
#
# Invariants:
#   * A slot whose row is -1, or outside [0, n_rows) (the op layer refuses those; a kernel must
#     not trust it), loads nothing and stores nothing: its h and g are 0, its z is written 0
#     (forward) and read as 0 (backward, so a NaN there cannot leak), so it adds nothing.
#   * Row offsets are int64 (n_rows·d may pass 2^31), as are the P/Q/workspace offsets j·d.
#   * Dropout: the hash of dropout.h over (row of h, column), common.py's dropout_key (once a
#     program) and dropout_keep; the kept value is multiplied by scale in fp32 (the reference's
#     t * scale).
#   * A workspace element is read and written by the same thread across tiles when the load and
#     the store get one layout, but layouts may replicate a vector over threads, so a
#     debug_barrier precedes each tile's first workspace access (__syncthreads orders global
#     memory too: the previous tile's stores are then visible to the whole CTA).
#   * Arithmetic in fp32; out and dh rounded once to h's dtype. Launches pass
#     EXACT_BF16=common.INTERPRETED and enable_fp_fusion=True, not common.LAUNCH (nothing here
#     is specified bit for bit, and an FMA rounds once).
#
# Tiles (_config), 8 warps, chosen without a GPU so that ptxas (sm_90a, compiled offline with
# d and the pointers 16-divisible) reports no spills, bf16:
#   r <= 8:  TILE 16 x BLOCK_D 256 (16 elements a thread, 8-wide loads): forward 55-91
#            registers, backward 98-182 (r = 1..8).
#   r 9..16: dot, 32 x 64: 62 / 138.   r 17..64: dot, 16 x 64: 58-80 / 140-176.
# TODO(gpu): measure on an H100. The target: >= 80% of HBM bandwidth at 8 x 512 x 4096
# bf16, every row edited, r = 4 (256 forward programs of 16 rows).

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import INTERPRETED, device_of, dropout_keep, dropout_key, from_f32, int32_bits, seed_words, to_f32

TILE_ELEMENTS = 4096  # TILE x BLOCK_D below DOT_MIN_RANK: 16 fp32 a thread at 8 warps (8192: 128+ registers)
WARPS = 8
REDUCE_BLOCK = 1024  # workspace columns per program of the reduction
# Cap on the backward workspace (n_programs x (2·r·d + r) fp32): at r = 4, d = 4096 the SM
# count bounds it (132 x 128 KiB), at r = 64 it bounds n_programs (to at least SMs / 4).
WORKSPACE_BYTES = 32 << 20
DOT_MIN_RANK = 16  # BLOCK_R from which the rank products use tl.dot (its minimum dimension)
INTERPRETER_PROGRAMS = 4  # persistent programs under the interpreter (no SM count)


def _config(r: int) -> dict:
    """Tile sizes by rank (see the header's Tiles)."""
    block_r = triton.next_power_of_2(r)
    if block_r < DOT_MIN_RANK:
        tile, block_d = 16, TILE_ELEMENTS // 16
    else:  # the FMA dot keeps its operands in registers: 32 x 64 (16 x 64 at r > 16) spills nothing
        tile, block_d = (32 if block_r == 16 else 16), 64
    return dict(TILE=tile, BLOCK_D=block_d, BLOCK_R=block_r, USE_DOT=block_r >= DOT_MIN_RANK, num_warps=WARPS)


def _ws_stride(r: int, d: int) -> int:
    """A workspace row: 2·r·d + r floats rounded up to 16 (64 B), so rows stay aligned."""
    return -(-(2 * r * d + r) // 16) * 16


# ---- kernels -------------------------------------------------------------------------------


@triton.jit
def _slot_rows(ROWS, tile, n_slots, n_rows, HAS_ROWS: tl.constexpr, TILE: tl.constexpr):
    """(slots, in range, row of h (0 where invalid), valid) of tile `tile`."""
    slots = (tile + tl.zeros([], dtype=tl.int64)) * TILE + tl.arange(0, TILE)  # (tile: an int interpreted)
    smask = slots < n_slots
    if HAS_ROWS:
        row = tl.load(ROWS + slots, mask=smask, other=-1)
    else:
        row = slots
    valid = smask & (row >= 0) & (row < n_rows)
    return slots, smask, tl.where(valid, row, 0), valid


@triton.jit
def _column(x, kr, j: tl.constexpr):
    """Column j of x ([TILE, BLOCK_R]) as a [TILE] vector."""
    return tl.sum(tl.where(kr[None, :] == j, x, 0.0), axis=1)


# The three rank products of a [TILE, BLOCK_D] chunk x against M (r x d fp32, rows kr), fp32.
# USE_DOT (BLOCK_R >= 16): tl.dot, ieee (fp32 FMAs). Otherwise a static loop over the ranks
# with M's rows loaded as [BLOCK_D] vectors (j >= r masked); see the header.


@triton.jit
def _project(acc, x, M, d64, cols, cmask, kr, r, BLOCK_R: tl.constexpr, USE_DOT: tl.constexpr):
    """acc [TILE, BLOCK_R] + x · M[:, cols]ᵀ."""
    if USE_DOT:
        m = tl.load(
            M + kr.to(tl.int64)[:, None] * d64 + cols[None, :], mask=(kr < r)[:, None] & cmask[None, :], other=0.0
        )
        return tl.dot(x, tl.trans(m), acc, input_precision="ieee")
    else:
        for j in tl.static_range(BLOCK_R):
            m = tl.load(M + j * d64 + cols, mask=cmask & (cols * 0 + j < r), other=0.0)
            acc = tl.where(kr[None, :] == j, acc + tl.sum(x * m[None, :], axis=1)[:, None], acc)
        return acc


@triton.jit
def _expand(acc, c, M, d64, cols, cmask, kr, r, BLOCK_R: tl.constexpr, USE_DOT: tl.constexpr):
    """acc [TILE, BLOCK_D] + c [TILE, BLOCK_R] · M[:, cols]."""
    if USE_DOT:
        m = tl.load(
            M + kr.to(tl.int64)[:, None] * d64 + cols[None, :], mask=(kr < r)[:, None] & cmask[None, :], other=0.0
        )
        return tl.dot(c, m, acc, input_precision="ieee")
    else:
        for j in tl.static_range(BLOCK_R):
            m = tl.load(M + j * d64 + cols, mask=cmask & (cols * 0 + j < r), other=0.0)
            acc += _column(c, kr, j)[:, None] * m[None, :]
        return acc


@triton.jit
def _accumulate(ptrs, mask, value, first):
    """*ptrs (= or +=) value: the first tile of a program stores, later ones add. (The old value
    is read on the first tile too and discarded by the select: garbage never enters a sum.)"""
    old = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, tl.where(first != 0, value, old + value), mask=mask)


@triton.jit
def _accumulate_outer(ws, c, x, d64, cols, cmask, kr, r, first, BLOCK_R: tl.constexpr, USE_DOT: tl.constexpr):
    """ws[j, cols] (+)= Σ_slots c[:, j] · x[:, cols] for j < r (ws: r x d, row stride d)."""
    if USE_DOT:
        ptrs = ws + kr.to(tl.int64)[:, None] * d64 + cols[None, :]
        _accumulate(ptrs, (kr < r)[:, None] & cmask[None, :], tl.dot(tl.trans(c), x, input_precision="ieee"), first)
    else:
        for j in tl.static_range(BLOCK_R):
            _accumulate(
                ws + j * d64 + cols, cmask & (cols * 0 + j < r), tl.sum(_column(c, kr, j)[:, None] * x, axis=0), first
            )


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])
def _reft_forward_kernel(
    H,
    P,
    Q,
    B,
    ROWS,
    OUT,
    Z,
    n_rows,
    d,
    r,
    n_slots,
    seed_lo,
    seed_hi,
    threshold,
    drop_scale,
    HAS_ROWS: tl.constexpr,
    DROPOUT: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr,
    EXACT_BF16: tl.constexpr,
):
    slots, smask, row, valid = _slot_rows(ROWS, tl.program_id(0), n_slots, n_rows, HAS_ROWS, TILE)
    kr = tl.arange(0, BLOCK_R)
    rmask = kr < r
    d64 = d + tl.zeros([], dtype=tl.int64)  # (d may arrive as the constexpr 1)
    h_rows = H + row[:, None] * d

    # Pass 1: z = Q·h over the whole row.
    z = tl.zeros([TILE, BLOCK_R], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < d
        h = to_f32(tl.load(h_rows + cols[None, :], mask=valid[:, None] & cmask[None, :], other=0.0), EXACT_BF16)
        z = _project(z, h, Q, d64, cols, cmask, kr, r, BLOCK_R, USE_DOT)
    b = tl.load(B + kr, mask=rmask, other=0.0)
    z = tl.where(valid[:, None], z + b[None, :], 0.0)  # a slot with no row: z = 0
    tl.store(Z + slots[:, None] * r + kr[None, :], z, mask=smask[:, None] & rmask[None, :])

    # Pass 2: out = h + drop(Pᵀz), the tile's rows of h again (from L2).
    if DROPOUT:
        key = dropout_key(seed_lo, seed_hi)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < d
        m = valid[:, None] & cmask[None, :]
        h = to_f32(tl.load(h_rows + cols[None, :], mask=m, other=0.0, eviction_policy="evict_first"), EXACT_BF16)
        edit = _expand(tl.zeros([TILE, BLOCK_D], dtype=tl.float32), z, P, d64, cols, cmask, kr, r, BLOCK_R, USE_DOT)
        if DROPOUT:
            keep = dropout_keep(key, row, cols, threshold)
            edit = tl.where(keep, edit * drop_scale, 0.0)  # fp32 product, as the reference
        tl.store(OUT + row[:, None] * d + cols[None, :], from_f32(h + edit, OUT.dtype.element_ty, EXACT_BF16), mask=m)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])
def _reft_backward_kernel(
    G,
    H,
    P,
    Q,
    Z,
    ROWS,
    DH,
    WS,
    n_rows,
    d,
    r,
    n_slots,
    n_tiles,
    ws_stride,
    seed_lo,
    seed_hi,
    threshold,
    drop_scale,
    HAS_ROWS: tl.constexpr,
    DROPOUT: tl.constexpr,
    NEED_H: tl.constexpr,
    NEED_PARAMS: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr,
    EXACT_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    kr = tl.arange(0, BLOCK_R)
    rmask = kr < r
    d64 = d + tl.zeros([], dtype=tl.int64)  # (d may arrive as the constexpr 1)
    ws = WS + pid.to(tl.int64) * ws_stride  # this program's row: [dP | dQ | db | pad]
    if DROPOUT:
        key = dropout_key(seed_lo, seed_hi)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        slots, smask, row, valid = _slot_rows(ROWS, tile, n_slots, n_rows, HAS_ROWS, TILE)
        g_rows = G + row[:, None] * d

        # Pass 1: s = P·g', g' = drop(g).
        s = tl.zeros([TILE, BLOCK_R], dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            cmask = cols < d
            g = to_f32(tl.load(g_rows + cols[None, :], mask=valid[:, None] & cmask[None, :], other=0.0), EXACT_BF16)
            if DROPOUT:
                g = tl.where(dropout_keep(key, row, cols, threshold), g * drop_scale, 0.0)
            s = _project(s, g, P, d64, cols, cmask, kr, r, BLOCK_R, USE_DOT)

        first = (tile == pid).to(tl.int32)
        if NEED_PARAMS:
            z = tl.load(Z + slots[:, None] * r + kr[None, :], mask=valid[:, None] & rmask[None, :], other=0.0)
            tl.debug_barrier()  # the previous tile's workspace stores, visible to every thread
            _accumulate(ws + 2 * r * d64 + kr, rmask, tl.sum(s, axis=0), first)

        # Pass 2: dh = g + Qᵀs; dP += zᵀg', dQ += sᵀh.
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            cmask = cols < d
            m = valid[:, None] & cmask[None, :]
            g = to_f32(tl.load(g_rows + cols[None, :], mask=m, other=0.0, eviction_policy="evict_first"), EXACT_BF16)
            if NEED_H:
                dh = _expand(g, s, Q, d64, cols, cmask, kr, r, BLOCK_R, USE_DOT)
                tl.store(DH + row[:, None] * d + cols[None, :], from_f32(dh, DH.dtype.element_ty, EXACT_BF16), mask=m)
            if NEED_PARAMS:
                if DROPOUT:
                    g = tl.where(dropout_keep(key, row, cols, threshold), g * drop_scale, 0.0)
                h = to_f32(
                    tl.load(H + row[:, None] * d + cols[None, :], mask=m, other=0.0, eviction_policy="evict_first"),
                    EXACT_BF16,
                )
                _accumulate_outer(ws, z, g, d64, cols, cmask, kr, r, first, BLOCK_R, USE_DOT)
                _accumulate_outer(ws + r * d64, s, h, d64, cols, cmask, kr, r, first, BLOCK_R, USE_DOT)


@triton.jit
def _reft_reduce_kernel(WS, DP, DQ, DB, n_programs, ws_stride, rd, width, BLOCK: tl.constexpr):
    """Column block of Σ_programs WS[program, :width] (in program order) -> dP | dQ | db."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < width
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n_programs):
        acc += tl.load(WS + (i + tl.zeros([], dtype=tl.int64)) * ws_stride + cols, mask=cmask, other=0.0)
    tl.store(DP + cols, acc, mask=cols < rd)
    tl.store(DQ + (cols - rd), acc, mask=(cols >= rd) & (cols < 2 * rd))
    tl.store(DB + (cols - 2 * rd), acc, mask=(cols >= 2 * rd) & cmask)


# ---- launchers ------------------------------------------------------------------------------
# Torch tensors (dense, on one device) and plain numbers in; results written into the caller's
# tensors; nothing allocated (the backward's workspace comes from backward_workspace_shape).
# The caller fills the rows no slot selects (out with h, dh with grad) when rows is given.


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _flat(t: torch.Tensor) -> tuple[int, int]:
    d = t.shape[-1]
    return t.numel() // d, d


def reft_forward(
    h: torch.Tensor,
    P: torch.Tensor,
    Q: torch.Tensor,
    b: torch.Tensor,
    rows: torch.Tensor | None,
    enabled: bool,
    seed: int,
    threshold: int,
    scale: float,
    out: torch.Tensor,
    z: torch.Tensor,
    *,
    config: dict | None = None,
) -> None:
    """ftk::ReftForwardParams (reft.h): out's selected rows = h + drop(Pᵀz), z = Q·h + b per slot.
    (enabled, seed, threshold, scale) as _formats.dropout_args gives them."""
    n_rows, d = _flat(h)
    r = P.shape[0]
    n_slots = z.shape[0]
    if n_slots == 0:
        return
    cfg = _config(r)
    if config:
        cfg.update(config)
    cfg.pop("PROGRAMS", None)
    lo, hi = seed_words(seed)
    grid = (triton.cdiv(n_slots, cfg["TILE"]),)
    with device_of(h):
        _reft_forward_kernel[grid](
            h,
            P,
            Q,
            b,
            rows if rows is not None else z,
            out,
            z,
            n_rows,
            d,
            r,
            n_slots,
            lo,
            hi,
            int32_bits(threshold),
            float(scale),
            HAS_ROWS=rows is not None,
            DROPOUT=bool(enabled),
            EXACT_BF16=INTERPRETED,
            enable_fp_fusion=True,
            **cfg,
        )


def backward_programs(n_slots: int, r: int, d: int, device: torch.device, *, config: dict | None = None) -> int:
    """How many persistent programs reft_backward runs with (>= 1 when n_slots > 0): the SM
    count, lowered so that the workspace fits WORKSPACE_BYTES (but not below SMs / 4)."""
    cfg = _config(r)
    if config:
        cfg.update(config)
    tiles = triton.cdiv(n_slots, cfg["TILE"])
    if "PROGRAMS" in cfg:
        cap = cfg["PROGRAMS"]
    elif device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        cap = min(sms, max(sms // 4, WORKSPACE_BYTES // (4 * _ws_stride(r, d))))
    else:
        cap = INTERPRETER_PROGRAMS
    return max(1, min(tiles, cap))


def backward_workspace_shape(
    n_slots: int, r: int, d: int, device: torch.device, need_params: bool, *, config: dict | None = None
) -> tuple[int, int]:
    """The fp32 workspace reft_backward needs: (n_programs, 2·r·d + r rounded up to 16), or
    (0, 0) without parameter gradients."""
    if not need_params or n_slots == 0:
        return (0, 0)
    return (backward_programs(n_slots, r, d, device, config=config), _ws_stride(r, d))


def reft_backward(
    grad: torch.Tensor,
    h: torch.Tensor,
    P: torch.Tensor,
    Q: torch.Tensor,
    z: torch.Tensor,
    rows: torch.Tensor | None,
    enabled: bool,
    seed: int,
    threshold: int,
    scale: float,
    dh: torch.Tensor | None,
    dP: torch.Tensor | None,
    dQ: torch.Tensor | None,
    db: torch.Tensor | None,
    workspace: torch.Tensor | None,
    *,
    config: dict | None = None,
) -> None:
    """ftk::ReftBackwardParams (reft.h). dh None: not wanted; dP, dQ, db None together: not
    wanted, else workspace is an fp32 tensor of backward_workspace_shape. With no slots, the
    parameter gradients are zeroed here (nothing else to launch)."""
    n_rows, d = _flat(h)
    r = P.shape[0]
    n_slots = z.shape[0]
    need_h, need_params = dh is not None, dP is not None
    if need_params and n_slots == 0:
        dP.zero_()
        dQ.zero_()
        db.zero_()
    if n_slots == 0 or not (need_h or need_params):
        return
    cfg = _config(r)
    if config:
        cfg.update(config)
    n_programs = backward_programs(n_slots, r, d, h.device, config=config)
    cfg.pop("PROGRAMS", None)
    ws_stride = _ws_stride(r, d)
    if need_params and tuple(workspace.shape) != (n_programs, ws_stride):
        raise ValueError(
            f"workspace must be {(n_programs, ws_stride)} (backward_workspace_shape), got {tuple(workspace.shape)}"
        )
    lo, hi = seed_words(seed)
    n_tiles = triton.cdiv(n_slots, cfg["TILE"])
    with device_of(h):
        _reft_backward_kernel[(n_programs,)](
            grad,
            h,
            P,
            Q,
            z,
            rows if rows is not None else z,
            dh if need_h else grad,
            workspace if need_params else z,
            n_rows,
            d,
            r,
            n_slots,
            n_tiles,
            ws_stride,
            lo,
            hi,
            int32_bits(threshold),
            float(scale),
            HAS_ROWS=rows is not None,
            DROPOUT=bool(enabled),
            NEED_H=need_h,
            NEED_PARAMS=need_params,
            EXACT_BF16=INTERPRETED,
            enable_fp_fusion=True,
            **cfg,
        )
        if need_params:
            _reft_reduce_kernel[(triton.cdiv(2 * r * d + r, REDUCE_BLOCK),)](
                workspace, dP, dQ, db, n_programs, ws_stride, r * d, 2 * r * d + r, BLOCK=REDUCE_BLOCK, num_warps=4
            )
