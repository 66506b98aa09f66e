"""The op registry: every op's schema, argument checks, fake function and dispatch, in one place.

How a call flows: ``torch.ops.ftk.<op>`` -> the dispatcher impl registered below for the
tensor's device -> ``_check_<op>`` (the argument contract, shared by every backend) ->
the kernel that ``backends/<name>.py`` registered with :func:`register_kernel`.

Backends: ``cuda`` (C++/CUDA module), ``triton``, ``cpu`` (C++ module) and ``reference``
(pure torch, the test oracle, and the path for any device torch supports). The default for
each device is the fastest measured one (README, "Backends"); ``FTK_BACKEND`` or
:func:`set_backend` overrides it. Autograd, where an op has a gradient, is attached here with
``torch.library.register_autograd`` so ``torch.compile`` and ``opcheck`` see it; the NF4 ops
take and give quantized data and have none. ``lora_linear_4bit`` has autograd for x, the LoRA
factors and the bias; its backward is the op ``lora_linear_4bit_backward``. ``loreft`` and
``direft`` have autograd for h and their three parameters; both run the kernels
``reft_forward`` and the op ``reft_backward``.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch

from ._formats import (
    BLOCKSIZES_4BIT,
    BLOCKSIZES_8BIT,
    FLOAT_DTYPES,
    GRAD_DTYPES,
    LORA_MAX_RANK,
    POSITION_DTYPES,
    QUANT_TYPES,
    REFT_MAX_RANK,
    OPTIM_BLOCK,
    lora_linear_4bit_backward_outputs,
    quantize_4bit_outputs,
    quantize_blockwise_outputs,
    reft_backward_outputs,
    reft_compute_dtype,
    reft_forward_outputs,
    reft_slots,
)

LIB = torch.library.Library("ftk", "DEF")  # noqa: TOR901 - the one library of the package

BACKENDS = ("cuda", "triton", "cpu", "reference")

_KERNELS: dict[tuple[str, str], Callable] = {}
_override: str | None = None


# ---- backend selection ---------------------------------------------------------------------


def register_kernel(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements ``ftk::op`` for ``backend`` (called with checked args)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn: Callable) -> Callable:
        _KERNELS[(op, backend)] = fn
        return fn

    return deco


def set_backend(name: str | None) -> None:
    """Force one backend for every op (``None`` restores the measured defaults)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    global _override
    _override = name


