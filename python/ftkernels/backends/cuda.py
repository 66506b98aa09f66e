"""CUDA C++ kernels (csrc/cuda/): torch allocates, the native module enqueues, pointers cross.

Each kernel runs with its tensors' device current (``torch.cuda.device``) and on torch's
current stream of that device, so it orders with the surrounding torch work, never blocks the
host and can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from .. import _formats, _native
from .._checks import need_no_float64
from .._registry import register_backend, register_kernel
from . import _lora

register_backend("cuda", lambda device_type: device_type == "cuda" and _native.cuda_available())


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@register_kernel("quantize_4bit", "cuda")
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    packed, absmax = _formats.quantize_4bit_outputs(A, blocksize)
    with torch.cuda.device(A.device):
        mod = _native.cuda()
        mod.quantize_4bit(
            _native.quantize_4bit_params(mod, A, blocksize, quant_type, packed, absmax), _stream(A.device)
        )
    return packed, absmax


@register_kernel("dequantize_4bit", "cuda")
def dequantize_4bit(w, dtype, out=None):
    if out is not None and out.data_ptr() % 16:
        # The kernel stores 16-byte vectors; a misaligned out (a view into a larger buffer)
        # gets the result through an aligned temporary rather than an error.
        return out.copy_(dequantize_4bit(w, dtype))
    if out is None:
        out = w.packed.new_empty(w.shape, dtype=dtype)
    device = w.packed.device
    with torch.cuda.device(device):
        mod = _native.cuda()
        mod.dequantize_4bit(_native.dequantize_4bit_params(mod, w, out), _stream(device))
    return out


@register_kernel("quantize_blockwise", "cuda")
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    out, absmax = _formats.quantize_blockwise_outputs(A, blocksize)
    with torch.cuda.device(A.device):
        mod = _native.cuda()
        mod.quantize_blockwise(
            _native.quantize_blockwise_params(mod, A, code, blocksize, out, absmax), _stream(A.device)
        )
    return out, absmax


@register_kernel("dequantize_blockwise", "cuda")
def dequantize_blockwise(A, absmax, code, blocksize, dtype):
    out = A.new_empty(A.shape, dtype=dtype)
    with torch.cuda.device(A.device):
        mod = _native.cuda()
        mod.dequantize_blockwise(
            _native.dequantize_blockwise_params(mod, A, absmax, code, blocksize, out), _stream(A.device)
        )
    return out


# ---- fused LoRA over a 4-bit weight (csrc/cuda/lora.cu; composed by _lora.py) -------------


def _lora_dropout(t: torch.Tensor, p: float, seed: int | None) -> torch.Tensor:
    """drop(t) as fp32 (rows, cols); t itself as fp32 when seed is None."""
    t = t.contiguous()
    out = torch.empty(t.shape, dtype=torch.float32, device=t.device)
    if out.numel() == 0:
        return out
    with torch.cuda.device(t.device):
        mod = _native.cuda()
        mod.lora_dropout(_native.lora_dropout_params(mod, t, p, seed, out), _stream(t.device))
    return out


def _lora_matmul(mode: int, X, w, bias, L, R, scaling: float, p: float, seed: int | None) -> torch.Tensor:
    """Forward: X (M, K) -> (M, N); GradInput: X (M, N) -> (M, K); out in X's dtype."""
    n, k = w.shape
    forward = mode == _formats.LORA_FORWARD
    out = torch.empty((X.shape[0], n if forward else k), dtype=X.dtype, device=X.device)
    if out.numel() == 0:
        return out
    X, L, R = X.contiguous(), L.to(torch.float32).contiguous(), R.contiguous()
    with torch.cuda.device(X.device):
        mod = _native.cuda()
        mod.lora_matmul(
            _native.lora_matmul_params(mod, mode, X, w, bias, L, R, scaling, p, seed, out), _stream(X.device)
        )
    return out


_lora.register("cuda", dropout=_lora_dropout, matmul=_lora_matmul)


# ---- fused ReFT edits (csrc/cuda/reft.cu) ---------------------------------------------------


@register_kernel("reft_forward", "cuda")
def reft_forward(h, P, Q, b, rows, dropout_p, seed):
    need_no_float64(h=h, P=P, Q=Q, b=b)
    n_slots = _formats.reft_slots(h, rows)
    out, z = _formats.reft_forward_outputs(h, P.shape[0], n_slots)
    if rows is not None:
        out.copy_(h)  # the kernel writes the selected rows only
    if n_slots == 0:
        return out, z
    with torch.cuda.device(h.device):
        mod = _native.cuda()
        mod.reft_forward(_native.reft_forward_params(mod, h, P, Q, b, rows, dropout_p, seed, out, z), _stream(h.device))
    return out, z


@register_kernel("reft_backward", "cuda")
def reft_backward(grad, h, P, Q, z, rows, dropout_p, seed, need_h, need_params):
    need_no_float64(grad=grad, h=h, P=P, Q=Q, z=z)
    r, d = P.shape
    grads = _formats.reft_backward_outputs(h, r, need_h, need_params)
    if not (need_h or need_params):
        return grads
    if need_h and rows is not None:
        grads[0].copy_(grad)  # the kernel writes the selected rows only
    with torch.cuda.device(h.device):
        mod = _native.cuda()
        ws = None
        if need_params:  # per-block partial sums of dP, dQ, db (the launcher never allocates)
            ws = torch.empty(mod.reft_backward_workspace(z.shape[0], d, r), dtype=torch.float32, device=h.device)
        params = _native.reft_backward_params(
            mod, grad, h, P, Q, z, rows, dropout_p, seed, grads, need_h, need_params, ws
        )
        mod.reft_backward(params, _stream(h.device))
    return grads


# ---- fused optimizer steps (csrc/cuda/optim.cu) ---------------------------------------------


@register_kernel("adamw_step", "cuda")
def adamw_step(param, grad, exp_avg, exp_avg_sq, hyper):
    with torch.cuda.device(param.device):
        mod = _native.cuda()
        params = _native.optim_32bit_params(mod, _formats.OPTIM_ADAMW, param, grad, exp_avg, exp_avg_sq, hyper)
        mod.optim_32bit_step(params, _stream(param.device))


@register_kernel("lion_step", "cuda")
def lion_step(param, grad, exp_avg, hyper):
    with torch.cuda.device(param.device):
        mod = _native.cuda()
        params = _native.optim_32bit_params(mod, _formats.OPTIM_LION, param, grad, exp_avg, None, hyper)
        mod.optim_32bit_step(params, _stream(param.device))


@register_kernel("adamw8bit_step", "cuda")
def adamw8bit_step(param, grad, state1, state2, absmax1, absmax2, code1, code2, hyper):
    with torch.cuda.device(param.device):
        mod = _native.cuda()
        params = _native.optim_8bit_params(mod, param, grad, state1, state2, absmax1, absmax2, code1, code2, hyper)
        mod.optim_8bit_step(params, _stream(param.device))
