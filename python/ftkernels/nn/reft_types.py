"""pyreft's other intervention types, each one fused edit h + Pᵀ(Q·h + b), and pyreft's weights.

pyreft (interventions.py) has six types; LoReFT and DiReFT are in ``loreft``, the other four
here. Each runs the fused ``loreft`` or ``direft`` op (no extra kernel), with its own (P, Q, b):

============  ==========================  =================================  ================
type          pyreft's formula            op and factors                     orthonormal P
============  ==========================  =================================  ================
LoReFT        h + Rᵀ(W·h + b − R·h)       loreft(R, W, b)                    yes
NoReFT        h + Pᵀ(W·h + b − (P·h+c))   loreft(R=P, W, b − c)              no
ConsReFT      h + Rᵀ(b − R·h)             loreft(R, W=0, b)                  yes
LobiReFT      h + Rᵀb                     direft(W1=0, W2=R, b)              yes
DiReFT        h + Rᵀ(W·h + b)             direft(W, R, b)                    ``orthogonal=True``
NodiReFT      h + Pᵀ(W·h + b)             direft(W, P, b)                    no
============  ==========================  =================================  ================

(c is NoReFT's optional projection bias; NodiReFT's projection bias, when it has one, is in
pyreft's state_dict but never used, so here too.) The parameters are initialised as pyreft's:
orthogonal R, ``torch.rand`` for ConsReFT's and LobiReFT's b, nn.Linear's init otherwise.

:func:`from_pyreft` reads a pyreft intervention's ``state_dict()`` (what pyvene's save writes,
one ``.bin`` an intervention): LoreftIntervention saves ``weight``, ``bias`` and
``rotate_layer`` (R as its d x rank columns); the others keep torch's default state_dict, with
R under torch's ``orthogonal()`` parametrisation (``rotate_layer.parametrizations.weight.
original`` and the d x d ``...weight.0.base``) and pyvene's ``embed_dim``/``interchange_dim``
buffers. The modules built from pyreft put dropout where pyreft does (``dropout_on="output"``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._checks import need_bool
from ..functional import direft, loreft
from .loreft import _BASE, _ORIGINAL, DiReFT, LoReFT, OrthonormalRows, ReFTIntervention, _check_act_fn, pyreft_rotation

__all__ = ["PYREFT_TYPES", "ConsReFT", "LobiReFT", "NoReFT", "NodiReFT", "from_pyreft"]


class _Projected(ReFTIntervention):
    """NoReFT's and NodiReFT's parameters: ``proj_layer`` Linear(embed_dim, rank, bias=add_bias)
    (P and c) and ``learned_source`` Linear(embed_dim, rank) (W and b), pyreft's names."""

    def __init__(
        self,
        embed_dim: int,
        rank: int,
        dropout: float = 0.0,
        device=None,
        dtype=None,
        *,
        add_bias: bool = False,
        dropout_on: str = "edit",
        act_fn: str | None = None,
    ):
        _check_act_fn(act_fn)
        super().__init__(embed_dim, rank, dropout, dropout_on)
        kw = {"device": device, "dtype": dtype}
        self.add_bias = need_bool("add_bias", add_bias)
        self.proj_layer = nn.Linear(embed_dim, rank, bias=add_bias, **kw)
        self.learned_source = nn.Linear(embed_dim, rank, **kw)

    def options(self) -> dict:
        return {**super().options(), **({"add_bias": True} if self.add_bias else {})}

    @classmethod
    def from_pyreft_state_dict(cls, state_dict: Mapping, dropout: float = 0.0, **options):
        w = state_dict["learned_source.weight"]
        mod = cls(w.shape[1], w.shape[0], dropout, add_bias="proj_layer.bias" in state_dict, **options)
        with torch.no_grad():
            mod.learned_source.weight.copy_(w)
            mod.learned_source.bias.copy_(state_dict["learned_source.bias"])
            mod.proj_layer.weight.copy_(state_dict["proj_layer.weight"])
            if mod.add_bias:
                mod.proj_layer.bias.copy_(state_dict["proj_layer.bias"])
        return mod


