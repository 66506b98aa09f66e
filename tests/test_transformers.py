"""ftkernels.integrations.transformers: quantize a model's linear layers, save a bitsandbytes
4-bit checkpoint that Transformers + bitsandbytes load, and load either kind back."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama

pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

from transformers import AutoModelForCausalLM  # noqa: E402

from ftkernels.integrations import load_quantized, model_bytes, quantize_model, save_quantized  # noqa: E402
from ftkernels.integrations.hf_compat import dtype_kwarg  # noqa: E402
from ftkernels.nn import LinearNF4  # noqa: E402

pytestmark = pytest.mark.transformers  # also run on the oldest supported Transformers

TOKENS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 3]])
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def nf4_layers(model) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (LinearNF4, bnb.nn.Linear4bit))}


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_quantize_model_replaces_every_linear_but_lm_head(tie):
    model = make_tiny_llama(tie)
    before = logits(model)
    embed = model.model.embed_tokens.weight.detach().clone()
    stats = quantize_model(model, progress=False)
    expected = {
        f"model.layers.{i}.{'self_attn' if p.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{p}"
        for i in range(2)
        for p in PROJ
    }
    assert set(nf4_layers(model)) == expected
    assert stats.count == 14 and stats.skipped == ["lm_head"]
    assert type(model.lm_head) is nn.Linear
    assert torch.equal(model.model.embed_tokens.weight, embed)
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    # 4 bits on random Gaussian weights: ~0.09 relative error per layer
    assert set(stats.errors) == expected and all(0.05 < e < 0.15 for e in stats.errors.values())
    # fp32 -> 4.127 bits a weight is 7.75x smaller; these 8K-16K-weight layers also carry the
    # fixed ~1.3 KB a layer of code tables (16 + 256 fp32) and JSON, so ~5.3x here
    assert 5.0 < stats.linear_bytes_before / stats.linear_bytes_after < 7.75
    assert stats.model_bytes_after == model_bytes(model) < stats.model_bytes_before
    after = logits(model)
    assert (after - before).abs().max() < 0.25 * before.abs().max()


def test_quantize_model_skip_modules_and_settings():
    model = make_tiny_llama()
    stats = quantize_model(
        model,
        blocksize=128,
        compress_statistics=False,
        quant_type="fp4",
        skip_modules=["mlp", "lm_head"],
        progress=False,
    )
    layers = nf4_layers(model)
    assert stats.count == 8 and all(".self_attn." in n for n in layers)
    assert {(m.quant_state.quant_type, m.quant_state.blocksize, m.quant_state.nested) for m in layers.values()} == {
        ("fp4", 128, False)
    }
    assert "model.layers.0.mlp.up_proj" in stats.skipped


@pytest.mark.parametrize("double", [True, False], ids=["dq", "plain"])
def test_checkpoint_loads_in_transformers_with_bitsandbytes(tmp_path, double):
    model = make_tiny_llama()
    quantize_model(model, compress_statistics=double, progress=False)
    ours = logits(model)
    save_quantized(model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] is True
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"] is double
    assert qc["llm_int8_skip_modules"] == ["lm_head"]
    assert "quantization_config" not in model.config.__dict__  # saving leaves the model as it was

    # float32 said outright: before 4.56 Transformers' bitsandbytes loader defaults to float16
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, **dtype_kwarg(torch.float32))
    layers = nf4_layers(theirs)
    assert len(layers) == 14 and all(type(m) is bnb.nn.Linear4bit for m in layers.values())
    # bitsandbytes holds exactly our bytes, scales and JSON ...
    ref, got = model.state_dict(), theirs.state_dict()
    assert list(ref) == list(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    # ... and computes our logits (its fp32 path: rows here hold whole 64-blocks, which its
    # native CPU kernel handles; its AVX512-BF16 repacking would round to bf16, so it is off)
    for m in layers.values():
        m.support_avx512bf16_for_cpu = False
    torch.testing.assert_close(logits(theirs), ours, rtol=1e-4, atol=1e-4)


def test_load_quantized_reads_its_own_checkpoint(tmp_path):
    model = make_tiny_llama(tie_word_embeddings=False)
    quantize_model(model, progress=False)
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    assert set(nf4_layers(loaded)) == set(nf4_layers(model))
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("double", [True, False], ids=["dq", "plain"])
def test_load_quantized_reads_a_checkpoint_bitsandbytes_wrote(tmp_path, double):
    from safetensors.torch import load_file
    from transformers import BitsAndBytesConfig

    make_tiny_llama().save_pretrained(tmp_path / "plain")
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double,
        bnb_4bit_compute_dtype=torch.float32,
    )
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path / "plain", quantization_config=config, **dtype_kwarg(torch.float32)
    )
    theirs.save_pretrained(tmp_path / "bnb")
    loaded = load_quantized(tmp_path / "bnb")
    assert len(nf4_layers(loaded)) == 14
    written = load_file(tmp_path / "bnb" / "model.safetensors")
    ours = loaded.state_dict()
    for k, v in written.items():
        assert torch.equal(ours[k], v), k
    for m in nf4_layers(theirs).values():
        m.support_avx512bf16_for_cpu = False
    torch.testing.assert_close(logits(loaded), logits(theirs), rtol=1e-4, atol=1e-4)


def test_load_quantized_ties_lm_head(tmp_path):
    model = make_tiny_llama(tie_word_embeddings=True)
    quantize_model(model, progress=False)
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(model))


# ---- bad input -----------------------------------------------------------------------------


def test_quantize_model_rejects_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        quantize_model("model")
    with pytest.raises(ValueError, match="blocksize"):
        quantize_model(make_tiny_llama(), blocksize=100, progress=False)
    with pytest.raises(ValueError, match="quant_type"):
        quantize_model(make_tiny_llama(), quant_type="int4", progress=False)


def test_save_quantized_rejects_unquantized_and_foreign_models(tmp_path):
    with pytest.raises(ValueError, match="no LinearNF4 layers"):
        save_quantized(make_tiny_llama(), tmp_path)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        save_quantized(nn.Sequential(nn.Linear(4, 4)), tmp_path)


def test_load_quantized_rejects_what_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_quantized(tmp_path)
    plain = make_tiny_llama()
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no bitsandbytes 4-bit quantization_config"):
        load_quantized(tmp_path / "plain")
    # never unpickles: a checkpoint without safetensors is refused
    model = make_tiny_llama()
    quantize_model(model, progress=False)
    save_quantized(model, tmp_path / "q")
    (tmp_path / "q" / "model.safetensors").rename(tmp_path / "q" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="never pickle"):
        load_quantized(tmp_path / "q")
