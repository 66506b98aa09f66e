"""ftk::loreft, ftk::direft and their backward: every backend against an fp64 oracle of the
formula (values and gradients, by DESIGN.md's rule: at most 2x torch's own error in the same
dtype), positions, dropout, opcheck, gradcheck, torch.compile, bad input; then the modules
(nn.LoReFT's orthonormality through training and save/load/resume) and the position helpers.
Mirrors csrc/cpu/reft.cpp, csrc/cuda/reft.cu, triton_kernels/reft.py and nn/loreft.py."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from torch import nn
from conftest import BACKEND_DEVICES, assert_within_torch_error, raise_bad_call

import ftkernels as ftk
from ftkernels import _native
from ftkernels.backends import reference
from ftkernels.nn import DiReFT, LoReFT, parse_positions, reft_positions
from ftkernels.nn.loreft import OrthonormalRows

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
            rows = torch.tensor([i * seq + int(q) for i in range(pos.shape[0]) for q in pos[i] if q >= 0],
                                dtype=torch.int64)
        rows = rows.to(h.device)
        x = h2[rows]
        if self.kind == "loreft":
            edit = (x @ B.T + b - x @ A.T) @ A  # Rᵀ(W·h + b − R·h), A = R, B = W
        else:
            edit = (x @ A.T + b) @ B  # W2ᵀ(W1·h + b), A = W1, B = W2
        if p > 0:
            s = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(seed)))
            keep = reference.dropout_keep(rows, d, p, s, h.device)
            edit = torch.where(keep, edit * reference.dropout_scale(p), torch.zeros((), dtype=dtype,
                                                                                      device=h.device))
        out = h2.index_add(0, rows, edit).reshape(h.shape)
        out.backward(self.grad.to(dtype))
        return (out, h.grad, A.grad, B.grad, b.grad)


def assert_close_to_oracle(case, outs, p=0.0, seed=7, what="", factor=2.0):
    """Each of outs within factor x torch's own error (same dtype, against fp64) + epsilon."""
    oracle = case.torch_run(torch.float64, p, seed)
    torch_own = case.torch_run(case.dtype, p, seed)
    for name, got, ref, own, like in zip(("out", "dh", "dA", "dB", "db"), outs, oracle, torch_own,
                                         (case.h, case.h, case.A, case.B, case.b)):
        if got is None:
            continue
        assert got.dtype == like.dtype, (what, name, got.dtype)
        assert_within_torch_error(got, ref, own, factor, f"{what} {name}")


def _skip_slow_triton(backend_device, i):
    if backend_device == ("triton", "cpu") and i not in SMALL:
        pytest.skip("the interpreted Triton kernels run the small shapes only")


# ---- values and gradients, every backend --------------------------------------------------


