"""QuantState: the state_dict entries Transformers writes for a bitsandbytes 4-bit weight,
read back with validation (JSON only, never code from the file)."""

from __future__ import annotations

import json

import pytest
import torch

import ftkernels as ftk
from ftkernels.quant_state import QuantState, pack_dict_to_tensor

bnb_functional = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(params=[True, False], ids=["double", "plain"])
def pair(request):
    A = torch.randn(128, 96, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    ours = ftk.quantize_nf4(A, blocksize=64, compress_statistics=request.param)
    theirs = bnb_functional.quantize_4bit(A, blocksize=64, compress_statistics=request.param, quant_type="nf4")
    return ours, theirs


def test_packed_dict_equals_bitsandbytes(pair):
    (_, qs), (_, bqs) = pair
    ours, theirs = qs.as_dict(packed=True), bqs.as_dict(packed=True)
    assert list(ours) == list(theirs)
    key = "quant_state.bitsandbytes__nf4"
    assert bytes(ours[key].numpy()) == bytes(theirs[key].numpy())  # the same JSON, byte for byte
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
    for k in ("quant_map", "nested_quant_map", "nested_absmax"):
        if k in ours:
            assert torch.equal(ours[k], theirs[k]), k


def test_round_trip_both_ways(pair):
    (packed, qs), (bpacked, bqs) = pair
    back = QuantState.from_dict(qs.as_dict(packed=True), "cpu")
    assert back == qs
    assert torch.equal(ftk.dequantize_4bit(packed, back), ftk.dequantize_4bit(packed, qs))
    ours_from_theirs = QuantState.from_dict(bqs.as_dict(packed=True), "cpu")
    assert (
        torch.equal(ftk.dequantize_4bit(bpacked, ours_from_theirs), ftk.dequantize_4bit(packed, qs)) or qs.nested
    )  # bnb's CPU build may pick another 8-bit code for a few absmax
    theirs_from_ours = bnb_functional.QuantState.from_dict(qs.as_dict(packed=True), torch.device("cpu"))
    assert theirs_from_ours.shape == qs.shape and theirs_from_ours.dtype == qs.dtype
    assert torch.equal(theirs_from_ours.absmax, qs.absmax)


def test_unpacked_dict_and_prefixed_keys(pair):
    (_, qs), _ = pair
    prefixed = {f"model.layers.0.q_proj.weight.{k}": v for k, v in qs.as_dict(packed=True).items()}
    assert QuantState.from_dict(prefixed, "cpu") == qs
    assert QuantState.from_dict(qs.as_dict(packed=False), "cpu") == qs


def _packed_with(qs, **changes):
    d = qs.as_dict(packed=True)
    meta = json.loads(bytes(d["quant_state.bitsandbytes__nf4"].numpy()))
    meta.update(changes)
    d["quant_state.bitsandbytes__nf4"] = pack_dict_to_tensor(meta)
    return d


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda qs: _packed_with(qs, blocksize=48), "blocksize must be one of"),
        (lambda qs: _packed_with(qs, dtype="torch.float32"), "dtype must be one of"),
        (lambda qs: _packed_with(qs, dtype="__import__('os')"), "dtype must be one of"),
        (lambda qs: _packed_with(qs, shape=[128, -96]), "shape must be"),
        (lambda qs: _packed_with(qs, shape=[128, 97]), "absmax has"),
        (lambda qs: _packed_with(qs, quant_type="fp4"), "says quant_type"),
        (lambda qs: _packed_with(qs, nested_offset="1.0"), "nested_offset must be a number"),
        (lambda qs: _packed_with(qs, nested_dtype="float16"), "nested_dtype must be float32"),
        (lambda qs: _packed_with(qs, nested_blocksize=100), "nested_blocksize"),
        (lambda qs: _packed_with(qs, surprise=1), "unexpected entries"),
        (
            lambda qs: {
                **qs.as_dict(packed=True),
                "quant_state.bitsandbytes__nf4": torch.tensor(list(b"{not json"), dtype=torch.uint8),
            },
            "not UTF-8 JSON",
        ),
        (
            lambda qs: {
                **qs.as_dict(packed=True),
                "quant_state.bitsandbytes__nf4": torch.tensor(list(b"[1, 2]"), dtype=torch.uint8),
            },
            "JSON object",
        ),
        (lambda qs: {**qs.as_dict(packed=True), "quant_map": torch.linspace(-1, 1, 16)}, "standard nf4 code"),
        (lambda qs: {**qs.as_dict(packed=True), "absmax": qs.absmax.float()}, "absmax must be uint8"),
        (lambda qs: {**qs.as_dict(packed=True), "nested_absmax": qs.nested_absmax[:0]}, "nested_absmax has 0"),
        (
            lambda qs: {k: v for k, v in qs.as_dict(packed=True).items() if k != "nested_quant_map"},
            "without nested_quant_map",
        ),
        (
            lambda qs: {k: v for k, v in qs.as_dict(packed=True).items() if not k.startswith("quant_state")},
            "no .quant_state.bitsandbytes__nf4. .or __fp4. entry",
        ),
    ],
    ids=lambda v: "bad" if callable(v) else v.replace(" ", "-").replace(".", ""),
)
def test_from_dict_rejects_what_does_not_fit(mutate, match):
    A = torch.randn(128, 96, generator=torch.Generator().manual_seed(0))
    _, qs = ftk.quantize_nf4(A, blocksize=64, compress_statistics=True)
    with pytest.raises(ValueError, match=match):
        QuantState.from_dict(mutate(qs), "cpu")


def test_check_packed():
    packed, qs = ftk.quantize_nf4(torch.randn(7, 3), blocksize=64)
    qs.check_packed(packed)
    with pytest.raises(ValueError, match="needs 11"):
        qs.check_packed(packed[:-1])
    with pytest.raises(TypeError, match="uint8"):
        qs.check_packed(packed.float())
