"""The fused optimizer steps (csrc/include/ftk/optim.h): ``adamw_step``, ``lion_step`` and
``adamw8bit_step``.

In-place ops: one pass over param, grad and the states. The math is optim.h's (torch's AdamW
order, Lion as in bitsandbytes, bitsandbytes' blockwise 8-bit Adam with blocks of 256). They
have no autograd: ``ftkernels.optim`` calls them under ``torch.no_grad``.
"""

from __future__ import annotations

import math

import torch

from .._checks import dense, fake_same_device, need_device, need_dtype, need_float, need_numel, need_tensor
from .._formats import FLOAT_DTYPES, OPTIM_BLOCK, OptimHyper, optim_hyper
from .._registry import arguments, define


def need_inplace(name: str, t, like: torch.Tensor, dtypes) -> None:
    """t: a contiguous tensor on like's device with like's numel (written in place, so never copied)."""
    need_tensor(name, t)
    need_dtype(name, t, dtypes)
    need_device(name, t, like.device)
    need_numel(name, t, like.numel(), "param")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is updated in place)")


def _check_hyper(lr, beta1, beta2, eps, weight_decay, step=None) -> OptimHyper:
    """The checked scalars as the OptimHyper every kernel takes (``step`` None for Lion)."""
    for name, v, lo, hi in (
        ("lr", lr, 0.0, math.inf),
        ("beta1", beta1, 0.0, 1.0),
        ("beta2", beta2, 0.0, 1.0),
        ("eps", eps, 0.0, math.inf),
        ("weight_decay", weight_decay, 0.0, math.inf),
    ):
        v = need_float(name, v)
        if not (lo <= v < hi):
            raise ValueError(f"{name} must be in [{lo}, {hi}), got {v!r}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
        raise ValueError(f"step must be an int >= 1 (the step being taken), got {step!r}")
    return optim_hyper(lr, beta1, beta2, eps, weight_decay, step)


def _check_param_grad(param, grad):
    need_tensor("param", param)
    need_dtype("param", param, FLOAT_DTYPES)
    if not param.is_contiguous():
        raise ValueError("param must be contiguous (it is updated in place)")
    need_tensor("grad", grad)
    need_dtype("grad", grad, FLOAT_DTYPES)
    need_device("grad", grad, param.device)
    if grad.is_sparse or grad.layout != torch.strided:
        raise ValueError("grad must be dense: these optimizers do not support sparse gradients")
    if grad.shape != param.shape:
        raise ValueError(f"grad has shape {list(grad.shape)} but param has {list(param.shape)}")
    return dense(grad)


def _check_adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step):
    grad = _check_param_grad(param, grad)
    need_inplace("exp_avg", exp_avg, param, (torch.float32,))
    need_inplace("exp_avg_sq", exp_avg_sq, param, (torch.float32,))
    return param, grad, exp_avg, exp_avg_sq, _check_hyper(lr, beta1, beta2, eps, weight_decay, step)


def _check_lion_step(param, grad, exp_avg, lr, beta1, beta2, weight_decay):
    grad = _check_param_grad(param, grad)
    need_inplace("exp_avg", exp_avg, param, (torch.float32,))
    return param, grad, exp_avg, _check_hyper(lr, beta1, beta2, 0.0, weight_decay)


def _check_adamw8bit_step(*args):
    param, grad, state1, state2, absmax1, absmax2, code1, code2, *scalars = arguments("adamw8bit_step")(*args)
    grad = _check_param_grad(param, grad)
    need_inplace("state1", state1, param, (torch.uint8,))
    need_inplace("state2", state2, param, (torch.uint8,))
    blocks = -(-param.numel() // OPTIM_BLOCK)
    for name, t in (("absmax1", absmax1), ("absmax2", absmax2)):
        need_tensor(name, t)
        need_dtype(name, t, (torch.float32,))
        need_device(name, t, param.device)
        need_numel(name, t, blocks, f"{param.numel()} elements in blocks of {OPTIM_BLOCK}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is updated in place)")
    for name, t in (("code1", code1), ("code2", code2)):
        need_tensor(name, t)
        need_dtype(name, t, (torch.float32,))
        need_device(name, t, param.device)
        need_numel(name, t, 256, "an 8-bit code")
    return (param, grad, state1, state2, absmax1, absmax2, dense(code1), dense(code2), _check_hyper(*scalars))


def _fake_inplace_step(op: str):
    """The fake of an in-place step: no outputs; every tensor on param's device."""

    def fake(*args):
        a = arguments(op)(*args)
        fake_same_device(a.param, **{k: v for k, v in a._asdict().items() if isinstance(v, torch.Tensor)})

    return fake


define(
    "adamw_step",
    "(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, float lr, float beta1, "
    "float beta2, float eps, float weight_decay, int step) -> ()",
    _fake_inplace_step("adamw_step"),
    _check_adamw_step,
)
define(
    "lion_step",
    "(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, float lr, float beta1, float beta2, float weight_decay) -> ()",
    _fake_inplace_step("lion_step"),
    _check_lion_step,
)
define(
    "adamw8bit_step",
    "(Tensor(a!) param, Tensor grad, Tensor(b!) state1, Tensor(c!) state2, Tensor(d!) absmax1, Tensor(e!) absmax2, "
    "Tensor code1, Tensor code2, float lr, float beta1, float beta2, float eps, float weight_decay, int step) -> ()",
    _fake_inplace_step("adamw8bit_step"),
    _check_adamw8bit_step,
)
