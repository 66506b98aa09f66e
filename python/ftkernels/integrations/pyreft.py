"""pyreft's formats, read into what ``add_loreft`` attaches (a :class:`._reft_base._Plan`).

- Representation specs (ReftConfig's ``representations``): dicts or pyvene
  ``RepresentationConfig`` tuples of ``{"layer", "component", "low_rank_dimension",
  "intervention", ...}``. Only what the hooks can do is taken (``block_output``, one position a
  unit, no subspaces, groups, links or sources); the intervention may be one of ours (module,
  class or name) or pyreft's (class, its name, or an intervention object, read through its
  state_dict), and every spec must be of one type and rank, each layer listed once or, as
  pyreft's ``share_weights=False`` lists them, twice.
- The directory pyreft's ``ReftModel.save`` writes: pyvene's ``config.json`` (the specs as
  lists, the type of each as ``"<class 'pyreft.interventions.X'>"``) and one
  ``intkey_<key>.bin`` (or ``.safetensors``) an intervention, read with
  ``torch.load(weights_only=True)`` so a pickled object other than tensors and plain
  containers is refused. The positions are not saved there; the caller names them.

Every error is a ValueError (or TypeError) naming the spec or file and the entry; a missing
file is a FileNotFoundError naming its path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..nn.loreft import ReFTIntervention, parse_positions
from ..nn.reft_types import PYREFT_TYPES, from_pyreft
from ._files import need_file, read_json, read_safetensors
from ._reft_base import INTERVENTION_TYPES, _hidden_size, _Plan, decoder_layers

PYREFT_CONFIG_NAME = "config.json"  # pyvene's IntervenableConfig.save_pretrained

# ---- pyreft's representation specs ------------------------------------------------------------

# pyvene's RepresentationConfig fields, in order (a saved config.json holds each as a list).
REPRESENTATION_FIELDS = (
    "layer",
    "component",
    "unit",
    "max_number_of_units",
    "low_rank_dimension",
    "intervention_type",
    "intervention",
    "subspace_partition",
    "group_key",
    "intervention_link_key",
    "moe_key",
    "source_representation",
    "hidden_source_representation",
    "latent_dim",
)
_UNSUPPORTED_FIELDS = REPRESENTATION_FIELDS[7:]  # must be None: no subspaces, groups, links, sources


def _is_specs(layers) -> bool:
    def one(x):
        return isinstance(x, Mapping) or hasattr(x, "_asdict")

    return one(layers) or (isinstance(layers, (list, tuple)) and bool(layers) and all(one(x) for x in layers))


def _type_name(mod: ReFTIntervention) -> str:
    for name, cls in INTERVENTION_TYPES.items():
        if isinstance(mod, cls):
            return name
    raise TypeError(f"intervention: {type(mod).__name__} is not one of {sorted(INTERVENTION_TYPES)}")


def _from_pyreft_object(obj, embed_dim: int, rank, where: str) -> ReFTIntervention:
    """Our module with the weights, dropout and act_fn of a pyreft intervention object."""
    act = getattr(obj, "act_fn", None)
    if act is not None and type(act).__name__ != "LinearActivation":  # Transformers' ACT2FN["linear"]
        raise ValueError(f"{where}: act_fn {type(act).__name__} is not supported (only pyreft's default, linear)")
    drop = getattr(obj, "dropout", None)
    p = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
    state = {k: v.detach().cpu() for k, v in obj.state_dict().items()}
    return from_pyreft(type(obj).__name__, state, embed_dim=embed_dim, rank=rank, dropout=p, where=where)


def _resolve(value, where: str, embed_dim: int, rank, dropout: float):
    """(type name, options, module or None) of one spec's intervention."""
    if value is None:
        return "LoReFT", {}, None
    if isinstance(value, ReFTIntervention):
        if value.embed_dim != embed_dim:
            raise ValueError(
                f"{where}: the intervention is for hidden size {value.embed_dim}, the model's is {embed_dim}"
            )
        return _type_name(value), value.options(), value
    name = value.__name__ if isinstance(value, type) else value if isinstance(value, str) else None
    if isinstance(value, type) and issubclass(value, ReFTIntervention):
        return _type_name_of_class(value, where), {}, None
    if name in INTERVENTION_TYPES:
        return name, {}, None
    if name in PYREFT_TYPES:
        cls, options, _, _ = PYREFT_TYPES[name]
        return _type_name_of_class(cls, where), {**options, "dropout_on": "output"}, None
    if type(value).__name__ in PYREFT_TYPES and isinstance(value, nn.Module):
        mod = _from_pyreft_object(value, embed_dim, rank, where)
        return _type_name(mod), mod.options(), mod
    raise ValueError(
        f"{where}: intervention must be an ftkernels.nn intervention (module, class or name: "
        f"{sorted(INTERVENTION_TYPES)}) or a pyreft one ({sorted(PYREFT_TYPES)}), got {value!r}"
    )


