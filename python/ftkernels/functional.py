"""Public functions. The quantization functions have bitsandbytes.functional's names, argument
order and defaults (``quantize_4bit(A)`` is FP4 without double quantization, as there), so a
stack can switch by changing an import; the QLoRA settings are one call away:
``quantize_nf4(W, compress_statistics=True)``."""

from __future__ import annotations

import torch

from ._checks import need_bool, need_optional_tensor, need_tensor
from ._formats import NESTED_BLOCKSIZE, code_4bit, dynamic_map
from .quant_state import QuantState

# bitsandbytes' blocksize when blocksize=None is passed (its CPU and CUDA default).
DEFAULT_BLOCKSIZE_4BIT = 64
# The dtypes the packed bytes may be viewed as (bitsandbytes' quant_storage): the bytes are the
# same, (numel + 1) // 2 of them, as a (bytes // itemsize, 1) tensor of that dtype.
QUANT_STORAGE_DTYPES = (
    torch.uint8,
    torch.int8,
    torch.float16,
    torch.bfloat16,
    torch.int16,
    torch.float32,
    torch.int32,
    torch.float64,
    torch.int64,
)
# bitsandbytes' int4 and af4 4-bit codes (get_4bit_type only: the kernels take nf4 and fp4).
_INT4_CODE = (7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7)
# AbnormalFloat4 at blocksize 64 (Yoshida, "NF4 isn't information theoretically optimal").
_AF4_CODE_64 = (
    1.0, 0.72424863, 0.55496234, 0.42563882, 0.31675666, 0.21961274, 0.12934483, 0.04273164,
    0.0, -0.04934812, -0.14982478, -0.25607552, -0.3736951, -0.51243739, -0.69441008, -1.0,
)  # fmt: skip


