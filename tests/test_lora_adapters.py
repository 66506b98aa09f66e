"""ftkernels.integrations.lora: LoRA on tiny random Llama and GPT-2 models: add (dense and over
NF4), train, save and load in PEFT's format both ways (PEFT itself on the other side), merge."""

from __future__ import annotations

import pytest
import torch

from ftkernels.integrations import enable_gradient_checkpointing
from ftkernels.integrations.lora import add_lora, load_lora, lora_modules, merge_lora, save_lora
from ftkernels.integrations.transformers import quantize_model
from ftkernels.nn import LoRALinear4bit
from ftkernels.nn.lora_linear import LoRALinear

from conftest import make_tiny_causal_lm, make_tiny_llama

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.transformers  # also run on the oldest supported Transformers

IDS = torch.tensor([[5, 9, 13, 17, 21, 25, 29, 33]])


def _randomise_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def test_add_lora_wraps_the_projections_and_starts_at_the_base_model():
    model = make_tiny_llama()
    with torch.no_grad():
        before = model(IDS).logits
    names = add_lora(model, r=4, alpha=8)
    assert len(names) == 2 * 7 and all(isinstance(m, LoRALinear) for m in lora_modules(model).values())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, before)  # B = 0 at init


def test_qlora_wraps_nf4_layers_with_the_fused_op_and_learns():
    model = make_tiny_llama()
    quantize_model(model)
    add_lora(model, r=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    layers = lora_modules(model)
    assert len(layers) == 6 and all(isinstance(m, LoRALinear4bit) for m in layers.values())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.arange(48).reshape(4, 12) % 10 + 3
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_peft_loads_our_adapter(tmp_path):
    model = make_tiny_llama()
    add_lora(model, r=4, alpha=8)
    _randomise_b(model)
    save_lora(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_we_load_peft_adapters(tmp_path):
    theirs = peft.get_peft_model(
        make_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj", "up_proj"])
    )
    _randomise_b(theirs.base_model.model)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(str(tmp_path))
    ours = make_tiny_llama()
    names = load_lora(ours, tmp_path)
    assert len(names) == 6
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-5, atol=1e-5)


def test_merge_gives_the_same_model_as_dense_layers():
    model = make_tiny_llama()
    add_lora(model, r=4, alpha=8)
    _randomise_b(model)
    with torch.no_grad():
        want = model(IDS).logits
        merge_lora(model)
        assert not lora_modules(model)
        torch.testing.assert_close(model(IDS).logits, want, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_layers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    ).eval()
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        before = model(ids).logits
    names = add_lora(model, r=4, alpha=8)
    assert len(names) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)


def test_bad_arguments_and_files(tmp_path):
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="match no linear layer"):
        add_lora(model, target_modules=["nope"])
    add_lora(model, r=4)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)
    save_lora(model, tmp_path)
    other = make_tiny_llama()
    cfg = (tmp_path / "adapter_config.json").read_text().replace('"r": 4', '"r": 8')
    (tmp_path / "adapter_config.json").write_text(cfg)
    with pytest.raises(ValueError, match="has shape"):
        load_lora(other, tmp_path)
    assert not lora_modules(other) and all(p.requires_grad for p in other.parameters()), "a failed load changes nothing"
    with pytest.raises(ValueError, match="r must be"):
        add_lora(other, r=0)
    assert not lora_modules(other) and all(p.requires_grad for p in other.parameters())
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="adapter_model.safetensors: .* not a valid safetensors file"):
        load_lora(other, tmp_path)
    (tmp_path / "adapter_config.json").write_text("not json")
    with pytest.raises(ValueError, match="adapter_config.json: .* not valid JSON"):
        load_lora(make_tiny_llama(), tmp_path)


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_gradient_checkpointing_gives_the_same_gradients(quantized):
    ids = torch.arange(48).reshape(4, 12) % 10 + 3
    grads = []
    for checkpointing in (False, True):
        model = make_tiny_llama()
        if quantized:
            quantize_model(model, progress=False)
        add_lora(model, r=4)
        _randomise_b(model)
        model.train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_qwen2_and_the_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = make_tiny_causal_lm("qwen2", vocab_size=64)
    quantize_model(model, double_quant=True, skip=("lm_head",), progress=False)
    assert len(add_lora(model, r=4)) == 2 * 7
    ids = torch.arange(64).reshape(8, 8) % 10 + 3
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and result.global_step == 4 and losses[-1] < losses[0]
