"""Pure-torch kernels: the test oracle, and the path for every device torch supports.

Each function follows the format in csrc/include/ftk/quant.h step for step (same fp32
operations in the same order), so its bytes equal the native kernels' bytes; it favours
clarity over speed.
"""

from __future__ import annotations

import math

import torch

from .._formats import (
    FP4_RANK_TO_BITS,
    FP4_THRESHOLDS,
    NF4_CODE,
    OPTIM_BLOCK,
    code_4bit,
    dropout_scale,
    dropout_threshold,
    lora_linear_4bit_backward_outputs,
    quantize_8bit,
    reft_backward_outputs,
)
from .._registry import register_backend, register_kernel

register_backend("reference", lambda device_type: True)  # any device torch supports


def _nf4_midpoints(device) -> torch.Tensor:
    c = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return (c[:-1] + c[1:]) / 2  # fp32 sum, then an exact halving


def _blocks(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x padded with zeros to whole blocks, shape [nblocks, blocksize]; absmax [nblocks])."""
    x = A.reshape(-1).float()
    nblocks = -(-x.numel() // blocksize)
    x = torch.nn.functional.pad(x, (0, nblocks * blocksize - x.numel())).view(nblocks, blocksize)
    absmax = x.abs().amax(dim=1) if nblocks else x.new_empty(0)  # amax propagates NaN
    return x, absmax


def _index_4bit(xn: torch.Tensor, quant_type: str) -> torch.Tensor:
    nan = xn.isnan()
    if quant_type == "nf4":
        # bucketize(right=False) counts the boundaries strictly below x.
        q = torch.bucketize(xn, _nf4_midpoints(xn.device))
    else:
        thresholds = torch.tensor(FP4_THRESHOLDS, dtype=torch.float32, device=xn.device)
        rank = torch.bucketize(xn.abs(), thresholds)
        q = torch.tensor(FP4_RANK_TO_BITS, device=xn.device)[rank] | torch.where(xn < 0, 8, 0)
    return torch.where(nan, 0, q).to(torch.uint8)


@register_kernel("quantize_4bit", "reference")
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    n = A.numel()
    x, absmax = _blocks(A, blocksize)
    xn = x * (1.0 / absmax).unsqueeze(1)
    q = _index_4bit(xn, quant_type).reshape(-1)[: n + (n & 1)]  # keeps the pad nibble
    packed = (q[0::2] << 4) | q[1::2]
    return packed.view(-1, 1), absmax


def _dequantize_blockwise_f32(A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int):
    idx = torch.arange(A.numel(), device=A.device) // blocksize
    return code[A.reshape(-1).long()] * absmax[idx]


@register_kernel("dequantize_4bit", "reference")
def dequantize_4bit(w, dtype, out=None):
    absmax = w.absmax
    if w.nested_absmax is not None:
        # Two roundings, as bitsandbytes: the 8-bit product, then the offset.
        absmax = _dequantize_blockwise_f32(absmax, w.nested_absmax, w.nested_code, w.nested_blocksize) + w.offset
    n = math.prod(w.shape)
    b = w.packed.reshape(-1)
    q = torch.stack((b >> 4, b & 0xF), dim=1).reshape(-1)[:n].long()
    device = w.packed.device
    vals = code_4bit(w.quant_type, device)[q] * absmax[torch.arange(n, device=device) // w.blocksize]
    result = vals.to(dtype).reshape(w.shape)
    return result if out is None else out.copy_(result)


@register_kernel("quantize_blockwise", "reference")
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    x, absmax = _blocks(A, blocksize)
    xn = x * (1.0 / absmax).unsqueeze(1)
    q = quantize_8bit(code, xn).reshape(-1)[: A.numel()]
    return q.reshape(A.shape), absmax


@register_kernel("dequantize_blockwise", "reference")
def dequantize_blockwise(A, absmax, code, blocksize, dtype):
    return _dequantize_blockwise_f32(A, absmax, code, blocksize).to(dtype).reshape(A.shape)


# ---- fused LoRA over a 4-bit weight ----------------------------------------------------------
# Dropout mask (the contract of csrc/include/ftk/lora.h, which every backend follows bit for bit):
#   mix32(h): h ^= h >> 16; h *= 0x7feb352d; h ^= h >> 15; h *= 0x846ca68b; h ^= h >> 16 (mod 2^32)
#   key = mix32(lo32(seed) ^ mix32(hi32(seed))); row_key = mix32(key ^ lo32(row))
#   keep(row, col) = (mix32(row_key ^ mix32(lo32(col))) >> 8) >= floor(p * 2^24)
# and a kept value is multiplied by fp32(1 / (1 - p)).

_M32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    # The low 32 bits of h * c with every partial product below 2^49 (no int64 overflow).
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _mul32(h, 0x846CA68B)
    return h ^ (h >> 16)


def dropout_keep(rows: int | torch.Tensor, cols: int, p: float, seed: int, device) -> torch.Tensor:
    """The (rows, cols) bool mask of kept elements for (p, seed); ``rows`` is a count (rows
    0..rows-1) or a 1-D int64 tensor of the row indices to hash."""
    s = torch.tensor([seed & _M32, (seed >> 32) & _M32], dtype=torch.int64, device=device)
    key = _mix32(s[0:1] ^ _mix32(s[1:2]))
    if isinstance(rows, int):
        rows = torch.arange(rows, dtype=torch.int64, device=device)
    row_key = _mix32(key ^ (rows & _M32))
    col_hash = _mix32(torch.arange(cols, dtype=torch.int64, device=device))
    h = _mix32(row_key[:, None] ^ col_hash[None, :])
    return (h >> 8) >= dropout_threshold(p)


def lora_dropout(t: torch.Tensor, p: float, seed: int | None) -> torch.Tensor:
    """PEFT's dropout of a 2-D t with the hashed mask (t itself when there is none)."""
    if seed is None:
        return t
    keep = dropout_keep(t.shape[0], t.shape[1], p, seed, t.device)
    return torch.where(keep, t * dropout_scale(p), torch.zeros((), dtype=t.dtype, device=t.device))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@register_kernel("lora_linear_4bit", "reference")
