"""ftk::loreft, ftk::direft and their backward: every backend against an fp64 oracle of the
formula (reft_oracle.py; values and gradients, by the tolerance rule of docs/ARCHITECTURE.md:
at most 2x torch's own error in the same dtype), positions, dropout, opcheck, gradcheck,
torch.compile, bad input. The modules are in test_loreft_modules.py. Mirrors
csrc/cpu/reft.cpp, csrc/cuda/reft.cu, triton_kernels/reft.py and _ops/reft.py."""

from __future__ import annotations

import pytest
import torch

import ftkernels as ftk
from ftkernels import _native
from ftkernels.backends import reference
from ftkernels.nn import LoReFT, reft_positions

from conftest import BACKEND_DEVICES, raise_bad_call
from reft_oracle import (
    DT_ID,
    DTYPES,
    SHAPES,
    SMALL,
    Case,
    _shape_id,
    assert_close_to_oracle,
)


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


@pytest.mark.parametrize(
    "need",
    [(True, False, False, False), (False, True, True, True), (False, False, False, True)],
    ids=["h", "params", "b"],
)
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
            torch.library.opcheck(
                torch.ops.ftk.reft_backward.default,
                (case.grad, case.h, P, Q, z, case.positions, p, torch.tensor([99]) if p > 0 else None, *need),
            )


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
        (
            lambda: f(torch.zeros(2, 200), torch.zeros(65, 200), torch.zeros(65, 200), torch.zeros(65)),
            ValueError,
            r"rank must be in 1..min\(d=200, 64\)",
        ),
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
        (
            lambda: torch.ops.ftk.reft_backward(h[:2], h, R, W - R, z, None, 0.0, None, True, True),
            ValueError,
            "grad must match h",
        ),
        (
            lambda: torch.ops.ftk.reft_backward(h, h, R, W - R, z, None, 0.0, None, True, True),
            ValueError,
            r"z must be \(slots=27, rank=8\)",
        ),
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
        return mod.ReftForwardParams(
            **{
                **dict(h=1, dtype=0, n_rows=4, d=128, r=2, rows=0, n_slots=4, P=1, Q=1, b=1, dropout=off, out=1, z=1),
                **kw,
            }
        )

    # r = 0, r > 64, an unknown dtype code: ValueError from the C++ checks, never a crash.
    for r, dtype in ((0, 0), (65, 0), (2, 7)):
        with pytest.raises(ValueError, match="r must be|dtype"):
            mod.reft_forward(forward_params(mod, r=r, dtype=dtype), 1)
    with pytest.raises(ValueError, match="come together"):
        off = mod.Dropout(enabled=False, seed=0, threshold=0, scale=1.0)
        mod.reft_backward(
            mod.ReftBackwardParams(
                grad=1,
                h=1,
                dtype=0,
                n_rows=4,
                d=8,
                r=2,
                rows=0,
                n_slots=4,
                P=1,
                Q=1,
                z=1,
                dropout=off,
                dh=0,
                dP=1,
                dQ=0,
                db=0,
                workspace=0,
                workspace_floats=0,
            ),
            1,
        )
    cuda = _native._load("_ftk_cuda")
    if cuda is not None and hasattr(cuda, "reft_forward"):
        with pytest.raises(ValueError, match="r must be"):
            cuda.reft_forward(forward_params(cuda, r=0), 0)
