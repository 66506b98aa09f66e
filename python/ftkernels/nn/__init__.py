"""Layers built on the ops: 4-bit linear layers, LoRA over them, ReFT interventions."""

from .linear_nf4 import LinearNF4, dequantized_weights
from .lora_linear_4bit import LoRALinear4bit
from .loreft import DiReFT, LoReFT, ReFTIntervention, parse_positions, reft_positions
from .reft_types import PYREFT_TYPES, ConsReFT, LobiReFT, NodiReFT, NoReFT, from_pyreft

__all__ = [
    "PYREFT_TYPES",
    "ConsReFT",
    "DiReFT",
    "LinearNF4",
    "LoRALinear4bit",
    "LoReFT",
    "LobiReFT",
    "NoReFT",
    "NodiReFT",
    "ReFTIntervention",
    "dequantized_weights",
    "from_pyreft",
    "parse_positions",
    "reft_positions",
]