def lora_linear_4bit(x, w, lora_A, lora_B, scaling, bias, dropout_p, seed):
    ct = _compute_dtype(x)
    n, k = w.shape
    x2 = x.reshape(-1, k).to(ct)
    y = x2 @ w.dequantize().to(ct).T
    if bias is not None:
        y = y + bias.to(ct)
    xa = lora_dropout(x2, dropout_p, seed) @ lora_A.to(ct).T
    y = y + scaling * (xa @ lora_B.to(ct).T)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


@register_kernel("lora_linear_4bit_backward", "reference")
def lora_linear_4bit_backward(grad_out, x, w, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_lora):
    dx, dA, dB = lora_linear_4bit_backward_outputs(x, lora_A, lora_B, need_x, need_lora)
    ct = _compute_dtype(x)
    n, k = w.shape
    dy = grad_out.reshape(-1, n).to(ct)
    A, B = lora_A.to(ct), lora_B.to(ct)
    g = dy @ B  # (M, r): the LoRA branch's gradient at its rank-r bottleneck
    if need_x:
        dx_lora = lora_dropout(scaling * (g @ A), dropout_p, seed)
        dx.copy_((dy @ w.dequantize().to(ct) + dx_lora).reshape(x.shape))
    if need_lora:
        xd = lora_dropout(x.reshape(-1, k).to(ct), dropout_p, seed)
        dA.copy_(scaling * (g.T @ xd))
        dB.copy_(scaling * (dy.T @ (xd @ A.T)))
    return dx, dA, dB


# ---- fused ReFT edits (csrc/include/ftk/reft.h) ----------------------------------------------


