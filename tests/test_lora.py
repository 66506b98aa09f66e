"""ftk::lora_linear_4bit and its backward: every backend against an fp64 oracle of the formula
(values and gradients, by the tolerance rule of docs/ARCHITECTURE.md: at most 2x torch's own
error in the same dtype), dropout, opcheck, gradcheck, torch.compile, bad input. Mirrors
csrc/cpu/lora.cpp, csrc/cuda/lora*.cu, triton_kernels/lora.py and backends/_lora.py."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

import ftkernels as ftk
from ftkernels import _formats, _native
from ftkernels.backends import reference

from conftest import assert_within_torch_error, cuda_only, raise_bad_call

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_ID = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# (M rows of x, N out, K in): odd sizes, blocks spanning rows, a byte spanning rows (odd K).
SHAPES = [(1, 70, 96), (3, 33, 7), (17, 64, 65), (40, 96, 130)]
SMALL = [(1, 33, 7), (9, 40, 65)]  # for the interpreted Triton kernels


class Case:
    """Inputs of one layer call, with the W the kernels see (dequantized to fp32)."""

    def __init__(
        self, shape, dtype, r=5, blocksize=64, nested=True, quant_type="nf4", bias=True, seed=0, lead=None, device="cpu"
    ):
        m, n, k = shape
        g = torch.Generator().manual_seed(seed)
        self.packed, self.qs = ftk.quantize_4bit(
            torch.randn(n, k, generator=g).to(device),
            blocksize=blocksize,
            compress_statistics=nested,
            quant_type=quant_type,
        )
        self.W = ftk.dequantize_4bit(self.packed, self.qs).double()
        xshape = (*(lead or ()), m, k)
        self.x = torch.randn(xshape, generator=g).to(device, dtype)
        self.A = (torch.randn(r, k, generator=g) / k**0.5).to(device, dtype)
        self.B = (torch.randn(n, r, generator=g) * 0.5).to(device, dtype)
        self.bias = torch.randn(n, generator=g).to(device, dtype) if bias else None
        self.dy = torch.randn((*(lead or ()), m, n), generator=g).to(device, dtype)
        self.scaling = 1.75

    def run(self, p=0.0, seed=7, backend=None, need=(True, True, True, True)):
        """(y, dx, dA, dB, dbias) from the public function under ``backend``."""
        leaves = [
            t.detach().clone().requires_grad_(want) if t is not None else None
            for t, want in zip((self.x, self.A, self.B, self.bias), need)
        ]
        x, A, B, bias = leaves
        with ftk.use_backend(backend) if backend else contextlib.nullcontext():
            y = ftk.lora_linear_4bit(
                x,
                self.packed,
                self.qs,
                A,
                B,
                self.scaling,
                bias,
                dropout_p=p,
                generator=torch.Generator().manual_seed(seed),
            )
            if any(t is not None and t.requires_grad for t in leaves):
                y.backward(self.dy)
        return (y, *(t.grad if t is not None else None for t in leaves))

    def torch_run(self, dtype, p=0.0, seed=7):
        """The same layer written in plain torch autograd in ``dtype`` with the same mask:
        fp64 is the oracle, the input dtype gives torch's own error."""
        dev = self.x.device
        x, A, B = (t.detach().to(dtype).requires_grad_() for t in (self.x, self.A, self.B))
        bias = self.bias.detach().to(dtype).requires_grad_() if self.bias is not None else None
        x2 = x.reshape(-1, x.shape[-1])
        xd = x2
        if p > 0:
            s = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(seed)))
            keep = reference.dropout_keep(x2.shape[0], x2.shape[1], p, s, dev)
            xd = torch.where(keep, x2 * _formats.dropout_scale(p), torch.zeros((), dtype=dtype, device=dev))
        y = x2 @ self.W.to(dtype).T + self.scaling * ((xd @ A.T) @ B.T)
        if bias is not None:
            y = y + bias
        y = y.reshape(*x.shape[:-1], self.W.shape[0])
        y.backward(self.dy.to(dtype))
        return (y, x.grad, A.grad, B.grad, bias.grad if bias is not None else None)


