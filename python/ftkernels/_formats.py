"""Formats and constants: the leaf every other module imports, and which imports only torch.

Everything here is a fact about the data, written down once: the dtype and enum codes that
cross into the native modules (csrc/include/ftk/*.h holds the same values, and
tests/test_native_abi.py checks each pair), the 4-bit and 8-bit code tables, the dropout
hash's constants, the AdamW bias terms, and the shapes of every op's outputs (the fake
functions return them and every backend fills them). docs/ARCHITECTURE.md, "Formats", says
what the bytes mean.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

# ---- dtypes and enum codes (csrc/include/ftk/common.h, quant.h, lora.h, optim.h) --------------

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GRAD_DTYPES = FLOAT_DTYPES + (torch.float64,)  # float64: the reference backend, for gradcheck
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # ftk::DType
QUANT_TYPES = ("nf4", "fp4")
QUANT_TYPE_CODE = {"nf4": 0, "fp4": 1}  # ftk::QuantType
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
BLOCKSIZES_8BIT = BLOCKSIZES_4BIT
NESTED_BLOCKSIZE = 256  # the absmax of absmax: 256 fp32 statistics share one fp32 scale

LORA_FORWARD, LORA_GRAD_INPUT = 0, 1  # ftk::LoraMatmulMode
LORA_MAX_RANK = 256  # ftk::kLoraMaxRank: the CUDA epilogue stages r in chunks of 16 or 32
REFT_MAX_RANK = 64  # ftk::kReftMaxRank: the kernels keep z and s (r floats a slot) on chip
POSITION_DTYPES = (torch.int64, torch.int32)
OPTIM_ADAMW, OPTIM_LION = 0, 1  # ftk::OptimKind
OPTIM_BLOCK = 256  # ftk::kOptimBlock: the blocksize of the 8-bit optimizer states

# ---- 4-bit codes (quant.h) ---------------------------------------------------------------------

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# Indexed by bit pattern; index 8 is -0.0 (sign times magnitude, as bitsandbytes' CUDA tree).
FP4_CODE = (
    0.0, 0.0625 / 12, 8 / 12, 1.0, 4 / 12, 6 / 12, 2 / 12, 3 / 12,
    -0.0, -0.0625 / 12, -8 / 12, -1.0, -4 / 12, -6 / 12, -2 / 12, -3 / 12,
)  # fmt: skip
# bitsandbytes' dQuantizeFP4 magnitude thresholds (literals, not exact midpoints) and the
# bit pattern of each magnitude rank.
FP4_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)
FP4_RANK_TO_BITS = (0, 1, 6, 7, 4, 5, 2, 3)


def code_4bit(quant_type: str, device) -> torch.Tensor:
    """The 16-entry fp32 code of ``quant_type``, indexed by the 4-bit pattern."""
    return torch.tensor(NF4_CODE if quant_type == "nf4" else FP4_CODE, dtype=torch.float32, device=device)


# ---- 8-bit codes (quant.h) ---------------------------------------------------------------------


@functools.cache
def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map on the CPU (cached: copy before handing it out).

    After Dettmers, "8-bit approximations for parallelism": with m = max_exponent_bits and
    f = total_bits - 1 - m fraction bits, for exponent e = 0..m-1 the midpoints of
    linspace(0.1, 1, int(2**(e + f) + 1)) at scale 10**(e + 1 - m) (unsigned: 2**(e + f + 1),
    the sign bit buying twice the resolution), each value with both signs when signed; then
    2**f - 1 more at scale 1 when f > 0, and 0 and 1. The defaults give 256 sorted values, one
    0, max 1.0; fewer total_bits give 2**total_bits values padded with zeros to 256. Returns
    None when the counts do not add up to 2**total_bits (the caller names the arguments)."""
    fraction_bits = total_bits - 1 - max_exponent_bits
    values = []

    def add(scale, n_edges):
        edges = torch.linspace(0.1, 1, n_edges, dtype=torch.float32)
        mids = (scale * ((edges[:-1] + edges[1:]) / 2.0)).tolist()
        values.extend(mids + ([-v for v in mids] if signed else []))

    for e in range(max_exponent_bits):
        add(10 ** (e + 1 - max_exponent_bits), int(2 ** (e + fraction_bits + (0 if signed else 1)) + 1))
    extra = 2**fraction_bits - 1
    if extra > 0:
        add(1, extra + 1)
    values += [0.0, 1.0]
    if len(values) != 2**total_bits:
        return None
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def quantize_8bit(code: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' dQuantize<0> (quant.h's quantize_8bit), vectorised: a 7-step binary search
    over the sorted code, then the nearer bracketing entry, ties to the pivot."""
    pivot = torch.full_like(x, 127, dtype=torch.long)
    upper_pivot = torch.full_like(pivot, 255)
    lower_pivot = torch.zeros_like(pivot)
    lower = torch.full_like(x, -1.0)
    upper = torch.full_like(x, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        gt = x > val
        lower_pivot = torch.where(gt, pivot, lower_pivot)
        lower = torch.where(gt, val, lower)
        upper_pivot = torch.where(gt, upper_pivot, pivot)
        upper = torch.where(gt, upper, val)
        pivot = torch.where(gt, pivot + step, pivot - step)
        val = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    up = torch.where(x > (upper + val) * 0.5, upper_pivot, pivot)
    down = torch.where(x < (lower + val) * 0.5, lower_pivot, pivot)
    return torch.where(x > val, up, down).to(torch.uint8)


# ---- dropout (dropout.h) -----------------------------------------------------------------------
# keep(row, col) = (hash(seed, row, col) >> 8) >= floor(p * 2^24); a kept value is multiplied by
# fp32(1 / (1 - p)). The hash itself is in backends/reference.py, dropout.h and the Triton kernels.


def dropout_threshold(p: float) -> int:
    return int(p * 16777216.0)


def dropout_scale(p: float) -> float:
    """1 / (1 - p) rounded to fp32, the factor every backend applies to kept values."""
    return torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).item()


def dropout_args(p: float, seed: int | None) -> tuple:
    """(enabled, seed, threshold, scale): the fields of ftk::Dropout."""
    if seed is None:
        return (False, 0, 0, 1.0)
    return (True, seed, dropout_threshold(p), dropout_scale(p))


# ---- optimizer scalars (optim.h) ---------------------------------------------------------------


def adamw_bias_terms(lr: float, beta1: float, beta2: float, step: int) -> tuple[float, float]:
    """(lr / (1 − β1^t), √(1 − β2^t)) in double, as torch.optim.AdamW computes them."""
    return lr / (1.0 - beta1**step), math.sqrt(1.0 - beta2**step)


class OptimHyper(NamedTuple):
    """ftk::OptimHyper (optim.h), field for field: the optimizer step's scalars, every derived one
    computed in double here and rounded to fp32 once on the way into a kernel."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    decay: float  # 1 − lr·weight_decay
    one_minus_beta1: float
    one_minus_beta2: float
    step_size: float  # lr / (1 − β1^t) for AdamW, lr for Lion
    bias_correction2_sqrt: float  # √(1 − β2^t) for AdamW, 1 for Lion