def get_backend() -> str | None:
    """The forced backend: :func:`set_backend`'s, else ``FTK_BACKEND``'s, else ``None``."""
    if _override is not None:
        return _override
    env = os.environ.get("FTK_BACKEND", "").strip().lower()
    if not env:
        return None
    if env not in BACKENDS:
        raise ValueError(f"FTK_BACKEND must be one of {BACKENDS}, got {env!r}")
    return env


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager form of :func:`set_backend`."""
    global _override
    old = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = old


def backend_available(backend: str, device_type: str) -> bool:
    """Whether ``backend`` can run on tensors of ``device_type`` here and now."""
    from . import _native

    if backend == "reference":
        return True
    if backend == "cpu":
        return device_type == "cpu" and _native.cpu_available()
    if backend == "cuda":
        return device_type == "cuda" and _native.cuda_available()
    if backend == "triton":
        from .backends import triton as triton_backend

        return triton_backend.available(device_type)
    return False


# Fastest first, as measured on the benchmarks (README, "Backends").
_DEFAULT_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


def select_backend(op: str, device_type: str) -> str:
    forced = get_backend()
    if forced is not None:
        if (op, forced) not in _KERNELS:
            raise NotImplementedError(f"ftk::{op} has no {forced!r} kernel")
        if not backend_available(forced, device_type):
            raise RuntimeError(
                f"backend {forced!r} (from FTK_BACKEND or set_backend) cannot run ftk::{op} on "
                f"{device_type} tensors here"
                + (" (Triton runs on the CPU only with TRITON_INTERPRET=1)" if forced == "triton" else "")
            )
        return forced
    for backend in _DEFAULT_ORDER.get(device_type, ("reference",)):
        if (op, backend) in _KERNELS and backend_available(backend, device_type):
            return backend
    return "reference"


def _dispatch(name: str, kernel: str | None = None) -> Callable:
    op, _, overload = name.partition(".")  # an ``.out`` overload runs its op's kernel with out=
    op = kernel or op  # ops that normalise to one computation share a kernel (loreft, direft)

    def impl(*args, **kwargs):
        device_type = _device_of(args).type
        checked = _CHECKS[name](*args, **kwargs)
        if overload == "out":  # mutates out and returns nothing, as custom ops must
            *checked, out = checked
            _KERNELS[(op, select_backend(op, device_type))](*checked, out=out)
            return None
        return _KERNELS[(op, select_backend(op, device_type))](*checked)

    impl.__name__ = f"{name.replace('.', '_')}_impl"
    return impl


def _device_of(args: Sequence) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    raise TypeError("no tensor argument")


def _define(name: str, schema: str, fake: Callable, check: Callable, kernel: str | None = None) -> None:
    """Defines ``ftk::name``; its impl runs ``check`` then the kernel registered as ``kernel``
    (default: ``name``) for the selected backend."""
    LIB.define(f"{name}{schema}")
    torch.library.register_fake(f"ftk::{name}", fake, lib=LIB)
    _CHECKS[name] = check
    impl = _dispatch(name, kernel)
    # Backend-specific keys first; CompositeExplicitAutograd catches every other device
    # (mps, xpu, ...), which the reference backend serves.
    for key in ("CPU", "CUDA", "CompositeExplicitAutograd"):
        LIB.impl(name, impl, key)


_CHECKS: dict[str, Callable] = {}


# ---- argument checks (the contract every backend relies on) -------------------------------


def _need_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _need_dtype(name: str, t: torch.Tensor, dtypes) -> None:
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {str(t.dtype).replace('torch.', '')}")


def _need_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the data is on {device}; move them to one device")


def _need_numel(name: str, t: torch.Tensor, numel: int, why: str) -> None:
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


def _check_quantize_4bit(A, blocksize, quant_type):
    _need_tensor("A", A)
    _need_dtype("A", A, FLOAT_DTYPES)
    need_blocksize(blocksize)
    need_quant_type(quant_type)
    return dense(A), blocksize, quant_type


def _check_dequantize_4bit(
    A, absmax, blocksize, quant_type, shape, dtype,
    nested_absmax=None, nested_code=None, offset=None, nested_blocksize=256,
):
    _need_tensor("A", A)
    _need_tensor("absmax", absmax)
    _need_dtype("A", A, (torch.uint8,))
    need_blocksize(blocksize)
    need_quant_type(quant_type)
    need_float_dtype("dtype", dtype)
    shape = [int(s) for s in shape]
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must not have negative sizes, got {shape}")
    n = math.prod(shape)
    _need_numel("A", A, (n + 1) // 2, f"shape {shape} ((numel + 1) // 2 packed bytes)")
    nblocks = -(-n // blocksize)
    _need_numel("absmax", absmax, nblocks, f"shape {shape} at blocksize {blocksize}")
    _need_device("absmax", absmax, A.device)
    nested = (nested_absmax, nested_code, offset)
    if all(t is None for t in nested):
        _need_dtype("absmax", absmax, (torch.float32,))
    elif any(t is None for t in nested):
        raise ValueError("nested_absmax, nested_code and offset come together (double quantization)")
    else:
        _need_dtype("absmax", absmax, (torch.uint8,))
        for name, t in zip(("nested_absmax", "nested_code", "offset"), nested):
            _need_tensor(name, t)
            _need_dtype(name, t, (torch.float32,))
            _need_device(name, t, A.device)
        need_blocksize(nested_blocksize, BLOCKSIZES_8BIT, "nested_blocksize")
        _need_numel("nested_absmax", nested_absmax, -(-nblocks // nested_blocksize),
                    f"{nblocks} absmax codes at nested_blocksize {nested_blocksize}")
        _need_numel("nested_code", nested_code, 256, "an 8-bit code")
        _need_numel("offset", offset, 1, "double quantization")
        nested = tuple(dense(t) for t in nested)
    return (dense(A), dense(absmax), blocksize, quant_type, shape, dtype, *nested, nested_blocksize)


def _check_dequantize_4bit_out(A, absmax, blocksize, quant_type, shape, dtype, nested_absmax=None,
                               nested_code=None, offset=None, nested_blocksize=256, *, out):
    checked = _check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype,
                                     nested_absmax, nested_code, offset, nested_blocksize)
    _need_tensor("out", out)
    if list(out.shape) != checked[4] or out.dtype != dtype:
        raise ValueError(f"out must have shape {checked[4]} and dtype {dtype}; got {list(out.shape)} {out.dtype}")
    _need_device("out", out, A.device)
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    return (*checked, out)


def _check_quantize_blockwise(A, code, blocksize):
    _need_tensor("A", A)
    _need_tensor("code", code)
    _need_dtype("A", A, FLOAT_DTYPES)
    _need_dtype("code", code, (torch.float32,))
    _need_numel("code", code, 256, "an 8-bit code")
    _need_device("code", code, A.device)
    need_blocksize(blocksize, BLOCKSIZES_8BIT)
    return dense(A), dense(code), blocksize


def _check_dequantize_blockwise(A, absmax, code, blocksize, dtype):
    _need_tensor("A", A)
    _need_tensor("absmax", absmax)
    _need_tensor("code", code)
    _need_dtype("A", A, (torch.uint8,))
    _need_dtype("absmax", absmax, (torch.float32,))
    _need_dtype("code", code, (torch.float32,))
    need_blocksize(blocksize, BLOCKSIZES_8BIT)
    need_float_dtype("dtype", dtype)
    _need_numel("absmax", absmax, -(-A.numel() // blocksize), f"{A.numel()} codes at blocksize {blocksize}")
    _need_numel("code", code, 256, "an 8-bit code")
    _need_device("absmax", absmax, A.device)
    _need_device("code", code, A.device)
    return dense(A), dense(absmax), dense(code), blocksize, dtype


# ---- schemas and fakes ---------------------------------------------------------------------
# A call that mixes devices can reach a fake (the dispatcher picks Meta over CPU), so the fakes
# check devices too; every other check lives in _check_<op> and runs before a kernel.


def _fake_same_device(A: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None:
            _need_device(name, t, A.device)


def _fake_quantize_4bit(A, blocksize, quant_type):
    return quantize_4bit_outputs(A, blocksize)


def _fake_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype,
                          nested_absmax=None, nested_code=None, offset=None, nested_blocksize=256):
    _fake_same_device(A, absmax=absmax, nested_absmax=nested_absmax, nested_code=nested_code, offset=offset)
    return A.new_empty(shape, dtype=dtype)


def _fake_dequantize_4bit_out(A, absmax, blocksize, quant_type, shape, dtype, nested_absmax=None,
                              nested_code=None, offset=None, nested_blocksize=256, *, out):
    _fake_same_device(A, absmax=absmax, out=out)


def _fake_quantize_blockwise(A, code, blocksize):
    _fake_same_device(A, code=code)
    return quantize_blockwise_outputs(A, blocksize)


def _fake_dequantize_blockwise(A, absmax, code, blocksize, dtype):
    _fake_same_device(A, absmax=absmax, code=code)
    return A.new_empty(A.shape, dtype=dtype)


_define(
    "quantize_4bit",
    "(Tensor A, int blocksize, str quant_type) -> (Tensor, Tensor)",
    _fake_quantize_4bit,
    _check_quantize_4bit,
)
_define(
    "dequantize_4bit",
    "(Tensor A, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, ScalarType dtype, "
    "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, "
    "int nested_blocksize=256) -> Tensor",
    _fake_dequantize_4bit,
    _check_dequantize_4bit,
)
_define(
    "dequantize_4bit.out",
    "(Tensor A, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, ScalarType dtype, "
    "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, "
    "int nested_blocksize=256, *, Tensor(a!) out) -> ()",
    _fake_dequantize_4bit_out,
    _check_dequantize_4bit_out,
)
_define(
    "quantize_blockwise",
    "(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)",
    _fake_quantize_blockwise,
    _check_quantize_blockwise,
)
_define(
    "dequantize_blockwise",
    "(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor",
    _fake_dequantize_blockwise,
    _check_dequantize_blockwise,
)


# ---- fused LoRA over a 4-bit weight ----------------------------------------------------------
# y = x·deq(W)ᵀ + bias + scaling·(dropout(x)·Aᵀ)·Bᵀ, W (N x K) frozen in NF4/FP4, A (r x K),
# B (N x r). Dropout is PEFT's (on the LoRA input only, kept values scaled by 1/(1-p)); its mask
# is a hash of (seed, row, column), so backward regenerates it instead of storing it.



class Weight4bit(NamedTuple):
    """A checked 4-bit weight of shape (N, K): the dequantize_4bit arguments in one value."""

    packed: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    quant_type: str
    shape: list
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    offset: torch.Tensor | None
    nested_blocksize: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.ops.ftk.dequantize_4bit(self.packed, self.absmax, self.blocksize, self.quant_type,
                                             self.shape, dtype, self.nested_absmax, self.nested_code,
                                             self.offset, self.nested_blocksize)


def _check_weight_4bit(packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset,
                       nested_blocksize) -> Weight4bit:
    if len(shape) != 2:
        raise ValueError(f"the 4-bit weight must be 2-D (out_features, in_features), got shape {list(shape)}")
    if any(int(s) == 0 for s in shape):
        raise ValueError(f"the 4-bit weight must have non-zero dimensions, got shape {list(shape)}")
    checked = _check_dequantize_4bit(packed, absmax, blocksize, quant_type, shape, torch.float32,
                                     nested_absmax, nested_code, offset, nested_blocksize)
    return Weight4bit(*checked[:5], *checked[6:])


def _need_float(name: str, v) -> float:
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
    _need_tensor("seed", seed)
    _need_dtype("seed", seed, (torch.int64,))
    if seed.numel() != 1 or seed.device.type != "cpu":
        raise ValueError(f"seed must be one int64 on the CPU, got {seed.numel()} on {seed.device}")
    return int(seed.item())


def _check_lora_factors(x, w: Weight4bit, lora_A, lora_B, x_name: str = "x", x_dim: int = 1):
    """Shapes, dtypes and devices of x (last dim = W's dim x_dim), A (r x K) and B (N x r)."""
    n, k = w.shape
    for name, t in ((x_name, x), ("lora_A", lora_A), ("lora_B", lora_B)):
        _need_tensor(name, t)
        _need_dtype(name, t, GRAD_DTYPES)
        _need_device(name, t, w.packed.device)
    want = (n, k)[x_dim]
    if x.dim() == 0 or x.shape[-1] != want:
        raise ValueError(f"{x_name} has shape {list(x.shape)}; its last dimension must be {want} "
                         f"(the 4-bit weight is {n} x {k})")
    if lora_A.dim() != 2 or lora_A.shape[1] != k or not 1 <= lora_A.shape[0] <= LORA_MAX_RANK:
        raise ValueError(f"lora_A must be (r, in_features={k}) with 1 <= r <= {LORA_MAX_RANK}, "
                         f"got {list(lora_A.shape)}")
    r = lora_A.shape[0]
    if lora_B.dim() != 2 or list(lora_B.shape) != [n, r]:
        raise ValueError(f"lora_B must be (out_features={n}, r={r}) to match lora_A, got {list(lora_B.shape)}")
    return dense(x), dense(lora_A), dense(lora_B)


def _check_lora_linear_4bit(x, packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code,
                            offset, nested_blocksize, lora_A, lora_B, scaling, bias, dropout_p, seed):
    w = _check_weight_4bit(packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset,
                           nested_blocksize)
    x, lora_A, lora_B = _check_lora_factors(x, w, lora_A, lora_B)
    if bias is not None:
        _need_tensor("bias", bias)
        _need_dtype("bias", bias, GRAD_DTYPES)
        _need_device("bias", bias, packed.device)
        if list(bias.shape) != [w.shape[0]]:
            raise ValueError(f"bias must have shape [{w.shape[0]}] (out_features), got {list(bias.shape)}")
        bias = dense(bias)
    return (x, w, lora_A, lora_B, _need_float("scaling", scaling), bias, float(dropout_p),
            dropout_seed(dropout_p, seed))


def _check_lora_linear_4bit_backward(grad_out, x, packed, absmax, blocksize, quant_type, shape, nested_absmax,
                                     nested_code, offset, nested_blocksize, lora_A, lora_B, scaling, dropout_p,
                                     seed, need_x, need_lora):
    w = _check_weight_4bit(packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset,
                           nested_blocksize)
    x, lora_A, lora_B = _check_lora_factors(x, w, lora_A, lora_B)
    grad_out, _, _ = _check_lora_factors(grad_out, w, lora_A, lora_B, "grad_out", 0)
    if grad_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"grad_out has shape {list(grad_out.shape)} but x has {list(x.shape)}; "
                         "their leading dimensions must match")
    return (grad_out, x, w, lora_A, lora_B, _need_float("scaling", scaling), float(dropout_p),
            dropout_seed(dropout_p, seed), bool(need_x), bool(need_lora))