class NoReFT(_Projected):
    """pyreft's NoreftIntervention, ``h + Pᵀ(W·h + b − P·h − c)``: LoReFT with an unconstrained
    P (``proj_layer.weight``) and its bias c (``add_bias=True``), through the loreft op."""

    pyreft_name = "NoreftIntervention"

    def forward(self, h: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        b = self.learned_source.bias
        if self.proj_layer.bias is not None:
            b = b - self.proj_layer.bias
        return self._fused(loreft, h, positions, self.proj_layer.weight, self.learned_source.weight, b)


class NodiReFT(_Projected):
    """pyreft's NodireftIntervention, ``h + Pᵀ(W·h + b)`` with P = ``proj_layer.weight``
    unconstrained. ``proj_layer.bias`` (``add_bias=True``) is kept for pyreft's state_dict and,
    as in pyreft, not used."""

    pyreft_name = "NodireftIntervention"

    def forward(self, h: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        ls = self.learned_source
        return self._fused(direft, h, positions, ls.weight, self.proj_layer.weight, ls.bias)


class _RotatedBias(ReFTIntervention):
    """ConsReFT's and LobiReFT's parameters: ``rotation`` R (rank x embed_dim, orthonormal rows
    as in :class:`LoReFT`) and ``learned_source`` b (rank,), ``torch.rand`` init as in pyreft."""

    def __init__(
        self, embed_dim: int, rank: int, dropout: float = 0.0, device=None, dtype=None, *, dropout_on: str = "edit"
    ):
        super().__init__(embed_dim, rank, dropout, dropout_on)
        kw = {"device": device, "dtype": dtype}
        self.rotation = nn.Parameter(nn.init.orthogonal_(torch.empty(rank, embed_dim, **kw)))
        parametrize.register_parametrization(self, "rotation", OrthonormalRows(), unsafe=False)
        self.learned_source = nn.Parameter(torch.rand(rank, **kw))

    @classmethod
    def from_pyreft_state_dict(cls, state_dict: Mapping, dropout: float = 0.0, **options):
        R = pyreft_rotation(state_dict[_ORIGINAL], state_dict[_BASE])
        mod = cls(R.shape[1], R.shape[0], dropout, **options)
        with torch.no_grad():
            mod.parametrizations.rotation.original.copy_(R)
            mod.learned_source.copy_(state_dict["learned_source"])
        return mod


class ConsReFT(_RotatedBias):
    """pyreft's ConsreftIntervention, ``h + Rᵀ(b − R·h)``: the loreft op with W = 0. (pyreft's
    ConsReFT has no dropout; ``dropout`` defaults to 0 here too.)"""

    pyreft_name = "ConsreftIntervention"

    def forward(self, h: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        R = self.rotation
        return self._fused(loreft, h, positions, R, R.new_zeros(R.shape), self.learned_source)


class LobiReFT(_RotatedBias):
    """pyreft's LobireftIntervention, ``h + Rᵀb`` (a learned shift in R's row space, the same
    for every h): the direft op with W1 = 0."""

    pyreft_name = "LobireftIntervention"

    def forward(self, h: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        R = self.rotation
        return self._fused(direft, h, positions, R.new_zeros(R.shape), R, self.learned_source)


# ---- pyreft's saved weights -----------------------------------------------------------------

_ROTATE = {_ORIGINAL: ("d", "r"), _BASE: ("d", "d")}
_SOURCE = {"learned_source.weight": ("r", "d"), "learned_source.bias": ("r",)}
_PROJ = {"proj_layer.weight": ("r", "d"), **_SOURCE}
_BUFFERS = {"embed_dim": (), "interchange_dim": ()}  # pyvene's Intervention buffers (0-d ints)

# pyreft class name -> (our class, constructor options, required entries, optional entries).
PYREFT_TYPES: dict[str, tuple[type, dict, dict, dict]] = {
    "LoreftIntervention": (LoReFT, {}, {"weight": ("r", "d"), "bias": ("r",), "rotate_layer": ("d", "r")}, {}),
    "NoreftIntervention": (NoReFT, {}, _PROJ, {"proj_layer.bias": ("r",), **_BUFFERS}),
    "ConsreftIntervention": (ConsReFT, {}, {"learned_source": ("r",), **_ROTATE}, _BUFFERS),
    "LobireftIntervention": (LobiReFT, {}, {"learned_source": ("r",), **_ROTATE}, _BUFFERS),
    "DireftIntervention": (DiReFT, {"orthogonal": True}, {**_ROTATE, **_SOURCE}, _BUFFERS),
    "NodireftIntervention": (NodiReFT, {}, _PROJ, {"proj_layer.bias": ("r",), **_BUFFERS}),
}


def _dim(template: tuple, d: int, r: int) -> list[int]:
    return [{"d": d, "r": r}[t] for t in template]


def from_pyreft(
    type_name: str,
    state_dict: Mapping,
    *,
    embed_dim: int | None = None,
    rank: int | None = None,
    dropout: float = 0.0,
    where: str = "state_dict",
) -> ReFTIntervention:
    """Our module with the weights of a pyreft intervention's ``state_dict()``.

    ``type_name`` is pyreft's class name ("LoreftIntervention", ...; :data:`PYREFT_TYPES`).
    Every entry is checked: no missing or unknown key, every tensor a float tensor of the shape
    its type has for (``embed_dim``, ``rank``), read off the tensors when not given, and pyvene's
    ``embed_dim`` buffer equal to d; errors are ValueErrors naming ``where`` and the entry. The
    module places dropout as pyreft does (``dropout_on="output"``)."""
    if type_name not in PYREFT_TYPES:
        raise ValueError(f"{where}: unknown pyreft intervention type {type_name!r}; known: {sorted(PYREFT_TYPES)}")
    cls, options, required, optional = PYREFT_TYPES[type_name]
    if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
        raise ValueError(f"{where}: must be a dict of named tensors, got {type(state_dict).__name__}")
    missing = sorted(set(required) - set(state_dict))
    unknown = sorted(set(state_dict) - set(required) - set(optional))
    if missing or unknown:
        raise ValueError(
            f"{where}: not a {type_name} state_dict: missing {missing}, unexpected {unknown} "
            f"(expected {sorted(required)}, optionally {sorted(optional)})"
        )
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{where}: entry {k!r} must be a tensor, got {type(v).__name__}")
    # d and r from the arguments, else from a (r, d) or (d, r) entry of this type.
    first = next(k for k, t in required.items() if len(t) == 2 and "r" in t)
    shape = state_dict[first].shape
    if len(shape) == 2:
        sizes = dict(zip(required[first], shape))
        embed_dim = sizes["d"] if embed_dim is None else embed_dim
        rank = sizes["r"] if rank is None else rank
    for k, v in state_dict.items():
        template = {**required, **optional}[k]
        if template == ():
            if v.dim() != 0 or v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
                raise ValueError(f"{where}: entry {k!r} must be a 0-d integer tensor, got {v.dtype} {list(v.shape)}")
            if k == "embed_dim" and int(v) != embed_dim:
                raise ValueError(f"{where}: entry 'embed_dim' is {int(v)}, expected {embed_dim}")
            continue
        want = _dim(template, embed_dim, rank) if embed_dim is not None and rank is not None else None
        if not v.is_floating_point() or want is None or list(v.shape) != want:
            raise ValueError(
                f"{where}: entry {k!r} must be a float tensor of shape {want or list(template)} "
                f"(d={embed_dim}, rank={rank}), got {v.dtype} {list(v.shape)}"
            )
    if _ORIGINAL in state_dict or "rotate_layer" in state_dict:
        rot = state_dict.get("rotate_layer")
        R = rot.T if rot is not None else pyreft_rotation(state_dict[_ORIGINAL], state_dict[_BASE])
        # pyreft's R is orthonormal to rounding (~1e-6 in fp32, ~1e-2 in 16 bits); far from it,
        # the file is damaged (e.g. a sign on the diagonal of `original` moved off +-1), and the
        # QR that re-orthonormalises it would give another edit than pyreft's.
        tol = 1e-3 if (rot if rot is not None else state_dict[_BASE]).dtype in (torch.float32, torch.float64) else 5e-2
        err = (R.double() @ R.double().T - torch.eye(R.shape[0], dtype=torch.float64)).abs().max().item()
        if not err <= tol:
            key = "rotate_layer" if rot is not None else _ORIGINAL
            raise ValueError(f"{where}: entry {key!r} does not give orthonormal rows (max |R Rᵀ − I| = {err:.3g})")
    state = {k: v for k, v in state_dict.items() if k not in _BUFFERS}
    try:
        return cls.from_pyreft_state_dict(state, dropout, dropout_on="output", **options)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
