"""Integrations with model libraries (imported on use; each needs its library installed)."""

from .transformers import QuantizeStats, load_quantized, model_bytes, quantize_model, save_quantized

__all__ = ["QuantizeStats", "load_quantized", "model_bytes", "quantize_model", "save_quantized"]
