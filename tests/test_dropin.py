"""ftkernels.integrations.dropin: PEFT models over bitsandbytes' Linear4bit (loaded through
Transformers' BitsAndBytesConfig) or LinearNF4 run the fused op after ``patch_peft``, with PEFT's
outputs, gradients, module tree, files, merging and adapter switching unchanged."""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from conftest import assert_within_torch_error, bnb_dequantize_4bit, load_bnb_4bit, make_tiny_causal_lm

pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from ftkernels.integrations import lora_config_for_nf4, patch_peft, quantize_model, unpatch_peft  # noqa: E402
from ftkernels.integrations.hf_compat import dtype_kwarg  # noqa: E402

pytestmark = pytest.mark.transformers

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 3], [4, 8, 15, 16, 23, 42, 7, 0]])


def lora_config(**kw):
    kw = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": PROJ, **kw}
    return peft.LoraConfig(**kw)


def randomize_lora(model, seed=1):
    """PEFT starts B at zero, which would hide a wrong B or dA: random factors instead."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def run(model):
    """The logits and every LoRA gradient of one training forward/backward."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(TOKENS).logits
    if out.requires_grad:  # not with every adapter disabled
        (out.float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


def assert_same_run(got, want):
    # Both fp32 through 2 layers; the fused op sums in another order (and bitsandbytes
    # dequantizes then multiplies): a few ulps per op.
    (out_g, grads_g), (out_w, grads_w) = got, want
    torch.testing.assert_close(out_g, out_w, rtol=1e-4, atol=1e-5)
    assert grads_g.keys() == grads_w.keys()
    for n in grads_w:
        scale = grads_w[n].abs().max().item()
        torch.testing.assert_close(grads_g[n], grads_w[n], rtol=1e-3, atol=1e-4 * scale, msg=n)


def fp64_oracle(model):
    """model's computation in float64: each LoRA layer's 4-bit base replaced by a dense layer
    holding its dequantized weight (bitsandbytes' generic dequantize), everything else cast."""
    ref = copy.deepcopy(model)
    for _, layer in list(ref.named_modules()):
        if isinstance(layer, peft.tuners.lora.LoraLayer):
            base = layer.base_layer
            dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
            dense.weight = nn.Parameter(bnb_dequantize_4bit(base.weight.data, base.weight.quant_state), False)
            if base.bias is not None:
                dense.bias = nn.Parameter(base.bias.detach().clone(), False)
            layer.base_layer = dense
    return ref.double()


def assert_within_torch_error_run(got, want, oracle):
    """The design's rule on every output and LoRA gradient: the patched model's error against the
    fp64 oracle at most 2x that of PEFT's own fp32 run (conftest.assert_within_torch_error)."""
    (out_g, grads_g), (out_w, grads_w), (out_o, grads_o) = got, want, oracle
    assert_within_torch_error(out_g, out_o, out_w, what="logits")
    assert grads_g.keys() == grads_w.keys() == grads_o.keys()
    for n in grads_o:
        assert_within_torch_error(grads_g[n], grads_o[n], grads_w[n], what=n)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    paths = {}
    for arch in ("llama", "qwen2"):
        p = tmp_path_factory.mktemp(arch)
        make_tiny_causal_lm(arch).save_pretrained(p)
        paths[arch] = p
    return paths


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("double", [True, False], ids=["dq", "plain"])
def test_patched_bnb_peft_model_matches_peft(saved, arch, double, count_fused_lora):
    model = peft.get_peft_model(load_bnb_4bit(saved[arch], double), lora_config())
    randomize_lora(model)
    keys = list(model.state_dict())
    names = [n for n, _ in model.named_modules()]
    want = run(model)
    report = patch_peft(model)
    assert report.patched == 14 and not report.fallbacks, str(report)
    got = run(model)
    assert len(count_fused_lora) == 14 and len(got[1]) == 28  # every projection, one call each
    assert_same_run(got, want)
    assert_within_torch_error_run(got, want, run(fp64_oracle(model)))
    # PEFT's module tree and names are untouched
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_modules()] == names
    assert unpatch_peft(model) == 14
    assert_same_run(run(model), want)
    assert len(count_fused_lora) == 14


def test_patched_nf4_peft_model_matches_peft_and_merges(count_fused_lora):
    base = make_tiny_causal_lm("llama")
    quantize_model(base)
    model = peft.get_peft_model(base, lora_config_for_nf4(lora_config()))
    randomize_lora(model)
    want = run(model)
    assert patch_peft(model).patched == 14
    assert_same_run(run(model), want)
    assert len(count_fused_lora) == 14
    # a patched model deep-copies and pickles (the patched forward is a partial of a module function)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        layer = twin.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.forward.args[0] is layer
        count_fused_lora.clear()
        assert_same_run(run(twin), want)
        assert len(count_fused_lora) == 14
    model.eval()
    with torch.no_grad():
        before = model(TOKENS).logits
        merged = model.merge_and_unload()
        after = merged(TOKENS).logits
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    # merging requantizes W + BA to NF4, as PEFT does for bitsandbytes: 4-bit rounding error
    assert (after - before).abs().max() < 0.1 * before.abs().max()


