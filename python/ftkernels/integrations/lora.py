"""LoRA on a Transformers model: add, save and load in PEFT's format, merge.

``add_lora(model, r, alpha, dropout, target_modules)`` wraps the target layers in place: a
``LinearNF4`` (after ``quantize_model``: QLoRA) becomes a ``LoRALinear4bit`` (the fused op), an
``nn.Linear`` a ``LoRALinear``, and GPT-2's ``Conv1D`` (a transposed linear) an ``nn.Linear``
first. Everything but the LoRA factors is frozen. ``save_lora`` writes PEFT's adapter files
(``adapter_config.json`` + ``adapter_model.safetensors``, keys
``base_model.model.<module>.lora_A.weight``), which PEFT's ``PeftModel.from_pretrained`` loads;
``load_lora`` reads them (ours or PEFT's) without unpickling and checks every shape;
``merge_lora`` folds the updates back into dense ``nn.Linear`` layers.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..nn.linear_nf4 import LinearNF4
from ..nn.lora_linear import LoRALinear
from ..nn.lora_linear_4bit import LoRALinear4bit, _check_hparams
from . import _dist
from ._files import check_tensors, json_field, read_json, read_safetensors
from .hf_compat import is_conv1d
from .transformers import replace_module

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# The attention and MLP projections of Llama/Qwen2/Mistral-style models, and GPT-2's.
DEFAULT_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "c_attn",
    "c_proj",
    "c_fc",
)

__all__ = ["add_lora", "load_lora", "lora_modules", "merge_lora", "save_lora"]


def _conv1d_to_linear(m: nn.Module) -> nn.Linear:
    """GPT-2's Conv1D (weight in x out) as the nn.Linear it computes (weight out x in)."""
    in_f, out_f = m.weight.shape
    lin = nn.Linear(in_f, out_f, bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(m.weight.T)
        if m.bias is not None:
            lin.bias.copy_(m.bias)
    return lin


def _targets(model: nn.Module, target_modules) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LinearNF4)) or is_conv1d(m)]
    if target_modules is None:
        wanted = [n for n in names if n.rsplit(".", 1)[-1] in DEFAULT_TARGETS and "lm_head" not in n]
    elif isinstance(target_modules, str):  # a regex over the full name, as PEFT reads a string
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regex: {e}") from None
        wanted = [n for n in names if pattern.fullmatch(n)]
    else:
        suffixes = tuple(target_modules)
        wanted = [n for n in names if n.rsplit(".", 1)[-1] in suffixes]
    if not wanted:
        raise ValueError(f"target_modules {target_modules!r} match no linear layer of {type(model).__name__}")
    return wanted


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's LoRA layers by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRALinear4bit))}


def add_lora(
    model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0, target_modules=None, use_rslora: bool = False
) -> list[str]:
    """Wraps the target layers with LoRA in place (see the module docstring); returns their names.

    ``target_modules``: None (the default projections), a list of name suffixes (PEFT's
    ``["q_proj", "v_proj"]``) or a regex over full module names.
    """
    if lora_modules(model):
        raise ValueError("the model already has LoRA layers")
    _dist.need_unsharded(model, "add_lora")
    _check_hparams(r, alpha, dropout, use_rslora, torch.float32)
    names = _targets(model, target_modules)  # both checked before the model changes
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        if is_conv1d(base):
            base = _conv1d_to_linear(base)
        if isinstance(base, LinearNF4):
            layer = LoRALinear4bit.from_linear(base, r, alpha, dropout, use_rslora=use_rslora)
        else:
            layer = LoRALinear(base, r, alpha, dropout, use_rslora=use_rslora)
        replace_module(model, name, layer)
    model._ftk_lora_config = {
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": use_rslora,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in names}),
    }
    return names


