"""Layers built on the ops: 4-bit linear layers, LoRA over them, ReFT interventions."""

from .linear_nf4 import LinearNF4, dequantized_weights
from .lora_linear_4bit import LoRALinear4bit
from .loreft import DiReFT, LoReFT, parse_positions, reft_positions

__all__ = [
    "DiReFT",
    "LinearNF4",
    "LoRALinear4bit",
    "LoReFT",
    "dequantized_weights",
    "parse_positions",
    "reft_positions",
]
