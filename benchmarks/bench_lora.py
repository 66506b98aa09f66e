"""Fused LoRA over an NF4 weight (4096x4096, r=16, alpha=32, blocksize 64, double quantization),
forward+backward, against PEFT on bitsandbytes' Linear4bit and the dense matmuls the layer
needs (x·Wᵀ and dY·W with W dense), all in the same run on the same inputs.

Targets:
  CPU, 512 tokens, at every instruction-set level (ftk bench --cpu-isa all): fp32
      forward+backward at most 1.1x the two dense fp32 matmuls (ftk-cpu_speedup_vs_dense >=
      0.91, interleaved) and at least 1.1x faster than PEFT+bitsandbytes; bf16 at least 1.3x
      faster than PEFT+bitsandbytes in bf16 where the CPU has 16-bit GEMMs (AVX512-BF16/AMX,
      PEFT's step ~0.1 s), at least 20x where it has not (PEFT's step: a minute).
  GPU: 4096 tokens bf16 forward+backward within 1.15x of the cuBLAS matmuls and >= 1.2x
      PEFT+bitsandbytes; 16 tokens >= 2x PEFT+bitsandbytes; 1 token forward >= 3x faster
      than a dense bf16 matmul.

test_lora_interleaved runs the CPU steps round-robin (ours, the dense matmuls, PEFT) and
reports the ratios of their medians: the figures the CPU targets are judged by.

Forward+backward means: y = layer(x); y.backward(dY) with x, lora_A and lora_B requiring
grad (the base weight frozen), as in a training step. Dropout 0 (PEFT's default).
Run: pytest benchmarks/bench_lora.py --benchmark-json=benchmarks/results/lora-cpu.json
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from torch import nn

import ftkernels as ftk

from conftest import QUICK, Timer, device_marks

N_OUT, K_IN, RANK, ALPHA, BLOCKSIZE = 4096, 4096, 16, 32, 64
if QUICK:  # ftk bench --quick: a small layer; the token counts (and so the test ids) stay
    N_OUT, K_IN = 256, 256

try:
    import bitsandbytes as bnb
    import peft
except ImportError:  # the benchmarks still run, without their baseline
    bnb = peft = None

# (device, dtype, tokens, what) cases of the targets above.
CASES = [
    pytest.param(("cpu", torch.float32, 512, "train"), id="cpu-fp32-512-train", marks=device_marks("cpu")),
    pytest.param(("cpu", torch.bfloat16, 512, "train"), id="cpu-bf16-512-train", marks=device_marks("cpu")),
] + [
    pytest.param(("cuda", torch.bfloat16, t, what), id=f"cuda-bf16-{t}-{what}", marks=device_marks("cuda"))
    for t, what in ((4096, "train"), (16, "train"), (1, "forward"))
]
IMPLS = ["ftk-cpu", "ftk-cuda", "ftk-triton", "peft-bnb", "dense"]
OURS = {"cpu": ["ftk-cpu"], "cuda": ["ftk-cuda", "ftk-triton"]}


@pytest.fixture(scope="module")
def weight():
    return torch.randn(N_OUT, K_IN, generator=torch.Generator().manual_seed(0)) * 0.02


class _Wrap(nn.Module):
    # PEFT picks its bitsandbytes LoRA layer only for models that say they are 4-bit.
    is_loaded_in_4bit = True

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def _peft_bnb(W, device, dtype):
    """PEFT's LoRA on bitsandbytes' Linear4bit (NF4, double quant), adapters in ``dtype``."""
    base = bnb.nn.Linear4bit(K_IN, N_OUT, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    base.weight = bnb.nn.Params4bit(
        W.to(dtype), requires_grad=False, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4"
    )
    base = base.to(device)  # Params4bit quantizes when moved to a device
    model = peft.get_peft_model(
        _Wrap(base), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=0.0)
    )
    layer = model.base_model.model.proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb", type(layer)
    layer.lora_A.default.to(dtype)
    layer.lora_B.default.to(dtype)
    nn.init.normal_(layer.lora_B.default.weight, std=0.02)  # non-zero, as after some training
    model.train()
    return model, layer.lora_A.default.weight, layer.lora_B.default.weight


def _step(device, dtype, tokens, what, impl, W):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, K_IN, generator=gen).to(device, dtype).requires_grad_(what == "train")
    dy = torch.randn(tokens, N_OUT, generator=gen).to(device, dtype)
    if impl == "dense":
        # The ceiling: the layer's two big matmuls alone, on a dense weight of the same dtype.
        Wd = W.to(device, dtype)
        xd = x.detach()
        if what == "forward":
            return lambda: xd @ Wd.T
        return lambda: (xd @ Wd.T, dy @ Wd)
    if impl == "peft-bnb":
        model, _, _ = _peft_bnb(W, device, dtype)
        fn = lambda: model(x)  # noqa: E731
    else:
        backend = impl.removeprefix("ftk-")
        packed, qs = ftk.quantize_nf4(W.to(device, dtype), blocksize=BLOCKSIZE, compress_statistics=True)
        A = (torch.randn(RANK, K_IN, generator=gen) / K_IN**0.5).to(device, dtype).requires_grad_()
        B = (torch.randn(N_OUT, RANK, generator=gen) * 0.02).to(device, dtype).requires_grad_()

        def fn():
            with ftk.use_backend(backend):
                return ftk.lora_linear_4bit(x, packed, qs, A, B, ALPHA / RANK)

    if what == "forward":
        return lambda: fn()

    def train():
        y = fn()
        y.backward(dy)
        return y

    return train


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_lora(benchmark, weight, case, impl):
    device, dtype, tokens, what = case
    if impl.startswith("ftk-") and impl not in OURS[device]:
        pytest.skip("not a backend of this device")
    if impl.startswith("ftk-") and not ftk._registry.backend_available(impl.removeprefix("ftk-"), device):
        pytest.skip(f"backend {impl} unavailable on {device}")
    if impl == "dense" and device == "cpu" and dtype != torch.float32:
        pytest.skip("torch's 16-bit CPU GEMM is no ceiling (~400x slower than fp32 here)")
    if impl == "peft-bnb" and bnb is None:
        pytest.skip("peft or bitsandbytes is not installed")
    name = f"{device}-{str(dtype).removeprefix('torch.').replace('bfloat16', 'bf16').replace('float32', 'fp32')}"
    name += f"-{tokens}-{what}"
    benchmark.group = f"lora-{name}"
    if impl != "peft-bnb" and impl != "dense":
        benchmark.extra_info["compare"] = {
            "peft-bnb": f"test_lora[{name}-peft-bnb]",
            "dense": f"test_lora[{name}-dense]",
        }
    fn = _step(device, dtype, tokens, what, impl, weight)
    flops = 2 * tokens * N_OUT * K_IN * (1 if what == "forward" else 2)  # the big matmuls only
    # PEFT+bitsandbytes in bf16 on the CPU: about a minute a step where torch's bf16 CPU GEMM
    # is slow (no AVX512-BF16/AMX), ~0.1 s where it is fast; one round, no warm-up.
    slow = impl == "peft-bnb" and device == "cpu" and dtype == torch.bfloat16
    rounds = 1 if slow else (5 if device == "cpu" else 50)
    Timer(benchmark, device)(fn, flops=flops, rounds=rounds, warmup_rounds=0 if slow else 1)


# The CPU cases once more, round-robin: one step of each implementation a round, each after the
# cache flush, so that a shared machine's drift between the tests above (single runs swing by
# 25%) cancels out of the ratios. PEFT in bf16 joins only where its step is fast (a CPU with
# 16-bit GEMMs: it took a minute a step on one without).
INTERLEAVED_ROUNDS = 2 if QUICK else 8


@pytest.mark.parametrize(
    "dtype",
    [
        pytest.param(dt, id=name, marks=device_marks("cpu"))
        for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
    ],
)
def test_lora_interleaved(benchmark, weight, dtype):
    from ftkernels import _native

    impls = ["ftk-cpu", "dense", "peft-bnb"]
    if dtype != torch.float32:
        impls.remove("dense")  # no ceiling: see test_lora
        if dtype not in _native.cpu_gemm16_dtypes():
            impls.remove("peft-bnb")
    if bnb is None and "peft-bnb" in impls:
        impls.remove("peft-bnb")
    if len(impls) < 2:
        pytest.skip("no baseline to interleave with here")
    steps = {impl: _step("cpu", dtype, 512, "train", impl, weight) for impl in impls}
    timer = Timer(benchmark, "cpu")
    times = {impl: [] for impl in steps}

    def rounds():
        for _ in range(INTERLEAVED_ROUNDS + 1):  # the first round warms up, untimed
            for impl, fn in steps.items():
                timer.flush()
                start = time.perf_counter()
                fn()
                times[impl].append(time.perf_counter() - start)

    name = "fp32" if dtype == torch.float32 else "bf16"
    benchmark.group = f"lora-cpu-{name}-512-train-interleaved"
    benchmark.pedantic(rounds, rounds=1, warmup_rounds=0)
    median = {impl: statistics.median(t[1:]) for impl, t in times.items()}
    info = {f"{impl}_median_ms": t * 1e3 for impl, t in median.items()}
    for other in ("dense", "peft-bnb"):
        if other in median:
            info[f"ftk-cpu_speedup_vs_{other}"] = median[other] / median["ftk-cpu"]
    benchmark.extra_info.update(info)
    benchmark.extra_info["report"] = sorted(info)
