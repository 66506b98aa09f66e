"""The fp64 oracle of the ReFT ops (loreft, direft) and its cases, shared by the op's tests
(test_loreft.py) and the modules' (test_loreft_modules.py): every backend's values and
gradients are held to at most 2x torch's own error in the same dtype (docs/ARCHITECTURE.md,
"Tests")."""

from __future__ import annotations

import contextlib

import torch

import ftkernels as ftk
from ftkernels import _formats
from ftkernels.backends import reference

from conftest import assert_within_torch_error

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_ID = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# (batch, seq, d, rank, positions): odd d, rank 1, 17 and the maximum 64, a 2-D h, k > seq/2.
SHAPES = [
    (1, 1, 7, 1, None),
    (2, 5, 7, 3, [[0, 3, -1], [4, -1, 1]]),
    (3, 9, 96, 8, [[8, 0], [-1, -1], [2, 5]]),
    (2, 6, 130, 64, None),
    (None, 11, 65, 5, [10, 0, 3]),  # h (rows, d), positions are row indices
    (1, 3, 4097, 4, [[2, 0]]),
    (2, 3, 40, 17, [[2, 0], [1, -1]]),  # rank >= 16: the Triton kernels' tl.dot path
]
SMALL = [0, 1, 2, 4, 6]  # indices into SHAPES for the interpreted Triton kernels


def _shape_id(s):
    b, n, d, r, pos = s
    return f"{'' if b is None else f'{b}x'}{n}x{d}-r{r}{'-pos' if pos is not None else ''}"


class Case:
    """One call's inputs: h, the factors (R orthonormal for LoReFT), positions, the gradient."""

    def __init__(self, spec, dtype, kind="loreft", seed=0, device="cpu", param_dtype=None):
        b, n, d, r, pos = spec
        g = torch.Generator().manual_seed(seed)
        self.kind, self.dtype = kind, dtype
        shape = (n, d) if b is None else (b, n, d)
        pd = param_dtype or dtype
        self.h = torch.randn(shape, generator=g).to(device, dtype)
        self.A = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0].T.to(device, pd)
        self.B = (torch.randn(r, d, generator=g) / d**0.5).to(device, pd)
        self.b = torch.randn(r, generator=g).to(device, pd)
        self.positions = None if pos is None else torch.tensor(pos, dtype=torch.int64, device=device)
        self.grad = torch.randn(shape, generator=g).to(device, dtype)

    @property
    def fn(self):
        return ftk.loreft if self.kind == "loreft" else ftk.direft

    def run(self, p=0.0, seed=7, backend=None, need=(True, True, True, True)):
        """(out, dh, dA, dB, db) from the public function under ``backend``."""
        leaves = [t.detach().clone().requires_grad_(w) for t, w in zip((self.h, self.A, self.B, self.b), need)]
        with ftk.use_backend(backend) if backend else contextlib.nullcontext():
            out = self.fn(*leaves, self.positions, dropout_p=p, generator=torch.Generator().manual_seed(seed))
            if any(need):
                out.backward(self.grad)
        return (out, *(t.grad for t in leaves))

    def torch_run(self, dtype, p=0.0, seed=7):
        """The edit in plain torch autograd in ``dtype``, row by row with gather and scatter, the
        same dropout mask: fp64 is the oracle, the input dtype gives torch's own error."""
        h, A, B, b = (t.detach().to(dtype).requires_grad_() for t in (self.h, self.A, self.B, self.b))
        d = h.shape[-1]
        h2 = h.reshape(-1, d)
        if self.positions is None:
            rows = torch.arange(h2.shape[0])
        else:
            pos = self.positions.cpu().reshape(1 if self.h.dim() == 2 else self.h.shape[0], -1)
            seq = self.h.shape[-2]
            rows = torch.tensor(
                [i * seq + int(q) for i in range(pos.shape[0]) for q in pos[i] if q >= 0], dtype=torch.int64
            )
        rows = rows.to(h.device)
        x = h2[rows]
        if self.kind == "loreft":
            edit = (x @ B.T + b - x @ A.T) @ A  # Rᵀ(W·h + b − R·h), A = R, B = W
        else:
            edit = (x @ A.T + b) @ B  # W2ᵀ(W1·h + b), A = W1, B = W2
        if p > 0:
            s = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(seed)))
            keep = reference.dropout_keep(rows, d, p, s, h.device)
            edit = torch.where(keep, edit * _formats.dropout_scale(p), torch.zeros((), dtype=dtype, device=h.device))
        out = h2.index_add(0, rows, edit).reshape(h.shape)
        out.backward(self.grad.to(dtype))
        return (out, h.grad, A.grad, B.grad, b.grad)


def assert_close_to_oracle(case, outs, p=0.0, seed=7, what="", factor=2.0):
    """Each of outs within factor x torch's own error (same dtype, against fp64) + epsilon."""
    oracle = case.torch_run(torch.float64, p, seed)
    torch_own = case.torch_run(case.dtype, p, seed)
    for name, got, ref, own, like in zip(
        ("out", "dh", "dA", "dB", "db"), outs, oracle, torch_own, (case.h, case.h, case.A, case.B, case.b)
    ):
        if got is None:
            continue
        assert got.dtype == like.dtype, (what, name, got.dtype)
        assert_within_torch_error(got, ref, own, factor, f"{what} {name}")
