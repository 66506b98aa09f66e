"""The fused LoRA op composed from a backend's two kernels (csrc/include/ftk/lora.h).

Each native backend (cpu, cuda, triton) supplies
  ``dropout(t, p, seed) -> fp32``: drop(t) of a 2-D t with the hashed mask (t as fp32 when
      seed is None), and
  ``matmul(mode, X, w, bias, L, R, scaling, p, seed) -> out``: the big product with its
      rank-r epilogue, ``_formats.LORA_FORWARD`` or ``_formats.LORA_GRAD_INPUT``;
and this module does the rest the same way for all of them: the rank-r GEMMs (drop(x)·Aᵀ,
dy·B, dA, dB; ~1% of the FLOPs at r=16, K=N=4096) go to torch's matmul. :func:`register`
registers the op's two kernels for a backend from its pair.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import _formats
from .._checks import need_no_float64
from .._registry import register_kernel


def _cpu_fp32(t: torch.Tensor) -> torch.Tensor:
    """t as mm32 multiplies it: fp32 on the CPU, as it is elsewhere."""
    return t.float() if t.device.type == "cpu" else t


def mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32. On the CPU both sides go to fp32 first, 16-bit GEMMs or not: these rank-r
    products are ~1% of the layer's FLOPs, and in bf16 their roundings doubled dB's error
    against torch's own bf16 layer. A tall, r-column product is computed as its transpose
    (bᵀ·aᵀ)ᵀ: MKL's sgemm took 0.92 ms for (1024 x 1536)·(1536 x 8) and 0.33 ms for the same
    product transposed, 1.28 against 0.38 ms for (1536 x 1024)·(1024 x 8). On a GPU a 16-bit a
    keeps its dtype (b is cast to it) and the tensor cores accumulate in fp32, so no M x K fp32
    copy of x is made."""
    if a.device.type == "cpu":
        a, b = _cpu_fp32(a), _cpu_fp32(b)
        return (b.T @ a.T).T if 8 * b.shape[1] <= a.shape[0] else a @ b
    if a.dtype in (torch.float32, torch.float64):
        return a.float() @ b.float()
    return (a @ b.to(a.dtype)).float()


def forward(x, w, lora_A, lora_B, scaling, bias, dropout_p, seed, *, dropout: Callable, matmul: Callable):
    n, k = w.shape
    x2 = x.reshape(-1, k)
    xd = dropout(x2, dropout_p, seed) if seed is not None else x2
    xa = mm32(xd, lora_A.T)  # (M, r) fp32, the epilogue's L
    y = matmul(_formats.LORA_FORWARD, x2, w, bias, xa, lora_B, scaling, 0.0, None)
    return y.view(*x.shape[:-1], n)


def backward(
    grad_out, x, w, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_lora, *, dropout: Callable, matmul: Callable
):
    n, k = w.shape
    dy = grad_out.reshape(-1, n)
    g = mm32(dy, lora_B)  # (M, r) fp32: the gradient at the LoRA bottleneck
    dx, dA, dB = _formats.lora_linear_4bit_backward_outputs(x, lora_A, lora_B, False, False)
    if need_x:
        dx = matmul(_formats.LORA_GRAD_INPUT, dy, w, None, g, lora_A, scaling, dropout_p, seed).view(x.shape)
    if need_lora:
        x2 = x.reshape(-1, k)
        xd = dropout(x2, dropout_p, seed) if seed is not None else x2
        xd, dy = _cpu_fp32(xd), _cpu_fp32(dy)  # widened once for the four products, not in each
        dA = (mm32(xd.T, g).T * scaling).to(lora_A.dtype).contiguous()  # x's side first: no fp32 copy of x
        dB = (mm32(dy.T, mm32(xd, lora_A.T)) * scaling).to(lora_B.dtype)
    return dx, dA, dB


def register(backend: str, *, dropout: Callable, matmul: Callable, widen: Callable[[torch.dtype], bool] | None = None):
    """Registers lora_linear_4bit and its backward for ``backend``, composed from its two kernels.
    ``widen(dtype)``: whether x and dy of that dtype are widened to fp32 once, before every
    product that reads them (the CPU backend without 16-bit GEMMs for the dtype), dx then
    rounded back to x's dtype; None: never."""

    def wide(t: torch.Tensor) -> torch.Tensor:
        return t.float() if widen is not None and t.dtype != torch.float32 and widen(t.dtype) else t

    @register_kernel("lora_linear_4bit", backend)
    def lora_linear_4bit(x, w, lora_A, lora_B, scaling, bias, dropout_p, seed):
        need_no_float64(x=x, lora_A=lora_A, lora_B=lora_B, bias=bias)
        y = forward(wide(x), w, lora_A, lora_B, scaling, bias, dropout_p, seed, dropout=dropout, matmul=matmul)
        return y.to(x.dtype)

    @register_kernel("lora_linear_4bit_backward", backend)
    def lora_linear_4bit_backward(grad_out, x, w, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_lora):
        need_no_float64(grad_out=grad_out, x=x, lora_A=lora_A, lora_B=lora_B)
        args = (wide(grad_out), wide(x), w, lora_A, lora_B, scaling, dropout_p, seed, need_x, need_lora)
        dx, dA, dB = backward(*args, dropout=dropout, matmul=matmul)
        return dx.to(x.dtype), dA, dB
