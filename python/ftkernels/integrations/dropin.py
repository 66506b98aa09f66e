"""PEFT models on the fused QLoRA op, unchanged: ``patch_peft(model)`` and ``unpatch_peft(model)``.

A PEFT LoRA layer over a 4-bit weight computes ``base_layer(x)`` (bitsandbytes dequantizes W
and runs a GEMM), then ``lora_B(lora_A(dropout(x))) * scaling`` as three more ops, each saving
its input for backward. ``patch_peft`` gives each such layer an instance ``forward`` that runs
:func:`ftkernels.lora_linear_4bit` instead: one op forward and one backward, reading the layer's
own packed weight and quant state (bitsandbytes' ``Params4bit`` bytes, or a
:class:`~ftkernels.nn.LinearNF4`'s) as they are, with no copy and no requantization.

Nothing else changes: the module tree, parameter names, ``state_dict``, ``save_pretrained``,
``merge_and_unload``, ``set_adapter`` and ``disable_adapter`` are PEFT's. The patched forward
checks on every call that the layer is in the one state the fused op computes (one active
adapter, plain LoRA, not merged, adapters enabled, no per-call arguments) and otherwise calls
PEFT's own forward, so switching adapters, merging or disabling them keeps PEFT's results.

Layers over a ``LinearNF4`` need PEFT to know that type: ``lora_config_for_nf4(config)``
registers it (PEFT's custom-module mapping) before ``get_peft_model``.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
import weakref
from collections import Counter

import torch
from torch import nn

from .._formats import FLOAT_DTYPES  # the op's input dtypes (others go to PEFT's forward)
from ..functional import lora_linear_4bit
from ..nn.linear_nf4 import LinearNF4
from ..nn.lora_linear_4bit import _bnb_linear4bit_class, _from_bnb_linear4bit

__all__ = ["PatchReport", "lora_config_for_nf4", "patch_peft", "unpatch_peft"]

# A patched layer's instance attribute; its presence marks the layer as patched.
_FORWARD = "forward"
_MARK = "_ftk_fused_forward"

# bitsandbytes weight -> the LinearNF4 view of it (shares its tensors), per PEFT layer, keyed
# by what changes when the weight is replaced (merge, .to(device), requantization).
_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch_peft` found: ``patched`` layers run the fused op; ``fallbacks``
    counts the LoRA layers left on PEFT's forward, by reason; ``layers`` maps each LoRA layer's
    name to ``"fused"`` or its reason."""

    patched: int = 0
    fallbacks: Counter = dataclasses.field(default_factory=Counter)
    layers: dict = dataclasses.field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.patched + sum(self.fallbacks.values())

    def __str__(self) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.fallbacks.items()))
        return f"{self.patched} of {self.total} LoRA layers fused" + (f" (PEFT's forward: {why})" if why else "")


def _lora_layer_class():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        raise ImportError("patch_peft needs PEFT (pip install peft)") from None
    return LoraLayer


def _base_kind(base: nn.Module) -> str | None:
    if isinstance(base, LinearNF4):
        return "nf4"
    bnb_cls = _bnb_linear4bit_class()
    if bnb_cls is not None and isinstance(base, bnb_cls):
        return "bnb"
    return None


def _weight_4bit(layer: nn.Module, base: nn.Module):
    """(packed, quant_state, bias) of the layer's 4-bit base; None if it holds no quantized
    weight yet (a bitsandbytes layer quantizes on its first move to a device)."""
    if isinstance(base, LinearNF4):
        return (*base.weight_and_state(), base.bias)
    w = base.weight
    qs = getattr(w, "quant_state", None) or getattr(base, "quant_state", None)
    if qs is None or w.is_floating_point():
        return None
    key = (w.data_ptr(), id(qs), qs.absmax.data_ptr(), w.device)
    cached = _VIEWS.get(layer)
    if cached is None or cached[0] != key:
        # Reads bitsandbytes' bytes and state through the state_dict format both share, checking
        # shapes and codes once; the big tensors are shared, not copied (except where bitsandbytes
        # repacked a CPU weight for its own kernel, which is undone on a copy).
        cached = (key, _from_bnb_linear4bit(base, None, None, None))
        _VIEWS[layer] = cached
    view = cached[1]
    return view.weight, view.quant_state, base.bias


def _plan(layer: nn.Module) -> tuple[str | None, str | None, tuple | None]:
    """(why not, adapter, weight): why the fused op cannot serve this layer as it is now (None
    when it can), else its one active adapter and :func:`_weight_4bit`'s (packed, state, bias)."""
    base = layer.get_base_layer()
    kind = _base_kind(base)
    if kind is None:
        return f"base {type(base).__name__} is not 4-bit", None, None
    if layer.disable_adapters:
        return "adapters disabled", None, None
    if layer.merged:
        return "merged", None, None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters", None, None
    name = active[0]
    if getattr(layer, "use_dora", {}).get(name, False) or name in getattr(layer, "lora_variant", {}):
        return "DoRA or another LoRA variant", None, None
    lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear:
        return "LoRA factors are not nn.Linear", None, None
    if lora_B.bias is not None or lora_A.bias is not None:
        return "lora_bias", None, None
    if type(layer.lora_dropout[name]) not in (nn.Dropout, nn.Identity):
        return f"dropout {type(layer.lora_dropout[name]).__name__}", None, None
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out", None, None
    weight = _weight_4bit(layer, base)
    if weight is None:
        return "weight not quantized yet", None, None
    return None, name, weight


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    peft_forward = type(self).forward
    if args or kwargs or not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        return peft_forward(self, x, *args, **kwargs)
    why, name, weight = _plan(self)
    if why is not None:
        return peft_forward(self, x)
    packed, qs, bias = weight
    if x.shape[-1] != qs.shape[1] or x.device != packed.device:
        return peft_forward(self, x)
    dropout = self.lora_dropout[name]
    return lora_linear_4bit(
        x,
        packed,
        qs,
        self.lora_A[name].weight,
        self.lora_B[name].weight,
        float(self.scaling[name]),
        bias,
        dropout_p=dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
        training=self.training,
    )


