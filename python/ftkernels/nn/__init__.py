"""Layers built on the 4-bit ops."""

from .linear_nf4 import LinearNF4, dequantized_weights
from .lora_linear_4bit import LoRALinear4bit

__all__ = ["LinearNF4", "LoRALinear4bit", "dequantized_weights"]
