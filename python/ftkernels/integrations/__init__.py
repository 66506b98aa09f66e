"""Integrations with model libraries (imported on use; each needs its library installed).

``FusedCallback``, ``fused_trainer_kwargs`` and ``optimizer_cls_and_kwargs`` come from
``.trainer``, which imports Transformers: it is loaded on first access."""

from .dropin import PatchReport, lora_config_for_nf4, patch_peft, unpatch_peft
from .fsdp import all_gather_bytes, nf4_resident_bytes, shard_model
from .hf_compat import enable_gradient_checkpointing
from .lora import add_lora, load_lora, merge_lora, save_lora
from .loss import fuse_lm_loss_when_training, fused_lm_loss, linear_cross_entropy, supports_fused_lm_loss
from .reft import add_loreft, load_loreft, remove_loreft, save_loreft
from .training_state import load_training_state, save_training_state
from .transformers import QuantizeStats, load_quantized, model_bytes, quantize_model, save_quantized

_TRAINER = ("FusedCallback", "fused_trainer_kwargs", "optimizer_cls_and_kwargs")


def __getattr__(name: str):
    if name in _TRAINER:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FusedCallback",
    "PatchReport",
    "QuantizeStats",
    "add_lora",
    "add_loreft",
    "all_gather_bytes",
    "enable_gradient_checkpointing",
    "fuse_lm_loss_when_training",
    "fused_lm_loss",
    "fused_trainer_kwargs",
    "linear_cross_entropy",
    "load_loreft",
    "load_lora",
    "load_quantized",
    "load_training_state",
    "lora_config_for_nf4",
    "merge_lora",
    "model_bytes",
    "nf4_resident_bytes",
    "optimizer_cls_and_kwargs",
    "patch_peft",
    "quantize_model",
    "remove_loreft",
    "save_loreft",
    "save_lora",
    "save_quantized",
    "save_training_state",
    "shard_model",
    "supports_fused_lm_loss",
    "unpatch_peft",
]
