"""LinearNF4: quantization on construction, forward against an fp64 oracle, the bitsandbytes
state_dict format both ways, devices, and bad input."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ftkernels
from ftkernels.nn import LinearNF4, dequantized_weights

from conftest import assert_layer_rejects_bad_input, bnb_from_linear, force_cpu_gemm16, make_linear

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# (out_features, in_features): odd numel (pads the last nibble), a partial last block,
# one row, a single element, and a block-aligned square.
SHAPES = [(70, 96), (7, 1), (1, 33), (1, 1), (128, 64)]
SHAPE_IDS = ["70x96", "7x1", "1x33", "1x1", "128x64"]
QSETTINGS = [("nf4", True, 64), ("nf4", False, 64), ("fp4", True, 64), ("nf4", True, 32), ("nf4", True, 4096)]
QSETTING_IDS = ["nf4-dq-64", "nf4-64", "fp4-dq-64", "nf4-dq-32", "nf4-dq-4096"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def qs_json(sd: dict, quant_type: str = "nf4") -> dict:
    return json.loads(bytes(sd[f"weight.quant_state.bitsandbytes__{quant_type}"].tolist()).decode())


def bnb_forward(b: bnb.nn.Linear4bit, x: torch.Tensor) -> torch.Tensor:
    """What Linear4bit computes (dequantize, then an fp32 linear), with bitsandbytes'
    dequantize (patched by the bnb_generic_dequantize fixture where a test asks for it)."""
    w = bnb.functional.dequantize_4bit(b.weight.data, b.weight.quant_state)
    return F.linear(x, w.to(x.dtype), None if b.bias is None else b.bias.to(x.dtype))


def bnb_from_state_dict(sd: dict, in_f: int, out_f: int) -> bnb.nn.Linear4bit:
    """What Transformers' bitsandbytes loader builds from a checkpoint's entries for one layer."""
    stats = {k[len("weight.") :]: v for k, v in sd.items() if k.startswith("weight.")}
    qt = "fp4" if "quant_state.bitsandbytes__fp4" in stats else "nf4"
    b = bnb.nn.Linear4bit(in_f, out_f, bias="bias" in sd, compute_dtype=torch.float32, quant_type=qt)
    b.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], dict(stats), device="cpu", module=b)
    if "bias" in sd:
        b.bias = nn.Parameter(sd["bias"].clone(), requires_grad=False)
    b.support_avx512bf16_for_cpu = False
    return b


# ---- construction -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_from_linear_holds_quantize_4bit_output(shape, dtype, bias):
    lin = make_linear(*shape, bias=bias, dtype=dtype)
    q = LinearNF4.from_linear(lin)
    packed, state = ftkernels.quantize_nf4(lin.weight.detach(), compress_statistics=True)  # the layer's defaults
    n = shape[0] * shape[1]
    assert (q.in_features, q.out_features) == (shape[1], shape[0])
    assert q.weight.dtype == torch.uint8 and q.weight.shape == ((n + 1) // 2, 1)
    assert not q.weight.requires_grad
    assert torch.equal(q.weight, packed)
    assert q.quant_state == state
    assert q.quant_state.dtype == dtype and tuple(q.quant_state.shape) == shape
    if bias:
        assert q.bias.dtype == dtype and torch.equal(q.bias, lin.bias) and not q.bias.requires_grad
    else:
        assert q.bias is None
    assert torch.equal(q.dequantize(), ftkernels.dequantize_4bit(packed, state))


@pytest.mark.parametrize("quant_type,double,blocksize", QSETTINGS, ids=QSETTING_IDS)
def test_from_linear_settings(quant_type, double, blocksize):
    lin = make_linear(70, 96)
    q = LinearNF4.from_linear(lin, blocksize=blocksize, compress_statistics=double, quant_type=quant_type)
    qs = q.quant_state
    assert (qs.quant_type, qs.nested, qs.blocksize) == (quant_type, double, blocksize)
    assert qs.absmax.dtype == (torch.uint8 if double else torch.float32)
    rel = (q.dequantize() - lin.weight).norm() / lin.weight.norm()
    assert rel < 0.15  # 4 bits on Gaussian weights: ~0.09 (nf4) to ~0.11 (fp4) at blocksize 64


def test_constructor_is_a_zero_layer_with_the_full_format():
    q = LinearNF4(96, 70, bias=True)
    assert torch.count_nonzero(q.dequantize()) == 0
    x = torch.randn(3, 96)
    assert torch.equal(q(x), torch.zeros(3, 70))
    assert list(q.state_dict()) == list(LinearNF4.from_linear(make_linear(70, 96)).state_dict())


# ---- forward ------------------------------------------------------------------------------


def _err(a, ref):
    return (a.double() - ref).abs().max().item()


@pytest.mark.parametrize("shape", [(70, 96), (7, 1), (128, 64)], ids=["70x96", "7x1", "128x64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_matches_fp64_dequantize_then_linear(shape, dtype, bias):
    lin = make_linear(*shape, bias=bias, dtype=dtype)
    q = LinearNF4.from_linear(lin)
    torch.manual_seed(1)
    x = torch.randn(2, 5, shape[1]).to(dtype)
    w = q.dequantize()
    b = q.bias
    ref = F.linear(x.double(), w.double(), b.double() if bias else None)
    out = q(x)
    assert out.dtype == dtype and out.shape == (2, 5, shape[0])
    # Tolerance relative to torch itself: plain torch in the same dtype, plus an epsilon.
    torch_err = _err(F.linear(x, w, b), ref)
    eps = 1e-6 * max(ref.abs().max().item(), 1.0)
    assert _err(out, ref) <= 2 * torch_err + eps


def test_forward_float64_input_is_exact_dequantize_then_linear():
    lin = make_linear(70, 96)
    q = LinearNF4.from_linear(lin)
    x = torch.randn(4, 96, dtype=torch.float64)
    assert torch.equal(q(x), F.linear(x, q.dequantize().double(), q.bias.double()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("compute_dtype", [None, torch.float16, torch.bfloat16], ids=["cd-none", "cd-fp16", "cd-bf16"])
@pytest.mark.parametrize("gemm16", [False, True], ids=["gemm32", "gemm16"])
def test_cpu_matmul_runs_in_half_precision_only_with_16bit_gemms(monkeypatch, dtype, compute_dtype, gemm16):
    # Without 16-bit GEMMs in the CPU (no AVX512-BF16/AMX) the matmul is widened to fp32;
    # with them it runs in the compute dtype.
    force_cpu_gemm16(monkeypatch, gemm16)
    seen = []
    real_linear = F.linear

    def spy(x, w, b=None):
        seen.append((x.dtype, w.dtype, None if b is None else b.dtype))
        return real_linear(x, w, b)

    q = LinearNF4.from_linear(make_linear(70, 96, dtype=dtype), compute_dtype=compute_dtype)
    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    out = q(torch.randn(3, 96).to(dtype))
    assert out.dtype == dtype
    mm = (compute_dtype or dtype) if gemm16 else torch.float32
    assert seen == [(mm, mm, mm)]


def test_compute_dtype_sets_the_matmul_dtype_and_output_keeps_input_dtype():
    q = LinearNF4.from_linear(make_linear(70, 96), compute_dtype=torch.float64)
    x = torch.randn(3, 96)
    out = q(x)
    assert out.dtype == torch.float32
    ref = F.linear(x.double(), q.dequantize().double(), q.bias.double()).float()
    assert torch.equal(out, ref)


def test_gradient_flows_to_the_input_only():
    q = LinearNF4.from_linear(make_linear(70, 96))
    x = torch.randn(4, 96, requires_grad=True)
    q(x).sum().backward()
    assert torch.allclose(x.grad, q.dequantize().sum(0).expand(4, -1), atol=1e-6)
    assert q.weight.grad is None and q.bias.grad is None


def test_dequantized_weights_reuses_one_copy_and_changes_nothing(monkeypatch):
    q = LinearNF4.from_linear(make_linear(70, 96))
    x = torch.randn(3, 96)
    plain = q(x)
    calls = []
    real = LinearNF4.dequantize
    monkeypatch.setattr(LinearNF4, "dequantize", lambda self: calls.append(1) or real(self))
    with dequantized_weights(nn.Sequential(q)):
        a, b = q(x), q(x)
    assert len(calls) == 1
    assert torch.equal(a, plain) and torch.equal(b, plain)
    assert q._dense is None
    q(x)
    assert len(calls) == 2


# ---- state_dict: the bitsandbytes format ---------------------------------------------------


@pytest.mark.parametrize("quant_type,double,blocksize", QSETTINGS, ids=QSETTING_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_state_dict_has_bnb_keys_dtypes_and_shapes(quant_type, double, blocksize, bias):
    lin = make_linear(70, 96, bias=bias)
    ours = LinearNF4.from_linear(
        lin, blocksize=blocksize, compress_statistics=double, quant_type=quant_type
    ).state_dict()
    theirs = bnb_from_linear(lin, quant_type, double, blocksize).state_dict()
    assert list(ours) == list(theirs)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype, k
        assert ours[k].shape == theirs[k].shape, k
    a, b = qs_json(ours, quant_type), qs_json(theirs, quant_type)
    assert list(a) == list(b)
    assert a.pop("nested_offset", 0.0) == pytest.approx(b.pop("nested_offset", 0.0), rel=1e-6)
    assert a == b


@pytest.mark.parametrize("quant_type,double,blocksize", QSETTINGS, ids=QSETTING_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_our_state_dict_loads_into_bnb_linear4bit(quant_type, double, blocksize, bias, bnb_generic_dequantize):
    lin = make_linear(70, 96, bias=bias)
    q = LinearNF4.from_linear(lin, blocksize=blocksize, compress_statistics=double, quant_type=quant_type)
    b = bnb_from_state_dict(q.state_dict(), 96, 70)
    assert torch.equal(bnb.functional.dequantize_4bit(b.weight.data, b.weight.quant_state), q.dequantize())
    x = torch.randn(5, 96)
    torch.testing.assert_close(q(x), bnb_forward(b, x), rtol=1e-5, atol=1e-6)
    # And bitsandbytes writes back exactly what it read.
    ours, theirs = q.state_dict(), b.state_dict()
    assert list(ours) == list(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


@pytest.mark.parametrize("quant_type,double,blocksize", QSETTINGS, ids=QSETTING_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_bnb_linear4bit_state_dict_loads_into_ours(quant_type, double, blocksize, bias, bnb_generic_dequantize):
    lin = make_linear(70, 96, bias=bias)
    b = bnb_from_linear(lin, quant_type, double, blocksize)
    theirs = b.state_dict()
    q = LinearNF4(96, 70, bias=bias)  # default settings: the state_dict's own win
    q.load_state_dict(theirs)
    assert (q.quant_state.quant_type, q.quant_state.nested, q.quant_state.blocksize) == (quant_type, double, blocksize)
    assert torch.equal(q.dequantize(), bnb.functional.dequantize_4bit(b.weight.data, b.weight.quant_state))
    ours = q.state_dict()
    assert list(ours) == list(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    x = torch.randn(5, 96)
    torch.testing.assert_close(q(x), bnb_forward(b, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("double", [True, False], ids=["dq", "plain"])
def test_bnb_linear4bit_forward_runs_our_weights(double):
    # bitsandbytes' own CPU matmul, on a layer whose rows hold whole blocks (96 = 3 x 32), the
    # case its native kernel gets right (see bnb_dequantize_4bit in conftest.py).
    q = LinearNF4.from_linear(make_linear(40, 96), blocksize=32, compress_statistics=double)
    b = bnb_from_state_dict(q.state_dict(), 96, 40)
    x = torch.randn(5, 96)
    torch.testing.assert_close(b(x), q(x), rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_and_assign():
    src = LinearNF4.from_linear(make_linear(70, 96))
    dst = LinearNF4(96, 70, compress_statistics=False)
    dst.load_state_dict(src.state_dict())
    assert dst.quant_state == src.quant_state and torch.equal(dst.weight, src.weight)
    with torch.device("meta"):
        lazy = LinearNF4(96, 70)
    lazy.load_state_dict(src.state_dict(), assign=True)
    assert lazy.weight.device.type == "cpu" and lazy.quant_state.absmax.device.type == "cpu"
    x = torch.randn(2, 96)
    assert torch.equal(lazy(x), src(x))


def test_plain_linear_state_dict_is_quantized_on_load():
    lin = make_linear(70, 96)
    q = LinearNF4(96, 70, blocksize=128)
    q.load_state_dict(lin.state_dict())
    expected = LinearNF4.from_linear(lin, blocksize=128)
    assert torch.equal(q.weight, expected.weight) and q.quant_state == expected.quant_state


# ---- devices and dtypes --------------------------------------------------------------------


def test_to_moves_the_quant_state_and_half_keeps_it():
    q = LinearNF4.from_linear(make_linear(70, 96))
    q.to("meta")
    qs = q.quant_state
    assert q.weight.is_meta and q.bias.is_meta
    assert all(t.is_meta for t in (qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code))
    q2 = LinearNF4.from_linear(make_linear(70, 96)).half()
    assert q2.weight.dtype == torch.uint8 and q2.bias.dtype == torch.float16
    assert q2.quant_state.absmax.dtype == torch.uint8 and q2.quant_state.state2.absmax.dtype == torch.float32


@pytest.mark.cuda
@CUDA
def test_cuda_forward_matches_cpu():
    lin = make_linear(70, 96)
    q = LinearNF4.from_linear(lin)
    x = torch.randn(3, 96)
    cpu_out = q(x)
    q.to("cuda")
    assert q.quant_state.absmax.is_cuda and q.quant_state.state2.code.is_cuda
    torch.testing.assert_close(q(x.cuda()).cpu(), cpu_out, rtol=1e-4, atol=1e-5)
    on_gpu = LinearNF4.from_linear(lin.cuda())
    assert torch.equal(on_gpu.weight.cpu(), LinearNF4.from_linear(lin.cpu()).weight)


def test_extra_repr():
    r = repr(LinearNF4.from_linear(make_linear(70, 96, dtype=torch.bfloat16), compute_dtype=torch.float32))
    for part in (
        "in_features=96",
        "out_features=70",
        "bias=True",
        "quant_type=nf4",
        "blocksize=64",
        "double_quant=True",
        "dtype=bfloat16",
        "compute_dtype=float32",
    ):
        assert part in r


# ---- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"blocksize": 48}, ValueError, "blocksize"),
        ({"quant_type": "int4"}, ValueError, "quant_type"),
        ({"compute_dtype": torch.int8}, TypeError, "compute_dtype"),
    ],
    ids=["blocksize", "quant_type", "compute_dtype"],
)
def test_from_linear_rejects_bad_settings(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LinearNF4.from_linear(make_linear(7, 5), **kwargs)


def test_from_linear_rejects_bad_layers():
    with pytest.raises(TypeError, match="linear"):
        LinearNF4.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError, match="linear.weight"):
        LinearNF4.from_linear(make_linear(7, 5).double())
    with pytest.raises(ValueError, match="meta"):
        LinearNF4.from_linear(nn.Linear(5, 7, device="meta"))


def test_forward_rejects_bad_input():
    assert_layer_rejects_bad_input(LinearNF4.from_linear(make_linear(7, 5)))


def _sd():
    return dict(LinearNF4.from_linear(make_linear(70, 96)).state_dict())


def _replace(sd, key, value):
    sd[key] = value
    return sd


def _drop(sd, key):
    del sd[key]
    return sd


def _json_entry(d):
    return torch.tensor(list(json.dumps(d).encode()), dtype=torch.uint8)


_QS = "weight.quant_state.bitsandbytes__nf4"
_GOOD = qs_json(_sd())


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: _replace(_sd(), "weight.absmax", torch.zeros(105)), ValueError, r"weight\.\*.*absmax must be uint8"),
        (
            lambda: _replace(_sd(), "weight.absmax", torch.zeros(7, dtype=torch.uint8)),
            ValueError,
            "absmax has 7 elements",
        ),
        (lambda: _replace(_sd(), "weight.quant_map", torch.zeros(16)), ValueError, "quant_map"),
        (
            lambda: _replace(_sd(), "weight.nested_absmax", torch.zeros(1, dtype=torch.float16)),
            ValueError,
            "nested_absmax",
        ),
        (lambda: _drop(_sd(), "weight.nested_quant_map"), ValueError, "nested_quant_map"),
        (lambda: _drop(_sd(), _QS), ValueError, "quant_state.bitsandbytes__nf4"),
        (lambda: _replace(_sd(), _QS, torch.tensor([1, 2, 255], dtype=torch.uint8)), ValueError, "JSON"),
        (
            lambda: _replace(_sd(), _QS, _json_entry({**_GOOD, "shape": [96, 70]})),
            ValueError,
            r"shape \[96, 70\].*\[70, 96\]",
        ),
        (lambda: _replace(_sd(), _QS, _json_entry({**_GOOD, "blocksize": 100})), ValueError, "blocksize"),
        (lambda: _replace(_sd(), _QS, _json_entry({**_GOOD, "dtype": "int8"})), ValueError, "dtype"),
        (
            lambda: _replace(_sd(), "weight", torch.zeros(3360, 1, dtype=torch.float16)),
            ValueError,
            "weight must be uint8",
        ),
        (
            lambda: _replace(_sd(), "weight", torch.zeros(3359, 1, dtype=torch.uint8)),
            ValueError,
            "weight has 3359 bytes",
        ),
        (lambda: _replace(_sd(), "weight", torch.zeros(5, 5, dtype=torch.uint8)), ValueError, "weight has 25 bytes"),
        (lambda: _drop(_sd(), "weight"), ValueError, "no 'weight'"),
    ],
    ids=[
        "absmax-dtype",
        "absmax-size",
        "quant_map",
        "nested_absmax-dtype",
        "nested_quant_map-missing",
        "quant_state-missing",
        "quant_state-not-json",
        "shape",
        "blocksize",
        "dtype",
        "storage-dtype",
        "weight-size",
        "weight-shape",
        "weight-missing",
    ],
)
def test_load_state_dict_rejects_bad_entries(make, exc, match):
    q = LinearNF4(96, 70)
    before = q.state_dict()
    with pytest.raises(exc, match=match):
        q.load_state_dict(make())
    for k, v in q.state_dict().items():  # a failed load leaves the layer as it was
        assert torch.equal(v, before[k]), k


def test_load_state_dict_reports_missing_and_unexpected_keys():
    sd = _sd()
    with pytest.raises(RuntimeError, match="Unexpected key.*extra"):
        LinearNF4(96, 70).load_state_dict({**sd, "extra": torch.zeros(1)})
    with pytest.raises(RuntimeError, match='Missing key.*"bias"'):
        LinearNF4(96, 70).load_state_dict(_drop(sd, "bias"))
    with pytest.raises(RuntimeError, match='Missing key.*"weight"'):
        LinearNF4(96, 70).load_state_dict({"bias": torch.zeros(70)})
