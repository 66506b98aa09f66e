"""QuantState: what it takes to dequantize a 4-bit tensor, and its state_dict format.

The format is the one Transformers writes for a bitsandbytes 4-bit weight, so checkpoints move
both ways: for a weight ``w``, ``w`` (packed uint8), ``w.absmax``, ``w.quant_map``, with double
quantization ``w.nested_absmax`` and ``w.nested_quant_map``, and ``w.quant_state.bitsandbytes__nf4``
(or ``__fp4``): UTF-8 JSON as a uint8 tensor with the non-tensor fields. Reading parses JSON only.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from ._formats import BLOCKSIZES_4BIT, BLOCKSIZES_8BIT, QUANT_TYPES, code_4bit

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_KEYS = {
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    "quant_type",
    "blocksize",
    "dtype",
    "shape",
    "nested_blocksize",
    "nested_dtype",
    "nested_offset",
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def pack_dict_to_tensor(d: dict) -> torch.Tensor:
    # json.dumps with its default separators: the bytes bitsandbytes writes.
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def unpack_tensor_to_dict(t: torch.Tensor) -> dict:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError("quant_state: the packed entry must be a 1-D uint8 tensor of UTF-8 JSON")
    try:
        d = json.loads(bytes(t.cpu().numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"quant_state: the packed entry is not UTF-8 JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError("quant_state: the packed entry must hold a JSON object")
    return d


class QuantState:
    """Quantization state of one 4-bit tensor (same fields as bitsandbytes' QuantState).

    ``absmax`` is fp32 per block, or with double quantization (``nested``) uint8 codes that
    ``state2`` (nested absmax, 256-entry ``code``, ``blocksize``) and ``offset`` decode. The
    state of an 8-bit blockwise tensor (:func:`ftkernels.quantize_blockwise`) has no shape and
    no quant_type. ``qs[i]`` is bitsandbytes' older list form, ``[absmax, shape, dtype,
    blocksize, [offset, state2] or None, quant_type]``.
    """

    valid_quant_types = ("fp4", "nf4")  # bitsandbytes' order
    valid_qs_type_keys = [f"bitsandbytes__{q}" for q in valid_quant_types]
    valid_qs_keys = sorted(_KEYS | {"quant_state"})

    def __init__(
        self, absmax, shape=None, code=None, blocksize=None, quant_type=None, dtype=None, offset=None, state2=None
    ):
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self.code = code
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.dtype = dtype
        self.offset = offset
        self.state2 = state2

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def nested_absmax(self):
        return self.state2.absmax if self.nested else None

    @property
    def nested_code(self):
        return self.state2.code if self.nested else None

    @property
    def nested_blocksize(self):
        return self.state2.blocksize if self.nested else None

    def __getattr__(self, name):
        # Only for names not found the usual way: the packed entry's last key part, which
        # FSDP's state_dict traversal looks up as an attribute ("quant_state.bitsandbytes__nf4").
        if name.startswith("bitsandbytes__") and name[len("bitsandbytes__") :] in QUANT_TYPES:
            packed = self.as_dict(packed=True)
            if f"quant_state.{name}" in packed:
                return packed[f"quant_state.{name}"]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __getitem__(self, idx):
        nested = [self.offset, self.state2] if self.nested else None
        return [self.absmax, self.shape, self.dtype, self.blocksize, nested, self.quant_type][idx]

    def __repr__(self) -> str:
        extra = f", nested_blocksize={self.nested_blocksize}" if self.nested else ""
        return (
            f"QuantState(quant_type={self.quant_type!r}, shape={tuple(self.shape or ())}, "
            f"dtype={self.dtype}, blocksize={self.blocksize}{extra})"
        )

    # ---- serialisation -------------------------------------------------------------------

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state_dict entries (``packed=True``: tensors only, as Transformers saves them)."""
        d: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            d.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    # a copy, so safetensors does not see one storage under two keys
                    "nested_quant_map": self.state2.code.clone(),
                    "nested_dtype": dtype_name(self.state2.dtype),
                    "nested_offset": float(self.offset.item()),
                }
            )
        if not packed or self.quant_type is None:  # an 8-bit state has no packed entry
            return d
        out = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        out[f"quant_state.bitsandbytes__{self.quant_type}"] = pack_dict_to_tensor(
            {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
        )
        return out

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device) -> QuantState:
        """Read the entries :meth:`as_dict` writes (packed or not, key prefixes allowed) and
        check that they describe a well-formed state; a ``ValueError`` names what does not."""
        d = dict(qs_dict)
        packed_keys = [k for k, v in d.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if len(packed_keys) > 1:
            raise ValueError(f"quant_state: expected one packed quant_state entry, found {packed_keys}")
        if packed_keys:
            key = packed_keys[0]
            suffix = key.split(".")[-1]
            if suffix not in {f"bitsandbytes__{q}" for q in QUANT_TYPES}:
                raise ValueError(f"quant_state: unknown packed entry {key!r}")
            d.update(unpack_tensor_to_dict(d.pop(key)))
            if d.get("quant_type") != suffix.split("__")[1]:
                raise ValueError(f"quant_state: {key!r} says quant_type {d.get('quant_type')!r}")
        elif "quant_type" not in d:
            raise ValueError("quant_state: no 'quant_state.bitsandbytes__nf4' (or __fp4) entry and no quant_type")
        d = {k.split(".")[-1]: v for k, v in d.items()}
        unknown = set(d) - _KEYS
        if unknown:
            raise ValueError(f"quant_state: unexpected entries {sorted(unknown)}")
        missing = {"quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape"} - set(d)
        if missing:
            raise ValueError(f"quant_state: missing entries {sorted(missing)}")

        quant_type = d["quant_type"]
        if quant_type is None and not packed_keys:
            return cls._from_dict_8bit(d, device)
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_state: quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        blocksize = _int_in("blocksize", d["blocksize"], BLOCKSIZES_4BIT)
        dtype = _dtype("dtype", d["dtype"])
        shape = d["shape"]
        if not isinstance(shape, (list, tuple)) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise ValueError(f"quant_state: shape must be a list of non-negative ints, got {shape!r}")
        nblocks = -(-math.prod(shape) // blocksize)

        code = _tensor("quant_map", d["quant_map"], torch.float32, 16)
        if not torch.equal(code, code_4bit(quant_type, "cpu").to(code.device)):
            raise ValueError(f"quant_state: quant_map is not the standard {quant_type} code")
        absmax = d["absmax"]
        nested = "nested_absmax" in d
        if nested:
            absmax = _tensor("absmax", absmax, torch.uint8, nblocks)
            state2, offset = cls._nested_from_dict(d, nblocks, device)
        else:
            absmax = _tensor("absmax", absmax, torch.float32, nblocks)
            state2 = offset = None
        return cls(
            absmax=absmax.to(device),
            shape=shape,
            code=code.to(device),
            blocksize=blocksize,
            quant_type=quant_type,
            dtype=dtype,
            offset=offset,
            state2=state2,
        )

    @classmethod
    def _from_dict_8bit(cls, d: dict[str, Any], device) -> QuantState:
        """The state of an 8-bit blockwise tensor (quant_type and shape None), checked."""
        if d["shape"] is not None:
            raise ValueError(f"quant_state: an 8-bit state (quant_type None) has no shape, got {d['shape']!r}")
        blocksize = _int_in("blocksize", d["blocksize"], BLOCKSIZES_8BIT)
        dtype = _dtype("dtype", d["dtype"])
        code = _tensor("quant_map", d["quant_map"], torch.float32, 256)
        absmax = d["absmax"]
        nested = "nested_absmax" in d
        if not isinstance(absmax, torch.Tensor) or absmax.dim() != 1:
            raise ValueError("quant_state: absmax must be a 1-D tensor")
        state2 = offset = None
        if nested:
            absmax = _tensor("absmax", absmax, torch.uint8, absmax.numel())
            state2, offset = cls._nested_from_dict(d, absmax.numel(), device)
        else:
            absmax = _tensor("absmax", absmax, torch.float32, absmax.numel())
        return cls(
            absmax=absmax.to(device),
            code=code.to(device),
            blocksize=blocksize,
            dtype=dtype,
            offset=offset,
            state2=state2,
        )

    @classmethod
    def _nested_from_dict(cls, d: dict[str, Any], nblocks: int, device) -> tuple[QuantState, torch.Tensor]:
        """(state2, offset) of a double-quantized absmax of ``nblocks`` codes, checked."""
        for k in ("nested_quant_map", "nested_blocksize", "nested_dtype", "nested_offset"):
            if k not in d:
                raise ValueError(f"quant_state: nested_absmax without {k}")
        nbs = _int_in("nested_blocksize", d["nested_blocksize"], BLOCKSIZES_8BIT)
        if _dtype("nested_dtype", d["nested_dtype"]) != torch.float32:
            raise ValueError("quant_state: nested_dtype must be float32")
        nabs = _tensor("nested_absmax", d["nested_absmax"], torch.float32, -(-nblocks // nbs))
        ncode = _tensor("nested_quant_map", d["nested_quant_map"], torch.float32, 256)
        off = d["nested_offset"]
        if isinstance(off, bool) or not isinstance(off, (int, float)):
            raise ValueError(f"quant_state: nested_offset must be a number, got {off!r}")
        state2 = cls(absmax=nabs.to(device), code=ncode.to(device), blocksize=nbs, dtype=torch.float32)
        return state2, torch.tensor(float(off), dtype=torch.float32, device=device)

    # ---- helpers ---------------------------------------------------------------------------

    def check_packed(self, packed: torch.Tensor, name: str = "A") -> None:
        """Raise ValueError unless ``packed`` holds this state's (numel + 1) // 2 bytes."""
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
            raise TypeError(f"{name} must be a uint8 tensor of packed 4-bit values")
        n = math.prod(self.shape)
        if packed.numel() != (n + 1) // 2:
            raise ValueError(
                f"{name} has {packed.numel()} bytes but quant_state shape {tuple(self.shape)} needs {(n + 1) // 2}"
            )

    def to(self, device) -> QuantState:
        """Move to ``device`` in place (as bitsandbytes does) and return self."""
        self.absmax = self.absmax.to(device)
        self.code = self.code.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.absmax = self.state2.absmax.to(device)
            self.state2.code = self.state2.code.to(device)
        return self

    def __eq__(self, other) -> bool:
        if not isinstance(other, QuantState):
            return NotImplemented
        same = (
            self.shape == other.shape
            and self.dtype == other.dtype
            and self.blocksize == other.blocksize
            and self.quant_type == other.quant_type
            and self.nested == other.nested
            and torch.equal(self.absmax.cpu(), other.absmax.cpu())
            and torch.equal(self.code.cpu(), other.code.cpu())
        )
        if same and self.nested:  # the nested state is compared by what decoding uses
            same = (
                torch.equal(self.offset.cpu(), other.offset.cpu())
                and self.nested_blocksize == other.nested_blocksize
                and torch.equal(self.nested_absmax.cpu(), other.nested_absmax.cpu())
                and torch.equal(self.nested_code.cpu(), other.nested_code.cpu())
            )
        return same

    __hash__ = None  # mutable, compared by value


def _int_in(name, v, allowed):
    if isinstance(v, bool) or not isinstance(v, int) or v not in allowed:
        raise ValueError(f"quant_state: {name} must be one of {allowed}, got {v!r}")
    return v


def _dtype(name, v):
    if v not in _DTYPES:
        raise ValueError(f"quant_state: {name} must be one of {sorted(_DTYPES)}, got {v!r}")
    return _DTYPES[v]


def _tensor(name, t, dtype, numel):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"quant_state: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"quant_state: {name} must be {dtype_name(dtype)}, got {dtype_name(t.dtype)}")
    if t.numel() != numel:
        raise ValueError(f"quant_state: {name} has {t.numel()} elements; the shape and blocksize need {numel}")
    return t