def _fake_lora_linear_4bit(x, packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset,
                           nested_blocksize, lora_A, lora_B, scaling, bias, dropout_p, seed):
    _fake_same_device(packed, x=x, absmax=absmax, lora_A=lora_A, lora_B=lora_B, bias=bias)
    return x.new_empty((*x.shape[:-1], shape[0]))


def _fake_lora_linear_4bit_backward(grad_out, x, packed, absmax, blocksize, quant_type, shape, nested_absmax,
                                    nested_code, offset, nested_blocksize, lora_A, lora_B, scaling, dropout_p,
                                    seed, need_x, need_lora):
    _fake_same_device(packed, grad_out=grad_out, x=x, absmax=absmax, lora_A=lora_A, lora_B=lora_B)
    return lora_linear_4bit_backward_outputs(x, lora_A, lora_B, need_x, need_lora)


_WEIGHT_4BIT_SCHEMA = ("Tensor packed, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, "
                       "Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, int nested_blocksize")
_define(
    "lora_linear_4bit",
    f"(Tensor x, {_WEIGHT_4BIT_SCHEMA}, Tensor lora_A, Tensor lora_B, float scaling, Tensor? bias, "
    "float dropout_p, Tensor? seed) -> Tensor",
    _fake_lora_linear_4bit,
    _check_lora_linear_4bit,
)
_define(
    "lora_linear_4bit_backward",
    f"(Tensor grad_out, Tensor x, {_WEIGHT_4BIT_SCHEMA}, Tensor lora_A, Tensor lora_B, float scaling, "
    "float dropout_p, Tensor? seed, bool need_x, bool need_lora) -> (Tensor, Tensor, Tensor)",
    _fake_lora_linear_4bit_backward,
    _check_lora_linear_4bit_backward,
)


