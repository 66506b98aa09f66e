"""Fused LoReFT (ftkernels.nn.LoReFT, d=4096, rank 4) against the published algorithm written
eagerly the way the reference library (pyreft on pyvene) runs it: R through torch's
Householder parametrisation (orthogonal(), with its d x d base) recomputed at every access of
the weight, the selected rows gathered, edited with separate matmuls, and scattered back into
a clone of the hidden states. Same run, same inputs; ``copy`` is the memory-bandwidth ceiling
(one read and one write of h).

Targets:
  CPU: 224 edited rows (16 sequences x "f7+l7") of d = 4096, forward+backward at least 20x
      faster than the eager reference (speedup_vs_eager >= 20).
  GPU: 8x512x4096 bf16 hidden states, every position edited: the forward at 80% or more of
      the copy bandwidth (fraction_of_copy_bandwidth >= 0.8), and forward+backward at least
      10x faster than the eager reference.

Forward+backward: out = layer(h, positions); out.backward(g), with h and the intervention's
parameters requiring grad (as when interventions sit in several layers).
Run: pytest benchmarks/bench_loreft.py --benchmark-json=benchmarks/results/loreft-cpu.json
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ftkernels as ftk
from ftkernels.nn import LoReFT, reft_positions

from conftest import QUICK, Timer, device_marks

D, RANK = 4096, 4
if QUICK:  # ftk bench --quick: narrow hidden states; batch x seq (and so the test ids) stay
    D = 256

# (device, dtype, batch, seq, positions spec or None for all, what)
CASES = [
    pytest.param(
        ("cpu", torch.float32, 16, 128, "f7+l7", "train"), id="cpu-fp32-16x128-f7+l7-train", marks=device_marks("cpu")
    ),
] + [
    pytest.param(
        ("cuda", torch.bfloat16, 8, 512, None, what), id=f"cuda-bf16-8x512-all-{what}", marks=device_marks("cuda")
    )
    for what in ("forward", "train")
]
IMPLS = ["ftk-cpu", "ftk-cuda", "ftk-triton", "eager", "copy"]
OURS = {"cpu": ["ftk-cpu"], "cuda": ["ftk-cuda", "ftk-triton"]}


class _RotateLayer(nn.Module):
    """pyreft's LowRankRotateLayer: x @ weight, weight (d x rank) orthogonally initialised."""

    def __init__(self, d, rank):
        super().__init__()
        self.weight = nn.Parameter(nn.init.orthogonal_(torch.empty(d, rank)))

    def forward(self, x):
        return torch.matmul(x.to(self.weight.dtype), self.weight)


class EagerLoReFT(nn.Module):
    """pyreft's LoreftIntervention: the weight is parametrised by torch's orthogonal()
    (Householder, with a d x d base for the trivialisation) and rebuilt at every access."""

    def __init__(self, d, rank):
        super().__init__()
        self.rotate_layer = nn.utils.parametrizations.orthogonal(_RotateLayer(d, rank))
        self.learned_source = nn.Linear(d, rank)

    def forward(self, base):
        rotated_base = self.rotate_layer(base)
        output = base + torch.matmul(self.learned_source(base) - rotated_base, self.rotate_layer.weight.T)
        return output.to(base.dtype)


def _eager_step(layer, h, positions):
    """pyvene's path: gather the positions' rows, edit them, scatter into a clone of h."""
    if positions is None:
        return layer(h)
    idx = positions.clamp(min=0)[..., None].expand(-1, -1, h.shape[-1])
    edited = layer(torch.gather(h, 1, idx))
    keep = (positions >= 0)[..., None]
    return h.clone().scatter(1, idx, torch.where(keep, edited, torch.gather(h, 1, idx)))


def _inputs(device, dtype, batch, seq, spec):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(batch, seq, D, generator=gen).to(device, dtype)
    g = torch.randn(batch, seq, D, generator=gen).to(device, dtype)
    if spec is None:
        return h, g, None
    lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=gen)
    mask = (torch.arange(seq)[None] >= seq - lengths[:, None]).long()  # left padding, as for generation
    return h, g, reft_positions(mask, spec).to(device)


def _fn(impl, device, h, g, positions, what):
    if impl == "copy":
        out = torch.empty_like(h)
        return lambda: out.copy_(h)
    torch.manual_seed(1)
    if impl == "eager":
        layer = EagerLoReFT(D, RANK).to(device)
        layer.learned_source.to(h.dtype)  # as pyreft: W, b in the hidden states' dtype, R in fp32

        def run(hh):
            return _eager_step(layer, hh, positions)
    else:
        layer = LoReFT(D, RANK).to(device)
        backend = impl.removeprefix("ftk-")

        def run(hh):
            with ftk.use_backend(backend):
                return layer(hh, positions)

    if what == "forward":

        def forward():
            with torch.no_grad():
                return run(h)

        return forward
    hh = h.detach().requires_grad_()

    def train():
        layer.zero_grad(set_to_none=True)
        hh.grad = None
        out = run(hh)
        out.backward(g)
        return out

    return train


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_loreft(benchmark, case, impl):
    device, dtype, batch, seq, spec, what = case
    if impl.startswith("ftk-") and impl not in OURS[device]:
        pytest.skip("not a backend of this device")
    if impl.startswith("ftk-") and not ftk._registry.backend_available(impl.removeprefix("ftk-"), device):
        pytest.skip(f"backend {impl} unavailable on {device}")
    name = f"{device}-{str(dtype).removeprefix('torch.').replace('bfloat16', 'bf16').replace('float32', 'fp32')}"
    name += f"-{batch}x{seq}-{spec or 'all'}-{what}"
    benchmark.group = f"loreft-{name}"
    h, g, positions = _inputs(device, dtype, batch, seq, spec)
    rows = positions.ge(0).sum().item() if positions is not None else batch * seq
    benchmark.extra_info["edited_rows"] = rows
    if impl.startswith("ftk-"):
        benchmark.extra_info["compare"] = {"eager": f"test_loreft[{name}-eager]"}
        benchmark.extra_info["ceiling"] = f"test_loreft[{name}-copy]"
    # Bytes the fused kernels must move: forward reads and writes each edited row once (and the
    # unedited ones once each through the copy); backward reads g and h and writes dh.
    row_bytes = D * h.element_size()
    total = h.numel() * h.element_size()
    bytes_moved = 2 * total if what == "forward" else 2 * total + 3 * rows * row_bytes + (total - rows * row_bytes) * 2
    if impl == "copy":
        bytes_moved = 2 * total
    fn = _fn(impl, device, h, g, positions, what)
    slow = impl == "eager" and device == "cpu"
    Timer(benchmark, device)(fn, bytes_moved=bytes_moved, rounds=5 if slow else (20 if device == "cpu" else 50))
