"""LoRALinear4bit: construction from nn.Linear, LinearNF4 and bitsandbytes' Linear4bit; PEFT's
initialisation; outputs and gradients against PEFT wrapping bitsandbytes' Linear4bit; merge;
dropout; the state_dict and its mapping to PEFT's keys; devices; bad input.

Tolerances: an fp32 result is compared with an fp64 oracle (the dequantized weight is exact in
fp32: a code times an fp32 scale) under the worst-case bound of an n-term fp32 dot product,
gamma_n * sum|a_i * b_i| with gamma_n = n*u / (1 - n*u), u = 2^-24 (Higham, Thm 3.5). Two fp32
results (ours, PEFT's) then differ by at most the sum of their bounds. A result rounded to bf16
or fp16 adds its unit roundoff (2^-8, 2^-11) relative per rounding.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from conftest import assert_layer_rejects_bad_input, bnb_dequantize_4bit, make_linear
from torch import nn

import ftkernels
from ftkernels.nn import LinearNF4, LoRALinear4bit

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
U32 = 2.0**-24
U_BF16 = 2.0**-8
ADAPTER = "default"


def gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def randomize_lora(m: LoRALinear4bit, seed=1):
    """B is zero after init; give both factors values so the LoRA branch counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.1)
        m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    return m


def deq32(m: LoRALinear4bit) -> torch.Tensor:
    """The base weight dequantized in fp32 (code * absmax, exact): the op's W."""
    qs = m.base_layer.quant_state
    return ftkernels.dequantize_4bit(m.base_layer.weight, ftkernels.QuantState(
        absmax=qs.absmax, shape=qs.shape, code=qs.code, blocksize=qs.blocksize, quant_type=qs.quant_type,
        dtype=torch.float32, offset=qs.offset, state2=qs.state2))


def oracle(m: LoRALinear4bit, x: torch.Tensor, g: torch.Tensor | None = None):
    """fp64 forward (and backward for grad_out g) of the layer, with the elementwise worst-case
    bound of computing each in fp32: {name: (value, bound)}."""
    W, A, B = deq32(m).double(), m.lora_A.weight.double(), m.lora_B.weight.double()
    s = m.scaling
    n, k = W.shape
    r = A.shape[0]
    x2 = x.detach().reshape(-1, k).double()
    b = m.bias.double() if m.bias is not None else torch.zeros(n, dtype=torch.float64)
    y = x2 @ W.T + b + s * (x2 @ A.T) @ B.T
    mag = x2.abs() @ W.abs().T + b.abs() + abs(s) * (x2.abs() @ A.abs().T) @ B.abs().T
    out = {"y": (y.reshape(*x.shape[:-1], n), (gamma(k + r + 4) * mag).reshape(*x.shape[:-1], n))}
    if g is not None:
        g2 = g.reshape(-1, n).double()
        m_rows = g2.shape[0]
        gB, gBa = g2 @ B, g2.abs() @ B.abs()
        out["dx"] = ((g2 @ W + s * gB @ A).reshape(x.shape),
                     (gamma(n + r + 4) * (g2.abs() @ W.abs() + abs(s) * gBa @ A.abs())).reshape(x.shape))
        out["dA"] = (s * gB.T @ x2, gamma(n + m_rows + 4) * abs(s) * gBa.T @ x2.abs())
        out["dB"] = (s * g2.T @ (x2 @ A.T), gamma(m_rows + k + 4) * abs(s) * g2.abs().T @ (x2.abs() @ A.abs().T))
    return out


def assert_within(actual: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str):
    err = (actual.double() - ref).abs()
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements beyond the bound; worst excess "
                           f"{(err - bound).max().item():.3g} (max err {err.max().item():.3g})")


def run(module: nn.Module, x: torch.Tensor, g: torch.Tensor, params: dict[str, torch.Tensor]):
    """Output and the gradients of x and params for grad_out g (grads cleared first)."""
    for p in params.values():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(g)
    return y.detach(), x.grad, {k: p.grad.clone() for k, p in params.items()}


def _peft_params(layer):
    return {"A": layer.lora_A[ADAPTER].weight, "B": layer.lora_B[ADAPTER].weight}


def _our_params(m):
    return {"A": m.lora_A.weight, "B": m.lora_B.weight}


