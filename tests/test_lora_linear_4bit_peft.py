"""LoRALinear4bit against bitsandbytes and PEFT: construction from bitsandbytes' Linear4bit
without requantizing, PEFT's initialisation given the seed, outputs and gradients against
PEFT wrapping bitsandbytes' Linear4bit, PEFT's state_dict keys, and PEFT's merge."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ftkernels
from ftkernels.nn import LinearNF4, LoRALinear4bit

from conftest import bnb_dequantize_4bit, bnb_from_linear, make_linear
from lora_oracle import (
    ADAPTER,
    U_BF16,
    assert_within,
    oracle,
    our_params,
    run,
)


def _peft_params(layer):
    return {"A": layer.lora_A[ADAPTER].weight, "B": layer.lora_B[ADAPTER].weight}


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
    pm = peft.get_peft_model(
        model,
        peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=0.0, use_rslora=use_rslora, target_modules=["proj"]),
    )
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
    return key[len(prefix) :].replace(f"lora_A.{ADAPTER}.", "lora_A.").replace(f"lora_B.{ADAPTER}.", "lora_B.")


@pytest.mark.parametrize(
    "quant_type,double,blocksize",
    [("nf4", True, 64), ("nf4", False, 64), ("fp4", True, 128), ("nf4", True, 32)],
    ids=["nf4-dq-64", "nf4-64", "fp4-dq-128", "nf4-dq-32"],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_from_bnb_linear4bit_converts_without_requantizing(
    bnb, quant_type, double, blocksize, bias, monkeypatch, bnb_generic_dequantize
):
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
    y_o, dx_o, d_o = run(m, x, g, our_params(m))
    ref = oracle(m, x, g)
    for name, ours, theirs in (
        ("y", y_o, y_p),
        ("dx", dx_o, dx_p),
        ("dA", d_o["A"], d_p["A"]),
        ("dB", d_o["B"], d_p["B"]),
    ):
        value, bound = ref[name]
        assert_within(ours, value, bound, f"ours {name}")
        assert_within(theirs, value, bound, f"PEFT {name}")
        assert_within(ours, theirs.double(), 2 * bound, f"ours - PEFT {name}")
    assert y_o.dtype == dx_o.dtype == torch.float32


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32], ids=["cd-bf16", "cd-fp32"])
def test_matches_peft_bf16(peft, compute_dtype, bnb_generic_dequantize, cpu_gemm16):
    # QLoRA's usual setup: bf16 weights and activations, fp32 LoRA factors. PEFT rounds the base
    # output, the LoRA output and their sum to bf16 (with compute dtype bf16 bitsandbytes also
    # multiplies in bf16). Without 16-bit GEMMs we compute in fp32 and round once; with them
    # W is rounded to bf16 as PEFT's is, and the base product rounded once. Both are held to an
    # fp64 oracle.
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
    y_o, dx_o, d_o = run(m, x, g, our_params(m))
    assert y_o.dtype == dx_o.dtype == torch.bfloat16 and d_o["A"].dtype == torch.float32
    ref = oracle(m, x, g)
    for name, ours, theirs in (("y", y_o, y_p), ("dx", dx_o, dx_p)):
        value, bound = ref[name]
        if not cpu_gemm16:  # ours: fp32 math, then one rounding to bf16
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
    result = m.load_state_dict({k[len(prefix) :]: v for k, v in adapter.items()}, strict=False)
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
    packed, qs = ftkernels.quantize_nf4(ours.weight, blocksize=64)
    assert torch.equal(w.data, packed) and torch.equal(w.quant_state.absmax, qs.absmax)
    requantized = LoRALinear4bit.from_linear(ours, compress_statistics=False)
    x = torch.randn(3, PEFT_SHAPES[0][1])
    torch.testing.assert_close(pm(x), requantized(x), rtol=1e-5, atol=1e-5)