def _lora_setup_context(ctx, inputs, output):
    (x, packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset, nested_blocksize,
     lora_A, lora_B, scaling, bias, dropout_p, seed) = inputs
    ctx.save_for_backward(x, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, seed)
    ctx.consts = (blocksize, quant_type, shape, nested_blocksize, scaling, dropout_p)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _lora_backward(ctx, grad):
    x, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, seed = ctx.saved_tensors
    blocksize, quant_type, shape, nested_blocksize, scaling, dropout_p = ctx.consts
    need = ctx.needs_input_grad
    need_x, need_lora = need[0], need[10] or need[11]
    dx = dA = dB = dbias = None
    if need_x or need_lora:
        dx, dA, dB = torch.ops.ftk.lora_linear_4bit_backward(
            grad, x, packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset,
            nested_blocksize, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_lora)
    if need[13]:
        acc = torch.float64 if ctx.bias_dtype == torch.float64 else torch.float32
        dbias = grad.reshape(-1, grad.shape[-1]).sum(0, dtype=acc).to(ctx.bias_dtype)
    return (dx if need_x else None, None, None, None, None, None, None, None, None, None,
            dA if need[10] else None, dB if need[11] else None, None, dbias, None, None)


torch.library.register_autograd("ftk::lora_linear_4bit", _lora_backward, setup_context=_lora_setup_context,
                                lib=LIB)