def optim_hyper(lr, beta1, beta2, eps, weight_decay, step=None) -> OptimHyper:
    """The OptimHyper of a step (``step`` None for Lion, which has no bias correction)."""
    step_size, bc2_sqrt = adamw_bias_terms(lr, beta1, beta2, step) if step is not None else (lr, 1.0)
    return OptimHyper(lr, beta1, beta2, eps, 1.0 - lr * weight_decay, 1.0 - beta1, 1.0 - beta2, step_size, bc2_sqrt)


# ---- output shapes (what each op's fake returns and each backend fills) -----------------------


def quantize_4bit_outputs(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (packed, absmax) for quantize_4bit of A."""
    n = A.numel()
    return A.new_empty(((n + 1) // 2, 1), dtype=torch.uint8), A.new_empty((-(-n // blocksize),), dtype=torch.float32)


def quantize_blockwise_outputs(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (codes, absmax) for quantize_blockwise of A."""
    return A.new_empty(A.shape, dtype=torch.uint8), A.new_empty((-(-A.numel() // blocksize),), dtype=torch.float32)


def lora_linear_4bit_backward_outputs(x, lora_A, lora_B, need_x: bool, need_lora: bool):
    """Empty (dx, dA, dB) in the dtypes of x, A and B; a gradient not asked for is a 0-element
    tensor (an op's outputs must be tensors)."""

    def like(t, wanted):
        return torch.empty_like(t) if wanted else t.new_empty(0)

    return like(x, need_x), like(lora_A, need_lora), like(lora_B, need_lora)


def reft_compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The ReFT math's dtype: fp32, or fp64 when h is (the reference backend, for gradcheck)."""
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def reft_slots(h: torch.Tensor, positions) -> int:
    """How many slots (rows of z) a ReFT call has: positions.numel() (or of the flat rows made
    from them), or every row of h."""
    return positions.numel() if positions is not None else h.numel() // h.shape[-1]


def reft_forward_outputs(h: torch.Tensor, r: int, n_slots: int):
    """Empty (out, z): out like h, z (n_slots, r) in the compute dtype."""
    out = torch.empty_like(h, memory_format=torch.contiguous_format)
    return out, h.new_empty((n_slots, r), dtype=reft_compute_dtype(h))


def reft_backward_outputs(h: torch.Tensor, r: int, need_h: bool, need_params: bool):
    """Empty (dh, dP, dQ, db); a gradient not asked for is a 0-element tensor."""
    ct = reft_compute_dtype(h)
    dh = torch.empty_like(h, memory_format=torch.contiguous_format) if need_h else h.new_empty(0)
    if not need_params:
        return dh, h.new_empty(0, dtype=ct), h.new_empty(0, dtype=ct), h.new_empty(0, dtype=ct)
    d = h.shape[-1]
    return dh, h.new_empty((r, d), dtype=ct), h.new_empty((r, d), dtype=ct), h.new_empty((r,), dtype=ct)
