"""The fp64 oracle of LoRALinear4bit and its error bounds, shared by the layer's tests
(test_lora_linear_4bit.py) and its comparisons with PEFT (test_lora_linear_4bit_peft.py).

Tolerances: an fp32 result is compared with an fp64 oracle (the dequantized weight is exact in
fp32: a code times an fp32 scale) under the worst-case bound of an n-term fp32 dot product,
gamma_n * sum|a_i * b_i| with gamma_n = n*u / (1 - n*u), u = 2^-24 (Higham, Thm 3.5). Two fp32
results (ours, PEFT's) then differ by at most the sum of their bounds. A result rounded to bf16
or fp16 adds its unit roundoff (2^-8, 2^-11) relative per rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ftkernels
from ftkernels.nn import LoRALinear4bit

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
U32 = 2.0**-24
U_BF16 = 2.0**-8
ADAPTER = "default"


def gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def randomize_lora(m: LoRALinear4bit, seed=1):
    """B is zero after init; give both factors values so the LoRA branch counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.1)
        m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    return m


def deq32(m: LoRALinear4bit) -> torch.Tensor:
    """The base weight dequantized in fp32 (code * absmax, exact): the op's W."""
    qs = m.base_layer.quant_state
    return ftkernels.dequantize_4bit(
        m.base_layer.weight,
        ftkernels.QuantState(
            absmax=qs.absmax,
            shape=qs.shape,
            code=qs.code,
            blocksize=qs.blocksize,
            quant_type=qs.quant_type,
            dtype=torch.float32,
            offset=qs.offset,
            state2=qs.state2,
        ),
    )


def oracle(m: LoRALinear4bit, x: torch.Tensor, g: torch.Tensor | None = None):
    """fp64 forward (and backward for grad_out g) of the layer, with the elementwise worst-case
    bound of computing each in fp32: {name: (value, bound)}."""
    W, A, B = deq32(m).double(), m.lora_A.weight.double(), m.lora_B.weight.double()
    s = m.scaling
    n, k = W.shape
    r = A.shape[0]
    x2 = x.detach().reshape(-1, k).double()
    b = m.bias.double() if m.bias is not None else torch.zeros(n, dtype=torch.float64)
    y = x2 @ W.T + b + s * (x2 @ A.T) @ B.T
    mag = x2.abs() @ W.abs().T + b.abs() + abs(s) * (x2.abs() @ A.abs().T) @ B.abs().T
    out = {"y": (y.reshape(*x.shape[:-1], n), (gamma(k + r + 4) * mag).reshape(*x.shape[:-1], n))}
    if g is not None:
        g2 = g.reshape(-1, n).double()
        m_rows = g2.shape[0]
        gB, gBa = g2 @ B, g2.abs() @ B.abs()
        out["dx"] = (
            (g2 @ W + s * gB @ A).reshape(x.shape),
            (gamma(n + r + 4) * (g2.abs() @ W.abs() + abs(s) * gBa @ A.abs())).reshape(x.shape),
        )
        out["dA"] = (s * gB.T @ x2, gamma(n + m_rows + 4) * abs(s) * gBa.T @ x2.abs())
        out["dB"] = (s * g2.T @ (x2 @ A.T), gamma(m_rows + k + 4) * abs(s) * g2.abs().T @ (x2.abs() @ A.abs().T))
    return out


def assert_within(actual: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str):
    err = (actual.double() - ref).abs()
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} elements beyond the bound; worst excess "
        f"{(err - bound).max().item():.3g} (max err {err.max().item():.3g})"
    )


def run(module: nn.Module, x: torch.Tensor, g: torch.Tensor, params: dict[str, torch.Tensor]):
    """Output and the gradients of x and params for grad_out g (grads cleared first)."""
    for p in params.values():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(g)
    return y.detach(), x.grad, {k: p.grad.clone() for k, p in params.items()}


def our_params(m):
    return {"A": m.lora_A.weight, "B": m.lora_B.weight}