@pytest.mark.parametrize("kind", ["loreft", "direft"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("i", range(len(SHAPES)), ids=[_shape_id(s) for s in SHAPES])
def test_matches_fp64_oracle(backend_device, i, dtype, kind):
    _skip_slow_triton(backend_device, i)
    backend, device = backend_device
    case = Case(SHAPES[i], dtype, kind, device=device)
    assert_close_to_oracle(case, case.run(backend=backend), what=f"{backend} {kind}")


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_matches_the_oracle_with_the_same_mask(backend_device, p):
    backend, device = backend_device
    for kind in ("loreft", "direft"):
        case = Case(SHAPES[2], torch.float32, kind, device=device)
        assert_close_to_oracle(case, case.run(p=p, seed=5, backend=backend), p=p, seed=5, what=f"{backend} {kind}")


def test_fp32_factors_on_a_bf16_h(backend_device):
    backend, device = backend_device
    case = Case(SHAPES[2], torch.bfloat16, device=device, param_dtype=torch.float32)
    assert_close_to_oracle(case, case.run(backend=backend), what=backend)


@pytest.mark.parametrize("need", [(True, False, False, False), (False, True, True, True), (False, False, False, True)],
                         ids=["h", "params", "b"])
def test_only_the_gradients_asked_for(backend_device, need):
    backend, device = backend_device
    case = Case(SHAPES[1], torch.float32, device=device)
    outs = case.run(backend=backend, need=need)
    assert [g is not None for g in outs[1:]] == list(need)
    assert_close_to_oracle(case, outs, what=backend)


def test_rows_outside_positions_are_unchanged_bit_for_bit(backend_device):
    backend, device = backend_device
    case = Case(SHAPES[2], torch.bfloat16, device=device)
    out, dh, *_ = case.run(p=0.3, backend=backend)
    edited = torch.zeros(case.h.shape[:2], dtype=torch.bool)
    for i, row in enumerate(case.positions.cpu().tolist()):
        for q in row:
            if q >= 0:
                edited[i, q] = True
    assert torch.equal(out[~edited], case.h[~edited]), "an unselected row of h changed"
    assert torch.equal(dh[~edited], case.grad[~edited]), "an unselected row's gradient is not grad itself"
    assert not torch.equal(out[edited], case.h[edited])


def test_no_slots_and_empty_h(backend_device):
    backend, device = backend_device
    for spec in [(2, 4, 16, 2, [[-1, -1], [-1, -1]]), (2, 0, 16, 2, None), (0, 3, 16, 2, None)]:
        case = Case(spec, torch.float32, device=device)
        out, dh, dA, dB, db = case.run(backend=backend)
        assert torch.equal(out, case.h) and torch.equal(dh, case.grad)
        assert not dA.any() and not dB.any() and not db.any()


def test_backends_agree_with_the_reference_backend(backend_device):
    backend, device = backend_device
    case = Case(SHAPES[2], torch.float32, device=device)
    for got, ref in zip(case.run(p=0.2, backend=backend), case.run(p=0.2, backend="reference")):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_dropout_edits_only_the_edit_and_follows_the_seed():
    case = Case((4, 64, 96, 4, None), torch.float32)
    plain = case.run()[0] - case.h
    out = case.run(p=0.5, seed=3)[0] - case.h
    again = case.run(p=0.5, seed=3)[0] - case.h
    other = case.run(p=0.5, seed=4)[0] - case.h
    assert torch.equal(out, again) and not torch.equal(out, other)
    kept = out != 0
    torch.testing.assert_close(out[kept], 2.0 * plain[kept])  # kept edits scaled by 1/(1-p)
    assert abs(kept.float().mean().item() - 0.5) < 0.02
    with torch.no_grad():  # eval: no dropout at all
        ev = ftk.loreft(case.h, case.A, case.B, case.b, dropout_p=0.5, training=False)
    torch.testing.assert_close(ev - case.h, plain)


def test_native_kernels_are_the_reference_mask_bit_for_bit(backend_device):
    backend, device = backend_device
    if backend == "reference":
        pytest.skip("the reference is the mask")
    case = Case((2, 8, 70, 3, None), torch.float32, device=device)
    case.B.zero_()  # W = 0: edit = -RᵀR·h, and a dropped element is exactly h
    dropped = case.run(p=0.5, seed=9, backend=backend)[0] == case.h
    s = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(9)))
    keep = reference.dropout_keep(16, 70, 0.5, s, device).reshape(2, 8, 70)
    assert torch.equal(dropped, ~keep)


# ---- op-level checks ------------------------------------------------------------------------


def _op_args(case, p):
    return (case.h, case.A, case.B, case.b, case.positions, p, torch.tensor([99]) if p > 0 else None)


@pytest.mark.parametrize("backend_device", [*BACKEND_DEVICES, pytest.param(("reference", "cpu"), id="reference-cpu")])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck(backend_device, p):
    backend, device = backend_device
    case = Case(SHAPES[2], torch.float32, device=device)
    h, A, B, b = (t.clone().requires_grad_() for t in (case.h, case.A, case.B, case.b))
    with ftk.use_backend(backend):
        for op in (torch.ops.ftk.loreft.default, torch.ops.ftk.direft.default):
            torch.library.opcheck(op, (h, A, B, b, case.positions, p, torch.tensor([99]) if p > 0 else None))
        out, z = torch.ops.ftk.loreft(*_op_args(case, p))
        P, Q = case.A, case.B - case.A
        for need in ((True, True), (False, True), (True, False)):
            torch.library.opcheck(torch.ops.ftk.reft_backward.default,
                                  (case.grad, case.h, P, Q, z, case.positions, p,
                                   torch.tensor([99]) if p > 0 else None, *need))


