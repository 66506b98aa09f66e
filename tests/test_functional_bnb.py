"""ftkernels.functional against bitsandbytes.functional: the same signatures (names, order,
defaults), a subset of bitsandbytes' own functional tests (their error bounds) run on ours, the
same positional calls giving the same bytes and values in both, ``out=`` / ``absmax=`` buffers,
``quant_storage`` views, and the non-finite check of double quantization."""

from __future__ import annotations

import inspect

import pytest
import torch

import ftkernels as ftk
from ftkernels import functional as F
from ftkernels.quant_state import QuantState

bnb_functional = pytest.importorskip("bitsandbytes.functional")

FUNCTIONS = [
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_nf4",
    "quantize_fp4",
    "dequantize_nf4",
    "dequantize_fp4",
    "quantize_blockwise",
    "dequantize_blockwise",
    "create_dynamic_map",
    "get_4bit_type",
]
# Ours only, keyword-only after bitsandbytes' parameters: the opt-out of the non-finite check.
EXTRA = {"quantize_4bit": ["check_finite"], "quantize_nf4": ["check_finite"], "quantize_fp4": ["check_finite"]}
DTYPES = [pytest.param(d, id=str(d).replace("torch.", "")) for d in (torch.float32, torch.float16, torch.bfloat16)]


def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    b = packed.view(torch.uint8).reshape(-1)
    return torch.stack((b >> 4, b & 15), 1).reshape(-1)


# ---- signatures --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FUNCTIONS)
def test_signature_is_bitsandbytes(name):
    ours, theirs = _params(getattr(F, name)), _params(getattr(bnb_functional, name))
    assert ours[: len(theirs)] == theirs
    extra = ours[len(theirs) :]
    assert [p[0] for p in extra] == EXTRA.get(name, [])
    assert all(kind == inspect.Parameter.KEYWORD_ONLY for _, kind, _ in extra)
    assert getattr(ftk, name) is getattr(F, name)  # the top-level names are these functions


def test_quant_state_has_bitsandbytes_members():
    B = bnb_functional.QuantState
    for name in ("as_dict", "from_dict", "to", "__getitem__", "__eq__"):
        assert name in vars(QuantState), name
    for name in ("as_dict", "from_dict", "to", "__getitem__"):
        assert [p[0] for p in _params(getattr(QuantState, name))] == [p[0] for p in _params(getattr(B, name))], name
    assert tuple(QuantState.valid_quant_types) == tuple(B.valid_quant_types)
    assert list(QuantState.valid_qs_type_keys) == list(B.valid_qs_type_keys)
    assert set(QuantState.valid_qs_keys) == set(B.valid_qs_keys)
    _, qs = ftk.quantize_nf4(_randn(8, 64), compress_statistics=True)
    _, bqs = bnb_functional.quantize_nf4(_randn(8, 64), compress_statistics=True)
    for attr in ("absmax", "shape", "code", "blocksize", "quant_type", "dtype", "offset", "state2", "nested"):
        assert hasattr(qs, attr) and hasattr(bqs, attr), attr


