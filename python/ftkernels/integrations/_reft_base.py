"""What attaching ReFT interventions needs to know, whichever format describes them: a model's
decoder blocks and hidden size, the ``ftkernels.nn`` intervention types by the name
``loreft_config.json`` records, and the plan of what to attach (:class:`_Plan`).

``reft`` (the hooks, ``add_loreft`` and our own saved format) and ``pyreft`` (pyreft's specs
and saved directories) both read into a ``_Plan`` and both ask the model the same questions,
so these live below the two of them.
"""

from __future__ import annotations

from torch import nn

from ..nn.loreft import DiReFT, LoReFT
from ..nn.reft_types import ConsReFT, LobiReFT, NodiReFT, NoReFT

# The intervention types by the name save_loreft writes ("intervention" in its config).
INTERVENTION_TYPES: dict[str, type] = {
    "LoReFT": LoReFT,
    "NoReFT": NoReFT,
    "ConsReFT": ConsReFT,
    "LobiReFT": LobiReFT,
    "DiReFT": DiReFT,
    "NodiReFT": NodiReFT,
}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama/Qwen2/Mistral-style (model.model.layers) or GPT-2-style
    (model.transformer.h) model."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        mod = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList):
            return mod
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__} "
        "(looked for model.layers, transformer.h, gpt_neox.layers, model.decoder.layers)"
    )


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        if config is not None and isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__} (no config.hidden_size)")


class _Plan:
    """What to attach: the layers (sorted), rank, share_weights, dropout, the type's name in
    INTERVENTION_TYPES and its options, and the modules by name when they are given."""

    def __init__(self, layers, rank, share_weights, dropout, intervention, options, modules):
        self.layers, self.rank, self.share_weights, self.dropout = layers, rank, share_weights, dropout
        self.intervention, self.options, self.modules = intervention, options, modules
