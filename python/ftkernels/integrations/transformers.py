"""Hugging Face Transformers integration: quantize a model's linear layers to 4 bits, save the
result as a bitsandbytes 4-bit checkpoint, and load such a checkpoint without bitsandbytes.

The checkpoint is the one Transformers itself writes for ``BitsAndBytesConfig(load_in_4bit=True)``:
safetensors with, per quantized weight, the entries of :meth:`ftkernels.QuantState.as_dict`
(``weight``, ``weight.absmax``, ``weight.quant_map``, ...), and a config.json whose
``quantization_config`` says ``quant_method: bitsandbytes``. So
``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it wherever bitsandbytes is installed
(Transformers replaces each listed ``nn.Linear`` by ``bnb.nn.Linear4bit`` and reads the entries
with ``Params4bit.from_prequantized``), and :func:`load_quantized` loads it with LinearNF4 layers.
Transformers converts exactly the modules of type ``nn.Linear`` (and GPT-2's ``Conv1D``) that
``llm_int8_skip_modules`` does not name, so :func:`save_quantized` lists every one it left alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .._checks import need_blocksize, need_quant_type
from ..nn.linear_nf4 import LinearNF4
from ..nn.nf4_param import NF4Param
from . import _dist
from ._files import check_shapes, json_field, read_json, read_safetensors
from .hf_compat import from_config, is_conv1d, no_init_weights

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


@dataclass
class QuantizeStats:
    """What :func:`quantize_model` did. Bytes count every tensor once (tied weights once)."""

    count: int  # linear layers replaced by LinearNF4
    skipped: list[str]  # nn.Linear layers left as they are (skip_modules, tied weights)
    linear_bytes_before: int  # weight + bias of the replaced layers, before
    linear_bytes_after: int  # packed weight + quant state + bias of the same layers, after
    model_bytes_before: int  # parameters and buffers of the whole model, before
    model_bytes_after: int
    errors: dict[str, float] = field(default_factory=dict)  # ||W - dq(q(W))||_F / ||W||_F per layer

    @property
    def mean_error(self) -> float:
        """Mean over the quantized layers of the relative Frobenius reconstruction error."""
        return sum(self.errors.values()) / len(self.errors) if self.errors else 0.0

    @property
    def max_error(self) -> tuple[str, float]:
        """(layer name, error) of the worst-reconstructed layer."""
        if not self.errors:
            return ("", 0.0)
        name = max(self.errors, key=self.errors.__getitem__)
        return name, self.errors[name]


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether some pattern is a whole run of ``name``'s dot-separated parts: "lm_head" matches
    "lm_head", "mlp" matches "model.layers.0.mlp.up_proj", "down_proj" every down_proj."""
    dotted = f".{name}."
    return any(f".{p}." in dotted for p in patterns)


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        t = _dist.local(t)  # a DTensor: this rank's shard
        if isinstance(t, NF4Param):  # a wrapper with no storage of its own
            total += t.payload_bytes()
            continue
        # Tied weights are one tensor under two names: count their storage once.
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def model_bytes(model: nn.Module) -> int:
    """Bytes held by ``model``'s parameters, buffers and 4-bit quant states (each tensor once)."""
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        if isinstance(m, LinearNF4) and not m.is_sharded:
            qs = m.quant_state
            tensors += [qs.absmax, qs.code]
            if qs.nested:
                tensors += [qs.offset, qs.state2.absmax, qs.state2.code]
    return _tensor_bytes(tensors)


def _layer_bytes(m: nn.Module) -> int:
    return _tensor_bytes(t for t in m.state_dict().values())


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Puts module in place of model's submodule called name ("" is not allowed)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that are one tensor under several names (e.g. a tied lm_head)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n for names in by_id.values() if len(names) > 1 for n in names}


