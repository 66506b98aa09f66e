"""AdamW, 8-bit AdamW and Lion with fused steps, optionally paged (states in CUDA managed memory).

Each parameter is updated by one fused op (``torch.ops.ftk.adamw_step``, ``lion_step``,
``adamw8bit_step``: one pass over param, grad and states; csrc/include/ftk/optim.h has the
math). These are ordinary ``torch.optim.Optimizer`` s: param groups, lr schedulers, closures,
``zero_grad``, and ``state_dict`` / ``load_state_dict`` with an identical trajectory after a
resume. Parameters may be fp32, bf16 or fp16 (each its own); states are fp32, or 8-bit for
``AdamW8bit`` (and ``AdamW(optim_bits=8)``) where a parameter has at least ``min_8bit_size``
elements (bitsandbytes' rule: smaller ones, biases and norms, keep fp32 states, where 8 bits
would save little and cost accuracy).

Constructors take bitsandbytes' (0.50) arguments for the same-named class, in its order and
with its defaults: ``amsgrad``, ``optim_bits``, ``args``, ``min_8bit_size``, ``is_paged``, and,
keyword-only, ``percentile_clipping`` and ``block_wise`` of bitsandbytes up to 0.49 (0.50 dropped
them). What has bitsandbytes' meaning: ``optim_bits=8`` (8-bit AdamW states, as ``AdamW8bit``),
``min_8bit_size``, ``is_paged=True`` (the ``Paged*`` behaviour), ``args`` (a namespace whose
``optim_bits``, ``min_8bit_size``, ``max_unorm``, ``skip_zeros`` override the keywords), and
``percentile_clipping`` (below). What is refused with a ValueError naming the argument:
``amsgrad=True`` (bitsandbytes' 32-bit AdamW ignores it silently), 8-bit Lion states,
``block_wise=False`` with 8-bit states (ours are blockwise only), ``args.max_unorm > 0`` and
``args.skip_zeros=True``.

Percentile clipping (``percentile_clipping=k < 100``), bitsandbytes' rule, per parameter: a
window of the last 100 squared gradient norms (all 100 slots set to the first step's), the
current one stored in slot ``step % 100``; when the current norm exceeds the square root of the
window's k-th smallest value (0-based), the gradient is scaled down to it. Computed on the
gradient's device without a host sync; at the default 100 nothing is computed.

Paged (``is_paged=True``, the ``Paged*`` classes): on a CUDA parameter the states are allocated in
managed memory (``ftkernels.optim.paged_empty``), which the driver moves between GPU and host
under memory pressure; before each parameter's step the next parameter's states are prefetched
to the GPU on the current stream, so the copy overlaps the running step and nothing
synchronises. On CPU parameters paging changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import chain

import torch

from .._formats import OPTIM_BLOCK, quantize_8bit
from ..functional import create_dynamic_map
from ._bnb_args import bnb_settings, need_default_bits, percentile_clipped
from .paged import paged_empty, prefetch

__all__ = ["AdamW", "AdamW8bit", "Lion", "PagedAdamW", "PagedAdamW8bit", "PagedLion"]

_UNPAGED_KEYS = frozenset({"step", "gnorm_vec"})  # 100 floats: too small to page, never prefetched


def _need_hyper(lr, betas, eps, weight_decay) -> None:
    if isinstance(lr, torch.Tensor):
        lr = lr.item()
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0.0 <= lr < math.inf):
        raise ValueError(f"Invalid learning rate: lr must be a finite number >= 0, got {lr!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: betas[{i}] must be in [0, 1), got {b!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= eps < math.inf:
        raise ValueError(f"Invalid epsilon value: eps must be a finite number >= 0, got {eps!r}")
    if (
        isinstance(weight_decay, bool)
        or not isinstance(weight_decay, (int, float))
        or not (0.0 <= weight_decay < math.inf)
    ):
        raise ValueError(f"Invalid weight_decay value: weight_decay must be >= 0, got {weight_decay!r}")


class _FusedOptimizer(torch.optim.Optimizer):
    """The shared loop: state creation (paged or not, 8-bit or not), prefetch, one op a param."""

    _kind = "adamw"  # or "lion"

    def __init__(
        self,
        params,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        *,
        amsgrad: bool = False,
        optim_bits: int = 32,
        args=None,
        min_8bit_size: int = 4096,
        paged: bool = False,
        percentile_clipping: int = 100,
        block_wise: bool = True,
    ):
        _need_hyper(lr, betas, eps, weight_decay)
        bits, size, paged, clip, blockwise = bnb_settings(
            type(self).__name__,
            self._kind,
            amsgrad=amsgrad,
            optim_bits=optim_bits,
            args=args,
            min_8bit_size=min_8bit_size,
            paged=paged,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
        )
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.optim_bits, self.min_8bit_size, self.paged = bits, size, paged
        self.percentile_clipping, self.block_wise = clip, blockwise

    @property
    def is_paged(self) -> bool:
        """bitsandbytes' name for ``paged``."""
        return self.paged

    # ---- states ----------------------------------------------------------------------------

    def _alloc(self, p: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
        if self.paged and p.device.type == "cuda":
            return paged_empty(shape, dtype, p.device)
        return torch.empty(shape, dtype=dtype, device=p.device)

    def _zeros(self, p, shape, dtype) -> torch.Tensor:
        return self._alloc(p, shape, dtype).zero_()

    def _uses_8bit(self, p: torch.Tensor) -> bool:
        return self.optim_bits == 8 and p.numel() >= self.min_8bit_size

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        state["step"] = 0
        if self._uses_8bit(p):
            blocks = -(-p.numel() // OPTIM_BLOCK)
            codes = _codes(p.device)
            state["state1"] = self._alloc(p, p.shape, torch.uint8).fill_(codes.zero1)
            state["state2"] = self._alloc(p, p.shape, torch.uint8).fill_(codes.zero2)
            state["absmax1"] = self._zeros(p, (blocks,), torch.float32)
            state["absmax2"] = self._zeros(p, (blocks,), torch.float32)
        else:
            state["exp_avg"] = self._zeros(p, p.shape, torch.float32)
            if self._kind == "adamw":
                state["exp_avg_sq"] = self._zeros(p, p.shape, torch.float32)

    def _state_tensors(self, state: dict) -> list[torch.Tensor]:
        return [v for k, v in state.items() if isinstance(v, torch.Tensor) and k not in _UNPAGED_KEYS]

    # ---- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One optimizer step over every parameter with a gradient; returns closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        for p, _ in work:
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        # A tensor lr (a scheduler's) is read once a group, not once a parameter: on a GPU each
        # read is a host sync.
        lrs = {
            id(g): float(g["lr"].item() if isinstance(g["lr"], torch.Tensor) else g["lr"]) for g in self.param_groups
        }
        for i, (p, group) in enumerate(work):
            state = self.state[p]
            # A DTensor (FSDP2's sharded parameter) steps on this rank's shard: the update is
            # elementwise within each 256-block of the shard, and its states are the shard's.
            local, grad = _local(p), _local(p.grad)
            if local is not p and self.percentile_clipping < 100:
                raise ValueError(
                    f"{type(self).__name__}: percentile_clipping needs each gradient's whole norm; "
                    "a sharded (DTensor) parameter has only its shard here (use percentile_clipping=100 "
                    "and torch.nn.utils.clip_grad_norm_)"
                )
            if not state:
                self._init_state(local, state)
            if self.paged:
                self._prefetch_next(work, i)
            state["step"] += 1
            self._update(local, grad, state, group, lrs[id(group)])
        return loss

    def _prefetch_next(self, work, i: int) -> None:
        """Queue the next parameter's states to its GPU on the current stream (this one's were
        queued during the previous step; the first one's now), never waiting."""
        for j in (i, i + 1) if i == 0 else (i + 1,):
            if j < len(work):
                q = work[j][0]
                if q.device.type == "cuda" and self.state[q]:  # a DTensor's states are its shard's
                    for t in self._state_tensors(self.state[q]):
                        prefetch(t)

    def _update(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, lr: float) -> None:
        beta1, beta2 = group["betas"]
        eps, wd, step = group["eps"], group["weight_decay"], state["step"]
        if self.percentile_clipping < 100:
            grad = percentile_clipped(grad, state, self.percentile_clipping)
        target = p if p.is_contiguous() else p.contiguous()
        if "state1" in state:
            codes = _codes(p.device)
            torch.ops.ftk.adamw8bit_step(
                target,
                grad,
                state["state1"],
                state["state2"],
                state["absmax1"],
                state["absmax2"],
                codes.signed,
                codes.unsigned,
                lr,
                beta1,
                beta2,
                eps,
                wd,
                step,
            )
        elif self._kind == "adamw":
            torch.ops.ftk.adamw_step(
                target, grad, state["exp_avg"], state["exp_avg_sq"], lr, beta1, beta2, eps, wd, step
            )
        else:
            torch.ops.ftk.lion_step(target, grad, state["exp_avg"], lr, beta1, beta2, wd)
        if target is not p:
            p.copy_(target)

    # ---- state_dict ----------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict, but the states keep their saved dtypes and, when paged, live
        in managed memory again. torch would cast each state to its parameter's dtype (bf16
        moments; uint8 codes widened to floats, 4x their bytes for an fp32 parameter), so torch
        loads the param_groups alone and each saved state is copied once, as it is, here."""
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        by_id = dict(zip(saved_ids, params))
        for pid, st in state_dict["state"].items():
            p = by_id[pid]
            for k, v in st.items():
                if k == "step":
                    self.state[p][k] = int(v.item()) if isinstance(v, torch.Tensor) else int(v)
                elif k in _UNPAGED_KEYS:
                    self.state[p][k] = v.to(device=p.device, copy=True)
                elif isinstance(v, torch.Tensor):
                    self.state[p][k] = self._alloc(p, v.shape, v.dtype).copy_(v)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (same storage), else t."""
    return t.to_local() if hasattr(t, "device_mesh") and hasattr(t, "to_local") else t


class _Codes:
    """The two 8-bit maps on a device, and the code each stores for 0."""

    def __init__(self, device):
        self.signed = create_dynamic_map().to(device)
        self.unsigned = create_dynamic_map(signed=False).to(device)
        zero = torch.zeros(1, device=device)
        self.zero1 = int(quantize_8bit(self.signed, zero).item())
        self.zero2 = int(quantize_8bit(self.unsigned, zero).item())


_CODES: dict[torch.device, _Codes] = {}


def _codes(device: torch.device) -> _Codes:
    if device not in _CODES:
        _CODES[device] = _Codes(device)
    return _CODES[device]


class AdamW(_FusedOptimizer):
    """AdamW with a fused step (torch.optim.AdamW's update): fp32 states, or 8-bit ones with
    ``optim_bits=8`` (then as :class:`AdamW8bit`). bitsandbytes' AdamW arguments; see the
    module docstring."""

    _kind = "adamw"

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        optim_bits: int = 32,
        args=None,
        min_8bit_size: int = 4096,
        is_paged: bool = False,
        *,
        percentile_clipping: int = 100,
        block_wise: bool = True,
    ):
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad=amsgrad,
            optim_bits=optim_bits,
            args=args,
            min_8bit_size=min_8bit_size,
            paged=is_paged,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
        )