def _type_name_of_class(cls: type, where: str) -> str:
    for name, c in INTERVENTION_TYPES.items():
        if issubclass(cls, c):
            return name
    raise ValueError(f"{where}: {cls.__name__} is not one of {sorted(INTERVENTION_TYPES)}")


def _spec_dict(spec, where: str) -> dict:
    if hasattr(spec, "_asdict"):  # pyvene's RepresentationConfig
        spec = spec._asdict()
    if isinstance(spec, (list, tuple)):  # as a saved config.json holds it
        if len(spec) > len(REPRESENTATION_FIELDS):
            raise ValueError(
                f"{where}: has {len(spec)} fields, pyvene's RepresentationConfig {len(REPRESENTATION_FIELDS)}"
            )
        spec = dict(zip(REPRESENTATION_FIELDS, spec))
    if not isinstance(spec, Mapping):
        raise TypeError(f"{where}: must be a dict like pyreft's representations, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(REPRESENTATION_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (pyvene's fields: {list(REPRESENTATION_FIELDS)})")
    return dict(spec)


def _check_spec(spec: dict, where: str, n: int) -> int:
    """Checks what add_loreft supports of one spec and returns its layer."""
    layer = spec.get("layer", 0)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"{where}: layer must be a decoder-layer index in [0, {n}), got {layer!r}")
    component = spec.get("component", "block_output")
    if component != "block_output":
        raise ValueError(
            f"{where}: component {component!r} is not supported; only 'block_output' (the residual "
            "stream after a decoder layer)"
        )
    unit = spec.get("unit", "pos")
    if unit != "pos":
        raise ValueError(f"{where}: unit {unit!r} is not supported; only 'pos' (token positions)")
    units = spec.get("max_number_of_units", 1)
    if units != 1:
        raise ValueError(f"{where}: max_number_of_units must be 1 (one position a unit), got {units!r}")
    for key in _UNSUPPORTED_FIELDS:
        if spec.get(key) is not None:
            raise ValueError(f"{where}: {key} is not supported (must be None), got {spec[key]!r}")
    if spec.get("intervention") is not None and spec.get("intervention_type") is not None:
        raise ValueError(f"{where}: give one of intervention and intervention_type, not both")
    rank = spec.get("low_rank_dimension")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise ValueError(f"{where}: low_rank_dimension must be an int, got {rank!r}")
    return layer


def _plan_from_specs(specs, n, embed_dim, rank, dropout, positions, share_weights, types=None, where="representations"):
    """The _Plan of pyreft's representations (``types``: pyreft type names replacing each
    spec's intervention, for a saved directory; ``where`` names the source in errors)."""
    if isinstance(specs, Mapping) or hasattr(specs, "_asdict"):
        specs = [specs]
    entries = []
    for i, spec in enumerate(specs):
        at = f"{where}[{i}]"
        spec = _spec_dict(spec, at)
        layer = _check_spec(spec, at, n)
        want = spec.get("low_rank_dimension")
        if types is not None:
            name, options, mod = types[i]
        else:
            value = spec.get("intervention")
            value = spec.get("intervention_type") if value is None else value
            name, options, mod = _resolve(value, at, embed_dim, want, dropout)
        r = mod.rank if mod is not None else (want if want is not None else rank)
        if want is not None and r != want:
            raise ValueError(f"{at}: low_rank_dimension is {want} but the intervention's rank is {r}")
        entries.append((layer, name, options, r, mod, at))
    if not entries:
        raise ValueError(f"{where}: must list at least one intervention")
    _, name0, options0, rank0, _, _ = entries[0]
    given = [mod is not None for *_, mod, _ in entries]
    if any(given) and not all(given):
        raise ValueError(f"{where}: give every intervention as a module, or none (classes or names)")
    for _, name, options, r, _, at in entries[1:]:
        if (name, options, r) != (name0, options0, rank0):
            raise ValueError(
                f"{at}: every intervention must be of one type, rank and options, as {where}[0] "
                f"({name0}, rank {rank0}, {options0}); got {name}, rank {r}, {options}"
            )
    if all(given):
        drops = {mod.dropout for *_, mod, _ in entries}
        if len(drops) > 1:
            raise ValueError(f"{where}: the interventions' dropouts differ ({sorted(drops)}); they must be one")
        dropout = drops.pop()
        if len({id(mod) for *_, mod, _ in entries}) != len(entries):
            raise ValueError(f"{where}: one intervention module is given for two specs; each needs its own")
    layers = [e[0] for e in entries]
    half = len(layers) // 2
    if len(set(layers)) == len(layers):
        share, names = True, [f"layer{i}" for i in layers]
    elif len(layers) % 2 == 0 and layers[:half] == layers[half:] and len(set(layers[:half])) == half:
        first, last = parse_positions(positions)
        if not (first and last):
            raise ValueError(
                f"{where}: lists each layer twice (pyreft's share_weights=False: the first positions, then "
                f"the last), so positions must have both parts ('f5+l5'), got {positions!r}"
            )
        share = False
        names = [f"layer{i}_first" for i in layers[:half]] + [f"layer{i}_last" for i in layers[half:]]
    else:
        raise ValueError(
            f"{where}: layers {layers} must list each layer once, or the layers twice in the same order "
            "(pyreft's share_weights=False: the first positions, then the last)"
        )
    if share_weights is not None and share_weights != share:
        raise ValueError(
            f"share_weights={share_weights} but {where} lists "
            + ("each layer once (share_weights=True)" if share else "the layers twice (share_weights=False)")
        )
    modules = dict(zip(names, (e[4] for e in entries))) if all(given) else None
    return _Plan(sorted(set(layers)), rank0, share, dropout, name0, options0, modules)