@pytest.mark.parametrize("kind", ["loreft", "direft"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_fp64_on_the_reference(kind, p):
    case = Case(SHAPES[1], torch.float64, kind)
    leaves = [t.clone().requires_grad_() for t in (case.h, case.A, case.B, case.b)]

    def edit(h, A, B, b):
        return case.fn(h, A, B, b, case.positions, dropout_p=p, generator=torch.Generator().manual_seed(11))

    with ftk.use_backend("reference"):
        assert torch.autograd.gradcheck(edit, leaves)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_torch_compile_fullgraph_forward_and_backward(p):
    torch._dynamo.reset()
    case = Case(SHAPES[2], torch.float32)

    def step(h, A, B, b):
        out = ftk.loreft(h, A, B, b, case.positions, dropout_p=p)
        return (out * out).sum()

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (case.h, case.A, case.B, case.b)]
        torch.manual_seed(3)
        loss = fn(*leaves)
        loss.backward()
        return loss, *(t.grad for t in leaves)

    for c, e in zip(grads(torch.compile(step, fullgraph=True)), grads(step)):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4)


def test_torch_compile_fullgraph_module_training_step():
    torch._dynamo.reset()
    torch.manual_seed(0)
    mod = LoReFT(96, 4)
    h = torch.randn(3, 9, 96)
    pos = torch.tensor([[0, 8], [1, -1], [4, 5]])

    def loss_of(m):
        m.zero_grad()
        loss = m(h, pos).square().mean()
        loss.backward()
        return loss, [p.grad.clone() for p in m.parameters()]

    eager = loss_of(mod)
    compiled = torch.compile(mod, fullgraph=True)
    got = loss_of(compiled)
    torch.testing.assert_close(got[0], eager[0])
    for g, e in zip(got[1], eager[1]):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


# ---- bad input ----------------------------------------------------------------------------