def _lora_layers(model: nn.Module):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a PeftModel), got {type(model).__name__}")
    LoraLayer = _lora_layer_class()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def patch_peft(model: nn.Module) -> PatchReport:
    """Run every LoRA layer of ``model`` (a ``PeftModel``, or any module holding PEFT LoRA
    layers) over a bitsandbytes ``Linear4bit`` or a ``LinearNF4`` with the fused op, forward and
    backward. Returns a :class:`PatchReport`; layers the op cannot serve (DoRA, several active
    adapters, merged, disabled, a dense base, ...) keep PEFT's forward and are counted by reason.
    Calling it again is harmless; :func:`unpatch_peft` undoes it."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(f"model: {type(model).__name__} has no PEFT LoRA layers (build it with get_peft_model)")
    report = PatchReport()
    for name, layer in layers:
        # A 4-bit layer is patched whatever its state now: the forward re-checks it per call. The
        # forward is a partial of a module-level function, not a bound method: it pickles and
        # deep-copies.
        if _base_kind(layer.get_base_layer()) is not None and _MARK not in layer.__dict__:
            layer.__dict__[_FORWARD] = functools.partial(_fused_forward, layer)
            layer.__dict__[_MARK] = True
        reason = _plan(layer)[0]
        if reason is None:
            report.patched += 1
            report.layers[name] = "fused"
        else:
            report.fallbacks[reason] += 1
            report.layers[name] = reason
    return report


def unpatch_peft(model: nn.Module) -> int:
    """Give every LoRA layer of ``model`` PEFT's forward back; returns how many were patched."""
    n = 0
    for _, layer in _lora_layers(model):
        if layer.__dict__.pop(_MARK, None):
            layer.__dict__.pop(_FORWARD, None)
            _VIEWS.pop(layer, None)
            n += 1
    return n


# ---- PEFT over LinearNF4 ----------------------------------------------------------------------


def _nf4_lora_class():
    """PEFT's dense LoRA layer, with merging done through the 4-bit weight (dequantize, add,
    requantize with the same settings, as PEFT does for bitsandbytes' Linear4bit). Built on first
    use (it subclasses a PEFT class) and kept as this module's ``LoraLinearNF4``, so models holding
    it pickle and unpickle (see ``__getattr__``)."""
    cls = globals().get("LoraLinearNF4")
    if cls is not None:
        return cls
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    class LoraLinearNF4(PeftLoraLinear):
        def __init__(self, *args, **kwargs):
            with warnings.catch_warnings():
                # PEFT reads in_features / out_features off the layer and warns that it does not
                # know the type; this class is what makes it known.
                warnings.filterwarnings("ignore", message="Unsupported layer type")
                super().__init__(*args, **kwargs)

        @torch.no_grad()
        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            from peft.tuners.tuners_utils import check_adapters_to_merge

            for name in check_adapters_to_merge(self, adapter_names):
                if name not in self.lora_A:
                    continue
                self._add_delta(name, +1.0, safe_merge)
                self.merged_adapters.append(name)

        @torch.no_grad()
        def unmerge(self) -> None:
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                if name in self.lora_A:
                    self._add_delta(name, -1.0, False)

        def _add_delta(self, name: str, sign: float, safe_merge: bool) -> None:
            base = self.get_base_layer()
            if base.is_sharded:
                raise ValueError(f"adapter {name}: merging into a sharded LinearNF4 is not supported; merge unsharded")
            qs = base.quant_state
            w = base.dequantize().float() + sign * self.get_delta_weight(name).float()
            if safe_merge and not torch.isfinite(w).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            dense = nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
            dense.weight = nn.Parameter(w.to(qs.dtype), requires_grad=False)
            fresh = LinearNF4.from_linear(
                dense, blocksize=qs.blocksize, compress_statistics=qs.nested, quant_type=qs.quant_type
            )
            base.weight = fresh.weight
            base.quant_state = fresh.quant_state
            if base._dense is not None:
                base._dense.clear()

    LoraLinearNF4.__module__, LoraLinearNF4.__qualname__ = __name__, "LoraLinearNF4"
    globals()["LoraLinearNF4"] = LoraLinearNF4
    return LoraLinearNF4


def __getattr__(name: str):
    if name == "LoraLinearNF4":  # unpickling a model that holds one, in a fresh process
        return _nf4_lora_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def lora_config_for_nf4(config):
    """``config`` (a ``peft.LoraConfig``) with :class:`~ftkernels.nn.LinearNF4` registered, so
    ``get_peft_model`` and ``PeftModel.from_pretrained(..., config=...)`` can wrap the layers of
    a model quantized with ``quantize_model``. Returns the same config."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ImportError("lora_config_for_nf4 needs PEFT (pip install peft)") from None
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}")
    if not hasattr(config, "_register_custom_module"):
        raise RuntimeError("config: this PEFT has no custom-module support (PEFT >= 0.13 has it)")
    config._register_custom_module({LinearNF4: _nf4_lora_class()})
    return config
