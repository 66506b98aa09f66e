"""The fused ReFT edits: LoReFT and DiReFT (csrc/include/ftk/reft.h).

Both edit selected rows of h through a rank-r bottleneck, out = h + drop(Pᵀ(Q·h + b)):
  loreft(h, R, W, b): h + Rᵀ(W·h + b − R·h)  ->  P = R,  Q = W − R
  direft(h, W1, W2, b): h + W2ᵀ(W1·h + b)    ->  P = W2, Q = W1
so both ops run one kernel pair, reft_forward and reft_backward. The forward also returns
z = Q·h + b (fp32, r values a slot) for the backward, which then never recomputes it.
Positions (batch, k) select rows: slot (i, j) edits h[i, positions[i, j]], -1 selects nothing.
Dropout applies to the edit only, never to h, with the hashed mask over (row, column) of h
(dropout.h), so backward regenerates it. Both ops have autograd for h and their three
parameters, through the op ``reft_backward``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._checks import dense, dropout_seed, fake_same_device, need_device, need_dtype, need_tensor
from .._formats import (
    GRAD_DTYPES,
    POSITION_DTYPES,
    REFT_MAX_RANK,
    reft_backward_outputs,
    reft_compute_dtype,
    reft_forward_outputs,
    reft_slots,
)
from .._registry import LIB, arguments, define, gradients


def _check_reft_h(h) -> None:
    need_tensor("h", h)
    need_dtype("h", h, GRAD_DTYPES)
    if h.dim() not in (2, 3) or h.shape[-1] == 0:
        raise ValueError(f"h must be (batch, seq, d) or (rows, d) with d >= 1, got {list(h.shape)}")


def _check_reft_factor(name: str, t, h: torch.Tensor, r: int | None = None) -> int:
    """A (r, d) factor on h's device; returns r (checked against ``r`` when given)."""
    need_tensor(name, t)
    need_dtype(name, t, GRAD_DTYPES)
    need_device(name, t, h.device)
    d = h.shape[-1]
    if t.dim() != 2 or t.shape[1] != d:
        raise ValueError(f"{name} must be (rank, d={d}) to match h {list(h.shape)}, got {list(t.shape)}")
    rank = t.shape[0]
    if r is not None and rank != r:
        raise ValueError(f"{name} has rank {rank} but the other factor has {r}; both must be (rank, {d})")
    if not 1 <= rank <= min(d, REFT_MAX_RANK):
        raise ValueError(f"{name}: rank must be in 1..min(d={d}, {REFT_MAX_RANK}), got {rank}")
    return rank


def _check_reft_bias(b, h: torch.Tensor, r: int) -> None:
    need_tensor("b", b)
    need_dtype("b", b, GRAD_DTYPES)
    need_device("b", b, h.device)
    if list(b.shape) != [r]:
        raise ValueError(f"b must have shape [{r}] (the rank), got {list(b.shape)}")


def reft_rows(positions, h: torch.Tensor) -> torch.Tensor | None:
    """The checked flat row index of each slot (int64, -1 for none), or None for every row.

    positions is (batch, k) for h (batch, seq, d), or (k,) for h (rows, d). Values must be in
    [-1, seq) and no position may repeat within a batch row; checking that on a GPU costs one
    host sync (skipped when positions is None)."""
    if positions is None:
        return None
    need_tensor("positions", positions)
    need_dtype("positions", positions, POSITION_DTYPES)
    need_device("positions", positions, h.device)
    if h.dim() == 3:
        if positions.dim() != 2 or positions.shape[0] != h.shape[0]:
            raise ValueError(
                f"positions must be (batch={h.shape[0]}, k) for h of shape {list(h.shape)}, got {list(positions.shape)}"
            )
        pos = positions.long()
    else:
        if positions.dim() != 1:
            raise ValueError(f"positions must be 1-D (row indices) for a 2-D h, got shape {list(positions.shape)}")
        pos = positions.long()[None]
    seq = h.shape[-2]
    if pos.numel() > 0:
        srt = pos.sort(dim=1).values
        bad = torch.stack(
            [((pos < -1) | (pos >= seq)).any(), ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()]
        ).tolist()
        if bad[0]:
            raise ValueError(
                f"positions must be in [-1, {seq}) (a sequence position, or -1 for none); got values "
                f"from {int(pos.min())} to {int(pos.max())}"
            )
        if bad[1]:
            raise ValueError("positions repeats a position within one sequence; each position may be edited once")
    base = torch.arange(pos.shape[0], device=pos.device, dtype=torch.int64)[:, None] * seq
    return torch.where(pos >= 0, pos + base, -1).reshape(-1)


def _check_reft(h, P_name, P, Q_name, Q, b, positions, dropout_p, seed, to_pq):
    _check_reft_h(h)
    r = _check_reft_factor(P_name, P, h)
    _check_reft_factor(Q_name, Q, h, r)
    _check_reft_bias(b, h, r)
    rows = reft_rows(positions, h)
    ct = reft_compute_dtype(h)
    P, Q = to_pq(P.to(ct), Q.to(ct))
    return (dense(h), dense(P), dense(Q), dense(b.to(ct)), rows, float(dropout_p), dropout_seed(dropout_p, seed))


# (P, Q) of each op's factors, and their gradients back from (dP, dQ).
def _loreft_pq(R, W):
    return R, W - R


def _loreft_grads(dP, dQ):
    return dP - dQ, dQ