def assert_close_to_oracle(case, outs, p=0.0, seed=7, what="", factor=2.0):
    """Each of outs within factor x torch's own error (same dtype, against fp64) + epsilon."""
    dtype = case.x.dtype
    oracle = case.torch_run(torch.float64, p, seed)
    torch_own = case.torch_run(dtype, p, seed)
    names = ("y", "dx", "dA", "dB", "dbias")
    for name, got, ref, own in zip(names, outs, oracle, torch_own):
        if got is None:
            continue
        assert got.dtype == {"y": dtype, "dx": dtype}.get(name, got.dtype)
        assert_within_torch_error(got, ref, own, factor, f"{what} {name}")


# ---- values and gradients, every backend --------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp64_oracle(backend_device, shape, dtype):
    backend, device = backend_device
    if backend == "triton" and device == "cpu" and shape not in SMALL:
        shape = SMALL[SHAPES.index(shape) % len(SMALL)]
    for nested, p, bias in ((True, 0.0, True), (False, 0.25, False)):
        case = Case(shape, dtype, nested=nested, bias=bias, device=device)
        assert_close_to_oracle(case, case.run(p, backend=backend), p, what=f"{backend} nested={nested} p={p}")


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=DT_ID.get)
@pytest.mark.parametrize("shape", [(17, 64, 65), (40, 200, 130)], ids=lambda s: "x".join(map(str, s)))
def test_cpu_16bit_gemms_on_and_off_match_fp64_oracle(cpu_gemm16, shape, dtype, monkeypatch):
    # On: W's tiles in the input's dtype (rounded as torch's own layer rounds W) into torch's
    # 16-bit GEMM, column tiles for dY·W; off: everything widened to fp32. Tiles of 16 KB so that
    # both products run over several tiles, the last one partial.
    from ftkernels.backends import cpu as cpu_backend

    if not _native.cpu_available():
        pytest.skip("the CPU module is not built")
    monkeypatch.setattr(cpu_backend, "_TILE_BYTES", 16 << 10)
    for nested, p, bias in ((True, 0.0, True), (False, 0.25, False)):
        case = Case(shape, dtype, nested=nested, bias=bias)
        assert_close_to_oracle(case, case.run(p, backend="cpu"), p, what=f"gemm16={cpu_gemm16} p={p}")


@pytest.mark.parametrize("r", [1, 16, 256])
@pytest.mark.parametrize("quant_type, blocksize", [("nf4", 32), ("fp4", 128), ("nf4", 4096)])
def test_ranks_blocksizes_and_fp4(backend_device, r, quant_type, blocksize):
    backend, device = backend_device
    shape = (3, 33, 7) if backend == "triton" and device == "cpu" else (6, 50, 90)
    case = Case(shape, torch.float32, r=r, blocksize=blocksize, quant_type=quant_type, device=device)
    assert_close_to_oracle(case, case.run(backend=backend), what=f"{backend} r={r}")


def test_any_leading_shape_and_empty_batches(backend_device):
    backend, device = backend_device
    for lead, m in (((2, 3), 4), ((), 5), ((2,), 0)):
        case = Case((m, 33, 7), torch.float32, lead=lead, device=device)
        outs = case.run(0.1, backend=backend)
        assert outs[0].shape == (*lead, m, 33)
        assert_close_to_oracle(case, outs, 0.1, what=f"lead={lead} m={m}")
    case = Case((1, 33, 7), torch.float32, device=device)
    x1 = case.x.reshape(7)  # a single 1-D input
    y = ftk.lora_linear_4bit(x1, case.packed, case.qs, case.A, case.B, 1.0)
    assert y.shape == (33,)


def test_mixed_dtypes_fp32_adapters_on_a_bf16_input(backend_device):
    backend, device = backend_device
    case = Case((5, 33, 7), torch.bfloat16, device=device)
    case.A, case.B = case.A.float(), case.B.float()
    outs = case.run(backend=backend)
    assert outs[0].dtype == torch.bfloat16 and outs[2].dtype == torch.float32 and outs[3].dtype == torch.float32
    ref = Case((5, 33, 7), torch.bfloat16, device=device).run(backend="reference")
    assert (outs[0].float() - ref[0].float()).abs().max() <= 0.05 * ref[0].float().abs().max()


