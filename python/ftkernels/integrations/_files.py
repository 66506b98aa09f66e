"""Reading the files the loaders are given: JSON configs and safetensors weights, checked
against what the model needs, every failure an exception whose message starts with the path.

Nothing here runs code from a file: JSON is parsed by ``json`` and tensors by safetensors
(``torch.load`` never appears). A missing file is a ``FileNotFoundError``; anything else that
cannot be used is a ``ValueError``: an empty, truncated or corrupt file, a config that is not
JSON, lacks a field or holds a value of the wrong type, tensors missing, unexpected, or of the
wrong shape or dtype for the model (an adapter saved for another rank or another model).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

_REQUIRED = object()

# What a JSON field may hold, by the words the error message uses.
_KINDS = {
    "an int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "a number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "a bool": lambda v: isinstance(v, bool),
    "a string": lambda v: isinstance(v, str),
    "a string or a list of strings": lambda v: (
        isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))
    ),
    "a list": lambda v: isinstance(v, list),
    "an object": lambda v: isinstance(v, dict),
}


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _few(names, n: int = 3) -> str:
    names = sorted(names)
    return f"{names[:n]}" + (f" ({len(names)} in all)" if len(names) > n else "")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def need_file(path: str | os.PathLike, what: str) -> str:
    """``path`` as a string once it is known to be a non-empty file (``what`` names it in the
    errors: FileNotFoundError when there is nothing there, ValueError for a directory or an
    empty file)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file (the {what})")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not a file (the {what} must be one)")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the {what} is an empty file (0 bytes)")
    return path


def read_json(path: str | os.PathLike, what: str) -> dict:
    """The JSON object in the file at ``path`` (``what`` names the file in the errors)."""
    path = need_file(path, what)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the {what}: {e}") from e
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: the {what} is not valid JSON (truncated or corrupt: {e})") from None
    except RecursionError:  # a run of thousands of '[' is valid JSON syntax, nested too deep to parse
        raise ValueError(f"{path}: the {what} is not valid JSON (nested too deeply to parse)") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: the {what} must be a JSON object, got {type(value).__name__}")
    return value


def json_field(config: Mapping, key: str, kind: str, path: str | os.PathLike, default=_REQUIRED):
    """``config[key]``, checked to be ``kind`` (one of "an int", "a number", "a bool", "a string",
    "a string or a list of strings", "a list", "an object"); ``default`` when the key is absent
    (and given), else a ValueError naming ``path``. A JSON null counts as absent only where
    ``default`` is None."""
    if key not in config or (config[key] is None and default is None):
        if default is _REQUIRED:
            raise ValueError(f"{os.fspath(path)}: lacks the required field {key!r} ({kind})")
        return default
    value = config[key]
    if not _KINDS[kind](value):
        raise ValueError(f"{os.fspath(path)}: {key!r} must be {kind}, got {_short(value)}")
    return value


def read_safetensors(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file at ``path``, on the CPU (``what`` names the file in
    the errors)."""
    path = need_file(path, what)
    try:
        return load_file(path, device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{path}: the {what} is not a valid safetensors file (truncated or corrupt: {e})") from None
    except (OSError, ValueError, TypeError, RuntimeError) as e:  # I/O, or a dtype this torch lacks
        raise ValueError(f"{path}: cannot read the {what} as safetensors: {e}") from e


def check_shapes(state: Mapping[str, torch.Tensor], want: Mapping[str, tuple], path: str | os.PathLike) -> None:
    """Each tensor of ``state`` that ``want`` names has the shape and dtype ``want`` gives:
    ``want[key] = (shape, dtype)``; a floating dtype accepts any floating tensor (loading casts
    it), any other dtype only itself."""
    for key in sorted(set(state) & set(want)):
        shape, dtype = want[key]
        t = state[key]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(
                f"{os.fspath(path)}: {key} has shape {list(t.shape)}, the model needs {list(shape)} "
                "(saved for another rank or another model?)"
            )
        if (not t.is_floating_point()) if dtype.is_floating_point else t.dtype != dtype:
            need = "a floating-point tensor" if dtype.is_floating_point else _dtype_name(dtype)
            raise ValueError(f"{os.fspath(path)}: {key} is {_dtype_name(t.dtype)}, the model needs {need}")


def check_tensors(state: Mapping[str, torch.Tensor], want: Mapping[str, tuple], path: str | os.PathLike) -> None:
    """``state`` has exactly the keys of ``want``, each of the shape and dtype it gives
    (:func:`check_shapes`)."""
    missing, unexpected = set(want) - set(state), set(state) - set(want)
    if missing or unexpected:
        raise ValueError(
            f"{os.fspath(path)}: the tensors do not fit the model: missing {_few(missing)}, "
            f"unexpected {_few(unexpected)}"
        )
    check_shapes(state, want, path)
