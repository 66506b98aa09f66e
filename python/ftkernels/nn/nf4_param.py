"""NF4Param: a 4-bit weight with its quant state as one tensor that FSDP2 can shard and gather.

Layout. A weight of ``n = out x in`` elements quantized at blocksize ``bs`` has
``nblocks = ceil(n / bs)`` blocks running row-major over W. NF4Param's outer tensor is
``(P, bs // 2)`` uint8: row ``b`` holds the packed bytes of block ``b`` (two codes a byte, the
layout of the flat packed weight, so its first ``(n + 1) // 2`` bytes are exactly that weight).
Its three inner tensors are

    packed         (P, bs // 2) uint8    the packed weight, zero bytes past (n + 1) // 2
    absmax         (P,)                  uint8 codes (double quantization) or fp32 scales
    nested_absmax  (Q,) fp32             one scale a 256 absmax codes (double quantization)

with ``P`` = nblocks and ``Q`` = ceil(nblocks / 256), each rounded up to a multiple of
``parts``, the number of shards the tensor is made for. The padding is ours, so every shard has the same
size and FSDP2's own uneven-shard padding never runs (it would have to pad all three alike).
The offset, the 16-entry code and the 256-entry nested code are replicated: 1 + 16 + 256
fp32 values a layer.

Sharding. ``fully_shard`` splits the outer tensor on dim 0 into ``parts`` chunks
(``aten.split``): chunk ``i`` is blocks ``[i P/parts, (i+1) P/parts)``, a contiguous range of
W's rows to the block, with their absmax, and nested scales ``[i Q/parts, (i+1) Q/parts)``.
The nested scales of a chunk need not cover its blocks: a chunk is storage only. The forward
runs on the gathered whole. ``fsdp_pre_all_gather`` hands FSDP2 the chunk's three inner
tensors as they are (packed bytes, 8-bit codes, fp32 nested scales: never a dequantized
weight, and never cast by a mixed-precision policy, which FSDP2 applies to floating-point
parameters only: this one is uint8); ``fsdp_post_all_gather`` wraps the gathered tensors
again, without a copy: the whole's inner tensors are FSDP2's all-gather outputs.

Invariants: P and Q are multiples of ``parts``; a chunk is never computed with; the
whole's ``quant_state()`` is bitsandbytes' QuantState of the original weight, byte for byte.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch

from .._formats import NESTED_BLOCKSIZE
from ..quant_state import QuantState, dtype_name

aten = torch.ops.aten

__all__ = ["NF4Param", "live_bytes", "storage_bytes"]

# Every NF4Param alive in this process: shards, the wholes FSDP2 gathers into (their storage
# resized to 0 while the parameter is resharded), and any transient alias.
_LIVE: weakref.WeakSet = weakref.WeakSet()


def storage_bytes(tensors, seen: set[int]) -> int:
    """Bytes of the storages under ``tensors`` not in ``seen`` (data pointers, updated): each
    storage once, a freed one (size 0) not at all."""
    total = 0
    for x in tensors:
        s = x.untyped_storage()
        if s.nbytes() and s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def live_bytes() -> int:
    """Bytes of packed weights, absmax and nested absmax that NF4Params hold in this process
    right now (:func:`storage_bytes` over every live one)."""
    seen: set[int] = set()
    return sum(storage_bytes(t._inner(), seen) for t in list(_LIVE))


@dataclasses.dataclass(frozen=True)
class _Meta:
    """What every chunk of one weight shares (hashable: it is the subclass' flatten context)."""

    shape: tuple[int, int]  # W's (out_features, in_features)
    dtype: torch.dtype  # W's original dtype
    blocksize: int
    quant_type: str
    nested: bool
    offset: float  # fp32 value of the double-quantization offset (0.0 when not nested)
    parts: int  # the number of chunks the inner tensors are padded for

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def nnested(self) -> int:
        return -(-self.nblocks // NESTED_BLOCKSIZE) if self.nested else 0


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    out = t.new_zeros((rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


class NF4Param(torch.Tensor):
    """A packed 4-bit weight and its quant state as one uint8 tensor ``(nblocks, bs // 2)``.

    Build one with :meth:`from_quantized` (``LinearNF4`` does, in ``shard_for``); read it back
    with :meth:`packed_weight` and :meth:`quant_state`, on the whole tensor only (a chunk held
    by one FSDP2 rank raises).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None

    @staticmethod
    def __new__(cls, packed, absmax, nested_absmax, code, nested_code, meta: _Meta, whole: bool):
        return torch.Tensor._make_wrapper_subclass(
            cls, packed.shape, strides=packed.stride(), dtype=torch.uint8, device=packed.device, requires_grad=False
        )

    def __init__(self, packed, absmax, nested_absmax, code, nested_code, meta: _Meta, whole: bool):
        self.packed, self.absmax, self.nested_absmax = packed, absmax, nested_absmax
        self.code, self.nested_code = code, nested_code  # replicated, never gathered
        self.meta, self.whole = meta, whole
        self._qs: QuantState | None = None
        _LIVE.add(self)

    # ---- construction and reading -----------------------------------------------------------

    @classmethod
    def from_quantized(cls, packed: torch.Tensor, qs: QuantState, parts: int = 1) -> NF4Param:
        """The whole tensor for a packed weight ``((n + 1) // 2, 1)`` and its quant state,
        padded for ``parts`` equal chunks."""
        if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
            raise ValueError(f"parts must be a positive int, got {parts!r}")
        if qs.shape is None or len(qs.shape) != 2:
            raise ValueError(f"qs: NF4Param holds a 2-D weight, got shape {qs.shape}")
        qs.check_packed(packed, name="packed")
        meta = _Meta(
            tuple(qs.shape),
            qs.dtype,
            qs.blocksize,
            qs.quant_type,
            qs.nested,
            float(qs.offset) if qs.nested else 0.0,
            parts,
        )
        half = meta.blocksize // 2
        rows = -(-meta.nblocks // parts) * parts
        flat = packed.reshape(-1)
        data = flat.new_zeros(rows * half)
        data[: flat.numel()] = flat
        absmax = _pad_rows(qs.absmax.reshape(-1), rows)
        nested = None
        if meta.nested:
            nested = _pad_rows(qs.state2.absmax.reshape(-1).float(), -(-meta.nnested // parts) * parts)
        nested_code = qs.state2.code if meta.nested else None
        return cls(data.view(rows, half), absmax, nested, qs.code, nested_code, meta, whole=True)

    def _need_whole(self, what: str) -> None:
        if not self.whole:
            raise RuntimeError(
                f"NF4Param.{what}: this is one rank's shard of a {list(self.meta.shape)} 4-bit weight; "
                "its layer computes only inside the forward of its fully_shard-ed module, "
                "which gathers the whole weight"
            )

    def packed_weight(self) -> torch.Tensor:
        """The packed weight ``((n + 1) // 2, 1)`` uint8 (a view, no copy)."""
        self._need_whole("packed_weight")
        return self.packed.view(-1)[: (self.meta.numel + 1) // 2].view(-1, 1)

    def quant_state(self) -> QuantState:
        """The weight's QuantState (views of this tensor's storage, built once)."""
        self._need_whole("quant_state")
        if self._qs is None:
            m = self.meta
            state2 = offset = None
            if m.nested:
                state2 = QuantState(
                    absmax=self.nested_absmax[: m.nnested],
                    code=self.nested_code,
                    blocksize=NESTED_BLOCKSIZE,
                    dtype=torch.float32,
                )
                offset = torch.tensor(m.offset, dtype=torch.float32, device=self.device)
            self._qs = QuantState(
                absmax=self.absmax[: m.nblocks],
                shape=m.shape,
                code=self.code,
                blocksize=m.blocksize,
                quant_type=m.quant_type,
                dtype=m.dtype,
                offset=offset,
                state2=state2,
            )
        return self._qs

    def payload_bytes(self) -> int:
        """The bytes this tensor holds and an all-gather moves: packed, absmax, nested absmax."""
        return sum(t.numel() * t.element_size() for t in self._inner())

    def _inner(self) -> list[torch.Tensor]:
        return [self.packed, self.absmax] + ([self.nested_absmax] if self.meta.nested else [])

    def __repr__(self) -> str:  # printing a wrapper would dispatch ops it does not support
        m = self.meta
        part = "whole" if self.whole else f"shard of {m.parts}"
        return (
            f"NF4Param({part}, weight {list(m.shape)} {m.quant_type} blocksize={m.blocksize} "
            f"double_quant={m.nested} dtype={dtype_name(m.dtype)}, device={self.device})"
        )

    # ---- FSDP2 all-gather extension ----------------------------------------------------------

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        if mesh.size() != self.meta.parts:
            raise ValueError(
                f"NF4Param was padded for {self.meta.parts} shards but the mesh has {mesh.size()} ranks; "
                "shard the model with the mesh it was prepared for"
            )
        if mesh.size() == 1:
            # NOTE: FSDP2's one-rank path copies a parameter's first all-gather input alone (torch
            # 2.13), so one rank gets the three tensors as one byte buffer, each part 16-byte aligned.
            return (self._one_buffer(),), None
        return tuple(self._inner()), None

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        outputs = tuple(all_gather_outputs)
        parts = self._from_one_buffer(outputs[0]) if len(outputs) == 1 else outputs
        if out is not None:  # the later gathers write into the storage FSDP2 re-allocated
            for mine, gathered in zip(out._inner(), parts):
                if mine.untyped_storage().data_ptr() != gathered.untyped_storage().data_ptr():
                    mine.copy_(gathered)
            return None
        packed, absmax, *nested = parts
        whole = NF4Param(
            packed, absmax, nested[0] if nested else None, self.code, self.nested_code, self.meta, whole=True
        )
        return whole, outputs

    def _segments(self) -> list[tuple[int, int]]:
        """(offset, bytes) of each inner tensor in the one-buffer layout, offsets 16-aligned."""
        out, at = [], 0
        for x in self._inner():
            n = x.numel() * x.element_size()
            out.append((at, n))
            at += -(-n // 16) * 16
        return out

    def _one_buffer(self) -> torch.Tensor:
        segments = self._segments()
        buf = self.packed.new_zeros(segments[-1][0] + -(-segments[-1][1] // 16) * 16)
        for (at, n), x in zip(segments, self._inner()):
            buf[at : at + n] = x.reshape(-1).view(torch.uint8)
        return buf

    def _from_one_buffer(self, buf: torch.Tensor) -> list[torch.Tensor]:
        return [buf[at : at + n].view(x.dtype).view(x.shape) for (at, n), x in zip(self._segments(), self._inner())]

    # ---- the aten ops FSDP2, DTensor and nn.Module use ----------------------------------------

    def __tensor_flatten__(self):
        names = ["packed", "absmax"] + (["nested_absmax"] if self.meta.nested else [])
        return names, (self.meta, self.whole, self.code, self.nested_code)

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        meta, whole, code, nested_code = ctx
        return NF4Param(inner["packed"], inner["absmax"], inner.get("nested_absmax"), code, nested_code, meta, whole)

    def _with(self, fn, shape=None, codes=None) -> NF4Param:
        """A new NF4Param whose inner tensors are fn(each) and whose replicated code tables are
        codes(each) (default: the same tensors)."""
        codes = codes or (lambda x: x)
        nested = fn(self.nested_absmax) if self.meta.nested else None
        ncode = codes(self.nested_code) if self.nested_code is not None else None
        out = NF4Param(fn(self.packed), fn(self.absmax), nested, codes(self.code), ncode, self.meta, self.whole)
        if shape is not None and tuple(shape) != tuple(out.shape):
            out = _reshaped(out, shape)
        return out

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None:
            raise NotImplementedError(
                f"NF4Param (a packed 4-bit weight) does not support {func}; "
                "dequantize its layer's weight first (LinearNF4.dequantize())"
            )
        return handler(func, *args, **kwargs)


def _reshaped(t: NF4Param, shape) -> NF4Param:
    """t's inner tensors under another outer shape: view(-1), which FSDP2 keeps as its flat
    record of a shard; nothing computes with it."""
    out = torch.Tensor._make_wrapper_subclass(NF4Param, tuple(shape), dtype=torch.uint8, device=t.device)
    out.__dict__.update(t.__dict__)
    _LIVE.add(out)
    return out


_HANDLERS = {}


def _handles(*ops):
    def register(fn):
        for op in ops:
            _HANDLERS[op] = fn
        return fn

    return register


@_handles(aten.detach.default, aten.alias.default)
def _alias(func, t):
    return t._with(lambda x: x, shape=t.shape)


@_handles(aten.clone.default)
def _clone(func, t, memory_format=None):
    return t._with(lambda x: x.clone(), shape=t.shape)


@_handles(aten.split.Tensor)
def _split(func, t, split_size, dim=0):
    parts = t.meta.parts
    if dim != 0 or not t.whole or t.shape[0] != split_size * parts:
        raise ValueError(
            f"NF4Param: padded for {parts} equal shards of {t.shape[0] // parts} blocks on dim 0; "
            f"cannot split into pieces of {split_size} on dim {dim}"
        )
    q = t.nested_absmax.shape[0] // parts if t.meta.nested else 0
    chunks = []
    for i in range(parts):
        rows = slice(i * split_size, (i + 1) * split_size)
        chunk = NF4Param(
            t.packed[rows],
            t.absmax[rows],
            t.nested_absmax[i * q : (i + 1) * q] if t.meta.nested else None,
            t.code,
            t.nested_code,
            t.meta,
            whole=False,
        )
        chunks.append(chunk)
    return chunks


@_handles(aten.new_zeros.default)
def _new_zeros(func, t, size, **kwargs):
    if tuple(size) == tuple(t.shape):
        return t._with(torch.zeros_like)
    parts = t.meta.parts
    if t.whole and tuple(size) == (t.shape[0] // parts, *t.shape[1:]):
        # FSDP2 asks the whole for a zero chunk (the padded shard it then copies chunk i into).
        q = t.nested_absmax.shape[0] // parts if t.meta.nested else 0
        zeros = lambda x, n: x.new_zeros((n, *x.shape[1:]))  # noqa: E731
        return NF4Param(
            zeros(t.packed, size[0]),
            zeros(t.absmax, size[0]),
            zeros(t.nested_absmax, q) if t.meta.nested else None,
            t.code,
            t.nested_code,
            t.meta,
            whole=False,
        )
    raise ValueError(f"NF4Param: new_zeros({list(size)}) of a {list(t.shape)} weight")


@_handles(aten.slice.Tensor)
def _slice(func, t, dim=0, start=None, end=None, step=1):
    n = t.shape[dim]
    start = 0 if start is None else start
    end = n if end is None else min(end, n)
    if start != 0 or end != n or step != 1:
        raise ValueError(f"NF4Param: only the whole of dim {dim} can be sliced, got [{start}:{end}:{step}]")
    return t._with(lambda x: x, shape=t.shape)


@_handles(aten.copy_.default)
def _copy(func, dst, src, non_blocking=False):
    if not isinstance(src, NF4Param) or src.meta != dst.meta or src.shape != dst.shape:
        raise ValueError("NF4Param: copy_ needs an NF4Param of the same weight and shape")
    for a, b in zip(dst._inner(), src._inner()):
        a.copy_(b, non_blocking=non_blocking)
    return dst


@_handles(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(func, t, size):
    size = list(size)
    if -1 in size:
        known = 1
        for s in size:
            known *= s if s != -1 else 1
        size[size.index(-1)] = t.numel() // known
    if torch.Size(size).numel() != t.numel():
        raise ValueError(f"NF4Param: cannot view a {list(t.shape)} tensor as {size}")
    return t._with(lambda x: x, shape=size)


@_handles(aten.as_strided.default)
def _as_strided(func, t, size, stride, storage_offset=None):
    if tuple(size) != tuple(t.shape) or storage_offset not in (None, 0):
        raise ValueError(f"NF4Param: as_strided to {list(size)} of a {list(t.shape)} tensor")
    return t._with(lambda x: x, shape=t.shape)


@_handles(aten._to_copy.default)
def _to_copy(func, t, dtype=None, device=None, non_blocking=False, **kwargs):
    if dtype is not None and dtype != torch.uint8:
        raise TypeError(
            f"NF4Param holds packed 4-bit codes; it cannot be cast to {dtype_name(dtype)} "
            "(dequantize its layer's weight instead)"
        )
    move = lambda x: x.to(device=device, non_blocking=non_blocking)  # noqa: E731
    return t._with(move, shape=t.shape, codes=move)


@_handles(aten.is_pinned.default)
def _is_pinned(func, t, device=None):
    return t.packed.is_pinned()


@_handles(aten._pin_memory.default)
def _pin(func, t, device=None):
    return t._with(lambda x: x.pin_memory(), shape=t.shape)


@_handles(aten.empty_like.default)
def _empty_like(func, t, **kwargs):
    return t._with(torch.empty_like, shape=t.shape)


@_handles(aten.equal.default)
def _equal(func, a, b):
    return (
        isinstance(b, NF4Param) and a.meta == b.meta and all(torch.equal(x, y) for x, y in zip(a._inner(), b._inner()))
    )