# ---- bitsandbytes' own tests (tests/test_functional.py), ported at small sizes ----------------
# Their 4-bit bounds: mean + 7 std of the mean error over 200 samples of 1024 x 1024 randn.
ERR_4BIT = {
    "fp4": {
        32: ((0.088925, 0.000091), (0.242443, 0.000330)),
        64: ((0.096543, 0.000111), (0.260125, 0.000379)),
        128: ((0.102969, 0.000134), (0.275817, 0.000433)),
        256: ((0.108684, 0.000182), (0.289831, 0.000497)),
        512: ((0.114115, 0.000234), (0.302881, 0.000583)),
        1024: ((0.119333, 0.000320), (0.315000, 0.000757)),
        2048: ((0.124556, 0.000455), (0.326607, 0.000955)),
        4096: ((0.129536, 0.000612), (0.337169, 0.001239)),
    },
    "nf4": {
        32: ((0.067746, 0.000069), (0.189726, 0.000304)),
        64: ((0.072798, 0.000074), (0.203339, 0.000340)),
        128: ((0.076831, 0.000091), (0.215237, 0.000391)),
        256: ((0.080337, 0.000102), (0.226105, 0.000398)),
        512: ((0.083547, 0.000143), (0.236079, 0.000544)),
        1024: ((0.086610, 0.000187), (0.245370, 0.000600)),
        2048: ((0.089592, 0.000251), (0.254163, 0.000747)),
        4096: ((0.092547, 0.000360), (0.262473, 0.000999)),
    },
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["fp4", "nf4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_4bit_quant_error_bounds(dtype, quant_type, blocksize):
    # 512 x 512: a quarter of their elements, so the mean's std is twice theirs; 7 of their
    # std is still 3.5 of ours.
    A1 = _randn(512, 512, dtype=dtype, seed=blocksize)
    qa, SA = F.quantize_4bit(A1, blocksize=blocksize, quant_type=quant_type)
    SA = QuantState.from_dict(SA.as_dict(), device=torch.device("cpu"))
    A2 = F.dequantize_4bit(qa, SA, blocksize=blocksize, quant_type=quant_type)
    assert A2.dtype == dtype
    err = (A1 - A2).abs().float()
    relerr = (err / (A1.abs().float() + 1e-8)).mean()
    (err_mean, err_std), (rel_mean, rel_std) = ERR_4BIT[quant_type][blocksize]
    assert err.mean() < err_mean + 7 * err_std
    assert relerr < rel_mean + 7 * rel_std


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("quant_type", ["fp4", "nf4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_4bit_compressed_stats(quant_type, blocksize, dtype):
    A1 = _randn(256, 256, dtype=dtype, seed=1)
    q2, SA2 = F.quantize_4bit(A1, blocksize=blocksize, quant_type=quant_type)
    q3, SA3 = F.quantize_4bit(A1, blocksize=blocksize, compress_statistics=True, quant_type=quant_type)
    assert not SA2.nested and SA3.nested
    for A2 in (F.dequantize_4bit(q2, SA2, quant_type=quant_type), F.dequantize_4bit(q3, SA3, quant_type=quant_type)):
        err = (A1 - A2).abs().float()
        assert err.mean() < 0.11
        assert (err / (A1.abs().float() + 1e-15)).mean() < 0.28


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", [4096, 2048, 1024, 512, 256, 128, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_blockwise_quantization(dtype, blocksize, nested, signed):
    A1 = _randn(128, 256, dtype=dtype, seed=2)
    C, S = F.quantize_blockwise(A1, blocksize=blocksize, nested=nested)
    S = QuantState.from_dict(S.as_dict(), device=torch.device("cpu"))  # an 8-bit state round-trips
    A2 = F.dequantize_blockwise(C, S)
    diff = (A1 - A2).abs().float()
    assert diff.mean() < 0.011
    assert (diff / (A1.float().abs() + 1e-8)).mean() < 0.018
    assert A2.dtype == dtype

    code = F.create_dynamic_map(signed=signed)
    A1 = torch.rand(128, 256, generator=torch.Generator().manual_seed(3)).to(dtype)
    C, S = F.quantize_blockwise(A1, blocksize=blocksize, nested=nested, code=code)
    A2 = F.dequantize_blockwise(C, S)
    diff = (A1 - A2).abs().float()
    rel = (diff / (A1.float().abs() + 1e-8)).mean()
    bounds = (0.0036, 0.015) if signed else (0.0023, 0.012)
    assert diff.mean() < bounds[0] and rel < bounds[1]
    assert A2.dtype == dtype


@pytest.mark.parametrize("bits", range(2, 9))
def test_few_bit_dynamic_map(bits):
    code = F.create_dynamic_map(True, bits, bits)
    assert torch.equal(code, bnb_functional.create_dynamic_map(True, bits, bits))
    assert code.numel() == 256 and torch.unique(code).numel() in (2**bits, 2**bits - 1)
    values = _randn(1, 32, seed=bits)
    values /= values.abs().max()
    q, S = F.quantize_blockwise(values, code=code)
    v = F.dequantize_blockwise(q, S)
    # every value lands on a nearest code entry (the absmax of the block is 1)
    nearest = (values.view(-1, 1) - code.view(1, -1)).abs().min(dim=1).values
    assert torch.equal((v - values).abs().view(-1), nearest)


# ---- the same positional calls in both libraries ----------------------------------------------


def test_positional_4bit_call_is_fp4_without_nesting_in_both():
    A = _randn(32, 128, dtype=torch.bfloat16, seed=4)
    for packed, qs in (F.quantize_4bit(A), bnb_functional.quantize_4bit(A)):
        assert qs.quant_type == "fp4" and not qs.nested and qs.blocksize == 64
        assert packed.shape == (A.numel() // 2, 1) and packed.dtype == torch.uint8
    (p, qs), (bp, bqs) = F.quantize_4bit(A, None, None, 64), bnb_functional.quantize_4bit(A, None, None, 64)
    assert torch.equal(qs.absmax, bqs.absmax) and torch.equal(qs.code, bqs.code)
    assert QuantState.from_dict(bqs.as_dict(packed=True), "cpu") == qs
    # The same 4-bit codes but where the two libraries pick differently between equals: FP4's
    # two zeros (0b0000, 0b1000; the sign of a value rounded to zero) and a value on a
    # threshold (ours are the literals of bitsandbytes' CUDA dQuantizeFP4, its CPU build uses
    # exact midpoints: 0.583333 against 0.5833333...), equally near within 1e-5
    a, b = _nibbles(p), _nibbles(bp)
    x = (A.float().view(-1, 64) / qs.absmax.view(-1, 1)).view(-1)
    code = qs.code
    tie = ((code[a.long()] - x).abs() - (code[b.long()] - x).abs()).abs() <= 1e-5
    assert (a != b).float().mean() < 0.02 and ((a == b) | tie).all()
    # rows of whole 64-blocks: bitsandbytes' own CPU dequantize is right there
    same = (code[a.long()] == code[b.long()]).view(A.shape)
    assert same.float().mean() > 0.999
    assert torch.equal(F.dequantize_4bit(p, qs)[same], bnb_functional.dequantize_4bit(bp, bqs)[same])
    assert torch.equal(F.dequantize_fp4(p, qs)[same], bnb_functional.dequantize_fp4(bp, bqs)[same])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "double"])
def test_nf4_same_bytes_state_and_values(dtype, blocksize, compress):
    # rows of 256, whole blocks: bitsandbytes' own CPU dequantize is right there (conftest.py,
    # bnb_dequantize_4bit, says where it is not)
    A = _randn(16, 256, dtype=dtype, seed=5)
    p, qs = F.quantize_4bit(A, None, None, blocksize, compress, "nf4")
    bp, bqs = bnb_functional.quantize_4bit(A, None, None, blocksize, compress, "nf4")
    assert torch.equal(p, bp)
    if compress:
        # bitsandbytes' CPU build may pick the neighbouring 8-bit code for an absmax
        # (tests/test_nf4_bnb.py); the offset and the nested scales are exact
        assert torch.equal(qs.offset, bqs.offset) and torch.equal(qs.state2.absmax, bqs.state2.absmax)
        assert (qs.absmax.int() - bqs.absmax.int()).abs().max() <= 1
        assert torch.equal(qs.state2.code, bqs.state2.code) and qs.state2.blocksize == bqs.state2.blocksize
    else:
        assert QuantState.from_dict(bqs.as_dict(packed=True), "cpu") == qs
    ours = F.dequantize_4bit(p, qs)
    same = (qs.absmax == bqs.absmax).repeat_interleave(blocksize)[: A.numel()].view(A.shape)
    assert torch.equal(ours[same], bnb_functional.dequantize_4bit(bp, bqs)[same])
    assert torch.equal(F.dequantize_nf4(p, qs), ours)
    bnb_quantized = QuantState.from_dict(bqs.as_dict(packed=True), "cpu")  # bitsandbytes' state, decoded by us
    assert torch.equal(F.dequantize_4bit(bp, bnb_quantized)[same], ours[same])


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_blockwise_same_state_and_values(blocksize, nested):
    A = _randn(32, 256, seed=6)
    c, s = F.quantize_blockwise(A, None, None, None, blocksize, nested)
    bc, bs = bnb_functional.quantize_blockwise(A, None, None, None, blocksize, nested)
    assert c.shape == bc.shape and c.dtype == bc.dtype == torch.uint8
    assert s.shape is bs.shape is None and s.quant_type is bs.quant_type is None
    assert (s.blocksize, s.dtype, s.nested) == (bs.blocksize, bs.dtype, bs.nested)
    assert torch.equal(s.code, bs.code)
    if nested:
        assert torch.equal(s.offset, bs.offset) and s.state2.blocksize == bs.state2.blocksize == blocksize
        absmax = F.dequantize_blockwise(s.absmax, s.state2) + s.offset
        babsmax = bnb_functional.dequantize_blockwise(bs.absmax, bs.state2) + bs.offset
    else:
        assert torch.equal(s.absmax, bs.absmax)
        absmax, babsmax = s.absmax, bs.absmax
    # bitsandbytes' CPU build picks an approximate 8-bit code for a few values: ours is the
    # binary search of its CUDA kernel, never the farther of the two, one code apart at most
    # (the codes are of A over the exact fp32 absmax, nested or not)
    raw = F.quantize_blockwise(A, blocksize=blocksize)[1].absmax
    x = (A.view(-1, blocksize) / raw.view(-1, 1)).view(-1)
    differ = c.view(-1) != bc.view(-1)
    assert differ.float().mean() < 0.01 and (c.view(-1).int() - bc.view(-1).int()).abs().max() <= 1
    ours_err = (s.code[c.view(-1)[differ].long()] - x[differ]).abs()
    assert (ours_err <= (s.code[bc.view(-1)[differ].long()] - x[differ]).abs()).all()
    # values compared where both decoded scales are equal (a nested scale's code may differ too)
    same_scale = (absmax == babsmax).repeat_interleave(blocksize)
    agree = (same_scale & ~differ).view(A.shape)
    assert agree.float().mean() > 0.9
    assert torch.equal(F.dequantize_blockwise(c, s)[agree], bnb_functional.dequantize_blockwise(bc, bs)[agree])
    back = QuantState.from_dict(s.as_dict(), "cpu")
    assert back == s and torch.equal(F.dequantize_blockwise(c, back), F.dequantize_blockwise(c, s))


def test_blockwise_without_state_and_with_code():
    A = _randn(3, 100, seed=7)
    code = F.create_dynamic_map(signed=True)
    c, s = F.quantize_blockwise(A, code, blocksize=64)
    assert torch.equal(
        F.dequantize_blockwise(c, None, s.absmax, code, None, 64), F.dequantize_blockwise(c, s)
    )  # absmax + code + blocksize describe the data as the state does
    assert torch.equal(F.dequantize_blockwise(c, absmax=s.absmax, blocksize=64), F.dequantize_blockwise(c, s))
    with pytest.raises(ValueError, match="nested=True"):
        F.dequantize_blockwise(c, s, nested=True)


def test_transposed_packed_form_gives_the_transposed_result():
    A = _randn(32, 128, seed=8)
    p, qs = F.quantize_nf4(A)
    bp, bqs = bnb_functional.quantize_nf4(A)
    ours = F.dequantize_4bit(p.t(), qs)
    assert ours.shape == (128, 32) and torch.equal(ours, F.dequantize_4bit(p, qs).t())
    assert torch.equal(ours, bnb_functional.dequantize_4bit(bp.t(), bqs))


# ---- out= and absmax= buffers, quant_storage --------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "double"])
def test_4bit_out_and_absmax_buffers(compress):
    A = _randn(8, 96, dtype=torch.float16, seed=9)
    p, qs = F.quantize_nf4(A, compress_statistics=compress)
    out = torch.full_like(p, 7)
    absmax = torch.full_like(qs.absmax, 3)
    p2, qs2 = F.quantize_nf4(A, absmax, out, compress_statistics=compress)
    assert p2 is out and qs2.absmax is absmax and torch.equal(out, p) and qs2 == qs
    into = torch.empty_like(A)
    assert F.dequantize_4bit(out, qs2, out=into) is into and torch.equal(into, F.dequantize_4bit(p, qs))
    with pytest.raises(ValueError, match="out must have shape"):
        F.quantize_nf4(A, out=torch.empty(p.numel(), dtype=torch.uint8), compress_statistics=compress)
    with pytest.raises(ValueError, match="absmax must have shape"):
        F.quantize_nf4(A, absmax=torch.empty(qs.absmax.numel(), dtype=torch.float64), compress_statistics=compress)


def test_4bit_without_quant_state_from_absmax_and_out():
    A = _randn(4, 128, seed=10)
    p, qs = F.quantize_fp4(A, blocksize=128)
    out = torch.empty(4, 128)
    got = F.dequantize_4bit(p, None, qs.absmax, out, 128)  # quant_type "fp4" by default
    assert got is out and torch.equal(out, F.dequantize_4bit(p, qs))
    p, qs = F.quantize_nf4(A)
    assert torch.equal(F.dequantize_nf4(p, absmax=qs.absmax, out=torch.empty(4, 128)), F.dequantize_4bit(p, qs))


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_blockwise_out_and_absmax_buffers(nested):
    A = _randn(5, 300, dtype=torch.bfloat16, seed=11)
    c, s = F.quantize_blockwise(A, blocksize=256, nested=nested)
    out, absmax = torch.empty_like(c), torch.empty_like(s.absmax)
    c2, s2 = F.quantize_blockwise(A, None, absmax, out, 256, nested)
    assert c2 is out and s2.absmax is absmax and torch.equal(out, c) and s2 == s
    into = torch.empty(A.shape, dtype=torch.bfloat16)
    assert F.dequantize_blockwise(c, s, out=into) is into and torch.equal(into, F.dequantize_blockwise(c, s))
    with pytest.raises(ValueError, match="out must have shape"):
        F.dequantize_blockwise(c, s, out=torch.empty(A.shape))  # fp32 buffer for bf16 values


@pytest.mark.parametrize(
    "storage", [torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32], ids=lambda d: str(d)[6:]
)
def test_quant_storage_views_the_same_bytes(storage):
    A = _randn(16, 64, dtype=torch.bfloat16, seed=12)
    p, qs = F.quantize_4bit(A, quant_type="nf4", quant_storage=storage)
    bp, bqs = bnb_functional.quantize_4bit(A, quant_type="nf4", quant_storage=storage)
    assert p.dtype == bp.dtype == storage and p.shape == bp.shape
    assert torch.equal(p.view(torch.uint8), bp.view(torch.uint8))
    assert torch.equal(F.dequantize_4bit(p, qs), F.dequantize_4bit(F.quantize_nf4(A)[0], qs))


# ---- non-finite input with double quantization --------------------------------------------------


@pytest.mark.parametrize(
    "quantize",
    [
        lambda A, **kw: F.quantize_4bit(A, compress_statistics=True, quant_type="nf4", **kw),
        lambda A, **kw: F.quantize_nf4(A, compress_statistics=True, **kw),
        lambda A, **kw: F.quantize_fp4(A, None, None, 64, True, **kw),
    ],
    ids=["quantize_4bit", "quantize_nf4", "quantize_fp4"],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_input_with_double_quantization(quantize, bad):
    A = _randn(8, 64, seed=13)
    A[3, 5] = bad
    A[6, 0] = bad
    with pytest.raises(ValueError, match=r"A has a non-finite value at flat index 197\b"):
        quantize(A)
    with pytest.raises(ValueError, match=r"flat index 45\b"):  # At.t()[5, 5], flat 5 * 8 + 5 in At.t()
        At = _randn(8, 64, seed=13)
        At[5, 5] = bad
        quantize(At.t())
    p, qs = quantize(A, check_finite=False)  # bitsandbytes' result: NaN everywhere
    assert F.dequantize_4bit(p, qs).isnan().all()


def test_non_finite_opt_out_matches_bitsandbytes():
    A = _randn(4, 64, seed=14)
    A[1, 7] = float("nan")
    p, qs = F.quantize_nf4(A, compress_statistics=True, check_finite=False)
    bp, bqs = bnb_functional.quantize_nf4(A, compress_statistics=True)
    # the NaN's block (bytes 32..63) is encoded differently (ours: the CUDA kernel's 0 codes), the rest alike
    assert torch.equal(p[:32], bp[:32]) and torch.equal(p[64:], bp[64:])
    assert qs.offset.isnan() and bqs.offset.isnan()
    assert F.dequantize_4bit(p, qs).isnan().all() and bnb_functional.dequantize_4bit(bp, bqs).isnan().all()
    # without double quantization only the bad block is non-finite, and nothing is refused
    p, qs = F.quantize_nf4(A)
    out = F.dequantize_4bit(p, qs)
    assert out[1].isnan().all() and out[[0, 2, 3]].isfinite().all()


# ---- QuantState's bitsandbytes members -----------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "double"])
def test_quant_state_list_form_and_packed_attribute(compress):
    A = _randn(8, 64, dtype=torch.bfloat16, seed=15)
    _, qs = F.quantize_nf4(A, compress_statistics=compress)
    _, bqs = bnb_functional.quantize_nf4(A, compress_statistics=compress)
    for i in (0, 1, 2, 3, 5):
        ours, theirs = qs[i], bqs[i]
        assert torch.equal(ours, theirs) if isinstance(ours, torch.Tensor) else ours == theirs, i
    if compress:
        offset, state2 = qs[4]
        assert offset is qs.offset and state2 is qs.state2 and bqs[4] is not None
    else:
        assert qs[4] is None and bqs[4] is None
    assert torch.equal(qs.bitsandbytes__nf4, bqs.bitsandbytes__nf4)  # the packed JSON, byte for byte
    with pytest.raises(AttributeError):
        qs.bitsandbytes__fp4  # noqa: B018
    assert qs.to("cpu") is qs


def test_bad_arguments_name_the_argument():
    A = _randn(4, 64)
    p, qs = F.quantize_nf4(A)
    cases = [
        (lambda: F.quantize_4bit(A, 64), TypeError, "absmax must be a torch.Tensor or None"),
        (lambda: F.quantize_4bit(A, None, 64), TypeError, "out must be a torch.Tensor or None"),
        (lambda: F.quantize_blockwise(A, nested=1), TypeError, "nested must be a bool"),
        (lambda: F.dequantize_4bit(p, None, qs.absmax), ValueError, "both absmax and out"),
        (lambda: F.dequantize_blockwise(p), ValueError, "needs quant_state or absmax"),
        (lambda: F.create_dynamic_map(True, 9, 8), ValueError, "max_exponent_bits"),
        (lambda: F.create_dynamic_map(False, 4, 8), ValueError, "does not give 2"),
        (lambda: F.create_dynamic_map(1), TypeError, "signed must be a bool"),
        (lambda: F.get_4bit_type("nf3"), ValueError, "typename"),
        (lambda: F.get_4bit_type("af4", blocksize=128), ValueError, "blocksize"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


def test_4bit_codes_match_bitsandbytes():
    for typename in ("nf4", "fp4", "af4"):
        assert torch.equal(F.get_4bit_type(typename), bnb_functional.get_4bit_type(typename, device="cpu"))
    # bitsandbytes' int4 table cannot be built (an in-place float division of an int tensor)
    assert torch.equal(
        F.get_4bit_type("int4") * 7, torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7.0])
    )