def create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8) -> torch.Tensor:
    """bitsandbytes' dynamic map (256 fp32, sorted, on the CPU): signed for double quantization
    and the first Adam moment, unsigned for the second. ``max_exponent_bits`` and ``total_bits``
    as in bitsandbytes; fewer than 8 total bits pad the 2**total_bits values with zeros."""
    need_bool("signed", signed)
    for name, v in (("max_exponent_bits", max_exponent_bits), ("total_bits", total_bits)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not 2 <= total_bits <= 8 or not 1 <= max_exponent_bits <= total_bits:
        raise ValueError(
            "create_dynamic_map needs 2 <= total_bits <= 8 and 1 <= max_exponent_bits <= total_bits, "
            f"got max_exponent_bits={max_exponent_bits}, total_bits={total_bits}"
        )
    code = dynamic_map(signed, max_exponent_bits, total_bits)
    if code is None:
        raise ValueError(
            f"create_dynamic_map: max_exponent_bits={max_exponent_bits}, total_bits={total_bits}, signed={signed} "
            f"does not give 2**{total_bits} values"
        )
    return code.clone()


def get_4bit_type(typename, device=None, blocksize=64) -> torch.Tensor:
    """The 16-entry fp32 code of ``typename`` ('nf4', 'fp4', 'int4', 'af4' at blocksize 64),
    indexed by the 4-bit pattern and scaled to max |value| 1, with bitsandbytes' values (FP4's
    index 8 is +0.0 here, as bitsandbytes stores it). ``device=None`` is the CPU (bitsandbytes:
    CUDA)."""
    device = device or "cpu"
    if typename in ("nf4", "fp4"):
        code = code_4bit(typename, device)
        # FP4 is kept as sign times magnitude with -0.0 at index 8; bitsandbytes' table has +0.0
        return code.abs() * torch.sign(code + 0.0) if typename == "fp4" else code
    if typename == "int4":
        return torch.tensor(_INT4_CODE, dtype=torch.float32, device=device) / 7
    if typename == "af4":
        if blocksize != 64:
            raise ValueError(f"blocksize: the af4 code is defined at blocksize 64 only, got {blocksize!r}")
        return torch.tensor(_AF4_CODE_64, dtype=torch.float32, device=device)
    raise ValueError(f"typename must be 'nf4', 'fp4', 'int4' or 'af4', got {typename!r}")


def _write_into(name: str, buf: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``buf.copy_(value)`` after checking that ``buf`` has value's shape, dtype and device (a
    copy_ would broadcast or cast silently)."""
    if buf.shape != value.shape or buf.dtype != value.dtype:
        raise ValueError(
            f"{name} must have shape {list(value.shape)} and dtype {value.dtype}; got {list(buf.shape)} {buf.dtype}"
        )
    if buf.device != value.device:
        raise ValueError(f"{name} is on {buf.device} but the data is on {value.device}")
    return buf.copy_(value)


def _first_non_finite(A: torch.Tensor) -> int:
    return int(torch.nonzero(~torch.isfinite(A.reshape(-1)))[0].item())


def quantize_4bit(
    A: torch.Tensor,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize=None,
    compress_statistics=False,
    quant_type="fp4",
    quant_storage=torch.uint8,
    *,
    check_finite: bool = True,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``A`` blockwise to 4 bits: ``(packed, quant_state)``, as bitsandbytes does.

    ``packed`` holds (A.numel() + 1) // 2 bytes, as a ``(bytes, 1)`` uint8 tensor or viewed
    as ``quant_storage``. ``blocksize=None`` is 64. ``compress_statistics`` stores the
    per-block absmax as 8-bit codes (double quantization: 4.127 instead of 4.5 bits per
    parameter at blocksize 64). ``out`` (the packed tensor's shape and dtype) and ``absmax``
    (the statistics' shape and dtype: fp32, uint8 with double quantization) are written in
    place and returned. NaN or inf in a block makes that block dequantize to non-finite
    values; with double quantization every block would (the offset is the mean absmax), so
    there ``A`` must be finite (``ValueError`` with the first bad index) unless
    ``check_finite=False``, which keeps bitsandbytes' result.
    """
    need_tensor("A", A)
    need_optional_tensor("absmax", absmax)
    need_optional_tensor("out", out)
    if blocksize is None:
        blocksize = DEFAULT_BLOCKSIZE_4BIT
    if quant_storage not in QUANT_STORAGE_DTYPES:
        allowed = ", ".join(str(d).replace("torch.", "") for d in QUANT_STORAGE_DTYPES)
        raise ValueError(f"quant_storage must be one of {allowed}; got {quant_storage!r}")
    nbytes = (A.numel() + 1) // 2
    if nbytes % quant_storage.itemsize:
        raise ValueError(
            f"quant_storage {quant_storage} holds {quant_storage.itemsize} bytes an element, but A's "
            f"{A.numel()} values pack into {nbytes} bytes"
        )
    packed, stats = torch.ops.ftk.quantize_4bit(A, blocksize, quant_type)
    if compress_statistics and check_finite and not bool(torch.isfinite(stats).all()):
        # A block's absmax is non-finite exactly when the block holds NaN or inf.
        raise ValueError(
            f"A has a non-finite value at flat index {_first_non_finite(A)}; with compress_statistics=True "
            "every block would dequantize to NaN (pass check_finite=False for bitsandbytes' behaviour)"
        )
    if quant_storage != torch.uint8:
        packed = packed.reshape(-1).view(quant_storage).unsqueeze(1)
    code = get_4bit_type(quant_type, A.device)
    offset = state2 = None
    if compress_statistics:
        offset = stats.mean() if stats.numel() else stats.new_zeros(())
        stats, state2 = quantize_blockwise(stats - offset, blocksize=NESTED_BLOCKSIZE)
    state = QuantState(
        absmax=stats,
        shape=A.shape,
        code=code,
        blocksize=blocksize,
        quant_type=quant_type,
        dtype=A.dtype,
        offset=offset,
        state2=state2,
    )
    if out is not None:
        packed = _write_into("out", out, packed)
    if absmax is not None:
        state.absmax = _write_into("absmax", absmax, state.absmax)
    return packed, state


def quantize_nf4(
    A: torch.Tensor,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize=None,
    compress_statistics=False,
    quant_storage=torch.uint8,
    *,
    check_finite: bool = True,
) -> tuple[torch.Tensor, QuantState]:
    """:func:`quantize_4bit` with quant_type 'nf4'; QLoRA's weights are
    ``quantize_nf4(W, compress_statistics=True)``."""
    return quantize_4bit(
        A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage, check_finite=check_finite
    )


def quantize_fp4(
    A: torch.Tensor,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize=None,
    compress_statistics=False,
    quant_storage=torch.uint8,
    *,
    check_finite: bool = True,
) -> tuple[torch.Tensor, QuantState]:
    """:func:`quantize_4bit` with quant_type 'fp4'."""
    return quantize_4bit(
        A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage, check_finite=check_finite
    )


def dequantize_4bit(
    A: torch.Tensor,
    quant_state: QuantState | None = None,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize=None,
    quant_type="fp4",
) -> torch.Tensor:
    """Dequantize ``A`` to ``quant_state.shape`` and ``quant_state.dtype``, as bitsandbytes does.

    Without ``quant_state``, ``absmax`` (fp32), ``out`` (its shape and dtype), ``blocksize``
    (None: 64) and ``quant_type`` describe the data; with it they are ignored except ``out``.
    ``out`` (contiguous, of that shape and dtype) is written in place and returned. ``A`` may be
    any quant_storage view of the bytes. The double-quantized absmax is decoded inside the
    kernel. A packed tensor in the transposed ``(1, bytes)`` form gives the result transposed,
    as bitsandbytes gives it.
    """
    need_tensor("A", A)
    need_optional_tensor("absmax", absmax)
    need_optional_tensor("out", out)
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit needs quant_state, or both absmax and out")
        quant_state = QuantState(
            absmax=absmax,
            shape=out.shape,
            dtype=out.dtype,
            blocksize=DEFAULT_BLOCKSIZE_4BIT if blocksize is None else blocksize,
            quant_type=quant_type,
        )
    elif not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a QuantState, got {type(quant_state).__name__}")
    qs = quant_state
    if qs.shape is None:
        raise ValueError("quant_state has no shape")
    packed = A if A.dtype == torch.uint8 else A.view(torch.uint8)
    args = (packed, qs.absmax, qs.blocksize, qs.quant_type, list(qs.shape), qs.dtype)
    if qs.nested:
        args += (qs.state2.absmax, qs.state2.code, qs.offset.reshape(1), qs.state2.blocksize)
    if out is not None:  # written in place: no allocation, no copy
        torch.ops.ftk.dequantize_4bit.out(*args, out=out)
    else:
        out = torch.ops.ftk.dequantize_4bit(*args)
    # bitsandbytes' transposed form: (1, bytes) packed data; one byte is the ordinary form.
    if A.dim() == 2 and A.shape[0] == 1 and A.shape[1] > 1 and out.dim() <= 2:
        return out.t()
    return out


def dequantize_nf4(
    A: torch.Tensor,
    quant_state: QuantState | None = None,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize=None,
) -> torch.Tensor:
    """:func:`dequantize_4bit` with quant_type 'nf4' (a quant_state's own type wins)."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4")


def dequantize_fp4(
    A: torch.Tensor,
    quant_state: QuantState | None = None,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize=None,
) -> torch.Tensor:
    """:func:`dequantize_4bit` with quant_type 'fp4' (a quant_state's own type wins)."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "fp4")


def quantize_blockwise(
    A: torch.Tensor,
    code: torch.Tensor | None = None,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize=4096,
    nested=False,
) -> tuple[torch.Tensor, QuantState]:
    """8-bit blockwise quantization with a 256-entry code (default: the signed dynamic map):
    ``(codes, quant_state)``, codes uint8 of A's shape, as bitsandbytes does.

    ``nested`` quantizes the fp32 absmax again, minus its mean (``offset``), at the same
    blocksize. ``out`` (A's shape, uint8) and ``absmax`` (the statistics' shape and dtype) are
    written in place and returned.
    """
    need_tensor("A", A)
    need_optional_tensor("code", code)
    need_optional_tensor("absmax", absmax)
    need_optional_tensor("out", out)
    need_bool("nested", nested)
    code = create_dynamic_map() if code is None else code
    code = code.to(A.device, copy=True)
    q, stats = torch.ops.ftk.quantize_blockwise(A, code, blocksize)
    if nested:
        offset = stats.mean() if stats.numel() else stats.new_zeros(())
        qstats, state2 = quantize_blockwise(stats - offset, blocksize=blocksize)
        state = QuantState(absmax=qstats, code=code, blocksize=blocksize, dtype=A.dtype, offset=offset, state2=state2)
    else:
        state = QuantState(absmax=stats, code=code, blocksize=blocksize, dtype=A.dtype)
    if out is not None:
        q = _write_into("out", out, q)
    if absmax is not None:
        state.absmax = _write_into("absmax", absmax, state.absmax)
    return q, state


def dequantize_blockwise(
    A: torch.Tensor,
    quant_state: QuantState | None = None,
    absmax: torch.Tensor | None = None,
    code: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize=4096,
    nested=False,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[A] * absmax[block]`` in quant_state's dtype.

    Without ``quant_state``, ``absmax`` (fp32), ``code`` (default: the signed dynamic map) and
    ``blocksize`` describe the data and the result is fp32; with it they are ignored. A
    quant_state with a nested state is decoded with it (absmax = its codes dequantized + offset);
    ``nested=True`` only asserts that there is one. ``out`` (A's shape, the result's dtype) is
    written in place and returned.
    """
    need_tensor("A", A)
    need_optional_tensor("absmax", absmax)
    need_optional_tensor("code", code)
    need_optional_tensor("out", out)
    if quant_state is None:
        if absmax is None:
            raise ValueError("dequantize_blockwise needs quant_state or absmax")
        code = create_dynamic_map() if code is None else code
        quant_state = QuantState(absmax=absmax, code=code.to(A.device), blocksize=blocksize, dtype=torch.float32)
    elif not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a QuantState, got {type(quant_state).__name__}")
    qs = quant_state
    if nested and not qs.nested:
        raise ValueError("nested=True, but quant_state has no nested state (quantize_blockwise(..., nested=True))")
    stats = qs.absmax
    if qs.nested:
        stats = dequantize_blockwise(qs.absmax, qs.state2)
        stats += qs.offset
        stats = stats.float()
    result = torch.ops.ftk.dequantize_blockwise(A, stats, qs.code, qs.blocksize, qs.dtype)
    return result if out is None else _write_into("out", out, result)


def _need_tensors(**tensors) -> None:
    for name, t in tensors.items():
        need_tensor(name, t)


def _dropout_seed(dropout_p, training: bool, generator) -> tuple[float, torch.Tensor | None]:
    """(p, seed): the effective dropout probability and a seed drawn from ``generator`` for it."""
    p = float(dropout_p) if training else 0.0
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    return p, (torch.randint(0, 2**62, (1,), generator=generator) if p > 0.0 else None)


def lora_linear_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    quant_state: QuantState,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """QLoRA's layer in one op: ``x @ W.T + bias + scaling * (dropout(x) @ lora_A.T) @ lora_B.T``.

    ``W`` (``out_features x in_features``) is ``packed`` with ``quant_state`` (from
    :func:`quantize_4bit`) and gets no gradient; x (any leading shape), ``lora_A``
    (``r x in_features``), ``lora_B`` (``out_features x r``) and ``bias`` do. Inputs may be fp16,
    bf16 or fp32, each its own; the math is fp32 and the output has x's dtype. Dropout, as in
    PEFT, applies to the LoRA input only and only when ``training``; its mask comes from a seed
    drawn from ``generator`` (default: torch's CPU generator) and backward regenerates it.
    """
    _need_tensors(x=x, packed=packed, lora_A=lora_A, lora_B=lora_B)
    need_optional_tensor("bias", bias)
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a QuantState, got {type(quant_state).__name__}")
    qs = quant_state
    if qs.shape is None or len(qs.shape) != 2:
        raise ValueError(f"quant_state must describe a 2-D weight, got shape {qs.shape}")
    p, seed = _dropout_seed(dropout_p, training, generator)
    nested = (
        (qs.state2.absmax, qs.state2.code, qs.offset.reshape(1), qs.state2.blocksize)
        if qs.nested
        else (None, None, None, NESTED_BLOCKSIZE)
    )
    args = (
        packed,
        qs.absmax,
        qs.blocksize,
        qs.quant_type,
        list(qs.shape),
        *nested,
        lora_A,
        lora_B,
        scaling,
        bias,
        p,
        seed,
    )
    device = x.device.type
    if torch.is_autocast_enabled(device):
        # As autocast runs a linear layer: x in the autocast dtype, so is the output. The op
        # runs with autocast off, or the GEMMs inside its CPU kernel would be cast one by one.
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return torch.ops.ftk.lora_linear_4bit(x.to(dtype), *args)
    return torch.ops.ftk.lora_linear_4bit(x, *args)


def loreft(
    h: torch.Tensor,
    R: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor,
    positions: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """LoReFT's edit in one op: ``h + Rᵀ(W·h + b − R·h)`` on the selected rows of h.

    h is (batch, seq, d) or (rows, d), fp32/fp16/bf16; R and W are (rank, d) (R with
    orthonormal rows: :class:`ftkernels.nn.LoReFT` keeps them so), b is (rank,). positions is
    None (every row) or a (batch, k) int tensor of sequence positions, -1 for none ((k,) row
    indices for a 2-D h); a position may appear once per sequence. Returns a new tensor in h's
    dtype, rows outside positions unchanged; the math is fp32. h, R, W and b get gradients.
    Dropout (when ``training``) applies to the edit ``Rᵀ(...)`` only, not to h.
    """
    _need_tensors(h=h, R=R, W=W, b=b)
    need_optional_tensor("positions", positions)
    p, seed = _dropout_seed(dropout_p, training, generator)
    return torch.ops.ftk.loreft(h, R, W, b, positions, p, seed)[0]


def direft(
    h: torch.Tensor,
    W1: torch.Tensor,
    W2: torch.Tensor,
    b: torch.Tensor,
    positions: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DiReFT's edit: ``h + W2ᵀ(W1·h + b)`` on the selected rows of h, no orthogonality.

    W1 and W2 are (rank, d), b is (rank,); h, positions, dropout and the result are as in
    :func:`loreft`.
    """
    _need_tensors(h=h, W1=W1, W2=W2, b=b)
    need_optional_tensor("positions", positions)
    p, seed = _dropout_seed(dropout_p, training, generator)
    return torch.ops.ftk.direft(h, W1, W2, b, positions, p, seed)[0]
