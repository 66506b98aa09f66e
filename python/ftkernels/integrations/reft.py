"""LoReFT interventions on a Transformers model's residual stream, as forward hooks.

``add_loreft(model, layers, rank, positions="f5+l5")`` attaches :class:`ftkernels.nn.LoReFT`
modules to the outputs of the chosen decoder layers (the residual stream after each block) and
freezes the model's own weights. The positions come from each call's ``attention_mask`` (the
first and last real tokens, left or right padding alike; :func:`ftkernels.nn.reft_positions`).
During generation only the prompt is edited: the prefill call sees the whole prompt and the
edits reach later tokens through the KV cache; the one-token decode calls (over a filled cache)
pass through untouched. In training, a call with ``labels`` takes its positions from the
prompt's tokens (label -100), so they are the positions generation will edit.
With ``share_weights=True`` one intervention a layer edits the first and the last positions;
with False, the first and the last positions get an intervention each (pyreft's two modes).
``save_loreft`` / ``load_loreft`` write and read them as safetensors plus a JSON config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..nn.loreft import LoReFT, parse_positions, reft_positions

CONFIG_NAME = "loreft_config.json"
WEIGHTS_NAME = "loreft_model.safetensors"
ATTRIBUTE = "ftk_loreft"  # the model attribute holding the interventions

__all__ = ["LoReFTInterventions", "add_loreft", "load_loreft", "remove_loreft", "save_loreft"]


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
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} "
                     "(looked for model.layers, transformer.h, gpt_neox.layers, model.decoder.layers)")


class LoReFTInterventions(nn.Module):
    """The interventions of one model (``model.ftk_loreft``) and the hooks that apply them."""

    def __init__(self, embed_dim: int, layers: list[int], rank: int, positions: str, share_weights: bool,
                 dropout: float):
        super().__init__()
        self.first, self.last = parse_positions(positions)
        self.config = {"embed_dim": embed_dim, "layers": layers, "rank": rank, "positions": positions,
                       "share_weights": share_weights, "dropout": dropout}
        names = [f"layer{i}" for i in layers] if share_weights else [
            f"layer{i}_{part}" for i in layers for part in ("first", "last")]
        self.interventions = nn.ModuleDict({n: LoReFT(embed_dim, rank, dropout) for n in names})
        self._positions: torch.Tensor | None = None
        self._handles: list = []

    def _capture_positions(self, model, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        x = ids if ids is not None else embeds
        if x is None:
            self._positions = None
            return
        batch, seq = x.shape[0], x.shape[1]
        cache = kwargs.get("past_key_values")
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            self._positions = None  # a decode step over the prompt's cache: nothing to edit
            return
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(batch, seq, dtype=torch.long, device=x.device)
        if mask.dim() != 2 or mask.shape[1] != seq:  # (older Transformers: the mask covers the cache)
            self._positions = None
            return
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.shape == mask.shape:
            # Training: the positions are the prompt's (the tokens whose label is -100), as at
            # generation, where only the prompt is there; a row without such tokens uses all.
            prompt = (mask != 0) & (labels == -100)
            mask = torch.where(prompt.any(dim=1, keepdim=True), prompt, mask != 0).long()
        self._positions = reft_positions(mask, self.config["positions"])

    def _edit(self, index: int, output):
        positions = self._positions
        if positions is None:
            return output
        h = output[0] if isinstance(output, tuple) else output
        if self.config["share_weights"]:
            h = self.interventions[f"layer{index}"](h, positions)
        else:
            h = self.interventions[f"layer{index}_first"](h, positions[:, :self.first])
            h = self.interventions[f"layer{index}_last"](h, positions[:, self.first:])
        return (h, *output[1:]) if isinstance(output, tuple) else h

    def attach(self, model: nn.Module) -> None:
        blocks = decoder_layers(model)
        self._handles.append(model.register_forward_pre_hook(self._capture_positions, with_kwargs=True))
        for i in self.config["layers"]:
            self._handles.append(blocks[i].register_forward_hook(
                lambda mod, args, output, i=i: self._edit(i, output)))

    def remove(self) -> None:
        """Detaches the hooks (the model computes as before add_loreft)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        if config is not None and isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__} (no config.hidden_size)")


