"""The op registry: backend selection, overrides and their errors."""

from __future__ import annotations

import pytest
import torch

import ftkernels as ftk
from ftkernels import _native, _registry


def test_every_op_has_a_reference_and_a_cpu_kernel():
    for op in ("quantize_4bit", "dequantize_4bit", "quantize_blockwise", "dequantize_blockwise"):
        for backend in ("reference", "cpu", "cuda", "triton"):
            assert (op, backend) in _registry._KERNELS, (op, backend)


def test_default_backend_per_device():
    expected = "cpu" if _native.cpu_available() else "reference"
    assert _registry.select_backend("quantize_4bit", "cpu") == expected
    assert _registry.select_backend("quantize_4bit", "mps") == "reference"


def test_set_backend_and_env_override(monkeypatch):
    ftk.set_backend("reference")
    assert ftk.get_backend() == "reference"
    assert _registry.select_backend("dequantize_4bit", "cpu") == "reference"
    ftk.set_backend(None)
    monkeypatch.setenv("FTK_BACKEND", "Reference ")
    assert _registry.select_backend("dequantize_4bit", "cpu") == "reference"
    monkeypatch.setenv("FTK_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FTK_BACKEND must be one of"):
        ftk.quantize_4bit(torch.randn(64))
    with pytest.raises(ValueError, match="backend must be one of"):
        ftk.set_backend("gpu")


def test_forced_backend_that_cannot_run_here_says_so():
    with ftk.use_backend("cuda"), pytest.raises(RuntimeError, match="cannot run ftk::quantize_4bit on cpu"):
        ftk.quantize_4bit(torch.randn(64))
    assert ftk.get_backend() is None  # the context manager restored the default


def test_backends_agree_through_the_public_api():
    A = torch.randn(300, 7)
    with ftk.use_backend("reference"):
        expected = ftk.dequantize_4bit(*ftk.quantize_nf4(A, compress_statistics=True))
    assert torch.equal(ftk.dequantize_4bit(*ftk.quantize_nf4(A, compress_statistics=True)), expected)


def test_arguments_follow_the_schema_with_its_defaults():
    a = _registry.arguments("dequantize_4bit")("A", "absmax", 64, "nf4", [8], "dtype")
    assert a._fields[:2] == ("A", "absmax") and a.nested_absmax is None and a.nested_blocksize == 256
    grads = _registry.gradients("lora_linear_4bit", x=1, bias=2)
    assert (
        grads[0] == 1
        and len(grads) == len(_registry.arguments("lora_linear_4bit")._fields)
        and grads.count(None) == len(grads) - 2
    )
    with pytest.raises(KeyError, match="no argument"):
        _registry.gradients("lora_linear_4bit", weight=1)