# ---- bitsandbytes and PEFT ------------------------------------------------------------------
# NOTE: bitsandbytes 0.50's Linear4bit forward on the CPU runs its native dequantize, which is
# wrong where a quantization block spans two rows (see bnb_dequantize_4bit in conftest.py);
# comparisons that run bitsandbytes' forward therefore use rows of whole 64-blocks
# (in_features 128 or 192). Its backward goes through bitsandbytes.functional.dequantize_4bit,
# which the bnb_generic_dequantize fixture routes through its generic (correct) kernel.
PEFT_SHAPES = [(40, 128), (7, 192)]
PEFT_SHAPE_IDS = ["40x128", "7x192"]


@pytest.fixture
def bnb():
    """bitsandbytes, or a skip: the layer never needs it (listed before bnb_generic_dequantize)."""
    return pytest.importorskip("bitsandbytes")


@pytest.fixture
def peft(bnb):
    return pytest.importorskip("peft")


def bnb_from_linear(lin: nn.Linear, quant_type="nf4", compress_statistics=True, blocksize=64,
                    compute_dtype=torch.float32, quantize=True):
    """A bitsandbytes Linear4bit quantized (by bitsandbytes, on the CPU) from ``lin``."""
    bnb = pytest.importorskip("bitsandbytes")
    b = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=compress_statistics,
                          quant_type=quant_type)
    b.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, blocksize=blocksize,
                                 compress_statistics=compress_statistics, quant_type=quant_type, module=b)
    if lin.bias is not None:
        b.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    if quantize:
        b = b.to("cpu")  # Params4bit quantizes when moved to a device
    # NOTE: with AVX512-BF16, bitsandbytes repacks the weight at the first eval-mode no-grad
    # forward and multiplies in bf16; off, it dequantizes and multiplies in the compute dtype.
    b.support_avx512bf16_for_cpu = False
    return b


class _OneLayer(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def peft_on_bnb(lin: nn.Linear, r=8, lora_alpha=16, use_rslora=False, seed=123, **bnb_kwargs):
    """get_peft_model on a one-layer model whose layer is a bitsandbytes Linear4bit; returns
    (peft model, its LoRA layer: peft.tuners.lora.bnb.Linear4bit)."""
    peft = pytest.importorskip("peft")
    model = _OneLayer(bnb_from_linear(lin, **bnb_kwargs))
    # NOTE: Transformers sets this on a model loaded in 4 bits; without it PEFT wraps a
    # Linear4bit in its generic lora.Linear (forward works, merge does not).
    model.is_loaded_in_4bit = True
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                    use_rslora=use_rslora, target_modules=["proj"]))
    layer = pm.base_model.model.proj
    assert isinstance(layer, peft.tuners.lora.bnb.Linear4bit)
    return pm, layer


def ours_from_peft(layer, r, lora_alpha, use_rslora=False) -> LoRALinear4bit:
    """Our layer over the same bitsandbytes weight, with PEFT's LoRA weights copied in."""
    m = LoRALinear4bit.from_linear(layer.base_layer, r=r, lora_alpha=lora_alpha, use_rslora=use_rslora)
    with torch.no_grad():
        m.lora_A.weight.copy_(layer.lora_A[ADAPTER].weight)
        m.lora_B.weight.copy_(layer.lora_B[ADAPTER].weight)
    return m


def peft_key_to_ours(key: str, prefix: str) -> str:
    """The documented mapping: strip the module path and PEFT's adapter name."""
    assert key.startswith(prefix), key
    return key[len(prefix):].replace(f"lora_A.{ADAPTER}.", "lora_A.").replace(f"lora_B.{ADAPTER}.", "lora_B.")


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


@pytest.mark.parametrize("quant_type,double,blocksize", [("nf4", True, 64), ("nf4", False, 128), ("fp4", True, 64)],
                         ids=["nf4-dq-64", "nf4-128", "fp4-dq-64"])
def test_from_linear_settings(quant_type, double, blocksize):
    m = LoRALinear4bit.from_linear(make_linear(70, 96), blocksize=blocksize, compress_statistics=double,
                                   quant_type=quant_type)
    qs = m.base_layer.quant_state
    assert (qs.quant_type, qs.nested, qs.blocksize) == (quant_type, double, blocksize)


