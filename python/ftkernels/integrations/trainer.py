"""Transformers' Trainer and TRL's SFTTrainer on the fused kernels, with the training code as it is.

    trainer = SFTTrainer(model, args=args, train_dataset=ds, peft_config=LoraConfig(...),
                         **fused_trainer_kwargs(args))

``fused_trainer_kwargs(args)`` gives the Trainer a :class:`FusedCallback` and an
``optimizer_cls_and_kwargs`` for an :mod:`ftkernels.optim` optimizer built from ``args``
(learning rate, betas, epsilon; Trainer adds the weight-decay groups itself). The callback, when
the Trainer is built (after SFTTrainer's ``get_peft_model``) and again when training begins,
runs :func:`~ftkernels.integrations.patch_peft` on the model and, where the model allows,
fuses its output head and loss in training forwards that are given labels
(:func:`~ftkernels.integrations.loss.fuse_lm_loss_when_training`). TRL computes its loss with
its own fused head (``fused_lm_head=True``), which is left to run. When training ends the loss
hooks come off and the layers stay patched (evaluation and generation run the fused op too;
what is saved is PEFT's either way); ``unpatch_peft(model)`` gives PEFT's forward back.

This module imports Transformers; ``ftkernels.integrations`` loads it on first use.
"""

from __future__ import annotations

from torch import nn
from transformers import TrainerCallback

from .. import optim
from .._checks import need_bool
from .dropin import PatchReport, patch_peft
from .loss import FusedLossHandle, fuse_lm_loss_when_training

__all__ = ["FusedCallback", "fused_trainer_kwargs", "optimizer_cls_and_kwargs"]

_OPTIMIZERS = ("AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "Lion", "PagedLion")


def _causal_lm(model: nn.Module) -> nn.Module:
    """The Transformers model under PEFT's wrappers (PeftModel -> LoraModel -> the causal LM)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _has_lora(model: nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return any(isinstance(m, LoraLayer) for m in model.modules())


class FusedCallback(TrainerCallback):
    """Runs a Trainer's PEFT LoRA layers with the fused op and, with ``fused_loss``, its head and
    loss fused (see the module's docstring). ``report`` is the last :class:`PatchReport`
    (None until a model with LoRA layers is seen)."""

    def __init__(self, fused_loss: bool = True, chunk_rows: int | None = None):
        need_bool("fused_loss", fused_loss)
        if chunk_rows is not None and (
            isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1
        ):
            raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
        self.fused_loss = fused_loss
        self.chunk_rows = chunk_rows
        self.report: PatchReport | None = None
        self.fused_loss_active = False
        self._loss: FusedLossHandle | None = None

    def _patch(self, model) -> None:
        if model is None:
            return
        if _has_lora(model):
            self.report = patch_peft(model)
        if self.fused_loss and self._loss is None:
            self._loss = fuse_lm_loss_when_training(_causal_lm(model), self.chunk_rows)
            self.fused_loss_active = self._loss.active

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._patch(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._patch(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._loss is not None:
            self._loss.remove()
            self._loss = None


def optimizer_cls_and_kwargs(args, optimizer: str = "AdamW8bit"):
    """``(cls, kwargs)`` for Trainer's ``optimizer_cls_and_kwargs``: the :mod:`ftkernels.optim`
    class named ``optimizer`` with ``args``' learning rate, betas and epsilon (Lion: its betas)."""
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(_OPTIMIZERS)}, got {optimizer!r}")
    for name in ("learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon"):
        if not hasattr(args, name):
            raise TypeError(f"args must be a transformers.TrainingArguments (no {name}), got {type(args).__name__}")
    kwargs = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2)}
    if "Lion" not in optimizer:
        kwargs["eps"] = args.adam_epsilon
    return getattr(optim, optimizer), kwargs


def fused_trainer_kwargs(args, optimizer: str | None = "AdamW8bit", fused_loss: bool = True) -> dict:
    """Keyword arguments for ``Trainer(...)`` / ``SFTTrainer(...)``: ``callbacks`` with a
    :class:`FusedCallback` and, unless ``optimizer`` is None, ``optimizer_cls_and_kwargs``."""
    out = {"callbacks": [FusedCallback(fused_loss=fused_loss)]}
    if optimizer is not None:
        out["optimizer_cls_and_kwargs"] = optimizer_cls_and_kwargs(args, optimizer)
    return out