def test_fallbacks_are_counted_and_keep_peft_results(saved, count_fused_lora):
    model = peft.get_peft_model(load_bnb_4bit(saved["llama"]), lora_config(target_modules=PROJ + ["lm_head"]))
    model.add_adapter("other", lora_config(use_dora=True, target_modules=["q_proj"]))
    randomize_lora(model)
    report = patch_peft(model)
    assert report.patched == 14 and report.fallbacks == {"base Linear is not 4-bit": 1}, str(report)
    assert report.layers["base_model.model.lm_head"] == "base Linear is not 4-bit"

    # DoRA active on q_proj: PEFT's forward there, fused elsewhere (the other layers have no
    # "other" adapter, so no active one: PEFT's forward adds nothing, and so does the fallback)
    model.base_model.set_adapter("other")
    unpatch_peft(model)
    want = run(model)
    report = patch_peft(model)
    assert report.fallbacks["DoRA or another LoRA variant"] == 2, str(report)
    count_fused_lora.clear()
    assert_same_run(run(model), want)
    assert not count_fused_lora

    # two active adapters
    model.base_model.set_adapter(["default", "other"])
    unpatch_peft(model)
    want = run(model)
    assert patch_peft(model).fallbacks["2 active adapters"] == 2
    assert_same_run(run(model), want)

    # adapter switching back, and disabled adapters
    model.base_model.set_adapter("default")
    unpatch_peft(model)
    want = run(model)
    with model.disable_adapter():
        want_off = run(model)
    patch_peft(model)
    count_fused_lora.clear()
    assert_same_run(run(model), want)
    assert len(count_fused_lora) == 14
    with model.disable_adapter():
        count_fused_lora.clear()
        assert_same_run(run(model), want_off)
        assert not count_fused_lora


def test_merge_and_save_after_patch_load_without_ftkernels(saved, tmp_path):
    model = peft.get_peft_model(load_bnb_4bit(saved["llama"]), lora_config())
    randomize_lora(model)
    patch_peft(model)
    run(model)  # a training step's forward and backward before saving
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8
    model.eval()
    with torch.no_grad():
        ours = model(TOKENS).logits
    script = textwrap.dedent(
        f"""
        import sys, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        import bitsandbytes as bnb
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained({str(saved["llama"])!r}, quantization_config=config,
                                                    dtype=torch.float32)
        for m in base.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():
            torch.save(model(torch.tensor({TOKENS.tolist()})).logits, {str(tmp_path / "theirs.pt")!r})
        assert "ftkernels" not in sys.modules
        """
    )
    if dtype_kwarg(torch.float32).keys() != {"dtype"}:
        script = script.replace("dtype=torch.float32)", "torch_dtype=torch.float32)")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    theirs = torch.load(tmp_path / "theirs.pt", weights_only=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    # and PEFT's from_pretrained, patched again, here
    reloaded = peft.PeftModel.from_pretrained(load_bnb_4bit(saved["llama"]), tmp_path / "adapter").eval()
    assert patch_peft(reloaded).patched == 14
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, ours, rtol=1e-4, atol=1e-5)

    # merge_and_unload on the patched model: PEFT's own merge (it requantizes to 4 bits)
    reference = copy.deepcopy(model)
    unpatch_peft(reference)
    with torch.no_grad():
        a = model.merge_and_unload()(TOKENS).logits
        b = reference.merge_and_unload()(TOKENS).logits
    torch.testing.assert_close(a, b)


def test_patch_peft_rejects_what_it_cannot_patch():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        patch_peft("model")
    with pytest.raises(ValueError, match="model: Linear has no PEFT LoRA layers"):
        patch_peft(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="config must be a peft.LoraConfig"):
        lora_config_for_nf4({"r": 8})


def test_plain_calls_fuse_and_per_call_arguments_go_to_peft(saved, count_fused_lora):
    model = peft.get_peft_model(load_bnb_4bit(saved["llama"]), lora_config(target_modules=["q_proj"]))
    patch_peft(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    want = type(layer).forward(layer, x)
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-5)
    assert len(count_fused_lora) == 1
    count_fused_lora.clear()
    layer(x, adapter_names=["default"] * 3)  # PEFT's per-call arguments
    assert not count_fused_lora
