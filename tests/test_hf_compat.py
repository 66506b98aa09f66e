"""ftkernels.integrations.hf_compat: the Transformers internals the integrations read, each
under every form the supported versions give it, and the fallbacks when a model does not
compute its loss the way fused_lm_loss needs."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from ftkernels.integrations import hf_compat
from ftkernels.integrations.hf_compat import forward_arguments, is_conv1d, past_length, real_tokens
from ftkernels.integrations.loss import fused_lm_loss, supports_fused_lm_loss

from conftest import make_tiny_causal_lm, make_tiny_llama

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.transformers  # also run on the oldest supported Transformers


def test_forward_arguments_by_position_and_by_name():
    model = make_tiny_llama()
    ids, mask = torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)
    by_pos = forward_arguments(model, (ids, mask), {"labels": ids})
    assert by_pos["input_ids"] is ids and by_pos["attention_mask"] is mask and by_pos["labels"] is ids
    assert forward_arguments(model, (), {"input_ids": ids}) == {"input_ids": ids}
    extra = forward_arguments(model, (ids,), {"some_future_kwarg": 1})  # lands in **kwargs, read by name
    assert extra["some_future_kwarg"] == 1


def _dynamic_cache(n):
    cache = transformers.DynamicCache()
    k = torch.zeros(1, 2, n, 16)
    cache.update(k, k.clone(), 0)
    return cache


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_past_length_from_a_cache_under_either_name(name):
    assert past_length({name: _dynamic_cache(5)}, 1) == 5
    assert past_length({name: transformers.DynamicCache()}, 4) == 0  # a prefill into a new cache
    legacy = ((torch.zeros(1, 2, 7, 16), torch.zeros(1, 2, 7, 16)),)  # per-layer (key, value) tuples
    assert past_length({name: legacy}, 1) == 7


def test_past_length_from_cache_position_and_position_ids():
    assert past_length({"cache_position": torch.tensor([6]), "cache": _dynamic_cache(2)}, 1) == 6
    assert past_length({"cache_position": torch.arange(4)}, 4) == 0
    # Left padding: pads at position 0 (or 1), the last column each row's newest position.
    prefill = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    assert past_length({"position_ids": prefill}, 5) == 0
    assert past_length({"position_ids": torch.tensor([[3], [5]])}, 1) == 3
    assert past_length({}, 9) == 0


def test_an_unknown_cache_warns_once_and_reads_position_ids(monkeypatch):
    monkeypatch.setattr(hf_compat, "_warned", set())

    class OddCache:
        pass

    with pytest.warns(RuntimeWarning, match="cannot tell the length of a OddCache"):
        assert past_length({"cache": OddCache(), "position_ids": torch.tensor([[4]])}, 1) == 4
    assert past_length({"cache": OddCache()}, 3) == 0  # no second warning (pytest would fail on none above)


def test_real_tokens_from_2d_and_4d_masks():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert real_tokens(mask, 2, 4).tolist() == mask.bool().tolist()
    assert real_tokens(torch.cat([mask, torch.ones(2, 2, dtype=torch.long)], 1), 2, 4).tolist() == mask.bool().tolist()
    assert real_tokens(mask, 4, 4).tolist() == mask.bool().repeat_interleave(2, 0).tolist()  # 2 beams a row
    causal = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    as_bool = causal[None, None] & mask.bool()[:, None, None, :]
    assert real_tokens(as_bool, 2, 4).tolist() == mask.bool().tolist()
    as_float = torch.zeros(2, 1, 4, 4).masked_fill(~as_bool, torch.finfo(torch.float32).min)
    assert real_tokens(as_float, 2, 4).tolist() == mask.bool().tolist()
    assert real_tokens(None, 2, 4) is None
    assert real_tokens(mask, 3, 4) is None  # 3 rows are not a whole number of 2
    assert real_tokens(mask[:, :2], 2, 4) is None  # shorter than the prompt


def test_conv1d_is_gpt2s_and_nothing_else():
    model = make_tiny_causal_lm("gpt2")
    convs = [n for n, m in model.named_modules() if is_conv1d(m)]
    assert len(convs) == 8 and all(n.split(".")[-1] in ("c_attn", "c_proj", "c_fc") for n in convs)

    class Conv1D(torch.nn.Module):  # the name alone is not enough
        pass

    assert not is_conv1d(Conv1D()) and not is_conv1d(torch.nn.Linear(3, 4))


def test_dtype_keyword_follows_the_version(monkeypatch):
    module = sys.modules["transformers"]  # as imported now (Transformers may swap its lazy module)
    monkeypatch.setattr(module, "__version__", "4.55.4")
    assert hf_compat.dtype_kwarg(torch.float16) == {"torch_dtype": torch.float16}
    monkeypatch.setattr(module, "__version__", "4.56.0")
    assert hf_compat.dtype_kwarg(torch.float16) == {"dtype": torch.float16}
    monkeypatch.setattr(module, "__version__", "5.24.0.dev0")
    assert hf_compat.dtype_kwarg(torch.bfloat16) == {"dtype": torch.bfloat16}


def test_from_config_and_no_init_weights_on_this_version():
    config = make_tiny_llama().config
    with hf_compat.no_init_weights():
        model = hf_compat.from_config(transformers.AutoModelForCausalLM, config, torch.float64)
    assert next(model.parameters()).dtype == torch.float64


class _OwnLossLlama(transformers.LlamaForCausalLM):
    """A causal LM that builds its loss itself, as Transformers < 4.46 and some models do."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)  # logits = self.lm_head(hidden states)
        if labels is not None:
            out.loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return out


