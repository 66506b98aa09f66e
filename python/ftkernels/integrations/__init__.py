"""Integrations with model libraries (imported on use; each needs its library installed)."""

from .hf_compat import enable_gradient_checkpointing
from .lora import add_lora, load_lora, merge_lora, save_lora
from .loss import fused_lm_loss, linear_cross_entropy, supports_fused_lm_loss
from .reft import add_loreft, load_loreft, remove_loreft, save_loreft
from .transformers import QuantizeStats, load_quantized, model_bytes, quantize_model, save_quantized

__all__ = [
    "QuantizeStats",
    "add_lora",
    "add_loreft",
    "enable_gradient_checkpointing",
    "fused_lm_loss",
    "linear_cross_entropy",
    "load_loreft",
    "load_lora",
    "load_quantized",
    "merge_lora",
    "model_bytes",
    "quantize_model",
    "remove_loreft",
    "save_loreft",
    "save_lora",
    "save_quantized",
    "supports_fused_lm_loss",
]