# ---- fused ReFT edits: LoReFT and DiReFT (csrc/include/ftk/reft.h) ---------------------------
# Both edit selected rows of h through a rank-r bottleneck, out = h + drop(Pᵀ(Q·h + b)):
#   loreft(h, R, W, b): h + Rᵀ(W·h + b − R·h)  ->  P = R,  Q = W − R
#   direft(h, W1, W2, b): h + W2ᵀ(W1·h + b)    ->  P = W2, Q = W1
# so both ops run one kernel pair, reft_forward and reft_backward. The forward also returns
# z = Q·h + b (fp32, r values a slot) for the backward, which then never recomputes it.
# Positions (batch, k) select rows: slot (i, j) edits h[i, positions[i, j]], -1 selects nothing.
# Dropout applies to the edit only, never to h, with the hashed mask over (row, column) of h
# (dropout.h), so backward regenerates it.



def _check_reft_h(h) -> None:
    _need_tensor("h", h)
    _need_dtype("h", h, GRAD_DTYPES)
    if h.dim() not in (2, 3) or h.shape[-1] == 0:
        raise ValueError(f"h must be (batch, seq, d) or (rows, d) with d >= 1, got {list(h.shape)}")


def _check_reft_factor(name: str, t, h: torch.Tensor, r: int | None = None) -> int:
    """A (r, d) factor on h's device; returns r (checked against ``r`` when given)."""
    _need_tensor(name, t)
    _need_dtype(name, t, GRAD_DTYPES)
    _need_device(name, t, h.device)
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
    _need_tensor("b", b)
    _need_dtype("b", b, GRAD_DTYPES)
    _need_device("b", b, h.device)
    if list(b.shape) != [r]:
        raise ValueError(f"b must have shape [{r}] (the rank), got {list(b.shape)}")


