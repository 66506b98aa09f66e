"""Layers built on the 4-bit ops."""

from .linear_nf4 import LinearNF4, dequantized_weights

__all__ = ["LinearNF4", "dequantized_weights"]
