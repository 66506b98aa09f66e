"""LoRA over a dense linear layer (the "lora" method; "qlora" uses LoRALinear4bit).

``y = base(x) + scaling · lora_B(lora_A(dropout(x)))`` with ``base`` a frozen ``nn.Linear``:
PEFT's LoRA layer, with its initialisation and its module and parameter names (``base_layer``,
``lora_A``, ``lora_B``), so adapters move between the two. There is no fused kernel to gain
here: the dense matmul dominates and torch runs it at the GEMM rate.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .lora_linear_4bit import _check_hparams

__all__ = ["LoRALinear"]


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) plus trainable LoRA factors of rank ``r``."""

    def __init__(
        self,
        base: nn.Linear,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        *,
        use_rslora: bool = False,
        lora_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be a torch.nn.Linear, got {type(base).__name__}")
        _check_hparams(r, lora_alpha, lora_dropout, use_rslora, lora_dtype)
        self.base_layer = base.requires_grad_(False)
        self.in_features, self.out_features, self.r = base.in_features, base.out_features, r
        self.lora_alpha, self.use_rslora = lora_alpha, use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        device = base.weight.device
        # PEFT's initialisation, drawn on the CPU in fp32 as PEFT draws it (same seed, same A).
        self.lora_A = nn.Linear(self.in_features, r, bias=False, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, dtype=torch.float32)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(device=device, dtype=lora_dtype)
        self.lora_B.to(device=device, dtype=lora_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        a = self.lora_A.weight
        lora = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype))))
        return y + (self.scaling * lora).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A dense nn.Linear with the LoRA update folded into its weight."""
        base = self.base_layer
        out = nn.Linear(
            self.in_features,
            self.out_features,
            bias=base.bias is not None,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        delta = self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        out.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
        if base.bias is not None:
            out.bias.copy_(base.bias)
        return out

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"