# ---- pyreft's saved directories ---------------------------------------------------------------

_CLASS_STR = re.compile(r"^(?:<class '(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*)'>|([A-Za-z_]\w*))$")


def _pyvene_keys(specs: list[dict]) -> list[str]:
    """pyvene's intervention keys (IntervenableModel._get_representation_key), in order:
    ``layer_<l>_comp_<component>_unit_<unit>_nunit_<n>#<how many came before with that name>``."""
    seen: dict[str, int] = {}
    keys = []
    for spec in specs:
        unit = str(spec.get("unit", "pos")).replace(".", "_")
        name = (
            f"layer_{spec.get('layer', 0)}_comp_{spec.get('component', 'block_output')}"
            f"_unit_{unit}_nunit_{spec.get('max_number_of_units', 1)}"
        )
        seen[name] = seen.get(name, -1) + 1
        keys.append(f"{name}#{seen[name]}")
    return keys


def _read_weights(path: Path) -> dict:
    """One intervention's state_dict: safetensors, or a torch.save'd dict of tensors read with
    weights_only=True (which refuses any pickled object but tensors and plain containers)."""
    if path.suffix == ".safetensors":
        return read_safetensors(path, "pyreft intervention's weights file")
    need_file(path, "pyreft intervention's weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickle, zip and I/O errors alike: a file we cannot read)
        raise ValueError(f"{path}: cannot read it as a dict of tensors (torch.load weights_only=True): {e}") from e
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: must hold a state_dict (a dict of tensors), got {type(state).__name__}")
    return dict(state)


def _read_pyreft(model: nn.Module, src: Path, positions: str | None) -> _Plan:
    """The _Plan of the directory pyreft's ReftModel.save wrote, its weights loaded, checked
    against ``model``'s layers and hidden size."""
    cfg_path = src / PYREFT_CONFIG_NAME
    if positions is None:
        raise ValueError(
            f"positions: {src} is a pyreft directory, which does not record the positions it was trained "
            "on; pass them as pyreft's position argument was, e.g. positions='f7+l7'"
        )
    config = read_json(cfg_path, "pyreft config")
    reps, types = config.get("representations"), config.get("intervention_types")
    if not isinstance(reps, list) or not reps or not isinstance(types, list) or len(types) != len(reps):
        raise ValueError(
            f"{cfg_path}: not a pyreft/pyvene config: needs 'representations' and 'intervention_types', "
            "lists of the same length"
        )
    where = f"{cfg_path} representations"
    specs = [_spec_dict(r, f"{where}[{i}]") for i, r in enumerate(reps)]
    n, hidden = len(decoder_layers(model)), _hidden_size(model)
    for i, spec in enumerate(specs):
        _check_spec(spec, f"{where}[{i}]", n)
    keys = _pyvene_keys(specs)
    sorted_keys = config.get("sorted_keys")
    if sorted_keys is not None and (not isinstance(sorted_keys, list) or sorted(map(str, sorted_keys)) != sorted(keys)):
        raise ValueError(f"{cfg_path}: sorted_keys {sorted_keys!r} do not match the representations' keys {keys}")
    built = []
    for i, (spec, key, type_str) in enumerate(zip(specs, keys, types)):
        m = _CLASS_STR.match(type_str) if isinstance(type_str, str) else None
        name = (m.group(1) or m.group(2)) if m else None
        if name not in PYREFT_TYPES:
            raise ValueError(
                f"{cfg_path}: intervention_types[{i}] is {type_str!r}, not one of pyreft's {sorted(PYREFT_TYPES)}"
            )
        files = [src / f"intkey_{key}.safetensors", src / f"intkey_{key}.bin"]
        path = next((f for f in files if f.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{files[1]}: no such file, nor {files[0]}: the weights of representations[{i}]")
        mod = from_pyreft(
            name, _read_weights(path), embed_dim=hidden, rank=spec.get("low_rank_dimension"), where=str(path)
        )
        built.append((_type_name(mod), mod.options(), mod))
    return _plan_from_specs(specs, n, hidden, None, 0.0, positions, None, types=built, where=where)
