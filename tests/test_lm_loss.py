"""The fused head + cross-entropy loss (integrations/loss.py) against Transformers' own loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ftkernels.integrations import add_lora, add_loreft, quantize_model
from ftkernels.integrations.loss import fused_lm_loss, linear_cross_entropy, supports_fused_lm_loss

from conftest import make_tiny_llama

pytestmark = pytest.mark.transformers  # also run on the oldest supported Transformers


def _case(dtype=torch.float32, rows=37, d=24, vocab=50, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, d, generator=g) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[::4] = -100
    return h, w, b, labels


def _grads(loss, *ts):
    return torch.autograd.grad(loss, [t for t in ts if t is not None])


@pytest.mark.parametrize("chunk", [1, 5, None], ids=["chunk1", "chunk5", "default"])
@pytest.mark.parametrize("num_items", [None, 29], ids=["mean", "num_items"])
def test_matches_cross_entropy_fp32(chunk, num_items):
    h, w, b, labels = _case()
    ref = F.cross_entropy(
        F.linear(h.double(), w.double(), b.double()), labels, reduction="sum" if num_items else "mean"
    )
    ref = ref / num_items if num_items else ref
    got = linear_cross_entropy(h, w, b, labels, num_items_in_batch=num_items, chunk_rows=chunk)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(_grads(got, h, w, b), _grads(ref, h, w, b)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_bf16_matches_transformers_order():
    # Logits in the model's dtype, then fp32, as ForCausalLMLoss: bf16 rounding of the logits
    # is the same, so the loss agrees closely with torch's bf16 path.
    h, w, b, labels = _case(torch.bfloat16, bias=False)
    ref = F.cross_entropy(F.linear(h, w).float(), labels)
    got = linear_cross_entropy(h, w, None, labels, chunk_rows=4)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(_grads(got, h, w), _grads(ref, h, w)):
        assert g.dtype == r.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-3)


def test_only_the_gradients_asked_for_and_none_without_grad():
    h, w, b, labels = _case()
    w.requires_grad_(False)
    loss = linear_cross_entropy(h, w, None, labels)
    (dh,) = torch.autograd.grad(loss, [h])
    ref = F.cross_entropy(F.linear(h, w), labels)
    torch.testing.assert_close(dh, torch.autograd.grad(ref, [h])[0], rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert not linear_cross_entropy(h, w, b, labels).requires_grad


def test_leading_dims_and_all_ignored():
    h, w, b, labels = _case(rows=12)
    got = linear_cross_entropy(h.reshape(3, 4, -1), w, b, labels.reshape(3, 4), chunk_rows=5)
    torch.testing.assert_close(got, F.cross_entropy(F.linear(h, w, b), labels))
    none = torch.full_like(labels, -100)
    assert torch.isnan(linear_cross_entropy(h, w, b, none)) == torch.isnan(F.cross_entropy(F.linear(h, w, b), none))


def test_bad_inputs_name_the_argument():
    h, w, b, labels = _case()
    with pytest.raises(ValueError, match="labels must be in"):
        linear_cross_entropy(h, w, b, torch.full_like(labels, 50))
    with pytest.raises(ValueError, match="labels must be in"):
        linear_cross_entropy(h, w, b, torch.full_like(labels, -5))
    with pytest.raises(ValueError, match="labels must have shape"):
        linear_cross_entropy(h, w, b, labels[:-1])
    with pytest.raises(TypeError, match="labels must be"):
        linear_cross_entropy(h, w, b, labels.float())
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(h, w[:, :-1], b, labels)
    with pytest.raises(ValueError, match="bias must be"):
        linear_cross_entropy(h, w, b[:-1], labels)
    with pytest.raises(TypeError, match="hidden must be"):
        linear_cross_entropy(labels, w, b, labels)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_rows"):
            linear_cross_entropy(h, w, b, labels, chunk_rows=bad)


def _batch(vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # a prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch, fused: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    if fused:
        with fused_lm_loss(model, chunk_rows=7) as on:
            assert on
            loss = model(**batch).loss
    else:
        loss = model(**batch).loss
    return loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("method", ["qlora", "lora", "loreft"])
def test_fused_loss_in_a_model_matches_transformers(method):
    model = make_tiny_llama()
    if method == "qlora":
        quantize_model(model, progress=False)
    if method == "loreft":
        add_loreft(model, rank=2, positions="f2+l2")
    else:
        add_lora(model, r=4, alpha=8)
        for name, p in model.named_parameters():  # LoRA's B starts at zero: give it a gradient path
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    model.train()
    batch = _batch()
    head = model.lm_head
    ref, ref_grads = _loss_and_grads(model, batch, fused=False)
    got, got_grads = _loss_and_grads(model, batch, fused=True)
    assert model.lm_head is head and "_loss_function" not in model.__dict__, "the head is put back"
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert len(got_grads) == len(ref_grads) > 0
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_fused_loss_trains_the_head_and_passes_num_items():
    model = make_tiny_llama(tie_word_embeddings=False)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_()
    batch = _batch()
    ref = model(**batch, num_items_in_batch=40).loss
    with fused_lm_loss(model):
        got = model(**batch, num_items_in_batch=40).loss
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    (gr,) = torch.autograd.grad(ref, [model.lm_head.weight])
    (gg,) = torch.autograd.grad(got, [model.lm_head.weight])
    torch.testing.assert_close(gg, gr, rtol=1e-4, atol=1e-7)


def test_models_it_cannot_serve_run_as_usual():
    model = make_tiny_llama(tie_word_embeddings=False)
    quantize_model(model, progress=False, skip=())  # the head too: a LinearNF4, not nn.Linear
    assert not supports_fused_lm_loss(model)
    batch = _batch()
    with torch.no_grad():
        ref = model(**batch).logits
        with fused_lm_loss(model) as on:
            assert not on
            torch.testing.assert_close(model(**batch).logits, ref)
    softcapped = make_tiny_llama()
    softcapped.config.final_logit_softcapping = 30.0
    assert not supports_fused_lm_loss(softcapped)
    assert not supports_fused_lm_loss(torch.nn.Linear(3, 3))


def test_the_head_is_put_back_after_an_error():
    model = make_tiny_llama()
    head = model.lm_head
    with pytest.raises(RuntimeError, match="boom"), fused_lm_loss(model):
        raise RuntimeError("boom")
    assert model.lm_head is head and "_loss_function" not in model.__dict__


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_fused_loss_other_architectures(arch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=128,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.Qwen2Config(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        model = transformers.Qwen2ForCausalLM(config)
    add_lora(model, r=4, alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.train()
    batch = _batch()
    ref, ref_grads = _loss_and_grads(model, batch, fused=False)
    got, got_grads = _loss_and_grads(model, batch, fused=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_fuse_when_training_only_serves_training_forwards_given_labels(monkeypatch):
    from ftkernels.integrations import loss as loss_mod
    from ftkernels.integrations.loss import fuse_lm_loss_when_training

    model = make_tiny_llama()
    add_lora(model, r=4, alpha=8)
    batch = _batch()
    model.train()
    want, want_grads = _loss_and_grads(model, batch, fused=False)
    with torch.no_grad():
        want_logits = model(batch["input_ids"]).logits
    calls = []
    real = loss_mod.linear_cross_entropy
    monkeypatch.setattr(loss_mod, "linear_cross_entropy", lambda *a: calls.append(1) or real(*a))
    handle = fuse_lm_loss_when_training(model, chunk_rows=7)
    assert handle.active
    got, got_grads = _loss_and_grads(model, batch, fused=False)
    assert calls == [1]
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # no labels: the logits, as Trainer's label smoothing needs them
        torch.testing.assert_close(model(batch["input_ids"]).logits, want_logits)
        model.eval()  # eval with labels: the logits too
        assert model(**batch).logits.shape[-1] == model.config.vocab_size
        model.train()
    assert calls == [1]
    handle.remove()
    assert not handle.active and type(model.lm_head) is torch.nn.Linear
    model(**batch)
    assert calls == [1]
