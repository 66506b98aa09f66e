"""LoReFT interventions on a Transformers model's residual stream, as forward hooks.

``add_loreft(model, layers, rank, positions="f5+l5")`` attaches :class:`ftkernels.nn.LoReFT`
modules to the outputs of the chosen decoder layers (the residual stream after each block) and
freezes the model's own weights. The positions are the first and last real tokens of the
prompt (left or right padding alike; :func:`ftkernels.nn.reft_positions`), read per call:

- ``model(...)`` called directly: its input is the prompt, the real tokens those of its
  ``attention_mask`` (all, without one). A call with ``labels`` takes the prompt's tokens
  (label -100), so training edits the positions generation will edit. A call over a cache
  that already holds tokens (a decode step the caller drives) edits nothing.
- ``model.generate(...)``: ``model.generate`` is wrapped to note the prompt's length and mask
  from generate's own arguments, because what generate passes to each forward differs between
  Transformers versions (the cache as ``past_key_values=`` or ``cache=``, ``cache_position``
  or not, the mask left out when it is all ones). A forward that starts inside the prompt (the
  prefill, or with ``use_cache=False`` every re-run of the whole sequence) edits the prompt's
  positions; a decode step over the cache edits nothing, and the edit reaches the generated
  tokens only through the cached keys and values of the prompt, as in pyreft.

How far into the sequence a call starts is read by :func:`.hf_compat.past_length`.
With ``share_weights=True`` one intervention a layer edits the first and the last positions;
with False, the first and the last positions get an intervention each (pyreft's two modes).
``save_loreft`` / ``load_loreft`` write and read them as safetensors plus a JSON config.

pyreft users: ``add_loreft`` also takes pyreft's representation specs (ReftConfig's
``representations``: a dict or a list of them, ``{"layer", "component": "block_output",
"low_rank_dimension", "intervention"}``), the intervention one of the ``ftkernels.nn`` types
(a module, its class or its name) or pyreft's class (or its name, "LoreftIntervention", ...;
or a pyreft intervention object, its weights read through its state_dict); and
``load_loreft`` reads the directory pyreft's ``ReftModel.save`` writes (pyvene's
``config.json`` and one ``intkey_<key>.bin`` an intervention, read with
``torch.load(weights_only=True)``, or ``.safetensors``). pyreft's interventions keep pyreft's
dropout placement (on h + edit; ours is on the edit). A pyreft directory does not record the
positions it was trained on: ``load_loreft(model, dir, positions="f7+l7")`` names them.
Both pyreft formats are read in :mod:`.pyreft`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..nn.loreft import parse_positions, reft_positions
from . import _dist
from ._files import check_tensors, json_field, read_json, read_safetensors
from ._reft_base import INTERVENTION_TYPES, _hidden_size, _Plan, decoder_layers
from .hf_compat import forward_arguments, past_length, real_tokens

# REPRESENTATION_FIELDS is not used here: callers read pyvene's field names from this module too.
from .pyreft import PYREFT_CONFIG_NAME, REPRESENTATION_FIELDS, _is_specs, _plan_from_specs, _read_pyreft  # noqa: F401

CONFIG_NAME = "loreft_config.json"
WEIGHTS_NAME = "loreft_model.safetensors"
ATTRIBUTE = "ftk_loreft"  # the model attribute holding the interventions

__all__ = ["LoReFTInterventions", "add_loreft", "load_loreft", "remove_loreft", "save_loreft"]


class LoReFTInterventions(nn.Module):
    """The interventions of one model (``model.ftk_loreft``) and the hooks that apply them."""

    def __init__(
        self,
        embed_dim: int,
        layers: list[int],
        rank: int,
        positions: str,
        share_weights: bool,
        dropout: float,
        intervention: str = "LoReFT",
        options: dict | None = None,
        modules: dict[str, nn.Module] | None = None,
    ):
        super().__init__()
        self.first, self.last = parse_positions(positions)
        options = dict(options or {})
        self.config = {
            "embed_dim": embed_dim,
            "layers": layers,
            "rank": rank,
            "positions": positions,
            "share_weights": share_weights,
            "dropout": dropout,
        }
        if intervention != "LoReFT" or options:  # a plain LoReFT keeps the original six keys
            self.config.update(intervention=intervention, options=options)
        names = (
            [f"layer{i}" for i in layers]
            if share_weights
            else [f"layer{i}_{part}" for i in layers for part in ("first", "last")]
        )
        if modules is None:
            cls = INTERVENTION_TYPES[intervention]
            modules = {n: cls(embed_dim, rank, dropout, **options) for n in names}
        self.interventions = nn.ModuleDict({n: modules[n] for n in names})
        self._positions: torch.Tensor | None = None
        self._prompt: _Prompt | None = None  # set while the model's generate runs
        self._handles: list = []

    def _capture_positions(self, model, args, kwargs) -> None:
        self._positions = None
        call = forward_arguments(model, args, kwargs)
        x = call.get("input_ids")
        if x is None:
            x = call.get("inputs_embeds")
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return
        batch, seq = x.shape[0], x.shape[1]
        past = past_length(call, seq)
        prompt = self._prompt
        if prompt is None:  # model(...) called directly: its input is the prompt
            if past > 0:
                return  # a step over a cache the caller filled: the prompt's edits are in it
            real = real_tokens(call.get("attention_mask"), batch, seq)
            if real is None:
                real = torch.ones(batch, seq, dtype=torch.bool, device=x.device)
            labels = call.get("labels")
            if isinstance(labels, torch.Tensor) and labels.shape == real.shape:
                # Training: the positions are the prompt's (the tokens whose label is -100), as at
                # generation, where only the prompt is there; a row without such tokens uses all.
                marked = real & (labels == -100)
                real = torch.where(marked.any(dim=1, keepdim=True), marked, real)
            self._positions = reft_positions(real.long(), self.config["positions"])
            return
        # Inside generate: the sequence's first prompt.length tokens are the prompt. A prefill
        # (past 0) or a re-run without a cache (use_cache=False: past 0, seq >= the prompt) edits
        # the prompt's positions; a decode step over the cache (past >= the prompt) edits nothing.
        if past >= prompt.length:
            return
        real = prompt.real
        if real is None:  # generate was given no mask: the prefill's own, or no padding
            real = real_tokens(call.get("attention_mask"), batch, prompt.length)
            if real is None:
                real = torch.ones(batch, prompt.length, dtype=torch.bool, device=x.device)
            prompt.real = real
        elif real.shape[0] != batch:  # generate expanded the batch (beams, num_return_sequences)
            rows = real.shape[0]
            real = real_tokens(real, batch, prompt.length)
            if real is None:
                raise ValueError(
                    f"generate: attention_mask has {rows} rows, and the model is called with "
                    f"{batch}, not a multiple of them"
                )
            prompt.real = real  # expanded once: every later call of this generate has the same rows
        positions = reft_positions(real.long(), self.config["positions"]) - past
        self._positions = torch.where((positions >= 0) & (positions < seq), positions, -1)

    def _edit(self, index: int, output):
        positions = self._positions
        if positions is None:
            return output
        h = output[0] if isinstance(output, tuple) else output
        if self.config["share_weights"]:
            h = self.interventions[f"layer{index}"](h, positions)
        else:
            h = self.interventions[f"layer{index}_first"](h, positions[:, : self.first])
            h = self.interventions[f"layer{index}_last"](h, positions[:, self.first :])
        return (h, *output[1:]) if isinstance(output, tuple) else h

    def attach(self, model: nn.Module) -> None:
        blocks = decoder_layers(model)
        self._handles.append(model.register_forward_pre_hook(self._capture_positions, with_kwargs=True))
        for i in self.config["layers"]:
            self._handles.append(blocks[i].register_forward_hook(lambda mod, args, output, i=i: self._edit(i, output)))
        if callable(getattr(model, "generate", None)):
            _RecordPrompt(self, model).install()

    def remove(self) -> None:
        """Detaches the hooks (the model computes as before add_loreft)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


