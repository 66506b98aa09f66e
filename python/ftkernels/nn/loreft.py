"""ReFT interventions as modules: LoReFT (orthonormal R) and DiReFT, plus the position helpers.

LoReFT edits h at chosen positions: Φ(h) = h + Rᵀ(W·h + b − R·h), R (rank x d) with
orthonormal rows. The reference library keeps R orthonormal with torch's Householder
parametrisation, which multiplies by a d x d "base" (64 MB at d = 4096) three times a forward.
Here R is the Q factor of a thin QR of an unconstrained (rank x d) parameter V:
    R = qr(Vᵀ).Q ᵀ, with the signs fixed so diag(qr(Vᵀ).R) > 0

which costs O(d·rank²) (Householder QR of a d x rank matrix), has no d x d buffer, is smooth
in V, and maps an orthonormal V to itself (so ``right_inverse`` is the identity and the
initial R is exactly the orthogonal init). R is recomputed from V once a forward, i.e. once
a training step; ``torch.nn.utils.parametrize.cached()`` shares it across several calls.
The state_dict holds V, so R is orthonormal to fp32 rounding after any optimizer step and
after saving, loading and resuming (it never drifts: it is recomputed, not updated).

Every intervention here (this file's LoReFT and DiReFT, and the other pyreft types in
``reft_types``) is one fused edit h + Pᵀ(Q·h + b) at the positions. Dropout goes either on the
edit (``dropout_on="edit"``, inside the fused op, the default) or, as pyreft places it, on the
whole edited row h + edit (``dropout_on="output"``; rows outside the positions are untouched).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .._checks import need_bool
from .._formats import REFT_MAX_RANK
from ..functional import direft, loreft

__all__ = ["DiReFT", "LoReFT", "OrthonormalRows", "ReFTIntervention", "parse_positions", "reft_positions"]


class OrthonormalRows(nn.Module):
    """Parametrisation: a (rank x d) V, rank <= d, to the orthonormal-rows R of its thin QR."""

    def forward(self, V: torch.Tensor) -> torch.Tensor:
        # NOTE: in fp32 (or fp64) whatever V's dtype: QR has no bf16/fp16 kernels, and a 16-bit
        # R would be orthonormal only to ~1e-2.
        ct = torch.float64 if V.dtype == torch.float64 else torch.float32
        q, r = torch.linalg.qr(V.to(ct).T)  # (d x rank), (rank x rank)
        signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(ct)
        return (q * signs).T.to(V.dtype)

    def right_inverse(self, R: torch.Tensor) -> torch.Tensor:
        return R  # an orthonormal R is its own preimage; any other V of full rank is valid too


def _check_dims(embed_dim, rank) -> None:
    for name, v in (("embed_dim", embed_dim), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if rank > min(embed_dim, REFT_MAX_RANK):
        raise ValueError(f"rank must be at most min(embed_dim={embed_dim}, {REFT_MAX_RANK}), got {rank}")


def _check_dropout(dropout) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return float(dropout)


DROPOUT_ON = ("edit", "output")


def _check_dropout_on(dropout_on) -> str:
    if dropout_on not in DROPOUT_ON:
        raise ValueError(f"dropout_on must be 'edit' or 'output' (pyreft's placement), got {dropout_on!r}")
    return dropout_on


def _check_act_fn(act_fn) -> None:
    # pyreft's act_fn defaults to None ("linear"); any other would make the edit non-linear in
    # W·h + b, which the fused op h + Pᵀ(Q·h + b) cannot express.
    if act_fn is not None and act_fn != "linear":
        raise ValueError(
            f"act_fn must be None or 'linear' (pyreft's default; the fused edit is linear), got {act_fn!r}"
        )


def edited_rows(h: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor | None:
    """The rows of ``h.reshape(-1, d)`` the positions select (int64, valid slots only), or None
    for every row. The positions must already be checked (the fused ops check them)."""
    if positions is None:
        return None
    pos = positions.long()
    if h.dim() == 2:
        return pos[pos >= 0]
    base = torch.arange(pos.shape[0], device=pos.device, dtype=torch.int64)[:, None] * h.shape[1]
    return (pos + base)[pos >= 0]


def output_dropout(out: torch.Tensor, positions: torch.Tensor | None, p: float, training: bool) -> torch.Tensor:
    """pyreft's dropout placement: dropout of the whole edited row (h + edit) at the positions,
    every other row as it was."""
    if not training or p == 0.0:
        return out
    rows = edited_rows(out, positions)
    if rows is None:
        return F.dropout(out, p, training=True)
    flat = out.reshape(-1, out.shape[-1])
    return flat.index_copy(0, rows, F.dropout(flat.index_select(0, rows), p, training=True)).reshape(out.shape)


class ReFTIntervention(nn.Module):
    """The shared part of the interventions: embed_dim, rank, dropout and its placement.

    ``options()`` are the constructor arguments beyond (embed_dim, rank, dropout) that rebuild
    the module (saved by :func:`ftkernels.integrations.save_loreft`)."""

    pyreft_name = ""  # the pyreft class this type reads the weights of

    def __init__(self, embed_dim: int, rank: int, dropout: float, dropout_on: str):
        super().__init__()
        _check_dims(embed_dim, rank)
        self.embed_dim, self.rank, self.dropout = embed_dim, rank, _check_dropout(dropout)
        self.dropout_on = _check_dropout_on(dropout_on)

    def _fused(self, op, h, positions, A, B, b) -> torch.Tensor:
        on_edit = self.dropout if self.dropout_on == "edit" else 0.0
        out = op(h, A, B, b, positions, dropout_p=on_edit, training=self.training)
        if self.dropout_on == "output":
            out = output_dropout(out, positions, self.dropout, self.training)
        return out

    def options(self) -> dict:
        return {} if self.dropout_on == "edit" else {"dropout_on": self.dropout_on}

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.options().items())
        return f"embed_dim={self.embed_dim}, rank={self.rank}, dropout={self.dropout}{extra}"


class LoReFT(ReFTIntervention):
    """A LoReFT intervention: ``h + Rᵀ(W·h + b − R·h)`` at the given positions, in one fused op
    (pyreft's LoreftIntervention).

    ``rotation`` is R (rank x embed_dim, orthonormal rows, see the module docstring);
    ``learned_source`` is the Linear(embed_dim, rank) holding W and b, as in pyreft. Dropout
    applies in training, to the edit only (``dropout_on="edit"``) or to h + edit as in pyreft
    (``"output"``). ``act_fn`` may be None or "linear" only. ``forward(h, positions=None)``
    takes h (batch, seq, d) or (rows, d) and positions as :func:`ftkernels.loreft` does.
    """

    pyreft_name = "LoreftIntervention"

    def __init__(
        self,
        embed_dim: int,
        rank: int,
        dropout: float = 0.0,
        device=None,
        dtype=None,
        *,
        dropout_on: str = "edit",
        act_fn: str | None = None,
    ):
        _check_act_fn(act_fn)
        super().__init__(embed_dim, rank, dropout, dropout_on)
        kw = {"device": device, "dtype": dtype}
        self.rotation = nn.Parameter(nn.init.orthogonal_(torch.empty(rank, embed_dim, **kw)))
        parametrize.register_parametrization(self, "rotation", OrthonormalRows(), unsafe=False)
        self.learned_source = nn.Linear(embed_dim, rank, **kw)

    def forward(self, h: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self._fused(loreft, h, positions, self.rotation, self.learned_source.weight, self.learned_source.bias)

    # pyreft's LoreftIntervention saves {"weight", "bias"} (learned_source) and "rotate_layer",
    # R as (embed_dim x rank) columns, computed from its parametrisation.
    @classmethod
    def from_pyreft_state_dict(cls, state_dict: dict, dropout: float = 0.0, **options) -> LoReFT:
        """A LoReFT with the weights of a pyreft LoreftIntervention's state_dict. R is made
        orthonormal again on the way in (QR, as always), should the saved one have drifted.
        ``options`` (dropout_on, act_fn) go to the constructor."""
        if not isinstance(state_dict, dict) or not {"weight", "bias", "rotate_layer"} <= state_dict.keys():
            raise ValueError("state_dict must be a pyreft LoreftIntervention's: keys 'weight', 'bias', 'rotate_layer'")
        rot, weight, bias = state_dict["rotate_layer"], state_dict["weight"], state_dict["bias"]
        for name, t, dims in (("rotate_layer", rot, 2), ("weight", weight, 2), ("bias", bias, 1)):
            if not isinstance(t, torch.Tensor) or t.dim() != dims or not t.is_floating_point():
                raise ValueError(f"{name} must be a {dims}-D float tensor, got {getattr(t, 'shape', type(t))}")
        embed_dim, rank = rot.shape
        if list(weight.shape) != [rank, embed_dim] or list(bias.shape) != [rank]:
            raise ValueError(
                f"weight must be ({rank}, {embed_dim}) and bias ({rank},) to match rotate_layer "
                f"({embed_dim}, {rank}), got {list(weight.shape)} and {list(bias.shape)}"
            )
        mod = cls(embed_dim, rank, dropout, device=rot.device, **options)
        with torch.no_grad():
            mod.parametrizations.rotation.original.copy_(rot.T)
            mod.learned_source.weight.copy_(weight)
            mod.learned_source.bias.copy_(bias)
        return mod

    def pyreft_state_dict(self) -> dict:
        """The weights as pyreft's LoreftIntervention saves them (for its load_state_dict)."""
        return {
            "weight": self.learned_source.weight.detach().clone(),
            "bias": self.learned_source.bias.detach().clone(),
            "rotate_layer": self.rotation.detach().T.contiguous(),
        }


class DiReFT(ReFTIntervention):
    """A DiReFT intervention: ``h + W2ᵀ(W1·h + b)`` (the ReFT paper's ablation, faster to
    train). ``learned_source`` is Linear(embed_dim, rank) (W1, b) and ``proj`` is W2 (rank x
    embed_dim, orthogonal init). With ``orthogonal=False`` (the default) W2 is unconstrained;
    pyreft's DireftIntervention keeps it orthonormal, which ``orthogonal=True`` does as LoReFT
    does R (``proj`` is then parametrised by :class:`OrthonormalRows`). Dropout and act_fn as
    in :class:`LoReFT`."""

    pyreft_name = "DireftIntervention"

    def __init__(
        self,
        embed_dim: int,
        rank: int,
        dropout: float = 0.0,
        device=None,
        dtype=None,
        *,
        orthogonal: bool = False,
        dropout_on: str = "edit",
        act_fn: str | None = None,
    ):
        _check_act_fn(act_fn)
        super().__init__(embed_dim, rank, dropout, dropout_on)
        self.orthogonal = need_bool("orthogonal", orthogonal)
        kw = {"device": device, "dtype": dtype}
        self.learned_source = nn.Linear(embed_dim, rank, **kw)
        self.proj = nn.Parameter(nn.init.orthogonal_(torch.empty(rank, embed_dim, **kw)))
        if orthogonal:
            parametrize.register_parametrization(self, "proj", OrthonormalRows(), unsafe=False)

    def forward(self, h: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self._fused(direft, h, positions, self.learned_source.weight, self.proj, self.learned_source.bias)

    def options(self) -> dict:
        return {**super().options(), **({"orthogonal": True} if self.orthogonal else {})}

    @classmethod
    def from_pyreft_state_dict(cls, state_dict: dict, dropout: float = 0.0, **options) -> DiReFT:
        """A DiReFT (``orthogonal=True`` unless ``options`` say otherwise) with the weights of
        a pyreft DireftIntervention's state_dict, shapes checked by :func:`.from_pyreft`."""
        R = pyreft_rotation(state_dict[_ORIGINAL], state_dict[_BASE])
        orthogonal = options.pop("orthogonal", True)
        mod = cls(R.shape[1], R.shape[0], dropout, device=R.device, orthogonal=orthogonal, **options)
        with torch.no_grad():
            (mod.parametrizations.proj.original if orthogonal else mod.proj).copy_(R)
            mod.learned_source.weight.copy_(state_dict["learned_source.weight"])
            mod.learned_source.bias.copy_(state_dict["learned_source.bias"])
        return mod


# torch's orthogonal() parametrisation of pyreft's (d x rank) rotate_layer weight, as saved.
_ORIGINAL = "rotate_layer.parametrizations.weight.original"
_BASE = "rotate_layer.parametrizations.weight.0.base"


def pyreft_rotation(original: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """R (rank x d) from torch's ``orthogonal()`` parametrisation of a (d x rank) weight, as
    pyreft's ``rotate_layer`` holds it: ``original`` and the d x d ``base`` (trivialisation).

    The weight is base @ Q(original), Q torch's default map: Householder reflectors below the
    diagonal of ``original`` (signs from its diagonal) for rank < d, the matrix exponential of
    its skew-symmetric lower part for rank == d. In fp32 (fp64 for fp64 inputs), as torch's;
    recomputed here (not with torch's module) to skip the d x d QR its constructor does."""
    ct = torch.float64 if original.dtype == torch.float64 else torch.float32
    X, B = original.to(ct), base.to(ct)
    d, r = X.shape
    if r == d:
        L = X.tril()
        Q = torch.matrix_exp(L - L.T)
    else:
        A = X.tril(diagonal=-1)
        Q = torch.linalg.householder_product(A, 2.0 / (1.0 + (A * A).sum(dim=0)))
        Q = Q * X.diagonal().int()[None]
    return (B @ Q).T.contiguous()


# ---- positions ------------------------------------------------------------------------------

_SPEC = re.compile(r"^\s*(?:f(\d+))?\s*\+?\s*(?:l(\d+))?\s*$")


def parse_positions(spec: str) -> tuple[int, int]:
    """pyreft's position spec, "f7+l7" (first 7 and last 7 tokens), "f5", "l3" -> (first, last)."""
    m = _SPEC.match(spec) if isinstance(spec, str) else None
    if m is None or (m.group(1) is None and m.group(2) is None) or (m.group(1) and m.group(2) and "+" not in spec):
        raise ValueError(f"positions must look like 'f7+l7', 'f5' or 'l3', got {spec!r}")
    return int(m.group(1) or 0), int(m.group(2) or 0)


def reft_positions(attention_mask: torch.Tensor, positions: str = "f7+l7") -> torch.Tensor:
    """The (batch, first + last) int64 positions of the first and last real tokens of each
    sequence, -1 where there are none, for :func:`ftkernels.loreft` and the modules.

    Real tokens are where ``attention_mask`` (batch, seq) is non-zero, so left and right padding
    (and any other) are both handled: positions are indices into the padded sequence. A prompt
    shorter than first + last has each of its tokens edited once: the first ``first`` of them
    in the first slots, the rest in the last slots, the unused slots -1.
    """
    first, last = parse_positions(positions)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError(
            "attention_mask must be a (batch, seq) tensor, got "
            f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}"
        )
    real = attention_mask != 0
    batch, seq = real.shape
    dev = real.device
    if seq == 0:
        return torch.full((batch, first + last), -1, dtype=torch.int64, device=dev)
    # Indices of the real tokens in order, then the padding: a stable sort on "is padding".
    order = torch.sort((~real).to(torch.int8), dim=1, stable=True).indices
    n = real.sum(dim=1, keepdim=True)  # (batch, 1) real tokens a sequence
    j = torch.arange(first, device=dev)[None]
    first_pos = torch.where(j < n, order.gather(1, j.clamp(max=seq - 1).expand(batch, -1)), -1)
    t = torch.arange(last, device=dev)[None]
    rank = n - last + t  # the rank among real tokens of last slot t
    valid = rank >= torch.minimum(n, torch.tensor(first, device=dev))
    last_pos = torch.where(valid, order.gather(1, rank.clamp(0, seq - 1)), -1)
    return torch.cat([first_pos, last_pos], dim=1).to(torch.int64)
