"""The fused optimizer steps (ftk::adamw_step, lion_step, adamw8bit_step) on every backend
against the pure-torch reference and torch.optim.AdamW: values, opcheck, torch.compile, the
8-bit CPU paths of every instruction-set level. The optimizer classes are in test_optimizers.py. Mirrors
csrc/cpu/optim.cpp, csrc/cuda/optim.cu, triton_kernels/optim.py and _ops/optim.py."""

from __future__ import annotations

import pytest
import torch

import ftkernels as ftk
from ftkernels import _formats

from conftest import assert_same_bits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_ID = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
SIZES = [1, 255, 256, 4097]  # partial and whole 256-blocks


def _codes(device):
    return ftk.create_dynamic_map().to(device), ftk.create_dynamic_map(signed=False).to(device)


def _fp32_ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in fp32 ulps of b's largest magnitude (a state near 0 is the difference of
    two larger numbers, so its own ulp would overstate a rounding difference)."""
    a, b = a.double(), b.double()
    if a.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / (b.abs().max().clamp(min=1e-30) * 2.0**-23)).item()


# ---- the ops, every backend against the reference -------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("n", SIZES)
def test_adamw_and_lion_steps_match_the_reference(backend_device, n, dtype):
    backend, device = backend_device
    g = torch.Generator().manual_seed(n)
    p0 = torch.randn(n, generator=g).to(device, dtype)
    runs = {}
    for b in (backend, "reference"):
        p, lp = p0.clone(), p0.clone()
        m, v, lm = (torch.zeros(n, device=device) for _ in range(3))
        gen = torch.Generator().manual_seed(1)
        with ftk.use_backend(b):
            for t in range(1, 21):
                grad = torch.randn(n, generator=gen).to(device, dtype)
                torch.ops.ftk.adamw_step(p, grad, m, v, 1e-2, 0.9, 0.999, 1e-8, 0.1, t)
                torch.ops.ftk.lion_step(lp, grad, lm, 1e-3, 0.9, 0.99, 0.1)
        runs[b] = (p, m, v, lp, lm)
    for name, got, want in zip(("p", "m", "v", "lion p", "lion m"), runs[backend], runs["reference"]):
        if got.dtype == torch.float32:  # 20 steps; torch's own kernels (the reference) may fuse an FMA
            assert _fp32_ulps(got, want) <= 16, (name, _fp32_ulps(got, want))
        else:  # one rounding to 16 bits of nearly the same fp32 value
            torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("n", SIZES)
def test_adamw8bit_step_matches_the_reference(backend_device, n, dtype):
    backend, device = backend_device
    code1, code2 = _codes(device)
    g = torch.Generator().manual_seed(n)
    p0 = torch.randn(n, generator=g).to(device, dtype)
    blocks = -(-n // 256)
    runs = {}
    for b in (backend, "reference"):
        p = p0.clone()
        st = [
            torch.zeros(n, dtype=torch.uint8, device=device),
            torch.zeros(n, dtype=torch.uint8, device=device),
            torch.zeros(blocks, device=device),
            torch.zeros(blocks, device=device),
        ]
        gen = torch.Generator().manual_seed(2)
        with ftk.use_backend(b):
            for t in range(1, 11):
                grad = torch.randn(n, generator=gen).to(device, dtype)
                torch.ops.ftk.adamw8bit_step(p, grad, *st, code1, code2, 1e-3, 0.9, 0.999, 1e-8, 0.01, t)
        runs[b] = (p, *st)
    got, want = runs[backend], runs["reference"]
    torch.testing.assert_close(
        got[0].float(), want[0].float(), rtol=1e-5 if dtype == torch.float32 else 2**-7, atol=1e-6
    )
    for name, x, y in zip(("state1", "state2"), got[1:3], want[1:3]):
        assert (x != y).float().mean().item() < 1e-3, f"{name}: codes differ"  # ties may differ in the last ulp
    torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=0)
    torch.testing.assert_close(got[4], want[4], rtol=1e-5, atol=0)


def test_adamw8bit_reference_is_the_blockwise_algorithm():
    # One step by hand: dequantize (zero states), update, requantize with the block's absmax.
    n = 600
    code1, code2 = _codes("cpu")
    p = torch.randn(n)
    grad = torch.randn(n)
    st = [torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8), torch.zeros(3), torch.zeros(3)]
    want_p = p.clone()
    with ftk.use_backend("reference"):
        torch.ops.ftk.adamw8bit_step(p, grad, *st, code1, code2, 1e-2, 0.9, 0.99, 1e-8, 0.0, 1)
    m, v = 0.1 * grad, 0.01 * grad * grad
    want_p -= (1e-2 / 0.1) * m / (v.sqrt() / (1 - 0.99) ** 0.5 + 1e-8)
    torch.testing.assert_close(p, want_p, rtol=1e-5, atol=1e-6)
    for blk in range(3):
        sl = slice(blk * 256, min(n, blk * 256 + 256))
        assert st[2][blk].item() == pytest.approx(m[sl].abs().max().item(), rel=1e-6)
        assert st[3][blk].item() == pytest.approx(v[sl].abs().max().item(), rel=1e-6)
        deq = code1[st[0][sl].long()] * st[2][blk]
        # the nearest code: within half a code step of the value
        assert (deq - m[sl]).abs().max().item() <= 0.05 * st[2][blk].item()


def test_reference_quantize_8bit_is_quantize_blockwise():
    x = torch.randn(256 * 8)
    code = ftk.create_dynamic_map()
    q, absmax = torch.ops.ftk.quantize_blockwise(x, code, 256)
    blocks = x.reshape(-1, 256)
    assert torch.equal(_formats.quantize_8bit(code, blocks / absmax[:, None]).reshape(-1), q)


def test_adamw_step_is_torch_adamw():
    n = 5000
    p0 = torch.randn(n)
    ours, theirs = p0.clone(), p0.clone().requires_grad_()
    opt = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1, foreach=False)
    m, v = torch.zeros(n), torch.zeros(n)
    gen = torch.Generator().manual_seed(0)
    for t in range(1, 51):
        grad = torch.randn(n, generator=gen)
        theirs.grad = grad.clone()
        opt.step()
        torch.ops.ftk.adamw_step(ours, grad, m, v, 1e-2, 0.9, 0.999, 1e-8, 0.1, t)
    assert _fp32_ulps(ours, theirs.detach()) <= 64


@pytest.mark.parametrize("op", ["adamw", "lion", "adamw8bit"])
def test_opcheck(op):
    n = 300
    p, grad = torch.randn(n), torch.randn(n)
    if op == "adamw":
        args = (p, grad, torch.zeros(n), torch.zeros(n), 1e-3, 0.9, 0.999, 1e-8, 0.01, 3)
    elif op == "lion":
        args = (p, grad, torch.zeros(n), 1e-4, 0.9, 0.99, 0.01)
    else:
        args = (
            p,
            grad,
            torch.zeros(n, dtype=torch.uint8),
            torch.zeros(n, dtype=torch.uint8),
            torch.zeros(2),
            torch.zeros(2),
            *_codes("cpu"),
            1e-3,
            0.9,
            0.999,
            1e-8,
            0.01,
            3,
        )
    torch.library.opcheck(getattr(torch.ops.ftk, f"{op}_step").default, args)


def test_torch_compile_fullgraph_step():
    torch._dynamo.reset()
    n = 1000
    p, grad, m, v = torch.randn(n), torch.randn(n), torch.zeros(n), torch.zeros(n)
    p2, m2, v2 = p.clone(), m.clone(), v.clone()

    def step(p, grad, m, v):
        torch.ops.ftk.adamw_step(p, grad, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1)

    torch.compile(step, fullgraph=True)(p, grad, m, v)
    step(p2, grad, m2, v2)
    assert torch.equal(p, p2) and torch.equal(m, m2) and torch.equal(v, v2)


@pytest.mark.parametrize(
    "param_dtype,grad_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.float16)],
    ids=["fp32", "bf16-param", "fp16-grad"],
)
def test_8bit_cpu_isa_levels_agree_bit_for_bit(param_dtype, grad_dtype):
    # Whole blocks take the AVX-512 or AVX2 path where the CPU has it (each level capped in
    # turn), partial ones and the baseline level the scalar one: same codes, same absmax, same
    # parameters. Gradients over 12 decades, an all-zero block and a partial last block.
    from ftkernels import _native

    if not _native.cpu_available():
        pytest.skip("the CPU module is not built")
    n = 256 * 6 + 100
    code1, code2 = _codes("cpu")
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(n, generator=gen) * torch.logspace(-12, 0, n) for _ in range(8)]
    for grad in grads[:2]:
        grad[256:512] = 0.0
    runs = []
    for level in (2, 1, 0):
        previous = _native.cpu().set_isa_limit(level)
        try:
            p = torch.linspace(-1, 1, n).to(param_dtype)
            st = [torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8), torch.zeros(7), torch.zeros(7)]
            for t, grad in enumerate(grads, 1):
                grad = grad.to(grad_dtype)
                torch.ops.ftk.adamw8bit_step(p, grad, *st, code1, code2, 1e-3, 0.9, 0.999, 1e-8, 0.01, t)
            runs.append((p, *st))
        finally:
            _native.cpu().set_isa_limit(previous)
    *vector, scalar = runs
    for level, run in zip(("avx512", "avx2"), vector):
        for name, a, b in zip(("param", "state1", "state2", "absmax1", "absmax2"), run, scalar):
            assert_same_bits(a, b, f"{level} {name}")