@pytest.mark.parametrize(
    "need",
    [(False, True, True, False), (True, False, False, False), (False, True, False, True)],
    ids=["lora-only", "x-only", "A-and-bias"],
)
def test_only_the_gradients_asked_for(backend_device, need):
    backend, device = backend_device
    case = Case((4, 33, 7), torch.float32, device=device)
    outs = case.run(0.2, backend=backend, need=need)
    for got, wanted in zip(outs[1:], need):
        assert (got is not None) == wanted
    assert_close_to_oracle(case, outs, 0.2)


def test_backends_agree_with_the_reference_backend(backend_device):
    backend, device = backend_device
    case = Case((9, 40, 65), torch.float32, device=device)
    got, want = case.run(0.3, backend=backend), case.run(0.3, backend="reference")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# ---- dropout ------------------------------------------------------------------------------


def test_dropout_is_a_function_of_the_seed(backend_device):
    backend, device = backend_device
    case = Case((9, 33, 65), torch.float32, device=device)
    a, b, c = (
        case.run(0.5, seed=1, backend=backend),
        case.run(0.5, seed=1, backend=backend),
        case.run(0.5, seed=2, backend=backend),
    )
    for u, v in zip(a, b):
        assert torch.equal(u, v)  # same seed, same values and gradients, bit for bit
    assert not torch.equal(a[0], c[0])
    no_dropout = case.run(0.0, backend=backend)
    assert not torch.equal(a[0], no_dropout[0])
    with ftk.use_backend(backend):  # eval mode: no dropout whatever p is
        y = ftk.lora_linear_4bit(
            case.x, case.packed, case.qs, case.A, case.B, case.scaling, case.bias, dropout_p=0.5, training=False
        )
    assert torch.equal(y, no_dropout[0])


def test_dropout_seed_comes_from_torchs_generator():
    case = Case((4, 33, 7), torch.float32)
    torch.manual_seed(5)
    a = ftk.lora_linear_4bit(case.x, case.packed, case.qs, case.A, case.B, 1.0, dropout_p=0.3)
    torch.manual_seed(5)
    b = ftk.lora_linear_4bit(case.x, case.packed, case.qs, case.A, case.B, 1.0, dropout_p=0.3)
    c = ftk.lora_linear_4bit(case.x, case.packed, case.qs, case.A, case.B, 1.0, dropout_p=0.3)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dropout_mask_statistics():
    keep = reference.dropout_keep(512, 1024, 0.1, 123, "cpu").float()
    assert abs(keep.mean().item() - 0.9) < 0.002  # 524288 draws: sd 0.0004
    assert abs(keep[:, ::2].mean().item() - keep[:, 1::2].mean().item()) < 0.005  # no column pattern
    assert abs(keep[::2].mean().item() - keep[1::2].mean().item()) < 0.005  # no row pattern
    other = reference.dropout_keep(512, 1024, 0.1, 124, "cpu").float()
    agree = (keep == other).float().mean().item()
    assert abs(agree - (0.9**2 + 0.1**2)) < 0.005  # two seeds: independent masks
    assert _formats.dropout_threshold(0.0) == 0 and reference.dropout_keep(3, 3, 0.0, 1, "cpu").all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_native_dropout_kernel_is_the_reference_mask_bit_for_bit(backend_device, dtype):
    backend, device = backend_device
    kernels = {
        "cpu": "ftkernels.backends.cpu",
        "cuda": "ftkernels.backends.cuda",
        "triton": "ftkernels.backends.triton",
    }
    import importlib

    mod = importlib.import_module(kernels[backend])
    dropout = getattr(mod, "_lora_dropout", None)
    if dropout is None:
        pytest.skip(f"{backend} has no dropout kernel")
    t = torch.randn(37, 131).to(device, dtype)
    for p, seed in ((0.3, 2**40 + 17), (0.9, 3), (0.5, -5), (0.0, None)):
        got = dropout(t, p, seed)
        want = reference.lora_dropout(t.float(), p, seed)
        assert got.dtype == torch.float32
        assert torch.equal(got, want), (p, seed)


# ---- the op contract ----------------------------------------------------------------------