def save_lora(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """PEFT's adapter files for the model's LoRA layers. On a model sharded with
    :func:`~ftkernels.integrations.shard_model` every rank calls it: the factors are gathered and
    rank 0 writes them."""
    layers = lora_modules(model)
    config = getattr(model, "_ftk_lora_config", None)
    if not layers or config is None:
        raise ValueError("the model has no LoRA layers (add_lora first)")
    tensors = {}
    for name, m in layers.items():
        # A sharded model's factors are gathered whole (every rank calls this); rank 0 writes.
        tensors[f"{PREFIX}{name}.lora_A.weight"] = _dist.full(m.lora_A.weight.detach()).contiguous().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = _dist.full(m.lora_B.weight.detach()).contiguous().cpu()
    try:  # the barrier even when rank 0's write fails: the other ranks never wait for it in vain
        if _dist.rank() == 0:
            _write_lora(Path(out_dir), tensors, config, base_model_name_or_path)
    finally:
        _dist.barrier()


def _write_lora(out: Path, tensors: dict, config: dict, base_model_name_or_path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config["r"],
        "lora_alpha": config["lora_alpha"],
        "lora_dropout": config["lora_dropout"],
        "target_modules": config["target_modules"],
        "use_rslora": config["use_rslora"],
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    (out / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2) + "\n")


def _read_config(src: Path) -> dict:
    """adapter_config.json, every field load_lora uses checked (a ValueError naming the file)."""
    path = src / CONFIG_NAME
    raw = read_json(path, "LoRA adapter config")
    peft_type = json_field(raw, "peft_type", "a string", path, "LORA")
    if peft_type != "LORA":
        raise ValueError(f"{path}: peft_type is {peft_type!r}; only LoRA adapters ('LORA') are read")
    config = {
        "r": json_field(raw, "r", "an int", path),
        "lora_alpha": json_field(raw, "lora_alpha", "a number", path),
        "target_modules": json_field(raw, "target_modules", "a string or a list of strings", path),
        "lora_dropout": json_field(raw, "lora_dropout", "a number", path, 0.0),
        "use_rslora": json_field(raw, "use_rslora", "a bool", path, False),
    }
    # Each of these changes what the adapter computes, or which tensors it has, in a way the
    # layers here do not model: refused rather than loaded into a different adapter.
    for key, why in (
        ("modules_to_save", "whole trained copies of modules"),
        ("rank_pattern", "per-layer ranks"),
        ("alpha_pattern", "per-layer alphas"),
        ("use_dora", "DoRA's magnitude vectors"),
    ):
        if raw.get(key):
            raise ValueError(f"{path}: {key} ({why}) is not supported, got {raw[key]!r}")
    try:
        _check_hparams(config["r"], config["lora_alpha"], config["lora_dropout"], config["use_rslora"], torch.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    return config


def _in_out(m: nn.Module) -> tuple[int, int]:
    if is_conv1d(m):
        return tuple(m.weight.shape)
    return m.in_features, m.out_features


def load_lora(model: nn.Module, in_dir: str | os.PathLike) -> list[str]:
    """Adds LoRA layers as a PEFT adapter directory describes them and loads their weights
    (JSON and safetensors only). The config's fields and every key, shape and dtype are checked
    against the model before it changes: FileNotFoundError for a missing file, ValueError for
    any other bad one, each naming the file. Returns the wrapped layers' names."""
    src = Path(in_dir)
    config = _read_config(src)
    r = config["r"]
    weights = src / WEIGHTS_NAME
    saved = read_safetensors(weights, "LoRA weights file")
    # PEFT writes the adapter name into keys only for non-default names; accept ".default" too.
    state = {
        k.replace(".lora_A.default.weight", ".lora_A.weight").replace(".lora_B.default.weight", ".lora_B.weight"): v
        for k, v in saved.items()
    }
    if len(state) != len(saved):
        raise ValueError(f"{weights}: holds some factors twice, with and without the '.default' adapter name")
    if lora_modules(model):
        raise ValueError("the model already has LoRA layers")
    try:
        targets = _targets(model, config["target_modules"])
    except ValueError as e:
        raise ValueError(f"{src / CONFIG_NAME}: {e}") from None
    want = {}
    for name in targets:
        k_in, n_out = _in_out(model.get_submodule(name))
        want[f"{PREFIX}{name}.lora_A.weight"] = ((r, k_in), torch.float32)
        want[f"{PREFIX}{name}.lora_B.weight"] = ((n_out, r), torch.float32)
    check_tensors(state, want, weights)
    names = add_lora(
        model,
        r,
        config["lora_alpha"],
        config["lora_dropout"],
        config["target_modules"],
        config["use_rslora"],
    )
    for name, m in lora_modules(model).items():
        _dist.assign_(m.lora_A.weight, state[f"{PREFIX}{name}.lora_A.weight"])
        _dist.assign_(m.lora_B.weight, state[f"{PREFIX}{name}.lora_B.weight"])
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Replaces every LoRA layer by a dense nn.Linear with its update folded in; returns model."""
    layers = lora_modules(model)
    if not layers:
        raise ValueError("the model has no LoRA layers")
    for name, m in layers.items():
        replace_module(model, name, m.merge())
    if hasattr(model, "_ftk_lora_config"):
        del model._ftk_lora_config
    return model