def _bad_calls():
    case = Case(SHAPES[2], torch.float32)
    h, R, W, b = case.h, case.A, case.B, case.b
    pos = case.positions
    f = ftk.loreft
    z = torch.zeros(6, 8)
    return [
        (lambda: f(h, R, W, b, torch.tensor([[9, 0], [1, 2], [0, 1]])), ValueError, r"positions must be in \[-1, 9\)"),
        (lambda: f(h, R, W, b, torch.tensor([[-2, 0], [1, 2], [0, 1]])), ValueError, r"positions must be in"),
        (lambda: f(h, R, W, b, torch.tensor([[3, 3], [1, 2], [0, 1]])), ValueError, "repeats a position"),
        (lambda: f(h, R, W, b, pos[:2]), ValueError, r"positions must be \(batch=3, k\)"),
        (lambda: f(h, R, W, b, pos.float()), TypeError, "positions must have dtype"),
        (lambda: f(h[0], R, W, b, pos), ValueError, "positions must be 1-D"),
        (lambda: f(h, R, W, b, pos.to("meta")), ValueError, "positions is on meta"),
        (lambda: f(h[..., :5], R[:, :5], W[:, :5], b), ValueError, r"rank must be in 1..min\(d=5"),
        (lambda: f(torch.zeros(2, 200), torch.zeros(65, 200), torch.zeros(65, 200), torch.zeros(65)), ValueError,
         r"rank must be in 1..min\(d=200, 64\)"),
        (lambda: f(h, R, W[:4], b), ValueError, "W has rank 4 but"),
        (lambda: f(h, R, W[:, :95], b), ValueError, r"W must be \(rank, d=96\)"),
        (lambda: f(h, R, W, b[:3]), ValueError, r"b must have shape \[8\]"),
        (lambda: f(h[None], R, W, b), ValueError, r"h must be \(batch, seq, d\) or \(rows, d\)"),
        (lambda: f(h.int(), R, W, b), TypeError, "h must have dtype"),
        (lambda: f(h, R.int(), W, b), TypeError, "R must have dtype"),
        (lambda: f(h, R.to("meta"), W, b), ValueError, "R is on meta"),
        (lambda: f(h.double(), R.double(), W.double(), b.double()), TypeError, "float64 runs on the reference"),
        (lambda: f(h, R, W, b, dropout_p=1.0), ValueError, "dropout_p must be in"),
        (lambda: f([1.0], R, W, b), TypeError, "h must be a torch.Tensor"),
        (lambda: ftk.direft(h, R, W, "b"), TypeError, "b must be a torch.Tensor"),
        (lambda: torch.ops.ftk.loreft(h, R, W, b, None, 0.5, None), ValueError, "seed is required"),
        (lambda: torch.ops.ftk.reft_backward(h[:2], h, R, W - R, z, None, 0.0, None, True, True), ValueError,
         "grad must match h"),
        (lambda: torch.ops.ftk.reft_backward(h, h, R, W - R, z, None, 0.0, None, True, True), ValueError,
         r"z must be \(slots=27, rank=8\)"),
        (lambda: LoReFT(16, 17), ValueError, "rank must be at most"),
        (lambda: LoReFT(16, 0), ValueError, "rank must be a positive int"),
        (lambda: LoReFT(16, 4, dropout=1.5), ValueError, "dropout must be in"),
        (lambda: LoReFT(96, 8)(h[..., :95]), ValueError, r"rotation must be|R must be \(rank, d=95\)"),
        (lambda: reft_positions(torch.ones(2, 5), "f7-l7"), ValueError, "positions must look like"),
        (lambda: reft_positions(torch.ones(5), "f7+l7"), ValueError, r"attention_mask must be a \(batch, seq\)"),
    ]


_N_BAD = 29


@pytest.mark.parametrize("i", range(_N_BAD))
def test_bad_input_raises_naming_the_argument(i):
    raise_bad_call(_bad_calls(), i, _N_BAD)


def test_native_reft_functions_check_their_arguments_again():
    mod = _native._load("_ftk_cpu")

    def forward_params(mod, **kw):
        off = mod.Dropout(enabled=False, seed=0, threshold=0, scale=1.0)
        return mod.ReftForwardParams(**{**dict(h=1, dtype=0, n_rows=4, d=128, r=2, rows=0, n_slots=4, P=1, Q=1, b=1,
                                               dropout=off, out=1, z=1), **kw})

    # r = 0, r > 64, an unknown dtype code: ValueError from the C++ checks, never a crash.
    for r, dtype in ((0, 0), (65, 0), (2, 7)):
        with pytest.raises(ValueError, match="r must be|dtype"):
            mod.reft_forward(forward_params(mod, r=r, dtype=dtype), 1)
    with pytest.raises(ValueError, match="come together"):
        off = mod.Dropout(enabled=False, seed=0, threshold=0, scale=1.0)
        mod.reft_backward(mod.ReftBackwardParams(grad=1, h=1, dtype=0, n_rows=4, d=8, r=2, rows=0, n_slots=4, P=1, Q=1,
                                                 z=1, dropout=off, dh=0, dP=1, dQ=0, db=0, workspace=0,
                                                 workspace_floats=0), 1)
    cuda = _native._load("_ftk_cuda")
    if cuda is not None and hasattr(cuda, "reft_forward"):
        with pytest.raises(ValueError, match="r must be"):
            cuda.reft_forward(forward_params(cuda, r=0), 0)


# ---- the modules ----------------------------------------------------------------------------


def _orthonormality_error(R: torch.Tensor) -> float:
    R = R.detach().double()
    return (R @ R.T - torch.eye(R.shape[0], dtype=torch.float64)).abs().max().item()