def reft_rows(positions, h: torch.Tensor) -> torch.Tensor | None:
    """The checked flat row index of each slot (int64, -1 for none), or None for every row.

    positions is (batch, k) for h (batch, seq, d), or (k,) for h (rows, d). Values must be in
    [-1, seq) and no position may repeat within a batch row; checking that on a GPU costs one
    host sync (skipped when positions is None)."""
    if positions is None:
        return None
    _need_tensor("positions", positions)
    _need_dtype("positions", positions, POSITION_DTYPES)
    _need_device("positions", positions, h.device)
    if h.dim() == 3:
        if positions.dim() != 2 or positions.shape[0] != h.shape[0]:
            raise ValueError(f"positions must be (batch={h.shape[0]}, k) for h of shape {list(h.shape)}, "
                             f"got {list(positions.shape)}")
        pos = positions.long()
    else:
        if positions.dim() != 1:
            raise ValueError(f"positions must be 1-D (row indices) for a 2-D h, got shape {list(positions.shape)}")
        pos = positions.long()[None]
    seq = h.shape[-2]
    if pos.numel() > 0:
        srt = pos.sort(dim=1).values
        bad = torch.stack([((pos < -1) | (pos >= seq)).any(),
                           ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()]).tolist()
        if bad[0]:
            raise ValueError(f"positions must be in [-1, {seq}) (a sequence position, or -1 for none); got values "
                             f"from {int(pos.min())} to {int(pos.max())}")
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


def _check_loreft(h, R, W, b, positions, dropout_p, seed):
    return _check_reft(h, "R", R, "W", W, b, positions, dropout_p, seed, lambda R, W: (R, W - R))


def _check_direft(h, W1, W2, b, positions, dropout_p, seed):
    return _check_reft(h, "W1", W1, "W2", W2, b, positions, dropout_p, seed, lambda W1, W2: (W2, W1))


def _check_reft_backward(grad, h, P, Q, z, positions, dropout_p, seed, need_h, need_params):
    _check_reft_h(h)
    _need_tensor("grad", grad)
    if grad.shape != h.shape or grad.dtype != h.dtype:
        raise ValueError(f"grad must match h ({list(h.shape)}, {h.dtype}), got {list(grad.shape)}, {grad.dtype}")
    _need_device("grad", grad, h.device)
    ct = reft_compute_dtype(h)
    r = _check_reft_factor("P", P, h)
    _check_reft_factor("Q", Q, h, r)
    for name, t in (("P", P), ("Q", Q), ("z", z)):
        _need_dtype(name, t, (ct,))
    _need_device("z", z, h.device)
    if list(z.shape) != [reft_slots(h, positions), r]:
        raise ValueError(f"z must be (slots={reft_slots(h, positions)}, rank={r}) as the forward made it, "
                         f"got {list(z.shape)}")
    rows = reft_rows(positions, h)
    return (dense(grad), dense(h), dense(P), dense(Q), dense(z), rows, float(dropout_p),
            dropout_seed(dropout_p, seed), bool(need_h), bool(need_params))


def _fake_reft(A_name: str, B_name: str) -> Callable:
    def fake(h, A, B, b, positions, dropout_p, seed):
        _fake_same_device(h, **{A_name: A, B_name: B}, b=b, positions=positions)
        return reft_forward_outputs(h, A.shape[0], reft_slots(h, positions))
    return fake