def quantize_model(
    model: nn.Module,
    blocksize: int = 64,
    compress_statistics: bool = True,
    quant_type: str = "nf4",
    skip_modules: Iterable[str] = ("lm_head",),
    progress: bool = True,
    *,
    double_quant: bool | None = None,
    skip: Iterable[str] | None = None,
) -> QuantizeStats:
    """Replace, in place, every ``nn.Linear`` of ``model`` by a :class:`LinearNF4`.

    Left as they are: modules matched by ``skip_modules`` (a name, a parent's name or a name
    suffix, see ``_matches``), the model's ``_keep_in_fp32_modules``, and linear layers whose
    weight is tied to another module's (a tied lm_head shares the embedding's tensor).
    Embeddings, norms and other modules are never touched. Returns a :class:`QuantizeStats`.
    ``double_quant`` and ``skip`` are the short names of ``compress_statistics`` and
    ``skip_modules`` (give one name of each pair).
    """
    if double_quant is not None:
        compress_statistics = double_quant
    if skip is not None:
        skip_modules = skip

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    need_blocksize(blocksize)
    need_quant_type(quant_type)
    if isinstance(skip_modules, str):
        skip_modules = (skip_modules,)
    skip = list(skip_modules) + list(getattr(model, "_keep_in_fp32_modules", None) or ())

    tied = _tied_names(model)
    targets, skipped = [], []
    for name, m in model.named_modules():
        if type(m) is not nn.Linear:  # subclasses (e.g. inside nn.MultiheadAttention) keep their own forward
            continue
        if _matches(name, skip) or f"{name}.weight" in tied:
            skipped.append(name)
        else:
            targets.append(name)

    before_model = model_bytes(model)
    before_linear = after_linear = 0
    errors: dict[str, float] = {}
    bar = tqdm(targets, desc=f"quantizing to {quant_type}", unit="layer", disable=not progress)
    for name in bar:
        linear = model.get_submodule(name)
        before_linear += _layer_bytes(linear)
        q = LinearNF4.from_linear(
            linear, blocksize=blocksize, compress_statistics=compress_statistics, quant_type=quant_type
        )
        with torch.no_grad():
            w = linear.weight.detach().float()
            ref = torch.linalg.vector_norm(w).item()
            diff = torch.linalg.vector_norm(q.dequantize().float() - w).item()
        errors[name] = diff / ref if ref > 0 else (0.0 if diff == 0 else math.inf)
        after_linear += _layer_bytes(q)
        replace_module(model, name, q)
    bar.close()
    return QuantizeStats(
        count=len(targets),
        skipped=skipped,
        linear_bytes_before=before_linear,
        linear_bytes_after=after_linear,
        model_bytes_before=before_model,
        model_bytes_after=model_bytes(model),
        errors=errors,
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` entry of config.json that describes ``model``'s LinearNF4
    layers to Transformers' bitsandbytes loader (as ``BitsAndBytesConfig.to_dict()`` writes it)."""
    from transformers import BitsAndBytesConfig

    layers = [m for m in model.modules() if isinstance(m, LinearNF4)]
    if not layers:
        raise ValueError("model has no LinearNF4 layers; run quantize_model(model) first")
    kinds = {(m.quant_type, m.compress_statistics) for m in layers}
    if len(kinds) > 1:
        raise ValueError(
            f"model: its LinearNF4 layers mix (quant_type, double_quant) settings {sorted(kinds)}; "
            "one bitsandbytes quantization_config can describe only one"
        )
    quant_type, nested = kinds.pop()
    first = layers[0]
    compute_dtype = first.compute_dtype or first.weight_dtype
    keep = sorted(name for name, m in model.named_modules() if type(m) is nn.Linear or is_conv1d(m))
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=nested,
        bnb_4bit_compute_dtype=_dtype_name(compute_dtype),
        bnb_4bit_quant_storage="uint8",
        llm_int8_skip_modules=keep,
    )
    return config.to_dict()


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None) -> None:
    """Write ``model`` (after :func:`quantize_model`) to ``out_dir`` as a Transformers
    bitsandbytes 4-bit checkpoint: model.safetensors, config.json with ``quantization_config``,
    generation_config.json, and the tokenizer's files when ``tokenizer`` is given."""
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise TypeError(f"model must be a Transformers PreTrainedModel, got {type(model).__name__}")
    qconfig = quantization_config(model)
    # Transformers' own save_pretrained does the rest (tied weights written once, sharding,
    # key renames of models whose checkpoint layout differs from their modules). While it
    # writes, the config carries our quantization_config, and a quantizer the model was
    # loaded with is set aside: a GGUF model, say, is dequantized on load, and its quantizer
    # would refuse to save (and describe weights that LinearNF4 layers have replaced).
    config = model.config
    had = "quantization_config" in config.__dict__
    old_config = config.__dict__.get("quantization_config")
    old_quantizer = model.__dict__.get("hf_quantizer", None)
    config.quantization_config = qconfig
    if "hf_quantizer" in model.__dict__:
        model.hf_quantizer = None
    try:
        model.save_pretrained(os.fspath(out_dir))
    finally:
        if had:
            config.quantization_config = old_config
        else:
            del config.quantization_config
        if "hf_quantizer" in model.__dict__:
            model.hf_quantizer = old_quantizer
    if tokenizer is not None:
        tokenizer.save_pretrained(os.fspath(out_dir))


def _read_checkpoint(out_dir: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(every tensor of the checkpoint, the path of the file each came from): model.safetensors,
    or the shards model.safetensors.index.json names, each holding what the index maps to it."""
    index = os.path.join(out_dir, SAFE_WEIGHTS_INDEX_NAME)
    weight_map = None
    if os.path.exists(index):
        weight_map = json_field(read_json(index, "checkpoint index"), "weight_map", "an object", index)
        shards = set(weight_map.values())
        if not weight_map or not all(
            isinstance(v, str) and v not in ("", ".", "..") and os.path.basename(v) == v for v in shards
        ):
            raise ValueError(
                f"{index}: weight_map must map each tensor name to a shard's file name in the same folder, "
                f"got {_short_map(weight_map)}"
            )
        files = sorted(shards)
    elif os.path.exists(os.path.join(out_dir, SAFE_WEIGHTS_NAME)):
        files = [SAFE_WEIGHTS_NAME]
    else:
        raise FileNotFoundError(
            f"{os.path.join(out_dir, SAFE_WEIGHTS_NAME)}: no such file, nor {index} "
            "(only safetensors checkpoints are read, never pickle)"
        )
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for name in files:
        path = os.path.join(out_dir, name)
        if weight_map is not None and not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file, and {index} names it as a shard")
        part = read_safetensors(path, "checkpoint shard" if weight_map is not None else "checkpoint")
        for key in part:
            if key in origin:
                raise ValueError(f"{path}: holds {key!r}, which {origin[key]} holds too")
            if weight_map is not None and weight_map.get(key) != name:
                raise ValueError(f"{path}: holds {key!r}, which {index} maps to {weight_map.get(key)!r}")
            origin[key] = path
        state.update(part)
    if weight_map is not None:
        absent = sorted(k for k in weight_map if k not in origin)
        if absent:
            shard = os.path.join(out_dir, weight_map[absent[0]])
            raise ValueError(f"{shard}: lacks {absent[0]!r}, which {index} maps to it ({len(absent)} such in all)")
    return state, origin


def _short_map(weight_map) -> str:
    items = list(weight_map.items())
    return repr(dict(items[:3])) + (" ..." if len(items) > 3 else "")


def _torch_dtype(value, what: str, where: str) -> torch.dtype | None:
    """The float dtype a config names ("bfloat16", or a torch.dtype), None for none."""
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, value, None) if isinstance(value, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{where}: {what} must name a float dtype such as 'bfloat16', got {value!r}")
    return dtype


def _files_of(keys: Iterable[str], origin: dict[str, str]) -> str:
    return ", ".join(sorted({origin[k] for k in keys}))


def load_quantized(out_dir: str | os.PathLike, device=None, model_class=None) -> nn.Module:
    """Build a model with LinearNF4 layers from a bitsandbytes 4-bit checkpoint (as
    :func:`save_quantized` or Transformers write it) without bitsandbytes. Reads config.json
    and safetensors only. ``model_class`` defaults to ``AutoModelForCausalLM``. Every file is
    checked (FileNotFoundError for a missing one, ValueError naming the file for an empty,
    truncated or corrupt one, a config or index lacking a field or of the wrong type, and
    tensors missing or of the wrong shape or dtype for the model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = os.fspath(out_dir)
    config_path = os.path.join(out_dir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path}: no such file (out_dir {out_dir!r} holds no config.json)")
    qc = json_field(read_json(config_path, "model config"), "quantization_config", "an object", config_path, None)
    if not isinstance(qc, dict) or qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        raise ValueError(
            f"out_dir: {config_path!r} has no bitsandbytes 4-bit quantization_config "
            "(quant_method 'bitsandbytes', load_in_4bit true)"
        )
    if qc.get("bnb_4bit_quant_storage", "uint8") != "uint8":
        raise ValueError(
            f"{config_path}: quantization_config.bnb_4bit_quant_storage must be 'uint8', "
            f"got {qc.get('bnb_4bit_quant_storage')!r}"
        )
    quant_type = json_field(qc, "bnb_4bit_quant_type", "a string", config_path, "nf4")
    nested = json_field(qc, "bnb_4bit_use_double_quant", "a bool", config_path, False)
    compute_dtype = _torch_dtype(qc.get("bnb_4bit_compute_dtype"), "bnb_4bit_compute_dtype", config_path)
    try:  # Transformers' own reader (no remote code: trust_remote_code stays False)
        config = AutoConfig.from_pretrained(out_dir)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{config_path}: Transformers cannot read it as a model config: {e}") from e
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = _torch_dtype(dtype, "dtype", config_path) or torch.float32
    state, origin = _read_checkpoint(out_dir)
    # A layer is 4-bit exactly when the checkpoint has its quant-state entry: that reads
    # checkpoints whatever rule chose their llm_int8_skip_modules (Transformers' own default
    # list is computed from the model, not written down).
    packed = {k.rsplit(".weight.quant_state.", 1)[0] for k in state if ".weight.quant_state." in k}

    cls = model_class or AutoModelForCausalLM
    with no_init_weights():
        model = from_config(cls, config, dtype)
    # Transformers ties weights (lm_head to the embeddings) inside the init that no_init_weights skips.
    model.tie_weights()
    layers: dict[str, LinearNF4] = {}
    for name, m in list(model.named_modules()):
        if name in packed and type(m) is nn.Linear:
            try:
                q = LinearNF4(
                    m.in_features,
                    m.out_features,
                    bias=m.bias is not None,
                    compute_dtype=compute_dtype,
                    quant_type=quant_type,
                    compress_statistics=nested,
                    dtype=m.weight.dtype,
                    device=m.weight.device,
                )
            except (TypeError, ValueError) as e:
                raise ValueError(f"{config_path}: quantization_config: {e}") from None
            replace_module(model, name, q)
            layers[name] = q
    if set(packed) - set(layers):
        odd = sorted(set(packed) - set(layers))
        raise ValueError(
            f"{_files_of([k for k in state if k.startswith(odd[0] + '.')], origin)}: has 4-bit weights for "
            f"modules that are not nn.Linear in {cls.__name__}: {odd[:8]}"
        )

    # Each 4-bit layer reads (and checks) its own entries; the other tensors are checked against
    # the parameters and buffers they load into first, so every error names the file at fault.
    def owner(key: str) -> str | None:
        parent = key.rpartition(".")[0]
        while parent:
            if parent in layers:
                return parent
            parent = parent.rpartition(".")[0]
        return None

    by_layer: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
    rest: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        name = owner(key)
        if name is None:
            rest[key] = t
        else:
            by_layer[name][key[len(name) + 1 :]] = t
    plain = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, LinearNF4):
            continue
        named = [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]
        for pname, t in named:
            if pname not in mod._non_persistent_buffers_set:
                plain[f"{mname}.{pname}" if mname else pname] = (tuple(t.shape), t.dtype)
    unexpected = sorted(set(rest) - set(plain))
    if unexpected:
        raise ValueError(
            f"{_files_of(unexpected, origin)}: has entries the model does not have: "
            f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    for key in rest:
        check_shapes({key: rest[key]}, plain, origin[key])
    missing: list[str] = []
    for name, entries in by_layer.items():
        where = _files_of([f"{name}.{k}" for k in entries], origin) if entries else out_dir
        try:
            result = layers[name].load_state_dict(entries, strict=False)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"{where}: {name}: {e}") from None
        if result.unexpected_keys:
            raise ValueError(f"{where}: {name} has entries a LinearNF4 does not have: {result.unexpected_keys}")
        missing += [f"{name}.{k}" for k in result.missing_keys]
    try:
        result = model.load_state_dict(rest, strict=False)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"{_files_of(rest, origin)}: {e}") from None
    missing += [k for k in result.missing_keys if owner(k) is None]
    # A tied weight is saved once, under one of its names; every other parameter must come
    # from the file (the model was built without initialising its weights).
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    loaded_alias = {n for names in aliases.values() if set(names) - set(missing) for n in names}
    lacking = sorted(k for k in missing if k not in loaded_alias)
    if lacking:
        raise ValueError(
            f"checkpoint in {out_dir!r} ({_files_of(origin, origin)}) lacks "
            f"{lacking[:8]}{' ...' if len(lacking) > 8 else ''}"
        )
    model.eval()
    if device is not None:
        model.to(device)
    return model
