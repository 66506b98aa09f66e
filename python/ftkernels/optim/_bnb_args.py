"""bitsandbytes' optimizer constructor arguments, read and checked once for every class of
``ftkernels.optim``, and the percentile clipping they can ask for.

:func:`bnb_settings` turns ``amsgrad``, ``optim_bits``, ``args``, ``min_8bit_size``,
``is_paged``, ``percentile_clipping`` and ``block_wise`` into the settings the fused steps use
(state bits, 8-bit threshold, paging, clipping percentile, blockwise), giving ``args`` (a
bitsandbytes namespace) precedence over the keywords as bitsandbytes does, and refusing with a
ValueError or TypeError naming the argument whatever the fused steps cannot honour.
:func:`percentile_clipped` is bitsandbytes' percentile rule on one gradient; the rule itself is
described in ``optimizers``' module docstring.
"""

from __future__ import annotations

import math

import torch

from .._checks import need_bool
from .._formats import OPTIM_BLOCK

GNORM_WINDOW = 100  # bitsandbytes' percentile clipping: the last 100 steps' gradient norms
# What bitsandbytes 0.50 reads from its args namespace at each step (Optimizer8bit.get_config).
ARGS_ATTRIBUTES = ("optim_bits", "min_8bit_size", "max_unorm", "skip_zeros")


def _int_in(owner: str, name: str, v, lo: int, hi: float, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{owner}: {name} must be an int {what}, got {v!r}")
    return v


def _from_args(owner: str, args, percentile_clipping, block_wise) -> dict:
    """bitsandbytes' ``args``: a namespace whose fields replace the keyword arguments. 0.50 reads
    ARGS_ATTRIBUTES at every step (a missing one fails there); releases up to 0.49 also read
    percentile_clipping and block_wise, honoured here when present."""
    if isinstance(args, dict):
        raise TypeError(
            f"{owner}: args must be an object with attributes (bitsandbytes reads args.optim_bits etc.), got a dict; "
            "pass types.SimpleNamespace(**d), or the values as keyword arguments"
        )
    missing = [a for a in ARGS_ATTRIBUTES if not hasattr(args, a)]
    if missing:
        raise TypeError(
            f"{owner}: args must have the attributes {', '.join(ARGS_ATTRIBUTES)} (bitsandbytes' optimizer "
            f"namespace, which replaces the keyword arguments); {type(args).__name__} lacks {', '.join(missing)}. "
            "Pass args=None and the values as keyword arguments instead"
        )
    max_unorm = args.max_unorm
    if isinstance(max_unorm, bool) or not isinstance(max_unorm, (int, float)):
        raise TypeError(f"{owner}: args.max_unorm must be a number, got {max_unorm!r}")
    if max_unorm > 0:  # bitsandbytes' test: 0 or below is off
        raise ValueError(
            f"{owner}: args.max_unorm={max_unorm!r} (bitsandbytes' update-norm clipping) is not implemented; "
            "set it to 0.0, or use percentile_clipping to clip gradients"
        )
    if args.skip_zeros:
        raise ValueError(
            f"{owner}: args.skip_zeros={args.skip_zeros!r} (bitsandbytes' skipping of zero gradients) is not "
            "implemented; set it to False"
        )
    named = {"args.optim_bits": args.optim_bits, "args.min_8bit_size": args.min_8bit_size}
    for name, keyword in (("percentile_clipping", percentile_clipping), ("block_wise", block_wise)):
        if hasattr(args, name):
            named[f"args.{name}"] = getattr(args, name)
        else:
            named[name] = keyword
    return named


def bnb_settings(
    owner: str,
    kind: str,
    *,
    amsgrad,
    optim_bits,
    args,
    min_8bit_size,
    paged,
    percentile_clipping,
    block_wise,
) -> tuple[int, int, bool, int, bool]:
    """(optim_bits, min_8bit_size, paged, percentile_clipping, block_wise) as checked for an
    optimizer of ``kind`` ("adamw" or "lion"); ``owner`` (the class's name) heads every error."""
    if need_bool(f"{owner}: amsgrad", amsgrad):
        raise ValueError(
            f"{owner}: amsgrad=True is not implemented (the fused step keeps no running maximum of the "
            "second moment); use amsgrad=False, or torch.optim.AdamW(amsgrad=True)"
        )
    paged = need_bool(f"{owner}: is_paged", paged)
    named = {
        "optim_bits": optim_bits,
        "min_8bit_size": min_8bit_size,
        "percentile_clipping": percentile_clipping,
        "block_wise": block_wise,
    }
    if args is not None:
        named = _from_args(owner, args, percentile_clipping, block_wise)
    (bits_name, bits), (size_name, size), (clip_name, clip), (blockwise_name, blockwise) = named.items()
    if isinstance(bits, bool) or bits not in (8, 32):
        raise ValueError(f"{owner}: {bits_name} must be 8 or 32 (the optimizer state's bits), got {bits!r}")
    size = _int_in(owner, size_name, size, 0, math.inf, ">= 0 (elements)")
    clip = _int_in(owner, clip_name, clip, 0, 100, "in [0, 100] (100: no clipping)")
    blockwise = need_bool(f"{owner}: {blockwise_name}", blockwise)
    if bits == 8 and kind == "lion":
        raise ValueError(
            f"{owner}: {bits_name}=8 (8-bit Lion states) is not implemented; use {bits_name}=32 (an fp32 "
            "state, 4 bytes a parameter), or AdamW8bit for 8-bit states"
        )
    if bits == 8 and not blockwise:
        raise ValueError(
            f"{owner}: {blockwise_name}=False (one absmax per tensor) is not implemented: the 8-bit states "
            f"are blockwise only (an absmax per {OPTIM_BLOCK} elements, bitsandbytes' default); use "
            f"{blockwise_name}=True"
        )
    return bits, size, paged, clip, blockwise


def need_default_bits(owner: str, optim_bits) -> None:
    # bitsandbytes' 8-bit classes keep optim_bits in their signature at 32 and refuse any other value.
    if isinstance(optim_bits, bool) or optim_bits != 32:
        raise ValueError(
            f"{owner}: optim_bits must stay 32 (kept for bitsandbytes' signature; {owner} always keeps 8-bit "
            f"states), got {optim_bits!r}; use AdamW(optim_bits=...) to choose the state's bits"
        )


def percentile_clipped(grad: torch.Tensor, state: dict, percentile: int) -> torch.Tensor:
    """grad scaled by bitsandbytes' percentile rule (``optimizers``' module docstring), as fp32:
    the steps take any float gradient, and bitsandbytes scales in fp32 inside its kernel. The
    window of squared norms is ``state["gnorm_vec"]``, its slot ``state["step"]``'s. No host sync."""
    g = grad.float()
    sq = g.square().sum()
    slot = state["step"] % GNORM_WINDOW
    window = state.get("gnorm_vec")
    if window is None:  # the first clipped step (or a resume saved without clipping): every slot
        window = state["gnorm_vec"] = sq.expand(GNORM_WINDOW).contiguous()
    else:
        window[slot] = sq
    current = window[slot].sqrt()
    bound = torch.kthvalue(window, percentile + 1).values.sqrt()
    return g * torch.where(current > bound, bound / current, torch.ones_like(current))