class _SaysButSkipsLlama(transformers.LlamaForCausalLM):
    """Its source names self.loss_function(self.lm_head(...)) but the path taken does not call it."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        if labels is None:  # never taken with labels: self.loss_function(self.lm_head(x))
            return super().forward(input_ids=input_ids, **kwargs)
        out = super().forward(input_ids=input_ids, **kwargs)
        out.loss = out.logits.float().mean()
        return out


def test_fused_loss_leaves_a_model_with_its_own_loss_alone_with_a_warning(monkeypatch):
    monkeypatch.setattr(hf_compat, "_warned", set())
    model = _OwnLossLlama(make_tiny_llama().config).eval()
    ids = torch.arange(3, 13)[None]
    want = model(ids, labels=ids).loss
    with pytest.warns(RuntimeWarning, match="does not compute self.loss_function"):
        assert not supports_fused_lm_loss(model)
    with fused_lm_loss(model) as fused:
        got = model(ids, labels=ids).loss
    assert fused is False
    torch.testing.assert_close(got, want)


def test_fused_loss_refuses_a_forward_that_skips_the_loss_function():
    model = _SaysButSkipsLlama(make_tiny_llama().config).eval()
    ids = torch.arange(3, 13)[None]
    with fused_lm_loss(model) as fused, pytest.raises(RuntimeError, match="did not call self.loss_function"):
        assert fused
        model(ids, labels=ids)
    assert type(model.lm_head) is torch.nn.Linear  # put back after the error
    assert "loss_function" not in model.__dict__ and "_loss_function" not in model.__dict__
    model(ids)  # and the model runs as before


def test_fused_loss_leaves_a_read_only_loss_function_alone(monkeypatch):
    # Transformers before 4.48: loss_function is a property without a setter.
    monkeypatch.setattr(hf_compat, "_warned", set())

    class ReadOnlyLoss(transformers.LlamaForCausalLM):
        loss_function = property(transformers.LlamaForCausalLM.loss_function.fget)

    model = ReadOnlyLoss(make_tiny_llama().config).eval()
    ids = torch.arange(3, 13)[None]
    with pytest.warns(RuntimeWarning, match="loss_function cannot be replaced"), fused_lm_loss(model) as fused:
        assert fused is False
        loss = model(ids, labels=ids).loss
    assert loss.shape == () and torch.isfinite(loss)