def _fake_reft_backward(grad, h, P, Q, z, positions, dropout_p, seed, need_h, need_params):
    _fake_same_device(h, grad=grad, P=P, Q=Q, z=z, positions=positions)
    return reft_backward_outputs(h, P.shape[0], need_h, need_params)


_define(
    "loreft",
    "(Tensor h, Tensor R, Tensor W, Tensor b, Tensor? positions, float dropout_p, Tensor? seed) -> (Tensor, Tensor)",
    _fake_reft("R", "W"),
    _check_loreft,
    kernel="reft_forward",
)
_define(
    "direft",
    "(Tensor h, Tensor W1, Tensor W2, Tensor b, Tensor? positions, float dropout_p, Tensor? seed) "
    "-> (Tensor, Tensor)",
    _fake_reft("W1", "W2"),
    _check_direft,
    kernel="reft_forward",
)
_define(
    "reft_backward",
    "(Tensor grad, Tensor h, Tensor P, Tensor Q, Tensor z, Tensor? positions, float dropout_p, Tensor? seed, "
    "bool need_h, bool need_params) -> (Tensor, Tensor, Tensor, Tensor)",
    _fake_reft_backward,
    _check_reft_backward,
)


def _reft_setup_context(ctx, inputs, output):
    h, A, B, b, positions, dropout_p, seed = inputs
    ctx.save_for_backward(h, A, B, output[1], positions, seed)
    ctx.mark_non_differentiable(output[1])  # z: the backward's saved state, not a result
    ctx.consts = (dropout_p, b.dtype)


def _reft_backward(ctx, grad, _grad_z, to_pq, from_dpq):
    h, A, B, z, positions, seed = ctx.saved_tensors
    dropout_p, b_dtype = ctx.consts
    need = ctx.needs_input_grad
    need_h, need_params = need[0], need[1] or need[2] or need[3]
    if not (need_h or need_params):
        return None, None, None, None, None, None, None
    ct = reft_compute_dtype(h)
    P, Q = to_pq(A.to(ct), B.to(ct))
    dh, dP, dQ, db = torch.ops.ftk.reft_backward(grad.to(h.dtype), h, P, Q, z, positions, dropout_p, seed,
                                                 need_h, need_params)
    dA = dB = None
    if need_params:
        dA, dB = from_dpq(dP, dQ)
        dA, dB, db = dA.to(A.dtype), dB.to(B.dtype), db.to(b_dtype)
    return (dh if need_h else None, dA if need[1] else None, dB if need[2] else None,
            db if need[3] else None, None, None, None)


torch.library.register_autograd(
    "ftk::loreft",
    lambda ctx, grad, grad_z: _reft_backward(ctx, grad, grad_z, lambda R, W: (R, W - R),
                                             lambda dP, dQ: (dP - dQ, dQ)),
    setup_context=_reft_setup_context, lib=LIB)
torch.library.register_autograd(
    "ftk::direft",
    lambda ctx, grad, grad_z: _reft_backward(ctx, grad, grad_z, lambda W1, W2: (W2, W1),
                                             lambda dP, dQ: (dQ, dP)),
    setup_context=_reft_setup_context, lib=LIB)


# ---- fused optimizer steps (csrc/include/ftk/optim.h) ----------------------------------------
# In-place ops: one pass over param, grad and the states. The math is optim.h's (torch's AdamW
# order, Lion as in bitsandbytes, bitsandbytes' blockwise 8-bit Adam with blocks of 256).



def _need_inplace(name: str, t, like: torch.Tensor, dtypes) -> None:
    """t: a contiguous tensor on like's device with like's numel (written in place, so never copied)."""
    _need_tensor(name, t)
    _need_dtype(name, t, dtypes)
    _need_device(name, t, like.device)
    _need_numel(name, t, like.numel(), "param")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is updated in place)")