class _Prompt:
    """What one ``generate`` call was given: the prompt's length and, when it came with an
    ``attention_mask``, its real tokens (batch, length) as bools."""

    def __init__(self, length: int, real: torch.Tensor | None):
        self.length, self.real = length, real


class _RecordPrompt:
    """Stands in for ``model.generate`` (an instance attribute over the class's method) and
    tells the interventions what the prompt is while it runs: ``generate``'s own arguments are
    the one thing every Transformers version gives alike, whatever its forwards are passed."""

    def __init__(self, reft: LoReFTInterventions, model: nn.Module):
        self.reft, self.model = reft, model
        self.generate = model.generate  # the method (or another wrapper) that was there

    def install(self) -> None:
        self.had_own = "generate" in self.model.__dict__
        self.model.generate = self
        self.reft._handles.append(self)

    def remove(self) -> None:  # as a hook handle: LoReFTInterventions.remove calls it
        if self.model.__dict__.get("generate") is self:
            if self.had_own:
                self.model.generate = self.generate
            else:
                del self.model.generate

    def __call__(self, *args, **kwargs):
        ids = kwargs.get("inputs", kwargs.get("input_ids", args[0] if args else None))
        embeds = kwargs.get("inputs_embeds")
        x = embeds if isinstance(embeds, torch.Tensor) else ids
        if not isinstance(x, torch.Tensor) or x.dim() < 2:  # generate makes its own start token
            return self.generate(*args, **kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape[:2] != x.shape[:2]):
            raise ValueError(
                f"generate: attention_mask must be (batch, seq) = {list(x.shape[:2])} like the "
                f"prompt, got {list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}"
            )
        outer = self.reft._prompt
        self.reft._prompt = _Prompt(x.shape[1], mask != 0 if mask is not None else None)
        try:
            return self.generate(*args, **kwargs)
        finally:
            self.reft._prompt = outer


