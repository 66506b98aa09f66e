"""Public functions. Names, arguments and results follow bitsandbytes.functional, so a stack
can switch by changing an import; the defaults are the QLoRA ones (NF4, double quantization)."""

from __future__ import annotations

import torch

from ._checks import need_quant_type, need_tensor
from ._formats import NESTED_BLOCKSIZE, code_4bit, dynamic_map
from .quant_state import QuantState


def create_dynamic_map(signed: bool = True, device=None) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map (256 fp32, sorted): signed for double quantization and
    the first Adam moment, unsigned for the second."""
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {type(signed).__name__} (pass device= by keyword)")
    return dynamic_map(signed).to(device or "cpu", copy=True)


def get_4bit_type(quant_type: str = "nf4", device=None) -> torch.Tensor:
    """The 16-entry code of ``quant_type`` as stored in ``quant_map`` (bitsandbytes' values)."""
    need_quant_type(quant_type)

    code = code_4bit(quant_type, device or "cpu")
    return code.abs() * torch.sign(code + 0.0) if quant_type == "fp4" else code  # +0.0 at index 8


def quantize_4bit(
    A: torch.Tensor,
    blocksize: int = 64,
    compress_statistics: bool = True,
    quant_type: str = "nf4",
    *,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``A`` blockwise to 4 bits: ``(packed, quant_state)``.

    ``packed`` is uint8 of shape ``((A.numel() + 1) // 2, 1)``; ``compress_statistics``
    stores the per-block absmax as 8-bit codes (double quantization, 4.127 instead of 4.5
    bits per parameter at blocksize 64). NaN or inf in a block is kept visible: that block
    dequantizes to non-finite values (with double quantization, every block does).
    """
    need_tensor("A", A)
    if quant_storage != torch.uint8:
        raise ValueError(f"quant_storage: only torch.uint8 is supported, got {quant_storage}")
    packed, absmax = torch.ops.ftk.quantize_4bit(A, blocksize, quant_type)
    code = get_4bit_type(quant_type, A.device)
    if not compress_statistics:
        return packed, QuantState(
            absmax=absmax, shape=A.shape, code=code, blocksize=blocksize, quant_type=quant_type, dtype=A.dtype
        )
    offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())
    qabsmax, state2 = quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
    return packed, QuantState(
        absmax=qabsmax,
        shape=A.shape,
        code=code,
        blocksize=blocksize,
        quant_type=quant_type,
        dtype=A.dtype,
        offset=offset,
        state2=state2,
    )


def dequantize_4bit(
    A: torch.Tensor,
    quant_state: QuantState | None = None,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int = 64,
    quant_type: str = "nf4",
) -> torch.Tensor:
    """Dequantize ``A`` to ``quant_state.shape`` and ``quant_state.dtype``.

    Without ``quant_state``, ``absmax`` (fp32) and ``out`` give the statistics, shape and
    dtype, as in bitsandbytes. With ``out`` (contiguous, of that shape and dtype) the kernel
    writes into it. The double-quantized absmax is decoded inside the kernel.
    """
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit needs quant_state, or both absmax and out")
        quant_state = QuantState(
            absmax=absmax, shape=out.shape, dtype=out.dtype, blocksize=blocksize, quant_type=quant_type
        )
    elif not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a QuantState, got {type(quant_state).__name__}")
    qs = quant_state
    if qs.shape is None:
        raise ValueError("quant_state has no shape")
    args = (A, qs.absmax, qs.blocksize, qs.quant_type, list(qs.shape), qs.dtype)
    if qs.nested:
        args += (qs.state2.absmax, qs.state2.code, qs.offset.reshape(1), qs.state2.blocksize)
    if out is not None:  # written in place: no allocation, no copy
        torch.ops.ftk.dequantize_4bit.out(*args, out=out)
        return out
    return torch.ops.ftk.dequantize_4bit(*args)


def quantize_blockwise(
    A: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = 4096
) -> tuple[torch.Tensor, QuantState]:
    """8-bit blockwise quantization with a 256-entry code (default: the dynamic map)."""
    need_tensor("A", A)
    if code is None:
        code = create_dynamic_map(device=A.device)
    q, absmax = torch.ops.ftk.quantize_blockwise(A, code, blocksize)
    return q, QuantState(absmax=absmax, shape=A.shape, code=code, blocksize=blocksize, dtype=A.dtype)


def dequantize_blockwise(
    A: torch.Tensor,
    quant_state: QuantState | None = None,
    absmax: torch.Tensor | None = None,
    code: torch.Tensor | None = None,
    blocksize: int = 4096,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[A] * absmax[block]`` in ``dtype``."""
    if quant_state is not None:
        absmax, code, blocksize, dtype = quant_state.absmax, quant_state.code, quant_state.blocksize, quant_state.dtype
    elif absmax is None:
        raise ValueError("dequantize_blockwise needs quant_state or absmax")
    if code is None:
        need_tensor("A", A)
        code = create_dynamic_map(device=A.device)
    return torch.ops.ftk.dequantize_blockwise(A, absmax, code, blocksize, dtype)


def _need_tensors(**tensors) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _need_positions(positions) -> None:
    if positions is not None and not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor or None, got {type(positions).__name__}")


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
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
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
    return torch.ops.ftk.lora_linear_4bit(
        x,
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
    _need_positions(positions)
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
    _need_positions(positions)
    p, seed = _dropout_seed(dropout_p, training, generator)
    return torch.ops.ftk.direft(h, W1, W2, b, positions, p, seed)[0]