def _direft_pq(W1, W2):
    return W2, W1


def _direft_grads(dP, dQ):
    return dQ, dP


def _check_loreft(h, R, W, b, positions, dropout_p, seed):
    return _check_reft(h, "R", R, "W", W, b, positions, dropout_p, seed, _loreft_pq)


def _check_direft(h, W1, W2, b, positions, dropout_p, seed):
    return _check_reft(h, "W1", W1, "W2", W2, b, positions, dropout_p, seed, _direft_pq)


def _check_reft_backward(grad, h, P, Q, z, positions, dropout_p, seed, need_h, need_params):
    _check_reft_h(h)
    need_tensor("grad", grad)
    if grad.shape != h.shape or grad.dtype != h.dtype:
        raise ValueError(f"grad must match h ({list(h.shape)}, {h.dtype}), got {list(grad.shape)}, {grad.dtype}")
    need_device("grad", grad, h.device)
    ct = reft_compute_dtype(h)
    r = _check_reft_factor("P", P, h)
    _check_reft_factor("Q", Q, h, r)
    for name, t in (("P", P), ("Q", Q), ("z", z)):
        need_dtype(name, t, (ct,))
    need_device("z", z, h.device)
    if list(z.shape) != [reft_slots(h, positions), r]:
        raise ValueError(
            f"z must be (slots={reft_slots(h, positions)}, rank={r}) as the forward made it, got {list(z.shape)}"
        )
    rows = reft_rows(positions, h)
    return (
        dense(grad),
        dense(h),
        dense(P),
        dense(Q),
        dense(z),
        rows,
        float(dropout_p),
        dropout_seed(dropout_p, seed),
        bool(need_h),
        bool(need_params),
    )


def _fake_reft(A_name: str, B_name: str) -> Callable:
    def fake(h, A, B, b, positions, dropout_p, seed):
        fake_same_device(h, **{A_name: A, B_name: B}, b=b, positions=positions)
        return reft_forward_outputs(h, A.shape[0], reft_slots(h, positions))

    return fake


def _fake_reft_backward(grad, h, P, Q, z, positions, dropout_p, seed, need_h, need_params):
    fake_same_device(h, grad=grad, P=P, Q=Q, z=z, positions=positions)
    return reft_backward_outputs(h, P.shape[0], need_h, need_params)


define(
    "loreft",
    "(Tensor h, Tensor R, Tensor W, Tensor b, Tensor? positions, float dropout_p, Tensor? seed) -> (Tensor, Tensor)",
    _fake_reft("R", "W"),
    _check_loreft,
    kernel="reft_forward",
)
define(
    "direft",
    "(Tensor h, Tensor W1, Tensor W2, Tensor b, Tensor? positions, float dropout_p, Tensor? seed) -> (Tensor, Tensor)",
    _fake_reft("W1", "W2"),
    _check_direft,
    kernel="reft_forward",
)
define(
    "reft_backward",
    "(Tensor grad, Tensor h, Tensor P, Tensor Q, Tensor z, Tensor? positions, float dropout_p, Tensor? seed, "
    "bool need_h, bool need_params) -> (Tensor, Tensor, Tensor, Tensor)",
    _fake_reft_backward,
    _check_reft_backward,
)


def _reft_setup_context(ctx, inputs, output, op: str, factors: tuple[str, str]):
    a = arguments(op)(*inputs)
    ctx.save_for_backward(a.h, getattr(a, factors[0]), getattr(a, factors[1]), output[1], a.positions, a.seed)
    ctx.mark_non_differentiable(output[1])  # z: the backward's saved state, not a result
    ctx.consts = (a.dropout_p, a.b.dtype)


def _reft_backward(ctx, grad, op: str, factors: tuple[str, str], to_pq: Callable, from_dpq: Callable):
    h, A, B, z, positions, seed = ctx.saved_tensors
    dropout_p, b_dtype = ctx.consts
    need = arguments(op)(*ctx.needs_input_grad)
    need_A, need_B = getattr(need, factors[0]), getattr(need, factors[1])
    need_params = need_A or need_B or need.b
    if not (need.h or need_params):
        return gradients(op)
    ct = reft_compute_dtype(h)
    P, Q = to_pq(A.to(ct), B.to(ct))
    dh, dP, dQ, db = torch.ops.ftk.reft_backward(
        grad.to(h.dtype), h, P, Q, z, positions, dropout_p, seed, need.h, need_params
    )
    dA = dB = None
    if need_params:
        dA, dB = from_dpq(dP, dQ)
        dA, dB, db = dA.to(A.dtype), dB.to(B.dtype), db.to(b_dtype)
    return gradients(
        op,
        h=dh if need.h else None,
        **{factors[0]: dA if need_A else None, factors[1]: dB if need_B else None},
        b=db if need.b else None,
    )


def _register_reft_autograd(op: str, factors: tuple[str, str], to_pq: Callable, from_dpq: Callable) -> None:
    torch.library.register_autograd(
        f"ftk::{op}",
        lambda ctx, grad, _grad_z: _reft_backward(ctx, grad, op, factors, to_pq, from_dpq),
        setup_context=lambda ctx, inputs, output: _reft_setup_context(ctx, inputs, output, op, factors),
        lib=LIB,
    )


_register_reft_autograd("loreft", ("R", "W"), _loreft_pq, _loreft_grads)
_register_reft_autograd("direft", ("W1", "W2"), _direft_pq, _direft_grads)
