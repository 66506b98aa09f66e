"""The argument checks every op shares: each names the argument it refuses.

An op's check (``_ops/<family>.py``) runs before any kernel and returns the arguments in the
form every backend may assume: tensors dense (contiguous, 16-byte aligned), dtypes, devices
and shapes agreed, scalars as Python numbers. The public functions, nn/ and integrations/ use
the same helpers for their own arguments, so one message says one thing everywhere.
"""

from __future__ import annotations

import math

import torch

from ._formats import BLOCKSIZES_4BIT, FLOAT_DTYPES, QUANT_TYPES


def need_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def need_optional_tensor(name: str, t) -> None:
    if t is not None and not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")


def need_bool(name: str, v) -> bool:
    """v, a bool (not an int standing in for one); a TypeError naming ``name`` otherwise."""
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {v!r}")
    return v


def need_dtype(name: str, t: torch.Tensor, dtypes) -> None:
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {str(t.dtype).replace('torch.', '')}")


def need_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the data is on {device}; move them to one device")


def need_numel(name: str, t: torch.Tensor, numel: int, why: str) -> None:
    if t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements but {why} needs {numel}")


def need_blocksize(blocksize, allowed=BLOCKSIZES_4BIT, name: str = "blocksize") -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {blocksize!r}")


def need_quant_type(quant_type) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def need_float_dtype(name: str, dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {dtype}")


def dense(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned: what the kernels may assume (a defined copy otherwise)."""
    if not t.is_contiguous() or (t.numel() > 0 and t.data_ptr() % 16 != 0):
        t = t.contiguous() if not t.is_contiguous() else t.clone()
    return t


def fake_same_device(A: torch.Tensor, **others) -> None:
    """A call that mixes devices can reach a fake (the dispatcher picks Meta over CPU), so the
    fakes check devices too; every other check runs in the op's check before a kernel."""
    for name, t in others.items():
        if t is not None:
            need_device(name, t, A.device)


def need_float(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def dropout_seed(dropout_p, seed) -> int | None:
    """The checked dropout seed as an int (``None`` when there is no dropout)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if dropout_p == 0.0:
        return None
    if seed is None:
        raise ValueError("seed is required when dropout_p > 0 (the backward pass regenerates the mask from it)")
    need_tensor("seed", seed)
    need_dtype("seed", seed, (torch.int64,))
    if seed.numel() != 1 or seed.device.type != "cpu":
        raise ValueError(f"seed must be one int64 on the CPU, got {seed.numel()} on {seed.device}")
    return int(seed.item())


def need_no_float64(**tensors) -> None:
    """The native kernels (cpu, cuda, triton) take float32, float16 and bfloat16; float64, which
    the ops accept for gradcheck, runs on the reference backend only."""
    for name, t in tensors.items():
        if t is not None and t.dtype == torch.float64:
            raise TypeError(
                f"{name}: float64 runs on the reference backend only (ftkernels.use_backend('reference')); "
                "the native kernels take float32, float16 or bfloat16"
            )
