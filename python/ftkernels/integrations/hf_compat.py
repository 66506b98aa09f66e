"""Every Transformers internal the integrations lean on, each read at call time with a fallback.

Transformers renames and moves what a wrapper around its models sees: 5.x passes the KV cache
to ``forward`` as ``cache=`` where 4.x passed ``past_key_values=`` (and before 4.36 a tuple of
per-layer (key, value) tensors), drops ``cache_position`` from ``generate``'s calls, leaves the
``attention_mask`` out when it is all ones, and moved ``no_init_weights`` between modules. The
helpers here read what every version gives and say so when they cannot: none of them imports
a private name without a fallback, and the tested range is in pyproject.toml and the README.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any

import torch
from torch import nn

# The names under which a decoder's forward receives its KV cache: 5.x, then 4.x (and older).
CACHE_KWARGS = ("cache", "past_key_values")

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """One warning a process for each ``key`` (a fallback is taken on every call after it)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def forward_arguments(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of one ``model.forward`` call by name, whether passed by position or by
    keyword (``model(ids, mask)`` and ``model(input_ids=ids, attention_mask=mask)`` alike)."""
    if not args:
        return dict(kwargs)
    try:
        signature = inspect.signature(model.forward)
        named = dict(signature.bind_partial(*args, **kwargs).arguments)
    except (TypeError, ValueError):  # a forward with an unusual signature: the first is the input
        return {"input_ids": args[0], **kwargs}
    for name, p in signature.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD and isinstance(named.get(name), dict):
            named.update(named.pop(name))
    return named


def _cache_length(cache) -> int | None:
    """Tokens held by a KV cache: a ``Cache`` object (``get_seq_length``), or the tuple of
    per-layer (key, value) tensors of older Transformers (keys ``(batch, heads, seq, dim)``)."""
    get = getattr(cache, "get_seq_length", None)
    if callable(get):
        return int(get())
    if isinstance(cache, (tuple, list)):
        if not cache:
            return 0
        layer = cache[0]
        if isinstance(layer, (tuple, list)) and layer and isinstance(layer[0], torch.Tensor):
            return int(layer[0].shape[-2])
    return None


def past_length(call: dict[str, Any], seq: int) -> int:
    """How many tokens of the sequence precede this call's ``seq`` inputs (0 for a prefill or a
    call without a cache, the cache's length for a decode step). Read from ``cache_position``
    when given (4.38-4.5x), else from the cache under either name, else from ``position_ids``."""
    cp = call.get("cache_position")
    if isinstance(cp, torch.Tensor) and cp.numel():
        return int(cp.reshape(-1)[0])
    for name in CACHE_KWARGS:
        cache = call.get(name)
        if cache is None:
            continue
        n = _cache_length(cache)
        if n is not None:
            return n
        warn_once(
            f"cache:{type(cache).__name__}",
            f"ftkernels: cannot tell the length of a {type(cache).__name__} cache; reading position_ids",
        )
        break
    pos = call.get("position_ids")
    if isinstance(pos, torch.Tensor) and pos.dim() >= 1 and pos.shape[-1] == seq and pos.numel():
        # The last column holds each row's newest position; the shortest row bounds what came before.
        return max(0, int(pos.reshape(-1, seq)[:, -1].min()) + 1 - seq)
    return 0


def real_tokens(mask, batch: int, width: int) -> torch.Tensor | None:
    """The (batch, width) bool map of real (non-padding) tokens at positions [0, width) of the
    sequence, from an attention mask as a model's forward receives it: 2-D (batch, >= width), or
    4-D (batch, 1, query, key) with True or 0.0 where a query attends (the last query attends to
    every real token before it). None when the mask does not say (absent, or another shape)."""
    if not isinstance(mask, torch.Tensor):
        return None
    if mask.dim() == 2 and mask.shape[1] >= width:
        real = mask[:, :width] != 0
    elif mask.dim() == 4 and mask.shape[-1] >= width:
        row = mask[:, 0, -1, :width]
        real = row if row.dtype == torch.bool else row == 0
    else:
        return None
    if real.shape[0] != batch:
        if batch % real.shape[0]:
            return None
        real = real.repeat_interleave(batch // real.shape[0], dim=0)  # beams, num_return_sequences
    return real


def no_init_weights():
    """Transformers' context that skips the random initialisation of weights a checkpoint
    overwrites (3.5 s -> 0.04 s for SmolLM2-135M on 2 cores). It moved from
    ``transformers.modeling_utils`` (4.x) to ``transformers.initialization`` (5.x); without
    either the weights are initialised, which is slower but right."""
    try:
        from transformers.initialization import no_init_weights as ctx
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights as ctx
        except ImportError:
            warn_once("no_init_weights", "ftkernels: transformers has no no_init_weights; initialising weights")
            return contextlib.nullcontext()
    return ctx()


def transformers_version() -> tuple[int, int]:
    """(major, minor) of the installed Transformers."""
    import transformers

    major, minor = (transformers.__version__.split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The keyword that sets a model's dtype in ``from_pretrained`` / ``from_config``: ``dtype``
    from Transformers 4.56 on, ``torch_dtype`` before (4.56-4.57 take both, with a warning
    for the old one; 5.x only the new one)."""
    return {"dtype" if transformers_version() >= (4, 56) else "torch_dtype": dtype}


def from_config(cls, config, dtype: torch.dtype):
    """``cls.from_config(config)`` with its weights in ``dtype``."""
    return cls.from_config(config, **dtype_kwarg(dtype))


def enable_gradient_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """Recompute each decoder layer's activations in the backward (torch.utils.checkpoint,
    non-reentrant by default: it needs no input that requires grad, which a frozen base with
    adapters or LoReFT hooks does not have). Transformers names it
    ``activation_checkpointing_enable`` from 5.2x and ``gradient_checkpointing_enable`` before
    (deprecated after); whichever the model has is called."""
    kwargs = {"use_reentrant": use_reentrant}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs=kwargs)
        return
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if not callable(enable):
        raise TypeError(
            f"model: {type(model).__name__} has no activation_checkpointing_enable or "
            "gradient_checkpointing_enable (not a Transformers PreTrainedModel?)"
        )
    enable(gradient_checkpointing_kwargs=kwargs)


def is_conv1d(m: nn.Module) -> bool:
    """GPT-2's ``transformers.pytorch_utils.Conv1D``: a linear layer whose weight is stored
    (in, out), which Transformers' bitsandbytes loader converts too. Matched by its class name
    and its ``nf`` attribute (the output size) so that nothing of Transformers is imported."""
    return (
        type(m).__name__ == "Conv1D"
        and isinstance(getattr(m, "nf", None), int)
        and isinstance(getattr(m, "weight", None), torch.Tensor)
        and m.weight.dim() == 2
        and m.weight.shape[1] == m.nf
    )