def add_loreft(
    model: nn.Module,
    layers="all",
    rank: int = 4,
    positions: str = "f5+l5",
    share_weights: bool | None = None,
    dropout: float = 0.0,
    freeze_model: bool = True,
) -> LoReFTInterventions:
    """Attaches ReFT interventions to decoder layers and returns them (also
    ``model.ftk_loreft``, so ``model.to(...)`` moves them). The model's own parameters are
    frozen unless ``freeze_model=False``; the interventions' are trainable.

    ``layers`` is a list of decoder-layer indices or "all" (LoReFT of ``rank`` at each; with
    ``share_weights=False`` two a layer, for the first and the last positions), or pyreft's
    representation specs (a dict or a list of dicts, see the module docstring): every spec the
    same type and rank, each layer listed once (one intervention for all positions) or the
    layers listed twice, as pyreft's ``share_weights=False`` lists them (the first for the
    first positions, the second for the last); ``share_weights`` is then read off the list.
    ``dropout`` goes to the interventions built from a class or name (a module has its own)."""
    if hasattr(model, ATTRIBUTE):
        raise ValueError("the model already has LoReFT interventions (model.ftk_loreft); remove them first")
    n = len(decoder_layers(model))
    parse_positions(positions)  # a clear error for a bad spec, before anything changes
    if _is_specs(layers):
        plan = _plan_from_specs(layers, n, _hidden_size(model), rank, dropout, positions, share_weights)
        return _attach(model, plan, positions, freeze_model)
    if layers == "all":
        layers = list(range(n))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if (
        not isinstance(layers, (list, tuple))
        or not layers
        or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in layers)
    ):
        raise ValueError(f"layers must be 'all' or decoder-layer indices in [0, {n}), got {layers!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers repeats an index: {layers!r}")
    if share_weights is not None and not isinstance(share_weights, bool):
        raise TypeError(f"share_weights must be a bool or None, got {type(share_weights).__name__}")
    share = True if share_weights is None else share_weights
    plan = _Plan(sorted(layers), rank, share, dropout, "LoReFT", {}, None)
    return _attach(model, plan, positions, freeze_model)


def _attach(model: nn.Module, plan: _Plan, positions: str, freeze_model: bool) -> LoReFTInterventions:
    _dist.need_unsharded(model, "add_loreft")
    if hasattr(model, ATTRIBUTE):
        raise ValueError("the model already has LoReFT interventions (model.ftk_loreft); remove them first")
    reft = LoReFTInterventions(
        _hidden_size(model),
        plan.layers,
        plan.rank,
        positions,
        plan.share_weights,
        plan.dropout,
        plan.intervention,
        plan.options,
        plan.modules,
    )  # built (and its arguments checked) before the model is changed
    if freeze_model:
        for p in model.parameters():
            p.requires_grad_(False)
    param = next(model.parameters(), None)
    if param is not None:
        reft.to(param.device)
    reft.train(model.training)  # dropout as the model's mode says, until model.train()/eval()
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
    """Writes the model's interventions: a JSON config and the weights as safetensors. On a
    sharded model every rank calls it; rank 0 writes the gathered weights."""
    reft = getattr(model, ATTRIBUTE, None)
    if not isinstance(reft, LoReFTInterventions):
        raise ValueError("the model has no LoReFT interventions (add_loreft first)")
    # A sharded model's interventions are gathered whole (every rank calls this); rank 0 writes.
    tensors = {k: _dist.full(v.detach()).contiguous().cpu() for k, v in reft.interventions.state_dict().items()}
    try:  # the barrier even when rank 0's write fails: the other ranks never wait for it in vain
        if _dist.rank() == 0:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / CONFIG_NAME).write_text(json.dumps(reft.config, indent=2) + "\n")
            save_file(tensors, str(out / WEIGHTS_NAME))
    finally:
        _dist.barrier()