def test_from_linear_nf4_wraps_it_without_requantizing(monkeypatch):
    q = LinearNF4.from_linear(make_linear(70, 96))
    monkeypatch.setattr(ftkernels.nn.linear_nf4, "quantize_4bit", None)  # any requantization fails
    m = LoRALinear4bit.from_linear(q, r=2)
    assert m.base_layer is q  # shared, as PEFT wraps its base layer
    m = LoRALinear4bit.from_linear(q, r=2, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert m.base_layer is q


@pytest.mark.parametrize("quant_type,double,blocksize", [("nf4", True, 64), ("nf4", False, 64), ("fp4", True, 128),
                                                         ("nf4", True, 32)],
                         ids=["nf4-dq-64", "nf4-64", "fp4-dq-128", "nf4-dq-32"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_from_bnb_linear4bit_converts_without_requantizing(bnb, quant_type, double, blocksize, bias, monkeypatch,
                                                           bnb_generic_dequantize):
    lin = make_linear(70, 96, bias=bias)
    b = bnb_from_linear(lin, quant_type, double, blocksize)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    with monkeypatch.context() as mp:
        mp.setattr(ftkernels.nn.linear_nf4, "quantize_4bit", None)
        m = LoRALinear4bit.from_linear(b)
    qs = m.base_layer.quant_state
    assert (qs.quant_type, qs.nested, qs.blocksize, qs.dtype) == (quant_type, double, blocksize, torch.float32)
    # bitsandbytes' bytes, statistics and JSON, exactly: our base layer writes back what it read ...
    assert torch.equal(m.base_layer.weight, b.weight.data)
    ours = m.base_layer.state_dict()
    assert list(ours) == list(before)
    for k in ours:
        assert torch.equal(ours[k], before[k]), k
    # ... leaves the bitsandbytes layer as it was, and dequantizes to bitsandbytes' values.
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(m.base_layer.dequantize(), bnb_dequantize_4bit(b.weight.data, b.weight.quant_state))
    assert isinstance(b, bnb.nn.Linear4bit)
    # The same nn.Linear through our quantizer: the same 4-bit codes (test_nf4.py: bitsandbytes'
    # CPU build may pick a neighbouring 8-bit code for a double-quantized absmax, nothing else).
    m_lin = LoRALinear4bit.from_linear(lin, blocksize=blocksize, compress_statistics=double, quant_type=quant_type)
    if quant_type == "nf4":
        assert torch.equal(m_lin.base_layer.weight, m.base_layer.weight)
    if not double:
        assert torch.equal(m_lin.base_layer.dequantize(), m.base_layer.dequantize())
    # blocksize, compress_statistics and quant_type, where given, must agree with the base's.
    with pytest.raises(ValueError, match="blocksize=4096 but the base layer is already quantized with blocksize"):
        LoRALinear4bit.from_linear(b, blocksize=4096)


def test_from_bnb_linear4bit_not_yet_quantized_uses_its_settings(bnb):
    lin = make_linear(70, 96)
    b = bnb_from_linear(lin, "nf4", False, 128, quantize=False)  # still a float weight on no device
    assert b.weight.quant_state is None
    m = LoRALinear4bit.from_linear(b)
    expected = LinearNF4.from_linear(lin, blocksize=128, compress_statistics=False)
    assert torch.equal(m.base_layer.weight, expected.weight) and m.base_layer.quant_state == expected.quant_state


@pytest.mark.parametrize("double", [True, False], ids=["dq", "plain"])
def test_from_bnb_linear4bit_after_its_cpu_repacking(bnb, double):
    if not bnb.functional.has_avx512bf16():
        pytest.skip("bitsandbytes repacks CPU weights only where the CPU has AVX512-BF16")
    lin = make_linear(64, 128)  # its repacking needs rows of whole blocks and 32 | out_features
    b = bnb_from_linear(lin, compress_statistics=double)
    b.support_avx512bf16_for_cpu = True
    packed0 = b.weight.data.clone()
    b.eval()
    x = torch.randn(3, 128)
    with torch.no_grad():
        y_bnb = b(x)  # the first eval-mode no-grad forward repacks the weight in place
    assert b.weight.quant_state.packing_format_for_cpu
    data0 = b.weight.data.clone()
    m = LoRALinear4bit.from_linear(b).eval()
    assert b.weight.quant_state.packing_format_for_cpu and torch.equal(b.weight.data, data0)  # left alone
    assert torch.equal(m.base_layer.weight, packed0)  # the 4-bit codes come back exactly
    if not double:
        # The scales bitsandbytes now uses: its fp32 absmax rounded to bf16.
        ref = LinearNF4.from_linear(lin, compress_statistics=False).quant_state.absmax
        assert torch.equal(m.base_layer.quant_state.absmax, ref.bfloat16().float())
    # bitsandbytes multiplies in bf16 here: compare at bf16 precision.
    torch.testing.assert_close(m(x), y_bnb, rtol=2e-2, atol=2e-2)


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


def test_init_same_as_peft_given_the_seed(peft):
    lin = make_linear(40, 128)
    for r, alpha, rs in ((8, 16, False), (4, 7, True), (1, 1, False)):
        pm, layer = peft_on_bnb(lin, r=r, lora_alpha=alpha, use_rslora=rs, seed=123)
        torch.manual_seed(123)
        m = LoRALinear4bit.from_linear(lin, r=r, lora_alpha=alpha, use_rslora=rs)
        assert torch.equal(m.lora_A.weight, layer.lora_A[ADAPTER].weight), (r, alpha, rs)
        assert torch.equal(m.lora_B.weight, layer.lora_B[ADAPTER].weight)
        assert m.lora_A.weight.dtype == layer.lora_A[ADAPTER].weight.dtype == torch.float32
        assert m.scaling == layer.scaling[ADAPTER]
        torch.manual_seed(123)  # from PEFT's own base layer: the same draw
        m2 = LoRALinear4bit.from_linear(layer.base_layer, r=r, lora_alpha=alpha, use_rslora=rs)
        assert torch.equal(m2.lora_A.weight, m.lora_A.weight)


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
def test_forward_backward_match_fp64_oracle(shape, dtype):
    # x in `dtype`, the base weight stored from `dtype`, LoRA factors fp32: fp32 math, then one
    # rounding of y and dx to `dtype` (unit roundoff u), none for the fp32 factor gradients.
    m = randomize_lora(LoRALinear4bit.from_linear(make_linear(*shape, dtype=dtype), r=4, lora_alpha=4))
    torch.manual_seed(4)
    x = torch.randn(2, 3, shape[1]).to(dtype)
    g = torch.randn(2, 3, shape[0]).to(dtype)
    y, dx, d = run(m, x, g, _our_params(m))
    assert y.shape == (2, 3, shape[0]) and y.dtype == dx.dtype == dtype
    ref = oracle(m, x, g)
    u = UNIT_ROUNDOFF[dtype]
    for name, got in (("y", y), ("dx", dx)):
        value, bound = ref[name]
        assert_within(got, value, bound + u * (value.abs() + bound), name)
    for name in ("A", "B"):
        assert d[name].dtype == torch.float32
        assert_within(d[name], *ref["d" + name], "d" + name)


# ---- against PEFT on bitsandbytes' Linear4bit ------------------------------------------------


@pytest.mark.parametrize("shape", PEFT_SHAPES, ids=PEFT_SHAPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_matches_peft_fp32(peft, shape, bias, use_rslora, bnb_generic_dequantize):
    lin = make_linear(*shape, bias=bias)
    pm, layer = peft_on_bnb(lin, r=8, lora_alpha=16, use_rslora=use_rslora)
    with torch.no_grad():
        layer.lora_B[ADAPTER].weight.normal_(0, 0.1)
    m = ours_from_peft(layer, 8, 16, use_rslora)
    torch.manual_seed(2)
    x = torch.randn(2, 3, shape[1])
    g = torch.randn(2, 3, shape[0])
    y_p, dx_p, d_p = run(pm, x, g, _peft_params(layer))
    y_o, dx_o, d_o = run(m, x, g, _our_params(m))
    ref = oracle(m, x, g)
    for name, ours, theirs in (("y", y_o, y_p), ("dx", dx_o, dx_p), ("dA", d_o["A"], d_p["A"]),
                               ("dB", d_o["B"], d_p["B"])):
        value, bound = ref[name]
        assert_within(ours, value, bound, f"ours {name}")
        assert_within(theirs, value, bound, f"PEFT {name}")
        assert_within(ours, theirs.double(), 2 * bound, f"ours - PEFT {name}")
    assert y_o.dtype == dx_o.dtype == torch.float32


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32], ids=["cd-bf16", "cd-fp32"])
def test_matches_peft_bf16(peft, compute_dtype, bnb_generic_dequantize):
    # QLoRA's usual setup: bf16 weights and activations, fp32 LoRA factors. PEFT rounds the base
    # output, the LoRA output and their sum to bf16 (with compute dtype bf16 bitsandbytes also
    # multiplies in bf16); we compute in fp32 and round once. Both are held to an fp64 oracle.
    shape = PEFT_SHAPES[0]
    lin = make_linear(*shape, dtype=torch.bfloat16)
    pm, layer = peft_on_bnb(lin, compute_dtype=compute_dtype)
    with torch.no_grad():
        layer.lora_B[ADAPTER].weight.normal_(0, 0.1)
    m = ours_from_peft(layer, 8, 16)
    assert m.base_layer.quant_state.dtype == torch.bfloat16 and m.lora_A.weight.dtype == torch.float32
    torch.manual_seed(3)
    x = torch.randn(4, shape[1]).bfloat16()
    g = torch.randn(4, shape[0]).bfloat16()
    y_p, dx_p, d_p = run(pm, x, g, _peft_params(layer))
    y_o, dx_o, d_o = run(m, x, g, _our_params(m))
    assert y_o.dtype == dx_o.dtype == torch.bfloat16 and d_o["A"].dtype == torch.float32
    ref = oracle(m, x, g)
    for name, ours, theirs in (("y", y_o, y_p), ("dx", dx_o, dx_p)):
        value, bound = ref[name]
        # ours: fp32 math, then one rounding to bf16
        assert_within(ours, value, bound + U_BF16 * (value.abs() + bound), f"ours {name}")
        ours_err = (ours.double() - value).abs().max().item()
        peft_err = (theirs.double() - value).abs().max().item()
        assert ours_err <= 2 * peft_err + 1e-6, (name, ours_err, peft_err)
        torch.testing.assert_close(ours, theirs, rtol=4 * U_BF16, atol=4 * U_BF16 * value.abs().max().item())
    # The factors' gradients are fp32 sums of bf16 values (exact in fp32) in both.
    for name in ("A", "B"):
        value, bound = ref["d" + name]
        assert_within(d_o[name], value, bound, f"ours d{name}")
        assert_within(d_p[name], value, bound, f"PEFT d{name}")


def test_peft_state_dict_loads_into_ours_key_by_key(peft, bnb_generic_dequantize):
    lin = make_linear(*PEFT_SHAPES[0])
    pm, layer = peft_on_bnb(lin, r=8, lora_alpha=16)
    with torch.no_grad():
        layer.lora_B[ADAPTER].weight.normal_(0, 0.1)
    reference = ours_from_peft(layer, 8, 16)
    x = torch.randn(5, PEFT_SHAPES[0][1])

    # 1. PEFT's whole model state_dict: base_layer.* as is, lora_X.default.weight -> lora_X.weight.
    prefix = "base_model.model.proj."
    theirs = pm.state_dict()
    mapped = {peft_key_to_ours(k, prefix): v for k, v in theirs.items()}
    assert list(reference.state_dict()) == list(mapped)  # same keys, same order
    # a skeleton with other quantization settings: the checkpoint's win
    fresh = LoRALinear4bit(PEFT_SHAPES[0][1], PEFT_SHAPES[0][0], r=8, lora_alpha=16, compress_statistics=False)
    fresh.load_state_dict(mapped)
    assert torch.equal(fresh(x), reference(x))

    # 2. PEFT's adapter file (what save_pretrained writes): lora_X.weight keys, nothing to rename.
    adapter = peft.get_peft_model_state_dict(pm)
    assert sorted(adapter) == [prefix + "lora_A.weight", prefix + "lora_B.weight"]
    m = LoRALinear4bit.from_linear(layer.base_layer, r=8, lora_alpha=16)
    result = m.load_state_dict({k[len(prefix):]: v for k, v in adapter.items()}, strict=False)
    assert result.unexpected_keys == [] and all(k.startswith("base_layer.") for k in result.missing_keys)
    assert torch.equal(m(x), reference(x))

    # 3. And back: our lora_A/lora_B entries, under PEFT's names, load into PEFT.
    with torch.no_grad():
        m.lora_B.weight.mul_(-0.5)
    ours = {prefix + k: v for k, v in m.state_dict().items() if k.startswith("lora_")}
    peft.set_peft_model_state_dict(pm, ours)
    assert torch.equal(layer.lora_B[ADAPTER].weight, m.lora_B.weight)
    value, bound = oracle(m, x)["y"]
    assert_within(pm(x), value, bound, "PEFT after loading ours")


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


def test_merge_matches_peft_merge(bnb, peft, bnb_generic_dequantize):
    from peft.utils.integrations import dequantize_bnb_weight

    lin = make_linear(*PEFT_SHAPES[0])
    pm, layer = peft_on_bnb(lin, r=8, lora_alpha=16, compress_statistics=False)
    with torch.no_grad():
        layer.lora_B[ADAPTER].weight.normal_(0, 0.1)
    m = ours_from_peft(layer, 8, 16)
    ours = m.merge()
    # PEFT's merge: bitsandbytes' dequantized weight plus get_delta_weight, then requantized.
    w = layer.base_layer.weight
    peft_sum = dequantize_bnb_weight(w, state=w.quant_state) + layer.get_delta_weight(ADAPTER)
    assert torch.equal(ours.weight, peft_sum)  # fp32 base: the same fp32 operations
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Merge lora module to 4-bit linear may get different generations"
        layer.merge()
    w = layer.base_layer.weight
    assert isinstance(w, bnb.nn.Params4bit)
    packed, qs = ftkernels.quantize_4bit(ours.weight, 64, compress_statistics=False)
    assert torch.equal(w.data, packed) and torch.equal(w.quant_state.absmax, qs.absmax)
    requantized = LoRALinear4bit.from_linear(ours, compress_statistics=False)
    x = torch.randn(3, PEFT_SHAPES[0][1])
    torch.testing.assert_close(pm(x), requantized(x), rtol=1e-5, atol=1e-5)


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
    y1, dx1, d1 = run(m, x, g, _our_params(m))
    torch.manual_seed(11)
    y2, dx2, d2 = run(m, x, g, _our_params(m))
    _, dx0, d0 = run(plain, x, g, _our_params(plain))
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)
    for k in ("A", "B"):
        assert torch.isfinite(d1[k]).all() and d1[k].abs().sum() > 0
        assert torch.equal(d1[k], d2[k])
        assert not torch.equal(d1[k], d0[k])  # the mask is in the gradients too
    assert not torch.equal(dx1, dx0)


# ---- state_dict ---------------------------------------------------------------------------------

KEYS_DQ = ["base_layer.weight", "base_layer.bias", "base_layer.weight.absmax", "base_layer.weight.quant_map",
           "base_layer.weight.nested_absmax", "base_layer.weight.nested_quant_map",
           "base_layer.weight.quant_state.bitsandbytes__nf4", "lora_A.weight", "lora_B.weight"]


@pytest.mark.parametrize("double", [True, False], ids=["dq", "plain"])
def test_state_dict_keys_and_round_trip(double):
    src = randomize_lora(LoRALinear4bit.from_linear(make_linear(70, 96), r=4, lora_alpha=8,
                                                    compress_statistics=double))
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
    y_c, dx_c, d_c = run(compiled, x, g, _our_params(m))
    torch.manual_seed(1)
    y_e, dx_e, d_e = run(m, x, g, _our_params(m))
    assert torch.equal(y_c, y_e) and torch.equal(dx_c, dx_e)
    assert torch.equal(d_c["A"], d_e["A"]) and torch.equal(d_c["B"], d_e["B"])


def test_extra_repr():
    r = repr(LoRALinear4bit.from_linear(make_linear(70, 96), r=4, lora_alpha=8, lora_dropout=0.1, use_rslora=True))
    for part in ("in_features=96", "out_features=70", "r=4", "lora_alpha=8", "scaling=4", "lora_dropout=0.1",
                 "use_rslora=True", "(base_layer): LinearNF4", "(lora_A): Linear"):
        assert part in r


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,exc,match", [
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
], ids=["r-0", "r-257", "r-float", "r-bool", "alpha-nan", "alpha-inf", "alpha-str", "dropout-1", "dropout-neg",
        "rslora", "lora_dtype", "blocksize", "quant_type", "compress_statistics"])
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