def test_orthonormal_rows_parametrisation():
    torch.manual_seed(0)
    V = torch.randn(5, 40)
    R = OrthonormalRows()(V)
    assert _orthonormality_error(R) < 1e-6
    # R spans V's row space, and an orthonormal V maps to itself (right_inverse is the identity).
    torch.testing.assert_close(R.T @ (R @ V.T), V.T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(OrthonormalRows()(R), R, rtol=0, atol=1e-6)


def test_loreft_module_is_the_op_and_keeps_no_d_by_d_state():
    torch.manual_seed(0)
    d, r = 4096, 4
    mod = LoReFT(d, r)
    assert sum(t.numel() for t in [*mod.parameters(), *mod.buffers()]) == 2 * r * d + r
    assert _orthonormality_error(mod.rotation) < 1e-6
    h = torch.randn(2, 3, d)
    want = ftk.loreft(h, mod.rotation, mod.learned_source.weight, mod.learned_source.bias)
    torch.testing.assert_close(mod(h), want)


def test_rotation_is_recomputed_once_a_training_step(monkeypatch):
    calls = []
    forward = OrthonormalRows.forward
    monkeypatch.setattr(OrthonormalRows, "forward", lambda self, V: calls.append(1) or forward(self, V))
    mod = LoReFT(32, 4)
    opt = torch.optim.SGD(mod.parameters(), lr=0.1)
    calls.clear()
    for _ in range(3):
        opt.zero_grad()
        mod(torch.randn(2, 5, 32)).square().sum().backward()
        opt.step()
    assert len(calls) == 3


def _train(mod, opt, steps, seed):
    """Steps of learning to add a fixed rank-3 shift at the edited positions: (first, last) loss."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.randn(3, 48, generator=torch.Generator().manual_seed(0)).sum(0)
    pos = reft_positions(torch.tensor([[1] * 12, [0] * 4 + [1] * 8, [1] * 3 + [0] * 9, [1] * 12]), "f3+l3")
    edited = torch.zeros(4, 12, dtype=torch.bool)
    for i, row in enumerate(pos.tolist()):
        edited[i, [q for q in row if q >= 0]] = True
    mod.train()
    losses = []
    for _ in range(steps):
        h = torch.randn(4, 12, 48, generator=g)
        loss = (mod(h, pos) - h - shift)[edited].square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_stays_orthonormal_through_training_and_save_load_resume():
    torch.manual_seed(0)
    mod = LoReFT(48, 6, dropout=0.1)
    opt = torch.optim.AdamW(mod.parameters(), lr=0.05)
    first, last = _train(mod, opt, 150, seed=1)
    assert _orthonormality_error(mod.rotation) < 1e-5
    assert last < 0.2 * first  # it learns

    buf = io.BytesIO()
    torch.save({"model": mod.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, buf)
    _train(mod, opt, 20, seed=2)  # uninterrupted

    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = LoReFT(48, 6, dropout=0.1)
    resumed.load_state_dict(state["model"])
    assert _orthonormality_error(resumed.rotation) < 1e-5
    ropt = torch.optim.AdamW(resumed.parameters(), lr=0.05)
    ropt.load_state_dict(state["opt"])
    torch.set_rng_state(state["rng"])
    _train(resumed, ropt, 20, seed=2)
    for (name, a), b in zip(mod.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resuming"
    assert _orthonormality_error(resumed.rotation) < 1e-5


def test_loading_a_non_orthonormal_state_still_gives_an_orthonormal_rotation():
    mod = LoReFT(32, 3)
    state = mod.state_dict()
    state["parametrizations.rotation.original"] = torch.randn(3, 32) * 5
    mod.load_state_dict(state)
    assert _orthonormality_error(mod.rotation) < 1e-6


def test_pyreft_state_dict_both_ways():
    # pyreft's LoreftIntervention, written out: R^T as an orthogonal()-parametrised (d x rank)
    # weight, W and b in learned_source; its state_dict is {weight, bias, rotate_layer}.
    torch.manual_seed(0)
    d, r = 40, 3
    rotate = nn.Module()
    rotate.weight = nn.Parameter(nn.init.orthogonal_(torch.empty(d, r)))
    rotate = nn.utils.parametrizations.orthogonal(rotate)
    source = nn.Linear(d, r)
    with torch.no_grad():
        # as after training (the Householder vectors live below the diagonal of `original`)
        rotate.parametrizations.weight.original.add_(0.1 * torch.randn(d, r).tril(-1))
    R_t = rotate.weight.detach()
    state = {"weight": source.weight.detach(), "bias": source.bias.detach(), "rotate_layer": R_t}
    mod = LoReFT.from_pyreft_state_dict(state)
    h = torch.randn(2, 5, d)
    want = h + ((h @ source.weight.detach().T + source.bias.detach()) - h @ R_t) @ R_t.T
    torch.testing.assert_close(mod(h), want, rtol=1e-5, atol=1e-5)
    back = mod.pyreft_state_dict()
    assert back.keys() == state.keys()
    for k in state:
        torch.testing.assert_close(back[k], state[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="keys 'weight', 'bias', 'rotate_layer'"):
        LoReFT.from_pyreft_state_dict({"weight": state["weight"]})
    with pytest.raises(ValueError, match="weight must be"):
        LoReFT.from_pyreft_state_dict({**state, "weight": state["weight"][:, :5]})


def test_direft_module_is_the_op():
    torch.manual_seed(0)
    mod = DiReFT(64, 4, dropout=0.2).eval()
    h = torch.randn(2, 7, 64)
    pos = torch.tensor([[0, 6], [3, -1]])
    want = ftk.direft(h, mod.learned_source.weight, mod.proj, mod.learned_source.bias, pos)
    torch.testing.assert_close(mod(h, pos), want)
    mod.train()
    mod(h, pos).sum().backward()
    assert all(p.grad is not None for p in mod.parameters())


# ---- positions ------------------------------------------------------------------------------


def test_parse_positions():
    assert parse_positions("f7+l7") == (7, 7)
    assert parse_positions("f5") == (5, 0)
    assert parse_positions("l3") == (0, 3)
    for bad in ("", "7", "f7l7", "x1", "f-1", None):
        with pytest.raises(ValueError, match="positions must look like"):
            parse_positions(bad)


def _expected_positions(mask_row, first, last):
    real = [i for i, m in enumerate(mask_row) if m]
    head = real[:first]
    tail = [q for q in real[max(len(real) - last, 0):] if q not in head]
    return head + [-1] * (first - len(head)) + [-1] * (last - len(tail)) + tail


@pytest.mark.parametrize("padding", ["right", "left"])
def test_positions_with_padding_and_short_prompts(padding):
    lengths = [10, 6, 3, 1, 0]
    seq = 10
    rows = []
    for n in lengths:
        ones, zeros = [1] * n, [0] * (seq - n)
        rows.append(ones + zeros if padding == "right" else zeros + ones)
    mask = torch.tensor(rows)
    for spec, (f, l) in (("f2+l2", (2, 2)), ("f7+l7", (7, 7)), ("f3", (3, 0)), ("l4", (0, 4))):
        got = reft_positions(mask, spec)
        assert got.dtype == torch.int64 and got.shape == (len(lengths), f + l)
        for i, row in enumerate(rows):
            assert got[i].tolist() == _expected_positions(row, f, l), (padding, spec, i)
        # every real token at most once, never a padding token
        for i, row in enumerate(rows):
            picked = [q for q in got[i].tolist() if q >= 0]
            assert len(set(picked)) == len(picked) and all(row[q] for q in picked)


def test_positions_feed_the_op_with_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos = reft_positions(mask, "f1+l1")
    assert pos.tolist() == [[2, 4], [0, 4]]
    case = Case((2, 5, 16, 2, pos.tolist()), torch.float32)
    assert_close_to_oracle(case, case.run())