def load_loreft(model: nn.Module, in_dir: str | os.PathLike, positions: str | None = None) -> LoReFTInterventions:
    """Attaches saved interventions to ``model``: a directory :func:`save_loreft` wrote
    (``loreft_config.json``; ``positions``, when given, replaces the saved ones) or one pyreft's
    ``ReftModel.save`` wrote (pyvene's ``config.json`` and ``intkey_*.bin``; ``positions`` is
    then required, pyreft does not save it). Reads JSON, safetensors and
    ``torch.load(weights_only=True)`` only; the config's fields and types, every tensor's name,
    shape and dtype, the layer indices and the type names are checked against the model
    (FileNotFoundError for a missing file, ValueError for any other bad one, naming the file
    and the entry)."""
    src = Path(in_dir)
    if positions is not None:
        parse_positions(positions)
    cfg_path = src / CONFIG_NAME
    if not cfg_path.exists():
        if (src / PYREFT_CONFIG_NAME).exists():
            return _attach(model, _read_pyreft(model, src, positions), positions, True)
        raise FileNotFoundError(
            f"{cfg_path}: no such file (save_loreft's config), nor {src / PYREFT_CONFIG_NAME} (pyreft's)"
        )
    config = read_json(cfg_path, "LoReFT config")
    keys = {"embed_dim", "layers", "rank", "positions", "share_weights", "dropout"}
    if set(config) not in (keys, keys | {"intervention", "options"}):
        raise ValueError(
            f"{cfg_path}: must hold exactly {sorted(keys)} (and 'intervention', 'options' for another "
            f"type than LoReFT), got {sorted(config)!r}"
        )
    embed_dim = json_field(config, "embed_dim", "an int", cfg_path)
    if embed_dim != _hidden_size(model):
        raise ValueError(
            f"{cfg_path}: the interventions are for hidden size {embed_dim}, the model's is {_hidden_size(model)}"
        )
    rank = json_field(config, "rank", "an int", cfg_path)
    saved_positions = json_field(config, "positions", "a string", cfg_path)
    share_weights = json_field(config, "share_weights", "a bool", cfg_path)
    dropout = json_field(config, "dropout", "a number", cfg_path)
    intervention = json_field(config, "intervention", "a string", cfg_path, "LoReFT")
    options = json_field(config, "options", "an object", cfg_path, {})
    if intervention not in INTERVENTION_TYPES:
        raise ValueError(f"{cfg_path}: intervention must be one of {sorted(INTERVENTION_TYPES)}, got {intervention!r}")
    n = len(decoder_layers(model))
    layers = json_field(config, "layers", "a list", cfg_path)
    if (
        not layers
        or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in layers)
        or len(set(layers)) != len(layers)
    ):
        raise ValueError(f"{cfg_path}: layers must be distinct decoder-layer indices in [0, {n}), got {layers!r}")
    plan = _Plan(sorted(layers), rank, share_weights, dropout, intervention, options, None)
    try:
        reft = LoReFTInterventions(
            embed_dim, plan.layers, rank, positions or saved_positions, share_weights, dropout, intervention, options
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    weights = src / WEIGHTS_NAME
    state = read_safetensors(weights, "LoReFT weights file")
    want = {k: (tuple(v.shape), v.dtype) for k, v in reft.interventions.state_dict().items()}
    check_tensors(state, want, weights)
    reft.interventions.load_state_dict(state)
    plan.modules = dict(reft.interventions.items())
    return _attach(model, plan, positions or saved_positions, True)