class AdamW8bit(_FusedOptimizer):
    """AdamW with both moments in 8 bits: blockwise (256) dynamic quantization, as
    bitsandbytes' AdamW8bit; parameters under ``min_8bit_size`` elements keep fp32 states."""

    _kind = "adamw"

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        optim_bits: int = 32,
        args=None,
        min_8bit_size: int = 4096,
        is_paged: bool = False,
        *,
        percentile_clipping: int = 100,
        block_wise: bool = True,
    ):
        need_default_bits(type(self).__name__, optim_bits)
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad=amsgrad,
            optim_bits=8,
            args=args,
            min_8bit_size=min_8bit_size,
            paged=is_paged,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
        )


class Lion(_FusedOptimizer):
    """Lion (Chen et al. 2023) with a fused step; one fp32 state. Its lr is typically 3-10x
    smaller than AdamW's and its weight decay 3-10x larger. bitsandbytes' Lion arguments;
    ``optim_bits=8`` is refused (no 8-bit Lion step)."""

    _kind = "lion"

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0,
        optim_bits: int = 32,
        args=None,
        min_8bit_size: int = 4096,
        is_paged: bool = False,
        *,
        percentile_clipping: int = 100,
        block_wise: bool = True,
    ):
        super().__init__(
            params,
            lr,
            betas,
            0.0,
            weight_decay,
            optim_bits=optim_bits,
            args=args,
            min_8bit_size=min_8bit_size,
            paged=is_paged,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
        )


class PagedAdamW(AdamW):
    """AdamW with its states in CUDA managed memory (see the module docstring)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        optim_bits: int = 32,
        args=None,
        min_8bit_size: int = 4096,
        *,
        percentile_clipping: int = 100,
        block_wise: bool = True,
    ):
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            optim_bits,
            args,
            min_8bit_size,
            True,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
        )


class PagedAdamW8bit(AdamW8bit):
    """AdamW8bit with its states in CUDA managed memory (see the module docstring)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        optim_bits: int = 32,
        args=None,
        min_8bit_size: int = 4096,
        *,
        percentile_clipping: int = 100,
        block_wise: bool = True,
    ):
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            optim_bits,
            args,
            min_8bit_size,
            True,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
        )


class PagedLion(Lion):
    """Lion with its state in CUDA managed memory (see the module docstring)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0,
        optim_bits: int = 32,
        args=None,
        min_8bit_size: int = 4096,
        *,
        percentile_clipping: int = 100,
        block_wise: bool = True,
    ):
        super().__init__(
            params,
            lr,
            betas,
            weight_decay,
            optim_bits,
            args,
            min_8bit_size,
            True,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
        )
