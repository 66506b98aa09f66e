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
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._formats import REFT_MAX_RANK
from ..functional import direft, loreft

__all__ = ["DiReFT", "LoReFT", "OrthonormalRows", "parse_positions", "reft_positions"]


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


class LoReFT(nn.Module):
    """A LoReFT intervention: ``h + Rᵀ(W·h + b − R·h)`` at the given positions, in one fused op.

    ``rotation`` is R (rank x embed_dim, orthonormal rows, see the module docstring);
    ``learned_source`` is the Linear(embed_dim, rank) holding W and b, as in pyreft. Dropout
    applies to the edit only, in training. ``forward(h, positions=None)`` takes h (batch, seq,
    d) or (rows, d) and positions as :func:`ftkernels.loreft` does.
    """

    def __init__(self, embed_dim: int, rank: int, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        _check_dims(embed_dim, rank)
        self.embed_dim, self.rank, self.dropout = embed_dim, rank, _check_dropout(dropout)
        kw = {"device": device, "dtype": dtype}
        self.rotation = nn.Parameter(nn.init.orthogonal_(torch.empty(rank, embed_dim, **kw)))
        parametrize.register_parametrization(self, "rotation", OrthonormalRows(), unsafe=False)
        self.learned_source = nn.Linear(embed_dim, rank, **kw)

    def forward(self, h: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return loreft(
            h,
            self.rotation,
            self.learned_source.weight,
            self.learned_source.bias,
            positions,
            dropout_p=self.dropout,
            training=self.training,
        )

    # pyreft's LoreftIntervention saves {"weight", "bias"} (learned_source) and "rotate_layer",
    # R as (embed_dim x rank) columns, computed from its parametrisation.
    @classmethod
    def from_pyreft_state_dict(cls, state_dict: dict, dropout: float = 0.0) -> LoReFT:
        """A LoReFT with the weights of a pyreft LoreftIntervention's state_dict. R is made
        orthonormal again on the way in (QR, as always), should the saved one have drifted."""
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
        mod = cls(embed_dim, rank, dropout, device=rot.device)
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

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, rank={self.rank}, dropout={self.dropout}"


class DiReFT(nn.Module):
    """A DiReFT intervention: ``h + W2ᵀ(W1·h + b)``, no orthogonality (the ReFT paper's
    ablation, faster to train). ``learned_source`` is Linear(embed_dim, rank) (W1, b) and
    ``proj`` is W2 (rank x embed_dim, orthogonal init as in pyreft)."""

    def __init__(self, embed_dim: int, rank: int, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        _check_dims(embed_dim, rank)
        self.embed_dim, self.rank, self.dropout = embed_dim, rank, _check_dropout(dropout)
        kw = {"device": device, "dtype": dtype}
        self.learned_source = nn.Linear(embed_dim, rank, **kw)
        self.proj = nn.Parameter(nn.init.orthogonal_(torch.empty(rank, embed_dim, **kw)))

    def forward(self, h: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return direft(
            h,
            self.learned_source.weight,
            self.proj,
            self.learned_source.bias,
            positions,
            dropout_p=self.dropout,
            training=self.training,
        )

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, rank={self.rank}, dropout={self.dropout}"


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
