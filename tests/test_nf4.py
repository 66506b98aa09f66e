"""NF4/FP4 and 8-bit blockwise ops: every backend against the reference, the CPU instruction-set
variants, the format's edge cases, opcheck, torch.compile, and bad input; the comparisons with
bitsandbytes are in test_nf4_bnb.py. Mirrors csrc/cpu/nf4.cpp, csrc/cuda/nf4.cu,
triton_kernels/nf4.py and _ops/quant.py."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ftkernels as ftk
from ftkernels import _native

from conftest import assert_same_bits, cuda_only
from nf4_cases import BLOCKSIZES, DTYPES, QUANT_TYPES, SHAPES, sample


def run(backend, fn, *args, **kwargs):
    with ftk.use_backend(backend):
        return fn(*args, **kwargs)


def quantize(backend, A, blocksize, compress, quant_type):
    # check_finite=False: the samples' NaN and inf are quantized as bitsandbytes quantizes them
    kw = dict(blocksize=blocksize, compress_statistics=compress, quant_type=quant_type, check_finite=False)
    return run(backend, ftk.quantize_4bit, A, **kw)


def reference_quantize(A, blocksize, compress, quant_type):
    return quantize("reference", A.cpu(), blocksize, compress, quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_4bit_matches_reference(backend_device, shape, dtype, blocksize, quant_type):
    backend, device = backend_device
    A = sample(shape, dtype, specials=True)
    packed, qs = quantize(backend, A.to(device), blocksize, False, quant_type)
    ref_packed, ref_qs = reference_quantize(A, blocksize, False, quant_type)
    assert_same_bits(packed, ref_packed, "packed")
    assert_same_bits(qs.absmax, ref_qs.absmax, "absmax")


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_4bit_matches_reference(backend_device, shape, dtype, blocksize, quant_type, compress):
    backend, device = backend_device
    A = sample(shape, dtype, seed=1, specials=True)
    packed, qs = reference_quantize(A, blocksize, compress, quant_type)
    expected = run("reference", ftk.dequantize_4bit, packed, qs)
    out = run(backend, ftk.dequantize_4bit, packed.to(device), qs.to(device))
    assert out.device.type == device
    assert_same_bits(out, expected, "dequantized")


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_4bit_into_out(backend_device, dtype, compress):
    backend, device = backend_device
    A = sample((33, 65), dtype, seed=11)
    packed, qs = reference_quantize(A, 64, compress, "nf4")
    out = torch.full(A.shape, 7.0, dtype=dtype, device=device)
    result = run(backend, ftk.dequantize_4bit, packed.to(device), qs.to(device), out=out)
    assert result is out
    assert_same_bits(out, run("reference", ftk.dequantize_4bit, packed, qs), "out")
    with pytest.raises(ValueError, match="out must be contiguous"):
        run(
            backend, ftk.dequantize_4bit, packed.to(device), qs, out=torch.empty(65, 33, dtype=dtype, device=device).t()
        )


# The CPU kernels come in baseline x86-64, AVX2 and AVX-512 variants picked at run time; the
# cap makes each one run here (a cap above what this CPU has runs its widest variant).
CPU_ISAS = [pytest.param(level, id=name) for level, name in ((0, "base"), (1, "avx2"), (2, "avx512"))]


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request):
    if not _native.cpu_available():
        pytest.skip("the CPU module is not built")
    previous = _native.cpu().set_isa_limit(request.param)
    yield request.param
    _native.cpu().set_isa_limit(previous)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_cpu_isa_variants_match_reference(cpu_isa, shape, dtype, blocksize, quant_type):
    A = sample(shape, dtype, seed=3, specials=True)
    packed, qs = reference_quantize(A, blocksize, True, quant_type)
    got = quantize("cpu", A, blocksize, True, quant_type)
    assert_same_bits(got[0], packed, "packed")
    assert_same_bits(run("cpu", ftk.dequantize_4bit, packed, qs), run("reference", ftk.dequantize_4bit, packed, qs))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_large_output_matches_reference(cpu_isa, dtype):
    # 8.4M elements over two threads, a partial last block, and an out= that starts 2 or 4
    # bytes past a 64-byte boundary (the vector stores are unaligned ones).
    A = sample((2049, 4099), dtype, seed=4)
    packed, qs = ftk.quantize_nf4(A, blocksize=64, compress_statistics=True)
    expected = run("reference", ftk.dequantize_4bit, packed, qs)
    assert_same_bits(run("cpu", ftk.dequantize_4bit, packed, qs), expected, "fresh")
    buf = torch.empty(A.numel() + 1, dtype=dtype)
    out = buf[1:].view(A.shape)
    run("cpu", ftk.dequantize_4bit, packed, qs, out=out)
    assert_same_bits(out, expected, "misaligned out")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 256, 4096])
@pytest.mark.parametrize("shape", SHAPES)
def test_blockwise_8bit_matches_reference(backend_device, shape, dtype, blocksize):
    backend, device = backend_device
    A = sample(shape, dtype, seed=2, specials=True)
    q, qs = run(backend, ftk.quantize_blockwise, A.to(device), blocksize=blocksize)
    ref_q, ref_qs = run("reference", ftk.quantize_blockwise, A, blocksize=blocksize)
    assert_same_bits(q, ref_q, "codes")
    assert_same_bits(qs.absmax, ref_qs.absmax, "absmax")
    out = run(backend, ftk.dequantize_blockwise, q, qs)
    assert_same_bits(out, run("reference", ftk.dequantize_blockwise, ref_q, ref_qs), "dequantized")


def _midpoint_cases(code: torch.Tensor) -> torch.Tensor:
    """Every code value, every midpoint (fp32, as the search computes it) and the floats on
    either side of each, in blocks of 256 that each hold 1.0, so x * (1 / absmax) is x."""
    mids = (code[1:] + code[:-1]) * 0.5
    vals = torch.cat([code, mids, torch.nextafter(mids, mids - 1), torch.nextafter(mids, mids + 1)]).clamp(-1, 1)
    vals = torch.cat([vals, torch.full((-vals.numel() % 255,), 0.5)]).view(-1, 255)
    return torch.cat([torch.ones(vals.shape[0], 1), vals], dim=1).flatten()


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_cpu_isa_blockwise_8bit_at_every_midpoint(cpu_isa, signed):
    # The vector code searches (csrc/cpu/code_search.h) count thresholds instead of searching
    # the code; at an exact midpoint the tie must go where quantize_8bit sends it.
    code = ftk.functional.create_dynamic_map(signed=signed)
    A = _midpoint_cases(code)
    A = torch.cat([A, torch.tensor([float("nan"), 0.0, -0.0, 1.0, 1e-30, -1e-30] + [0.25] * 7)])
    q, qs = run("cpu", ftk.quantize_blockwise, A, code=code, blocksize=256)
    ref_q, _ = run("reference", ftk.quantize_blockwise, A, code=code, blocksize=256)
    assert_same_bits(q, ref_q, "codes")


def test_cpu_blockwise_8bit_unsorted_code_takes_the_exact_search(cpu_isa):
    # A code the vector search's premises do not hold for (not increasing) is searched as
    # quantize_8bit searches it, at every level.
    code = ftk.functional.create_dynamic_map(signed=True)
    code = torch.cat([code[:100], code[100:110].flip(0), code[110:]])
    A = sample((5, 300), torch.float32, seed=9)
    q, _ = run("cpu", ftk.quantize_blockwise, A, code=code, blocksize=256)
    ref_q, _ = run("reference", ftk.quantize_blockwise, A, code=code, blocksize=256)
    assert_same_bits(q, ref_q, "codes")


def test_double_quantization_layout():
    A = sample((128, 256), torch.bfloat16)
    packed, qs = ftk.quantize_nf4(A, compress_statistics=True)  # QLoRA: blocksize 64, double quantization
    assert packed.shape == (128 * 256 // 2, 1) and packed.dtype == torch.uint8
    assert qs.nested and qs.absmax.dtype == torch.uint8 and qs.absmax.numel() == 128 * 256 // 64
    assert qs.nested_blocksize == 256 and qs.nested_absmax.numel() == math.ceil(512 / 256)
    assert qs.nested_code.numel() == 256 and qs.offset.dtype == torch.float32
    bits = (packed.numel() * 8 + qs.absmax.numel() * 8 + qs.nested_absmax.numel() * 32) / A.numel()
    assert bits == pytest.approx(4.127, abs=1e-3)  # 4 + 8/64 + 32/(64*256)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_error_within_torch_rounding(dtype):
    # Tolerance relative to torch: the kernel's error against fp64 code*absmax may be at most
    # twice that of torch rounding the same fp32 product to dtype, plus an epsilon.
    A = sample((257, 129), dtype, seed=3)
    packed, qs = ftk.quantize_nf4(A, blocksize=64)
    out = ftk.dequantize_4bit(packed, qs)
    b = packed.view(-1)
    q = torch.stack((b >> 4, b & 15), 1).view(-1)[: A.numel()].long()
    exact = ftk.get_4bit_type("nf4").double()[q] * qs.absmax.double().repeat_interleave(64)[: A.numel()]
    torch_err = (exact.float().to(dtype).double() - exact).abs().max()
    assert (out.double().view(-1) - exact).abs().max() <= 2 * torch_err + 1e-12


def test_quantization_error_is_bounded():
    # Every element lands on the nearest NF4 level: error <= half the widest gap (0.152) * absmax.
    A = sample((64, 1024), torch.float32, seed=4)
    packed, qs = ftk.quantize_nf4(A, blocksize=64)
    err = (ftk.dequantize_4bit(packed, qs) - A).abs().view(-1, 64)
    assert (err <= 0.1520 * qs.absmax.unsqueeze(1) + 1e-6).all()


def test_non_finite_input_is_defined():
    A = torch.randn(256)
    A[3] = float("nan")
    A[100] = float("inf")
    packed, qs = ftk.quantize_nf4(A, blocksize=64)
    assert qs.absmax[0].isnan() and qs.absmax[1].isinf() and qs.absmax[2:].isfinite().all()
    out = ftk.dequantize_4bit(packed, qs)
    assert not out[:128].isfinite().any() and out[128:].isfinite().all()
    # with double quantization the mean absmax is non-finite: every block is (when not refused)
    packed, qs = ftk.quantize_nf4(A, blocksize=64, compress_statistics=True, check_finite=False)
    assert not ftk.dequantize_4bit(packed, qs).isfinite().any()


def test_zero_block_follows_cuda_contract():
    # absmax 0 -> 1/0 = inf -> 0*inf = NaN -> index 0 (NF4) / 0 (FP4); dequantizes to zeros.
    A = torch.zeros(64)
    packed, qs = ftk.quantize_nf4(A, blocksize=64)
    assert packed.eq(0).all() and qs.absmax.eq(0).all()
    assert ftk.dequantize_4bit(packed, qs).eq(0).all()


def test_empty_tensor():
    for compress in (False, True):
        packed, qs = ftk.quantize_nf4(
            torch.empty(0, 5, dtype=torch.bfloat16), blocksize=64, compress_statistics=compress
        )
        assert packed.shape == (0, 1) and qs.shape == (0, 5)
        out = ftk.dequantize_4bit(packed, qs)
        assert out.shape == (0, 5) and out.dtype == torch.bfloat16


def test_non_contiguous_and_misaligned_inputs_give_the_contiguous_result():
    base = sample((130, 96), torch.bfloat16, seed=5)
    expected = ftk.quantize_nf4(base.t().contiguous(), blocksize=64)
    got = ftk.quantize_nf4(base.t(), blocksize=64)
    assert torch.equal(got[0], expected[0])
    storage = torch.empty(base.numel() + 1, dtype=torch.bfloat16)
    shifted = storage[1:].view(base.shape)  # data pointer 2 bytes past an allocation
    shifted.copy_(base)
    assert torch.equal(ftk.quantize_nf4(shifted, blocksize=64)[0], ftk.quantize_nf4(base, blocksize=64)[0])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 3000),
    blocksize=st.sampled_from(BLOCKSIZES),
    quant_type=st.sampled_from(QUANT_TYPES),
    scale=st.floats(1e-30, 1e30),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpu_matches_reference_property(n, blocksize, quant_type, scale, seed):
    A = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale).to(torch.float32)
    got = quantize("cpu", A, blocksize, True, quant_type)
    ref = reference_quantize(A, blocksize, True, quant_type)
    assert_same_bits(got[0], ref[0])
    assert_same_bits(got[1].absmax, ref[1].absmax)
    assert_same_bits(run("cpu", ftk.dequantize_4bit, *got), run("reference", ftk.dequantize_4bit, *ref))


# ---- the op contract: opcheck, torch.compile, bad input ---------------------------------


def _op_samples(device):
    A = sample((33, 70), torch.bfloat16, seed=8).to(device)
    packed, qs = ftk.quantize_nf4(A, blocksize=64, compress_statistics=True)
    q8, qs8 = ftk.quantize_blockwise(A.float(), blocksize=256)
    return [
        (torch.ops.ftk.quantize_4bit.default, (A, 64, "nf4")),
        (torch.ops.ftk.quantize_4bit.default, (A.float(), 32, "fp4")),
        (
            torch.ops.ftk.dequantize_4bit.default,
            (
                packed,
                qs.absmax,
                64,
                "nf4",
                list(A.shape),
                torch.bfloat16,
                qs.nested_absmax,
                qs.nested_code,
                qs.offset.reshape(1),
                256,
            ),
        ),
        (
            torch.ops.ftk.dequantize_4bit.out,
            (
                packed,
                qs.absmax,
                64,
                "nf4",
                list(A.shape),
                torch.bfloat16,
                qs.nested_absmax,
                qs.nested_code,
                qs.offset.reshape(1),
                256,
            ),
            {"out": torch.empty_like(A)},
        ),
        (torch.ops.ftk.quantize_blockwise.default, (A.float(), qs8.code, 256)),
        (torch.ops.ftk.dequantize_blockwise.default, (q8, qs8.absmax, qs8.code, 256, torch.float16)),
    ]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, cuda_only])])
def test_opcheck(device):
    for op, args, *kwargs in _op_samples(device):
        torch.library.opcheck(op, args, *kwargs)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, cuda_only])])
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def roundtrip(A):
        packed, absmax = torch.ops.ftk.quantize_4bit(A, 64, "nf4")
        return torch.ops.ftk.dequantize_4bit(packed, absmax, 64, "nf4", A.shape, A.dtype)

    A = sample((64, 96), torch.bfloat16, seed=9).to(device)
    packed, qs = ftk.quantize_nf4(A, blocksize=64)
    assert torch.equal(roundtrip(A), ftk.dequantize_4bit(packed, qs))


def _deq4(*args):
    """A call of the dequantize op on 4 packed bytes (8 values) with these other arguments."""
    return lambda: torch.ops.ftk.dequantize_4bit(torch.zeros(4, 1, dtype=torch.uint8), *args)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: ftk.quantize_4bit(torch.ones(8, dtype=torch.int32)), TypeError, "A must have dtype"),
        (lambda: ftk.quantize_4bit(torch.ones(8, dtype=torch.float64)), TypeError, "A must have dtype"),
        (lambda: ftk.quantize_4bit(torch.ones(8), blocksize=48), ValueError, "blocksize"),
        (lambda: ftk.quantize_4bit(torch.ones(8), blocksize=True), ValueError, "blocksize"),
        (lambda: ftk.quantize_4bit(torch.ones(8), quant_type="int4"), ValueError, "quant_type"),
        (lambda: ftk.quantize_4bit([1.0, 2.0]), TypeError, "A must be a torch.Tensor"),
        (lambda: ftk.quantize_4bit(torch.ones(8), quant_storage=torch.complex64), ValueError, "quant_storage"),
        (lambda: ftk.quantize_4bit(torch.ones(6), quant_storage=torch.float32), ValueError, "quant_storage"),
        (lambda: ftk.quantize_4bit(torch.ones(8), 64), TypeError, "absmax must be a torch.Tensor"),
        (
            lambda: torch.ops.ftk.dequantize_4bit(
                torch.zeros(3, 1, dtype=torch.uint8), torch.ones(1), 64, "nf4", [8], torch.float32
            ),
            ValueError,
            "A has 3 elements",
        ),
        (
            _deq4(torch.ones(2), 64, "nf4", [8], torch.float32),
            ValueError,
            "absmax has 2 elements",
        ),
        (
            _deq4(torch.ones(1, device="meta"), 64, "nf4", [8], torch.float32),
            ValueError,
            "absmax is on meta",
        ),
        (
            _deq4(torch.ones(1), 64, "nf4", [8], torch.int8),
            TypeError,
            "dtype must be",
        ),
        (
            _deq4(torch.ones(1), 64, "nf4", [-8], torch.float32),
            ValueError,
            "negative",
        ),
        (
            _deq4(
                torch.zeros(1, dtype=torch.uint8),
                64,
                "nf4",
                [8],
                torch.float32,
                torch.ones(1),
            ),
            ValueError,
            "come together",
        ),
        (
            _deq4(
                torch.zeros(1, dtype=torch.uint8),
                64,
                "nf4",
                [8],
                torch.float32,
                torch.ones(1),
                torch.ones(256),
                torch.ones(1),
                48,
            ),
            ValueError,
            "nested_blocksize",
        ),
        (
            _deq4(
                torch.zeros(1, dtype=torch.uint8),
                64,
                "nf4",
                [8],
                torch.float32,
                torch.ones(1),
                torch.ones(16),
                torch.ones(1),
                256,
            ),
            ValueError,
            "nested_code has 16",
        ),
        (lambda: torch.ops.ftk.quantize_blockwise(torch.ones(8), torch.ones(255), 256), ValueError, "code has 255"),
        (
            lambda: torch.ops.ftk.dequantize_blockwise(
                torch.zeros(8, dtype=torch.uint8), torch.ones(2), torch.ones(256), 256, torch.float32
            ),
            ValueError,
            "absmax has 2",
        ),
        (lambda: ftk.dequantize_4bit(torch.zeros(4, dtype=torch.uint8)), ValueError, "needs quant_state"),
        (lambda: ftk.dequantize_4bit(torch.zeros(4, dtype=torch.uint8), quant_state="nf4"), TypeError, "QuantState"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_quant_state_that_does_not_fit_the_data():
    packed, qs = ftk.quantize_nf4(torch.randn(64, 64), blocksize=64, compress_statistics=True)
    with pytest.raises(ValueError, match="A has"):
        ftk.dequantize_4bit(packed[:-1], qs)
    qs.state2.absmax = qs.state2.absmax[:0]
    with pytest.raises(ValueError, match="nested_absmax has 0"):
        ftk.dequantize_4bit(packed, qs)


@pytest.mark.parametrize("module", ["_ftk_cpu", "_ftk_cuda"])
def test_native_module_checks_its_arguments_again(module):
    # Python checks first; the C++ launchers check again and raise ValueError, never crash.
    # The CUDA module is built wherever nvcc is (CI has no GPU and no driver): with cudart
    # linked statically it must import there too, and refuse bad params before any CUDA call.
    mod = _native._load(module)
    if mod is None:
        pytest.skip(f"{module} is not built")
    last = 1  # num_threads (CPU) or a stream handle (CUDA; never used: every call here is refused)

    def quantize(**kw):
        return mod.Quantize4bitParams(
            **{**dict(A=0, n=8, dtype=0, blocksize=64, quant_type=0, packed=0, absmax=0), **kw}
        )

    def dequantize(dtype=0, out=0, **kw):
        w = mod.Weight4bit(
            **{
                **dict(
                    packed=0,
                    rows=1,
                    cols=8,
                    blocksize=64,
                    quant_type=0,
                    absmax=0,
                    absmax_q=0,
                    nested_absmax=0,
                    nested_code=0,
                    offset=0,
                    nested_blocksize=256,
                ),
                **kw,
            }
        )
        return mod.Dequantize4bitParams(w=w, dtype=dtype, out=out)

    with pytest.raises(ValueError, match="blocksize"):
        mod.quantize_4bit(quantize(blocksize=48), last)
    with pytest.raises(ValueError, match="must not be null"):
        mod.quantize_4bit(quantize(), last)
    with pytest.raises(ValueError, match="dtype"):
        mod.dequantize_4bit(dequantize(dtype=7), last)
    with pytest.raises(ValueError, match="quant_type"):
        mod.quantize_4bit(quantize(quant_type=5), last)
    with pytest.raises(ValueError, match="double-quantization"):
        mod.dequantize_4bit(dequantize(packed=1, out=1), last)
    with pytest.raises(ValueError, match="unknown dtype code"):
        mod.quantize_blockwise(
            mod.QuantizeBlockwiseParams(A=0, n=64, dtype=7, code=0, blocksize=256, out=0, absmax=0), last
        )
    if module == "_ftk_cuda":
        assert mod.device_count() >= 0


@pytest.mark.triton
def test_triton_launcher_takes_the_quant_type_codes_of_formats():
    pytest.importorskip("triton")
    from ftkernels import _formats
    from ftkernels.triton_kernels import nf4

    A = torch.randn(64)
    packed, absmax = _formats.quantize_4bit_outputs(A, 64)
    with pytest.raises(ValueError, match="quant_type must be one of"):
        nf4.quantize_4bit(A, packed, absmax, 64, max(_formats.QUANT_TYPE_CODE.values()) + 1)