def _check_hyper(lr, beta1, beta2, eps, weight_decay, step=None) -> None:
    for name, v, lo, hi in (("lr", lr, 0.0, math.inf), ("beta1", beta1, 0.0, 1.0), ("beta2", beta2, 0.0, 1.0),
                            ("eps", eps, 0.0, math.inf), ("weight_decay", weight_decay, 0.0, math.inf)):
        v = _need_float(name, v)
        if not (lo <= v < hi):
            raise ValueError(f"{name} must be in [{lo}, {hi}), got {v!r}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
        raise ValueError(f"step must be an int >= 1 (the step being taken), got {step!r}")


def _check_param_grad(param, grad):
    _need_tensor("param", param)
    _need_dtype("param", param, FLOAT_DTYPES)
    if not param.is_contiguous():
        raise ValueError("param must be contiguous (it is updated in place)")
    _need_tensor("grad", grad)
    _need_dtype("grad", grad, FLOAT_DTYPES)
    _need_device("grad", grad, param.device)
    if grad.is_sparse or grad.layout != torch.strided:
        raise ValueError("grad must be dense: these optimizers do not support sparse gradients")
    if grad.shape != param.shape:
        raise ValueError(f"grad has shape {list(grad.shape)} but param has {list(param.shape)}")
    return dense(grad)


def _check_adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step):
    grad = _check_param_grad(param, grad)
    _need_inplace("exp_avg", exp_avg, param, (torch.float32,))
    _need_inplace("exp_avg_sq", exp_avg_sq, param, (torch.float32,))
    _check_hyper(lr, beta1, beta2, eps, weight_decay, step)
    return param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step


def _check_lion_step(param, grad, exp_avg, lr, beta1, beta2, weight_decay):
    grad = _check_param_grad(param, grad)
    _need_inplace("exp_avg", exp_avg, param, (torch.float32,))
    _check_hyper(lr, beta1, beta2, 0.0, weight_decay)
    return param, grad, exp_avg, lr, beta1, beta2, weight_decay


def _check_adamw8bit_step(param, grad, state1, state2, absmax1, absmax2, code1, code2, lr, beta1, beta2, eps,
                          weight_decay, step):
    grad = _check_param_grad(param, grad)
    _need_inplace("state1", state1, param, (torch.uint8,))
    _need_inplace("state2", state2, param, (torch.uint8,))
    blocks = -(-param.numel() // OPTIM_BLOCK)
    for name, t in (("absmax1", absmax1), ("absmax2", absmax2)):
        _need_tensor(name, t)
        _need_dtype(name, t, (torch.float32,))
        _need_device(name, t, param.device)
        _need_numel(name, t, blocks, f"{param.numel()} elements in blocks of {OPTIM_BLOCK}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is updated in place)")
    for name, t in (("code1", code1), ("code2", code2)):
        _need_tensor(name, t)
        _need_dtype(name, t, (torch.float32,))
        _need_device(name, t, param.device)
        _need_numel(name, t, 256, "an 8-bit code")
    _check_hyper(lr, beta1, beta2, eps, weight_decay, step)
    return (param, grad, state1, state2, absmax1, absmax2, dense(code1), dense(code2), lr, beta1, beta2, eps,
            weight_decay, step)


def _fake_adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step):
    _fake_same_device(param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)


def _fake_lion_step(param, grad, exp_avg, lr, beta1, beta2, weight_decay):
    _fake_same_device(param, grad=grad, exp_avg=exp_avg)


def _fake_adamw8bit_step(param, grad, state1, state2, absmax1, absmax2, code1, code2, lr, beta1, beta2, eps,
                         weight_decay, step):
    _fake_same_device(param, grad=grad, state1=state1, state2=state2, absmax1=absmax1, absmax2=absmax2,
                      code1=code1, code2=code2)


_define(
    "adamw_step",
    "(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, float lr, float beta1, "
    "float beta2, float eps, float weight_decay, int step) -> ()",
    _fake_adamw_step,
    _check_adamw_step,
)
_define(
    "lion_step",
    "(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, float lr, float beta1, float beta2, float weight_decay) "
    "-> ()",
    _fake_lion_step,
    _check_lion_step,
)
_define(
    "adamw8bit_step",
    "(Tensor(a!) param, Tensor grad, Tensor(b!) state1, Tensor(c!) state2, Tensor(d!) absmax1, Tensor(e!) absmax2, "
    "Tensor code1, Tensor code2, float lr, float beta1, float beta2, float eps, float weight_decay, int step) -> ()",
    _fake_adamw8bit_step,
    _check_adamw8bit_step,
)