def _op_args(case, p=0.0):
    qs = case.qs
    nested = (
        (qs.state2.absmax, qs.state2.code, qs.offset.reshape(1), qs.state2.blocksize)
        if qs.nested
        else (None, None, None, 256)
    )
    seed = torch.tensor([99]) if p > 0 else None
    return (case.packed, qs.absmax, qs.blocksize, qs.quant_type, list(qs.shape), *nested), seed


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck(backend, p):
    case = Case((5, 33, 70), torch.float32)
    w, seed = _op_args(case, p)
    x, A, B = (t.clone().requires_grad_() for t in (case.x, case.A, case.B))
    with ftk.use_backend(backend):
        torch.library.opcheck(
            torch.ops.ftk.lora_linear_4bit.default, (x, *w, A, B, 1.5, case.bias.clone().requires_grad_(), p, seed)
        )
        torch.library.opcheck(
            torch.ops.ftk.lora_linear_4bit_backward.default,
            (case.dy, case.x, *w, case.A, case.B, 1.5, p, seed, True, True),
        )
        torch.library.opcheck(
            torch.ops.ftk.lora_linear_4bit_backward.default,
            (case.dy, case.x, *w, case.A, case.B, 1.5, p, seed, False, True),
        )


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_fp64_on_the_reference(p):
    case = Case((3, 9, 70), torch.float64, r=3)
    x, A, B, bias = (t.clone().requires_grad_() for t in (case.x, case.A, case.B, case.bias))
    seed = 11

    def layer(x, A, B, bias):
        return ftk.lora_linear_4bit(
            x, case.packed, case.qs, A, B, 0.75, bias, dropout_p=p, generator=torch.Generator().manual_seed(seed)
        )

    with ftk.use_backend("reference"):
        assert torch.autograd.gradcheck(layer, (x, A, B, bias))


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_torch_compile_fullgraph_forward_and_backward(p):
    torch._dynamo.reset()
    case = Case((6, 33, 70), torch.float32)

    def step(x, A, B):
        y = ftk.lora_linear_4bit(x, case.packed, case.qs, A, B, 2.0, case.bias, dropout_p=p)
        return (y * y).sum()

    def grads(fn):
        x, A, B = (t.clone().requires_grad_() for t in (case.x, case.A, case.B))
        torch.manual_seed(3)
        loss = fn(x, A, B)
        loss.backward()
        return loss, x.grad, A.grad, B.grad

    compiled, eager = grads(torch.compile(step, fullgraph=True)), grads(step)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4)


# ---- bad input ----------------------------------------------------------------------------


def _bad_calls():
    case = Case((4, 33, 70), torch.float32)
    x, A, B, pk, qs = case.x, case.A, case.B, case.packed, case.qs
    f = ftk.lora_linear_4bit
    return [
        (lambda: f(x[:, :69], pk, qs, A, B, 1.0), ValueError, "x has shape .* last dimension must be 70"),
        (lambda: f(x, pk, qs, A[:, :69], B, 1.0), ValueError, "lora_A must be"),
        (lambda: f(x, pk, qs, A, B[:, :4], 1.0), ValueError, "lora_B must be"),
        (lambda: f(x, pk, qs, A, B[:32], 1.0), ValueError, "lora_B must be"),
        (lambda: f(x, pk, qs, torch.zeros(257, 70), torch.zeros(33, 257), 1.0), ValueError, "1 <= r <= 256"),
        (lambda: f(x, pk, qs, A, B, 1.0, bias=torch.zeros(32)), ValueError, "bias must have shape"),
        (lambda: f(x.int(), pk, qs, A, B, 1.0), TypeError, "x must have dtype"),
        (lambda: f(x, pk, qs, A.to(torch.uint8), B, 1.0), TypeError, "lora_A must have dtype"),
        (lambda: f(x.double(), pk, qs, A.double(), B.double(), 1.0), TypeError, "float64 runs on the reference"),
        (lambda: f(x, pk, qs, A.to("meta"), B, 1.0), ValueError, "lora_A is on meta"),
        (lambda: f(x, pk, qs, A, B, 1.0, bias=torch.zeros(33, device="meta")), ValueError, "bias is on meta"),
        (lambda: f(x, pk[:-1], qs, A, B, 1.0), ValueError, "A has"),
        (lambda: f(x, pk, "nf4", A, B, 1.0), TypeError, "quant_state must be a QuantState"),
        (lambda: f(x, pk, qs, A, B, float("nan")), ValueError, "scaling must be a finite number"),
        (lambda: f(x, pk, qs, A, B, 1.0, dropout_p=1.0), ValueError, "dropout_p must be in"),
        (lambda: f(x, pk, qs, A, B, 1.0, dropout_p=-0.1), ValueError, "dropout_p must be in"),
        (lambda: f([1.0], pk, qs, A, B, 1.0), TypeError, "x must be a torch.Tensor"),
        (
            lambda: torch.ops.ftk.lora_linear_4bit(x, *_op_args(case)[0], A, B, 1.0, None, 0.5, None),
            ValueError,
            "seed is required",
        ),
        (
            lambda: torch.ops.ftk.lora_linear_4bit(x, *_op_args(case)[0], A, B, 1.0, None, 0.5, torch.tensor([1.5])),
            TypeError,
            "seed must have dtype",
        ),
        (
            lambda: torch.ops.ftk.lora_linear_4bit(
                x, pk, qs.absmax, 64, "nf4", [33 * 70], None, None, None, 256, A, B, 1.0, None, 0.0, None
            ),
            ValueError,
            "must be 2-D",
        ),
        (
            lambda: torch.ops.ftk.lora_linear_4bit_backward(
                case.dy[:3], x, *_op_args(case)[0], A, B, 1.0, 0.0, None, True, True
            ),
            ValueError,
            "leading dimensions must match",
        ),
    ]