def add_loreft(model: nn.Module, layers="all", rank: int = 4, positions: str = "f5+l5",
               share_weights: bool = True, dropout: float = 0.0, freeze_model: bool = True) -> LoReFTInterventions:
    """Attaches LoReFT interventions to ``layers`` (a list of decoder-layer indices, or "all")
    and returns them (also ``model.ftk_loreft``, so ``model.to(...)`` moves them). The model's
    own parameters are frozen unless ``freeze_model=False``; the interventions' are trainable."""
    if hasattr(model, ATTRIBUTE):
        raise ValueError("the model already has LoReFT interventions (model.ftk_loreft); remove them first")
    blocks = decoder_layers(model)
    n = len(blocks)
    if layers == "all":
        layers = list(range(n))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not layers or any(
            isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in layers):
        raise ValueError(f"layers must be 'all' or decoder-layer indices in [0, {n}), got {layers!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers repeats an index: {layers!r}")
    parse_positions(positions)  # a clear error for a bad spec, before anything changes
    if freeze_model:
        for p in model.parameters():
            p.requires_grad_(False)
    param = next(model.parameters(), None)
    reft = LoReFTInterventions(_hidden_size(model), sorted(layers), rank, positions, share_weights, dropout)
    if param is not None:
        reft.to(param.device)
    setattr(model, ATTRIBUTE, reft)
    reft.attach(model)
    return reft


def remove_loreft(model: nn.Module) -> LoReFTInterventions:
    """Detaches the model's interventions and returns them (the model computes as before)."""
    reft = getattr(model, ATTRIBUTE, None)
    if not isinstance(reft, LoReFTInterventions):
        raise ValueError("the model has no LoReFT interventions (add_loreft first)")
    reft.remove()
    delattr(model, ATTRIBUTE)
    return reft


def save_loreft(model: nn.Module, out_dir: str | os.PathLike) -> None:
    """Writes the model's interventions: a JSON config and the weights as safetensors."""
    from safetensors.torch import save_file

    reft = getattr(model, ATTRIBUTE, None)
    if not isinstance(reft, LoReFTInterventions):
        raise ValueError("the model has no LoReFT interventions (add_loreft first)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(reft.config, indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in reft.interventions.state_dict().items()},
              str(out / WEIGHTS_NAME))


def load_loreft(model: nn.Module, in_dir: str | os.PathLike) -> LoReFTInterventions:
    """Attaches the interventions saved by :func:`save_loreft` to ``model``. Reads JSON and
    safetensors only; the config and every tensor's shape are checked against the model."""
    from safetensors.torch import load_file

    src = Path(in_dir)
    try:
        config = json.loads((src / CONFIG_NAME).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {src / CONFIG_NAME}: {e}") from e
    keys = {"embed_dim", "layers", "rank", "positions", "share_weights", "dropout"}
    if not isinstance(config, dict) or set(config) != keys:
        got = sorted(config) if isinstance(config, dict) else config
        raise ValueError(f"{CONFIG_NAME} must hold exactly {sorted(keys)}, got {got!r}")
    if config["embed_dim"] != _hidden_size(model):
        raise ValueError(f"the interventions are for hidden size {config['embed_dim']}, the model's is "
                         f"{_hidden_size(model)}")
    reft = add_loreft(model, config["layers"], config["rank"], config["positions"], config["share_weights"],
                      config["dropout"])
    state = load_file(str(src / WEIGHTS_NAME), device="cpu")
    want = reft.interventions.state_dict()
    if set(state) != set(want):
        raise ValueError(f"{WEIGHTS_NAME} has keys {sorted(state)}, expected {sorted(want)}")
    for k, v in state.items():
        if v.shape != want[k].shape:
            raise ValueError(f"{WEIGHTS_NAME}: {k} has shape {list(v.shape)}, expected {list(want[k].shape)}")
    reft.interventions.load_state_dict(state)
    return reft
