"""LoRALinear4bit: construction from nn.Linear and LinearNF4; PEFT's initialisation; outputs
and gradients against the fp64 oracle (lora_oracle.py, with its error bounds); merge; dropout;
the state_dict; devices; bad input. The comparisons with bitsandbytes' Linear4bit and PEFT
are in test_lora_linear_4bit_peft.py."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import ftkernels
from ftkernels.nn import LinearNF4, LoRALinear4bit

from conftest import assert_layer_rejects_bad_input, force_cpu_gemm16, make_linear
from lora_oracle import (
    assert_within,
    deq32,
    gamma,
    oracle,
    our_params,
    randomize_lora,
    run,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---- construction -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(70, 96), (7, 1), (1, 33)], ids=["70x96", "7x1", "1x33"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_from_linear_quantizes_like_linear_nf4(shape, dtype, bias):
    lin = make_linear(*shape, bias=bias, dtype=dtype)
    m = LoRALinear4bit.from_linear(lin, r=4, lora_alpha=8)
    q = LinearNF4.from_linear(lin)
    assert isinstance(m.base_layer, LinearNF4)
    assert torch.equal(m.base_layer.weight, q.weight) and m.base_layer.quant_state == q.quant_state
    assert (m.in_features, m.out_features, m.r, m.scaling) == (shape[1], shape[0], 4, 2.0)
    assert m.lora_A.weight.shape == (4, shape[1]) and m.lora_B.weight.shape == (shape[0], 4)
    assert m.lora_A.weight.dtype == m.lora_B.weight.dtype == torch.float32
    assert m.lora_A.bias is None and m.lora_B.bias is None
    # Only the LoRA factors train; the bias keeps its dtype and the source's storage.
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    assert m.weight is m.base_layer.weight and not m.weight.requires_grad
    if bias:
        assert m.bias.dtype == dtype and m.bias.data_ptr() == lin.bias.data_ptr()
    else:
        assert m.bias is None


@pytest.mark.parametrize(
    "quant_type,double,blocksize",
    [("nf4", True, 64), ("nf4", False, 128), ("fp4", True, 64)],
    ids=["nf4-dq-64", "nf4-128", "fp4-dq-64"],
)
def test_from_linear_settings(quant_type, double, blocksize):
    m = LoRALinear4bit.from_linear(
        make_linear(70, 96), blocksize=blocksize, compress_statistics=double, quant_type=quant_type
    )
    qs = m.base_layer.quant_state
    assert (qs.quant_type, qs.nested, qs.blocksize) == (quant_type, double, blocksize)


def test_from_linear_nf4_wraps_it_without_requantizing(monkeypatch):
    q = LinearNF4.from_linear(make_linear(70, 96))
    monkeypatch.setattr(ftkernels.nn.linear_nf4, "quantize_4bit", None)  # any requantization fails
    m = LoRALinear4bit.from_linear(q, r=2)
    assert m.base_layer is q  # shared, as PEFT wraps its base layer
    m = LoRALinear4bit.from_linear(q, r=2, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert m.base_layer is q


# ---- PEFT's initialisation ------------------------------------------------------------------


def test_init_b_is_zero_so_the_output_is_the_base_layers():
    m = LoRALinear4bit.from_linear(make_linear(70, 96), r=16, lora_alpha=32)
    assert torch.count_nonzero(m.lora_B.weight) == 0
    x = torch.randn(2, 5, 96)
    y = m(x)
    with torch.no_grad():
        m.lora_A.weight.normal_()  # with B = 0 the LoRA branch adds exactly 0, whatever A is
    assert torch.equal(m(x), y)
    o = oracle(m, x)["y"]
    assert_within(y, *o, "y")
    assert_within(m.base_layer(x), *o, "base_layer(x)")


@pytest.mark.parametrize("in_features,r", [(96, 8), (1024, 64), (3, 1)], ids=["96-r8", "1024-r64", "3-r1"])
def test_init_a_is_kaiming_uniform_with_a_sqrt5(in_features, r):
    torch.manual_seed(0)
    m = LoRALinear4bit(in_features, 5, r=r)
    A = m.lora_A.weight
    ref = torch.empty(r, in_features)
    fan_in = nn.init._calculate_correct_fan(ref, "fan_in")
    bound = nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3.0 / fan_in)
    assert bound == pytest.approx(1 / math.sqrt(in_features))
    assert A.abs().max() <= bound
    if A.numel() >= 512:  # the sample fills the interval: max|A| > 0.95 bound w.p. 1 - 0.95^n
        assert A.abs().max() > 0.95 * bound
        assert A.mean().abs() < 0.1 * bound
        assert A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


def test_lora_dtype_casts_the_fp32_init():
    torch.manual_seed(5)
    a32 = LoRALinear4bit(96, 70).lora_A.weight
    torch.manual_seed(5)
    m = LoRALinear4bit(96, 70, lora_dtype=torch.bfloat16)
    assert m.lora_A.weight.dtype == m.lora_B.weight.dtype == torch.bfloat16
    assert torch.equal(m.lora_A.weight, a32.bfloat16())
    x = torch.randn(3, 96, requires_grad=True)
    m(x).sum().backward()
    assert m.lora_B.weight.grad.dtype == torch.bfloat16 and x.grad.dtype == torch.float32


# ---- forward and backward against the fp64 oracle --------------------------------------------

ODD_SHAPES = [(70, 96), (7, 1), (1, 33), (128, 64)]
ODD_SHAPE_IDS = ["70x96", "7x1", "1x33", "128x64"]
UNIT_ROUNDOFF = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=ODD_SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_forward_backward_match_fp64_oracle(shape, dtype, monkeypatch):
    # x in `dtype`, the base weight stored from `dtype`, LoRA factors fp32: fp32 math, then one
    # rounding of y and dx to `dtype` (unit roundoff u), none for the fp32 factor gradients.
    # That is the CPU path without 16-bit GEMMs; with them W is rounded to `dtype` as in torch's
    # own layer, under test_lora.py's tolerance rule.
    force_cpu_gemm16(monkeypatch, False)
    m = randomize_lora(LoRALinear4bit.from_linear(make_linear(*shape, dtype=dtype), r=4, lora_alpha=4))
    torch.manual_seed(4)
    x = torch.randn(2, 3, shape[1]).to(dtype)
    g = torch.randn(2, 3, shape[0]).to(dtype)
    y, dx, d = run(m, x, g, our_params(m))
    assert y.shape == (2, 3, shape[0]) and y.dtype == dx.dtype == dtype
    ref = oracle(m, x, g)
    u = UNIT_ROUNDOFF[dtype]
    for name, got in (("y", y), ("dx", dx)):
        value, bound = ref[name]
        assert_within(got, value, bound + u * (value.abs() + bound), name)
    for name in ("A", "B"):
        assert d[name].dtype == torch.float32
        assert_within(d[name], *ref["d" + name], "d" + name)


# ---- merge ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_merge_matches_the_module(dtype, bias):
    m = randomize_lora(LoRALinear4bit.from_linear(make_linear(70, 96, bias=bias, dtype=dtype), r=8, lora_alpha=16))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rng = torch.get_rng_state()
    merged = m.merge()
    assert torch.equal(torch.get_rng_state(), rng)  # built without drawing init values
    assert isinstance(merged, nn.Linear) and merged.weight.dtype == dtype  # the base's dtype
    assert (merged.bias is None) == (not bias)
    for k, v in m.state_dict().items():  # the module is unchanged
        assert torch.equal(v, before[k]), k
    dense = m.merge(dtype=torch.float32)
    W, A, B = deq32(m).double(), m.lora_A.weight.double(), m.lora_B.weight.double()
    w_ref = W + m.scaling * B @ A
    assert_within(dense.weight, w_ref, gamma(8 + 2) * (W.abs() + m.scaling * B.abs() @ A.abs()), "merged W")
    if dtype == torch.bfloat16:
        assert torch.equal(merged.weight, dense.weight.bfloat16())
    x = torch.randn(4, 96)
    value, bound = oracle(m, x)["y"]
    with torch.no_grad():
        # The merged layer's own fp32 rounding: its weight (above) and its dot products.
        mag = x.double().abs() @ (W.abs() + m.scaling * B.abs() @ A.abs()).T
        merged_bound = bound + gamma(96 + 8 + 4) * mag
        assert_within(dense(x), value, merged_bound, "merged(x)")
        assert_within(m(x), value, bound, "module(x)")


# ---- dropout ----------------------------------------------------------------------------------


def _dropout_pair(p=0.3):
    lin = make_linear(70, 96)
    m = randomize_lora(LoRALinear4bit.from_linear(lin, r=8, lora_dropout=p))
    plain = LoRALinear4bit.from_linear(lin, r=8)
    plain.load_state_dict(m.state_dict())
    return m, plain


def test_dropout_follows_the_torch_seed_and_is_off_in_eval():
    m, plain = _dropout_pair()
    x = torch.randn(6, 96)
    assert m.training
    torch.manual_seed(7)
    y1 = m(x)
    torch.manual_seed(7)
    y2 = m(x)
    torch.manual_seed(8)
    y3 = m(x)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    assert not torch.equal(y1, plain(x))
    m.eval()
    rng = torch.get_rng_state()
    y_eval = m(x)
    assert torch.equal(torch.get_rng_state(), rng)  # no draw without dropout
    assert torch.equal(y_eval, plain(x))
    plain.train()
    plain(x)
    assert torch.equal(torch.get_rng_state(), rng)  # lora_dropout=0: none in train mode either


def test_dropout_touches_the_lora_branch_only():
    m, _ = _dropout_pair(p=0.5)
    with torch.no_grad():
        m.lora_B.weight.zero_()
    x = torch.randn(6, 96)
    torch.manual_seed(0)
    assert torch.equal(m(x), m.eval()(x))


def test_dropout_gradients_flow_and_repeat_with_the_seed():
    m, plain = _dropout_pair()
    x = torch.randn(6, 96)
    g = torch.randn(6, 70)
    torch.manual_seed(11)
    y1, dx1, d1 = run(m, x, g, our_params(m))
    torch.manual_seed(11)
    y2, dx2, d2 = run(m, x, g, our_params(m))
    _, dx0, d0 = run(plain, x, g, our_params(plain))
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)
    for k in ("A", "B"):
        assert torch.isfinite(d1[k]).all() and d1[k].abs().sum() > 0
        assert torch.equal(d1[k], d2[k])
        assert not torch.equal(d1[k], d0[k])  # the mask is in the gradients too
    assert not torch.equal(dx1, dx0)


# ---- state_dict ---------------------------------------------------------------------------------

KEYS_DQ = [
    "base_layer.weight",
    "base_layer.bias",
    "base_layer.weight.absmax",
    "base_layer.weight.quant_map",
    "base_layer.weight.nested_absmax",
    "base_layer.weight.nested_quant_map",
    "base_layer.weight.quant_state.bitsandbytes__nf4",
    "lora_A.weight",
    "lora_B.weight",
]


@pytest.mark.parametrize("double", [True, False], ids=["dq", "plain"])
def test_state_dict_keys_and_round_trip(double):
    src = randomize_lora(LoRALinear4bit.from_linear(make_linear(70, 96), r=4, lora_alpha=8, compress_statistics=double))
    sd = src.state_dict()
    expected = KEYS_DQ if double else [k for k in KEYS_DQ if "nested" not in k]
    assert list(sd) == expected
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert sd["lora_A.weight"].shape == (4, 96) and sd["lora_B.weight"].shape == (70, 4)
    x = torch.randn(3, 96)
    # Through torch.save / weights_only torch.load, and through safetensors: tensors only.
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    dst = LoRALinear4bit(96, 70, r=4, lora_alpha=8, compress_statistics=not double)  # the checkpoint's win
    dst.load_state_dict(loaded)
    assert dst.base_layer.quant_state == src.base_layer.quant_state
    assert torch.equal(dst(x), src(x))
    st = pytest.importorskip("safetensors.torch")
    dst2 = LoRALinear4bit(96, 70, r=4, lora_alpha=8)
    dst2.load_state_dict(st.load(st.save({k: v.contiguous() for k, v in sd.items()})))
    assert torch.equal(dst2(x), src(x))
    # assign=True into a meta skeleton
    with torch.device("meta"):
        lazy = LoRALinear4bit(96, 70, r=4, lora_alpha=8)
    lazy.load_state_dict(sd, assign=True)
    assert lazy.lora_A.weight.device.type == "cpu" and lazy.base_layer.quant_state.absmax.device.type == "cpu"
    assert torch.equal(lazy(x), src(x))


def test_load_state_dict_with_another_rank_fails():
    sd = LoRALinear4bit.from_linear(make_linear(70, 96), r=4).state_dict()
    with pytest.raises(RuntimeError, match=r"lora_A\.weight.*size mismatch|size mismatch.*lora_A\.weight"):
        LoRALinear4bit(96, 70, r=8).load_state_dict(sd)


# ---- devices and dtypes --------------------------------------------------------------------------


def test_to_moves_everything_and_dtype_casts_leave_the_4bit_base():
    m = LoRALinear4bit.from_linear(make_linear(70, 96))
    m.to("cpu")
    m.to("meta")
    qs = m.base_layer.quant_state
    assert m.lora_A.weight.is_meta and m.lora_B.weight.is_meta and m.weight.is_meta and m.bias.is_meta
    assert all(t.is_meta for t in (qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code))

    m = randomize_lora(LoRALinear4bit.from_linear(make_linear(70, 96)))
    packed, state = m.weight.clone(), m.base_layer.quant_state
    m.to(torch.bfloat16)
    assert m.lora_A.weight.dtype == m.lora_B.weight.dtype == torch.bfloat16
    assert torch.equal(m.weight, packed) and m.weight.dtype == torch.uint8
    assert m.base_layer.quant_state == state and m.base_layer.quant_state.dtype == torch.float32
    assert m.merge().weight.dtype == torch.float32  # the base's original dtype
    x = torch.randn(3, 96)
    assert m(x).dtype == torch.float32


@pytest.mark.cuda
@CUDA
def test_cuda_matches_cpu():
    lin = make_linear(70, 96)
    torch.manual_seed(0)
    m = randomize_lora(LoRALinear4bit.from_linear(lin))
    x = torch.randn(3, 96)
    cpu_out = m(x)
    m.to("cuda")
    assert m.base_layer.quant_state.absmax.is_cuda and m.lora_A.weight.is_cuda
    torch.testing.assert_close(m(x.cuda()).cpu(), cpu_out, rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    on_gpu = LoRALinear4bit.from_linear(lin.cuda())  # quantized on the GPU, LoRA drawn on the CPU
    torch.manual_seed(0)
    on_cpu = LoRALinear4bit.from_linear(lin.cpu())
    assert on_gpu.lora_A.weight.is_cuda and on_gpu.base_layer.quant_state.absmax.is_cuda
    assert torch.equal(on_gpu.weight.cpu(), on_cpu.weight)
    assert torch.equal(on_gpu.lora_A.weight.cpu(), on_cpu.lora_A.weight)  # PEFT's draw, on any device


def test_torch_compile_fullgraph_smoke():
    # aot_eager traces forward and backward through the op's fake functions in ~2 s on a CPU
    # (inductor would add a C++ build); the dropout seed is drawn inside the graph.
    m = randomize_lora(LoRALinear4bit.from_linear(make_linear(70, 96), lora_dropout=0.2))
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 96)
    g = torch.randn(3, 70)
    torch.manual_seed(1)
    y_c, dx_c, d_c = run(compiled, x, g, our_params(m))
    torch.manual_seed(1)
    y_e, dx_e, d_e = run(m, x, g, our_params(m))
    assert torch.equal(y_c, y_e) and torch.equal(dx_c, dx_e)
    assert torch.equal(d_c["A"], d_e["A"]) and torch.equal(d_c["B"], d_e["B"])


def test_extra_repr():
    r = repr(LoRALinear4bit.from_linear(make_linear(70, 96), r=4, lora_alpha=8, lora_dropout=0.1, use_rslora=True))
    for part in (
        "in_features=96",
        "out_features=70",
        "r=4",
        "lora_alpha=8",
        "scaling=4",
        "lora_dropout=0.1",
        "use_rslora=True",
        "(base_layer): LinearNF4",
        "(lora_A): Linear",
    ):
        assert part in r


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"r": 0}, ValueError, r"r must be an int in \[1, 256\], got 0"),
        ({"r": 257}, ValueError, "r must be"),
        ({"r": 2.0}, ValueError, "r must be"),
        ({"r": True}, ValueError, "r must be"),
        ({"lora_alpha": float("nan")}, ValueError, "lora_alpha"),
        ({"lora_alpha": float("inf")}, ValueError, "lora_alpha"),
        ({"lora_alpha": "16"}, ValueError, "lora_alpha"),
        ({"lora_dropout": 1.0}, ValueError, r"lora_dropout must be a number in \[0, 1\)"),
        ({"lora_dropout": -0.1}, ValueError, "lora_dropout"),
        ({"use_rslora": 1}, TypeError, "use_rslora"),
        ({"lora_dtype": torch.int8}, TypeError, "lora_dtype"),
        ({"blocksize": 48}, ValueError, "blocksize"),
        ({"quant_type": "int4"}, ValueError, "quant_type"),
        ({"compress_statistics": "yes"}, TypeError, "compress_statistics"),
    ],
    ids=[
        "r-0",
        "r-257",
        "r-float",
        "r-bool",
        "alpha-nan",
        "alpha-inf",
        "alpha-str",
        "dropout-1",
        "dropout-neg",
        "rslora",
        "lora_dtype",
        "blocksize",
        "quant_type",
        "compress_statistics",
    ],
)
def test_rejects_bad_settings(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LoRALinear4bit.from_linear(make_linear(7, 5), **kwargs)
    if "compress_statistics" not in kwargs:
        with pytest.raises(exc, match=match):
            LoRALinear4bit(5, 7, **kwargs)


def test_rejects_bad_bases():
    with pytest.raises(TypeError, match="base must be a torch.nn.Linear.*Conv1d"):
        LoRALinear4bit.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError, match="base must be"):
        LoRALinear4bit.from_linear(None)
    with pytest.raises(TypeError, match="base.weight must be float32, float16 or bfloat16, got float64"):
        LoRALinear4bit.from_linear(make_linear(7, 5).double())
    with pytest.raises(ValueError, match="base: its weight is on the meta device"):
        LoRALinear4bit.from_linear(nn.Linear(5, 7, device="meta"))
    q = LinearNF4.from_linear(make_linear(7, 5))
    for kwargs in ({"blocksize": 128}, {"compress_statistics": False}, {"quant_type": "fp4"}):
        name = next(iter(kwargs))
        with pytest.raises(ValueError, match=f"{name}=.* but the base layer is already quantized"):
            LoRALinear4bit.from_linear(q, **kwargs)


def test_forward_rejects_bad_input():
    m = LoRALinear4bit.from_linear(make_linear(7, 5))
    assert_layer_rejects_bad_input(m)
    with pytest.raises(TypeError, match="dtype"):
        m.merge(dtype=torch.int8)


def test_under_cpu_autocast_runs_in_the_autocast_dtype():
    """As autocast runs nn.Linear: x cast to bf16, a bf16 output, gradients for fp32 factors;
    the op's own GEMMs are not cast one by one (that mixed bf16 and fp32 operands)."""
    layer = LoRALinear4bit.from_linear(make_linear(24, 64), r=4)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 5, 64)
    want = layer(x.bfloat16().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad is not None
    # bf16 GEMMs (W rounded to bf16 where the CPU has them) and a bf16 output: a few 2^-8 of the scale
    assert (y.float() - want).abs().max() <= 2**-5 * want.abs().max()