@pytest.mark.parametrize("i", range(21))
def test_bad_input_raises_naming_the_argument(i):
    raise_bad_call(_bad_calls(), i, 21)


def test_native_lora_functions_check_their_arguments_again():
    mod = _native._load("_ftk_cpu")

    def dropout_params(mod, **kw):
        off = mod.Dropout(enabled=False, seed=0, threshold=0, scale=1.0)
        return mod.LoraDropoutParams(**{**{"in": 1, "dtype": 0, "rows": 2, "cols": 2, "dropout": off, "out": 1}, **kw})

    def weight(mod, **kw):
        return mod.Weight4bit(
            **{
                **dict(
                    packed=1,
                    rows=1,
                    cols=8,
                    blocksize=64,
                    quant_type=0,
                    absmax=1,
                    absmax_q=0,
                    nested_absmax=0,
                    nested_code=0,
                    offset=0,
                    nested_blocksize=256,
                ),
                **kw,
            }
        )

    with pytest.raises(ValueError, match="dtype"):
        mod.lora_dropout(dropout_params(mod, dtype=7), 1)
    with pytest.raises(ValueError, match="must not be null"):
        mod.lora_dropout(dropout_params(mod, **{"in": 0, "out": 0}), 1)
    with pytest.raises(ValueError, match="range"):
        mod.dequantize_4bit_range(mod.Dequantize4bitParams(w=weight(mod), dtype=0, out=1), 4, 9, 1)
    cuda = _native._load("_ftk_cuda")
    if cuda is not None and hasattr(cuda, "lora_matmul"):
        off = cuda.Dropout(enabled=False, seed=0, threshold=0, scale=1.0)
        with pytest.raises(ValueError, match="r must be"):
            cuda.lora_matmul(
                cuda.LoraMatmulParams(
                    mode=0,
                    X=1,
                    dtype=0,
                    M=4,
                    W=weight(cuda, rows=4, cols=4),
                    bias=0,
                    bias_dtype=0,
                    L=1,
                    R=1,
                    R_dtype=0,
                    r=0,
                    scaling=1.0,
                    dropout=off,
                    out=1,
                ),
                0,
            )


@cuda_only
@pytest.mark.cuda
def test_cuda_decode_and_tiled_paths_agree():
    # 1..16 rows take the decode path, more rows the tiled one: both against the oracle.
    for m, dtype in itertools.product((1, 2, 16, 17, 300), (torch.bfloat16, torch.float16, torch.float32)):
        case = Case((m, 1000, 515), dtype, r=16, device="cuda")
        assert_close_to_oracle(case, case.run(0.1, backend="cuda"), 0.1, what=f"m={m}")
