"""The fused LoRA ops over a 4-bit weight (csrc/include/ftk/lora.h).

y = x·deq(W)ᵀ + bias + scaling·(dropout(x)·Aᵀ)·Bᵀ, W (N x K) frozen in NF4/FP4, A (r x K),
B (N x r). Dropout is PEFT's (on the LoRA input only, kept values scaled by 1/(1-p)); its mask
is a hash of (seed, row, column), so backward regenerates it instead of storing it.
``lora_linear_4bit`` has autograd for x, the LoRA factors and the bias; its backward is the
op ``lora_linear_4bit_backward`` (dx, dA, dB in one pass) plus the bias's column sum.
"""

from __future__ import annotations

import torch

from .._checks import dense, dropout_seed, fake_same_device, need_device, need_dtype, need_float, need_tensor
from .._formats import GRAD_DTYPES, LORA_MAX_RANK, lora_linear_4bit_backward_outputs
from .._registry import LIB, arguments, define, gradients
from .quant import Weight4bit, check_weight_4bit


def _check_lora_factors(x, w: Weight4bit, lora_A, lora_B, x_name: str = "x", x_dim: int = 1):
    """Shapes, dtypes and devices of x (last dim = W's dim x_dim), A (r x K) and B (N x r)."""
    n, k = w.shape
    for name, t in ((x_name, x), ("lora_A", lora_A), ("lora_B", lora_B)):
        need_tensor(name, t)
        need_dtype(name, t, GRAD_DTYPES)
        need_device(name, t, w.packed.device)
    want = (n, k)[x_dim]
    if x.dim() == 0 or x.shape[-1] != want:
        raise ValueError(
            f"{x_name} has shape {list(x.shape)}; its last dimension must be {want} (the 4-bit weight is {n} x {k})"
        )
    if lora_A.dim() != 2 or lora_A.shape[1] != k or not 1 <= lora_A.shape[0] <= LORA_MAX_RANK:
        raise ValueError(
            f"lora_A must be (r, in_features={k}) with 1 <= r <= {LORA_MAX_RANK}, got {list(lora_A.shape)}"
        )
    r = lora_A.shape[0]
    if lora_B.dim() != 2 or list(lora_B.shape) != [n, r]:
        raise ValueError(f"lora_B must be (out_features={n}, r={r}) to match lora_A, got {list(lora_B.shape)}")
    return dense(x), dense(lora_A), dense(lora_B)


def _check_lora_linear_4bit(*args):
    a = arguments("lora_linear_4bit")(*args)
    w = check_weight_4bit(a)
    x, lora_A, lora_B = _check_lora_factors(a.x, w, a.lora_A, a.lora_B)
    bias = a.bias
    if bias is not None:
        need_tensor("bias", bias)
        need_dtype("bias", bias, GRAD_DTYPES)
        need_device("bias", bias, w.packed.device)
        if list(bias.shape) != [w.shape[0]]:
            raise ValueError(f"bias must have shape [{w.shape[0]}] (out_features), got {list(bias.shape)}")
        bias = dense(bias)
    scaling = need_float("scaling", a.scaling)
    return (x, w, lora_A, lora_B, scaling, bias, float(a.dropout_p), dropout_seed(a.dropout_p, a.seed))


def _check_lora_linear_4bit_backward(*args):
    a = arguments("lora_linear_4bit_backward")(*args)
    w = check_weight_4bit(a)
    x, lora_A, lora_B = _check_lora_factors(a.x, w, a.lora_A, a.lora_B)
    grad_out, _, _ = _check_lora_factors(a.grad_out, w, lora_A, lora_B, "grad_out", 0)
    if grad_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"grad_out has shape {list(grad_out.shape)} but x has {list(x.shape)}; their leading dimensions must match"
        )
    scaling = need_float("scaling", a.scaling)
    seed = dropout_seed(a.dropout_p, a.seed)
    return (grad_out, x, w, lora_A, lora_B, scaling, float(a.dropout_p), seed, bool(a.need_x), bool(a.need_lora))


def _fake_lora_linear_4bit(*args):
    a = arguments("lora_linear_4bit")(*args)
    fake_same_device(a.packed, x=a.x, absmax=a.absmax, lora_A=a.lora_A, lora_B=a.lora_B, bias=a.bias)
    return a.x.new_empty((*a.x.shape[:-1], a.shape[0]))


def _fake_lora_linear_4bit_backward(*args):
    a = arguments("lora_linear_4bit_backward")(*args)
    fake_same_device(a.packed, grad_out=a.grad_out, x=a.x, absmax=a.absmax, lora_A=a.lora_A, lora_B=a.lora_B)
    return lora_linear_4bit_backward_outputs(a.x, a.lora_A, a.lora_B, a.need_x, a.need_lora)


_WEIGHT_4BIT_SCHEMA = (
    "Tensor packed, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, "
    "Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, int nested_blocksize"
)
define(
    "lora_linear_4bit",
    f"(Tensor x, {_WEIGHT_4BIT_SCHEMA}, Tensor lora_A, Tensor lora_B, float scaling, Tensor? bias, "
    "float dropout_p, Tensor? seed) -> Tensor",
    _fake_lora_linear_4bit,
    _check_lora_linear_4bit,
)
define(
    "lora_linear_4bit_backward",
    f"(Tensor grad_out, Tensor x, {_WEIGHT_4BIT_SCHEMA}, Tensor lora_A, Tensor lora_B, float scaling, "
    "float dropout_p, Tensor? seed, bool need_x, bool need_lora) -> (Tensor, Tensor, Tensor)",
    _fake_lora_linear_4bit_backward,
    _check_lora_linear_4bit_backward,
)


def _lora_setup_context(ctx, inputs, output):
    a = arguments("lora_linear_4bit")(*inputs)
    ctx.save_for_backward(a.x, a.packed, a.absmax, a.nested_absmax, a.nested_code, a.offset, a.lora_A, a.lora_B, a.seed)
    ctx.consts = (a.blocksize, a.quant_type, a.shape, a.nested_blocksize, a.scaling, a.dropout_p)
    ctx.bias_dtype = a.bias.dtype if a.bias is not None else None


def _lora_backward(ctx, grad):
    x, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, seed = ctx.saved_tensors
    blocksize, quant_type, shape, nested_blocksize, scaling, dropout_p = ctx.consts
    need = arguments("lora_linear_4bit")(*ctx.needs_input_grad)
    need_lora = need.lora_A or need.lora_B
    dx = dA = dB = dbias = None
    if need.x or need_lora:
        weight = (packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset, nested_blocksize)
        dx, dA, dB = torch.ops.ftk.lora_linear_4bit_backward(
            grad, x, *weight, lora_A, lora_B, scaling, dropout_p, seed, need.x, need_lora
        )
    if need.bias:
        acc = torch.float64 if ctx.bias_dtype == torch.float64 else torch.float32
        dbias = grad.reshape(-1, grad.shape[-1]).sum(0, dtype=acc).to(ctx.bias_dtype)
    return gradients(
        "lora_linear_4bit",
        x=dx if need.x else None,
        lora_A=dA if need.lora_A else None,
        lora_B=dB if need.lora_B else None,
        bias=dbias,
    )


torch.library.register_autograd("ftk::lora_linear_4bit", _lora_backward, setup_context=_lora_setup_context, lib=LIB)