def _reft_slots(h2: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index of each slot clamped to a valid row, bool: the slot selects a row)."""
    if rows is None:
        idx = torch.arange(h2.shape[0], device=h2.device)
        return idx, torch.ones_like(idx, dtype=torch.bool)
    return rows.clamp(min=0), rows >= 0


def _reft_drop(t: torch.Tensor, idx: torch.Tensor, p: float, seed: int | None) -> torch.Tensor:
    """drop(t) for slot rows t (n_slots, d) of h rows idx: the mask hashes the row of h."""
    if seed is None:
        return t
    keep = dropout_keep(idx, t.shape[1], p, seed, t.device)
    return torch.where(keep, t * dropout_scale(p), torch.zeros((), dtype=t.dtype, device=t.device))


@register_kernel("reft_forward", "reference")
def reft_forward(h, P, Q, b, rows, dropout_p, seed):
    ct = _compute_dtype(h)
    h2 = h.reshape(-1, h.shape[-1])
    idx, sel = _reft_slots(h2, rows)
    hs = h2[idx].to(ct)
    z = torch.where(sel[:, None], hs @ Q.to(ct).T + b.to(ct), 0.0)
    edited = hs + _reft_drop(z @ P.to(ct), idx, dropout_p, seed)
    out = h2.clone()
    out[idx[sel]] = edited[sel].to(h.dtype)
    return out.reshape(h.shape), z


@register_kernel("reft_backward", "reference")
def reft_backward(grad, h, P, Q, z, rows, dropout_p, seed, need_h, need_params):
    dh, dP, dQ, db = reft_backward_outputs(h, P.shape[0], need_h, need_params)
    ct = _compute_dtype(h)
    d = h.shape[-1]
    g2 = grad.reshape(-1, d)
    idx, sel = _reft_slots(g2, rows)
    gs = g2[idx].to(ct)
    gd = torch.where(sel[:, None], _reft_drop(gs, idx, dropout_p, seed), 0.0)  # g' = drop(g)
    s = gd @ P.T  # (n_slots, r), 0 for a slot that selects nothing
    if need_h:
        full = g2.clone()
        full[idx[sel]] = (gs + s @ Q)[sel].to(h.dtype)
        dh.copy_(full.reshape(h.shape))
    if need_params:
        dP.copy_(z.T @ gd)
        dQ.copy_(s.T @ h.reshape(-1, d)[idx].to(ct))
        db.copy_(s.sum(0))
    return dh, dP, dQ, db


# ---- fused optimizer steps (csrc/include/ftk/optim.h) -----------------------------------------


@register_kernel("adamw_step", "reference")
def adamw_step(param, grad, exp_avg, exp_avg_sq, hyper):
    p, g = param.float(), grad.float()
    p.mul_(hyper.decay)
    exp_avg.lerp_(g, hyper.one_minus_beta1)
    exp_avg_sq.mul_(hyper.beta2).addcmul_(g, g, value=hyper.one_minus_beta2)
    p.addcdiv_(exp_avg, (exp_avg_sq.sqrt() / hyper.bias_correction2_sqrt).add_(hyper.eps), value=-hyper.step_size)
    param.copy_(p)


@register_kernel("lion_step", "reference")
def lion_step(param, grad, exp_avg, hyper):
    p, g = param.float(), grad.float()
    p.mul_(hyper.decay)
    p.add_((exp_avg * hyper.beta1 + g * hyper.one_minus_beta1).sign_(), alpha=-hyper.lr)
    exp_avg.mul_(hyper.beta2).add_(g, alpha=hyper.one_minus_beta2)
    param.copy_(p)


@register_kernel("adamw8bit_step", "reference")
def adamw8bit_step(param, grad, state1, state2, absmax1, absmax2, code1, code2, hyper):
    n = param.numel()
    if n == 0:
        return
    g = _blocks(grad, OPTIM_BLOCK)[0]
    m = code1[_blocks(state1, OPTIM_BLOCK)[0].long()] * absmax1[:, None]  # codes 0..255 are exact in fp32
    v = code2[_blocks(state2, OPTIM_BLOCK)[0].long()] * absmax2[:, None]
    valid = torch.arange(m.numel(), device=m.device).reshape(m.shape) < n  # the last block's padding: 0
    m = torch.where(valid, m * hyper.beta1 + g * hyper.one_minus_beta1, 0.0)
    v = torch.where(valid, v * hyper.beta2 + (g * g) * hyper.one_minus_beta2, 0.0)
    p = param.float().reshape(-1) * hyper.decay
    upd = (m / (v.sqrt() / hyper.bias_correction2_sqrt + hyper.eps)).reshape(-1)[:n]
    param.copy_((p - hyper.step_size * upd).reshape(param.shape))
    for s, ab, x, code in ((state1, absmax1, m, code1), (state2, absmax2, v, code2)):
        amax = x.abs().amax(dim=1)
        scaled = torch.where(amax[:, None] > 0, x / torch.where(amax > 0, amax, 1.0)[:, None], 0.0)
        s.copy_(quantize_8bit(code, scaled).reshape(-1)[:n].reshape(s.shape))
        ab.copy_(amax)
