"""Small cases of every CUDA kernel family of ftkernels, run through the public ops, for
compute-sanitizer: benchmarks/gpu/verify.sh runs all of them under ``--tool memcheck`` and the
``racecheck`` subset (the kernels that share memory between threads) under ``--tool racecheck``.

Each case is named, prints one line, and checks its result against the reference backend on the
same inputs (quantized bytes and dequantized values exactly, everything else within a loose
relative bound), so a kernel that writes wrong values without leaving its buffers fails too.
The shapes are picked from the notes at the top of each csrc/cuda/*.cu file so that every case
reaches the kernel (and the edge) its name says:

  nf4.cu        quantize_4bit groups of G = blocksize/16 threads: G = 2 (blocksize 32), 4 (64, the
                QLoRA setting, nested: the absmax goes through the 8-bit blockwise kernels) and
                256 (4096: the shared-memory reduction over 8 warps); odd numels (a padded last
                nibble) and partial last blocks; dequantize fresh and into ``out=``.
  lora.cu       Forward takes the decode kernel for M <= 16, GradInput for M <= 8; larger M takes
                lora_tc.cu (fp16/bf16) or lora_simt.cu (fp32). M = 130 is two 128-row tensor-core
                tiles, the second nearly empty; K % 8 == 0 takes the vector W loads and an odd K
                the per-element path (bytes that span two rows); K = 528 crosses the decode
                kernel's 512-element chunk. Dropout > 0 runs lora_dropout.cu and the masked
                GradInput epilogue.
  reft.cu       8 rows a block: 37 x 2 rows with -1 slots, ranks 4 (one chunk) and 6 (two passes),
                d not a multiple of 256; the backward's per-block workspace and its reduction.
  optim.cu      quads with a tail (n % 4 != 0), bf16 params, 8-bit blocks of 256 with a partial
                last block; paged.cu: managed memory, prefetch to the host and back, a paged step.

Run: python benchmarks/gpu/sanitize_cases.py [--subset racecheck] (FTK_BACKEND, default cuda);
``--selftest`` runs every case on the CPU with the reference backend (tests/test_gpu_verify.py).
Exit status: 0 when every case passes, 2 when one fails (compute-sanitizer's own errors exit 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import ftkernels as ftk
import ftkernels.optim as ftk_optim
from ftkernels.nn import reft_positions

# Relative Frobenius error allowed against the reference backend: 16-bit outputs round to 8 or
# 11 mantissa bits (2^-8 = 3.9e-3 a value, so 2e-2 leaves 5x); fp32 sums differ in their order.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4}
FAILED = 2  # exit status when a case fails (compute-sanitizer's --error-exitcode is 1)


@dataclass(frozen=True)
class Case:
    name: str
    family: str  # the kernel family (csrc/cuda file) the case is there for
    racecheck: bool  # in the racecheck subset: its kernels share memory between threads
    what: str  # the shape and the path it takes
    run: Callable[[str, str], None]  # run(device, backend): raises AssertionError on a mismatch


def _rand(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


def _close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype, (
        f"{what}: {got.shape}/{got.dtype} != {ref.shape}/{ref.dtype}"
    )
    got64, ref64 = got.double(), ref.double()
    assert torch.isfinite(got64).all(), f"{what}: non-finite values"
    err = (got64 - ref64).norm().item() / max(ref64.norm().item(), 1e-30)
    tol = TOLERANCE[got.dtype]
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g} against the reference backend"


def _same(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert torch.equal(got.cpu(), ref.cpu()), f"{what}: differs from the reference backend"


def _both(backend: str, fn: Callable[[], tuple]) -> tuple[tuple, tuple]:
    """fn() under ``backend``, then under the reference backend."""
    with ftk.use_backend(backend):
        got = fn()
    with ftk.use_backend("reference"):
        ref = fn()
    return got, ref


# ---- nf4.cu -----------------------------------------------------------------------------------


def _nf4(shape, dtype, blocksize, nested, quant_type):
    def run(device, backend):
        A = _rand(*shape, dtype=dtype, device=device)

        def quant_dequant():
            packed, qs = ftk.quantize_4bit(A, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
            out = torch.empty(shape, dtype=dtype, device=device)
            return packed, qs.absmax, ftk.dequantize_4bit(packed, qs), ftk.dequantize_4bit(packed, qs, out=out)

        got, ref = _both(backend, quant_dequant)
        for g, r, what in zip(got, ref, ("packed", "absmax", "dequantized", "dequantized into out")):
            _same(g, r, what)

    return run


def _blockwise(n, blocksize, dtype):
    def run(device, backend):
        A = _rand(n, device=device)

        def quant_dequant():
            q, qs = ftk.quantize_blockwise(A, blocksize=blocksize)
            as_dtype = ftk.QuantState(absmax=qs.absmax, code=qs.code, blocksize=blocksize, dtype=dtype)
            return q, qs.absmax, ftk.dequantize_blockwise(q, as_dtype)

        got, ref = _both(backend, quant_dequant)
        for g, r, what in zip(got, ref, ("codes", "absmax", "dequantized")):
            _same(g, r, what)

    return run


# ---- lora.cu and its kernel files ---------------------------------------------------------------


def _lora(M, K, N, r, dtype, blocksize=64, nested=True, quant_type="nf4", dropout=0.1):
    def run(device, backend):
        W = _rand(N, K, dtype=dtype, device=device, seed=1, scale=0.05)
        # the same bytes on every backend
        packed, qs = ftk.quantize_4bit(W, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
        x0 = _rand(M, K, dtype=dtype, device=device, seed=2)
        A0 = _rand(r, K, dtype=dtype, device=device, seed=3, scale=K**-0.5)
        B0 = _rand(N, r, dtype=dtype, device=device, seed=4, scale=0.05)
        bias0 = _rand(N, dtype=dtype, device=device, seed=5, scale=0.1)
        dy = _rand(M, N, dtype=dtype, device=device, seed=6)

        def fwd_bwd():
            x, A, B, bias = (t.clone().requires_grad_() for t in (x0, A0, B0, bias0))
            gen = torch.Generator().manual_seed(7)  # the same dropout mask on both backends
            y = ftk.lora_linear_4bit(x, packed, qs, A, B, 2.0, bias, dropout_p=dropout, generator=gen)
            y.backward(dy)
            return y.detach(), x.grad, A.grad, B.grad, bias.grad

        got, ref = _both(backend, fwd_bwd)
        for g, rf, what in zip(got, ref, ("y", "dx", "dA", "dB", "dbias")):
            _close(g, rf, what)

    return run


# ---- reft.cu ----------------------------------------------------------------------------------


def _orthonormal_rows(rank, d, device):
    q, _ = torch.linalg.qr(_rand(d, rank, seed=11))
    return q.T.contiguous().to(device)


def _reft(shape, rank, dtype, positions, dropout, direct=False):
    def run(device, backend):
        d = shape[-1]
        h0 = _rand(*shape, dtype=dtype, device=device, seed=10)
        R0 = _orthonormal_rows(rank, d, device)
        W0 = _rand(rank, d, device=device, seed=12, scale=d**-0.5)
        b0 = _rand(rank, device=device, seed=13, scale=0.1)
        g = _rand(*shape, dtype=dtype, device=device, seed=14)
        pos = None if positions is None else positions(shape).to(device)
        op = ftk.direft if direct else ftk.loreft

        def fwd_bwd():
            h, R, W, b = (t.clone().requires_grad_() for t in (h0, R0, W0, b0))
            gen = torch.Generator().manual_seed(15)
            out = op(h, R, W, b, pos, dropout_p=dropout, generator=gen)
            out.backward(g)
            return out.detach(), h.grad, R.grad, W.grad, b.grad

        got, ref = _both(backend, fwd_bwd)
        for gt, rf, what in zip(got, ref, ("out", "dh", "dR", "dW", "db")):
            _close(gt, rf, what)

    return run


def _first_and_last_3(shape):
    batch, seq, _ = shape
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :33] = 0  # the second sequence has 4 real tokens: 2 of its 6 slots are -1
    return reft_positions(mask, "f3+l3")


# ---- optim.cu and paged.cu ----------------------------------------------------------------------


def _steps(make_opt, shapes_dtypes, device, backend, steps=2):
    """Params after ``steps`` steps of make_opt, under ``backend`` and under the reference."""

    def train():
        params = [
            torch.nn.Parameter(_rand(*s, dtype=dt, device=device, seed=20 + i))
            for i, (s, dt) in enumerate(shapes_dtypes)
        ]
        opt = make_opt(params)
        for step in range(steps):
            for i, p in enumerate(params):
                p.grad = _rand(*p.shape, dtype=p.dtype, device=device, seed=100 * step + i, scale=1e-2)
            opt.step()
        return tuple(p.detach() for p in params)

    got, ref = _both(backend, train)
    for i, (g, r) in enumerate(zip(got, ref)):
        _close(g, r, f"param {i}")


def _optim_32bit(device, backend):
    _steps(
        lambda ps: ftk_optim.AdamW(ps, lr=1e-2), [((1001,), torch.float32), ((64, 33), torch.bfloat16)], device, backend
    )
    _steps(
        lambda ps: ftk_optim.Lion(ps, lr=1e-3), [((1001,), torch.float32), ((64, 33), torch.bfloat16)], device, backend
    )


def _optim_8bit(device, backend):
    # 7000 = 27 whole blocks of 256 and one of 88; 4196 bf16 elements: 16 blocks and one of 100.
    shapes = [((100, 70), torch.float32), ((4196,), torch.bfloat16)]
    _steps(lambda ps: ftk_optim.AdamW8bit(ps, lr=1e-2), shapes, device, backend)


def _paged(device, backend):
    if device == "cuda":
        t = ftk_optim.paged_empty((3000,), torch.float32)
        t.copy_(torch.arange(3000, dtype=torch.float32, device=device))
        ftk_optim.prefetch(t, "cpu")
        ftk_optim.prefetch(t)
        assert torch.equal(t.cpu(), torch.arange(3000, dtype=torch.float32)), "paged tensor changed across prefetches"
        del t
    _steps(
        lambda ps: ftk_optim.PagedAdamW8bit(ps, lr=1e-2),
        [((100, 70), torch.float32), ((999,), torch.float32)],
        device,
        backend,
    )


CASES = [
    Case(
        "nf4-bf16-bs64-nested",
        "nf4",
        True,
        "33x71 bf16 (odd numel), G=4, 8-bit absmax",
        _nf4((33, 71), torch.bfloat16, 64, True, "nf4"),
    ),
    Case(
        "fp4-fp32-bs4096",
        "nf4",
        True,
        "5000 fp32, G=256 (smem reduction), partial block",
        _nf4((5000,), torch.float32, 4096, False, "fp4"),
    ),
    Case("nf4-fp16-bs32", "nf4", False, "7x9 fp16 (odd numel), G=2", _nf4((7, 9), torch.float16, 32, False, "nf4")),
    Case(
        "blockwise-8bit-bs512", "nf4", False, "3001 fp32 -> fp16, partial block", _blockwise(3001, 512, torch.float16)
    ),
    Case(
        "lora-tc-bf16",
        "lora_tc",
        True,
        "M=130 K=200 N=72 r=8 bf16, vector W, dropout",
        _lora(130, 200, 72, 8, torch.bfloat16),
    ),
    Case(
        "lora-tc-fp16-oddK",
        "lora_tc",
        False,
        "M=40 K=71 N=33 r=3 fp16 fp4 bs32, per-element W",
        _lora(40, 71, 33, 3, torch.float16, 32, False, "fp4"),
    ),
    Case(
        "lora-simt-fp32",
        "lora_simt",
        True,
        "M=70 K=96 N=80 r=16 fp32, blocks across rows",
        _lora(70, 96, 80, 16, torch.float32),
    ),
    Case(
        "lora-decode-bf16",
        "lora_decode",
        True,
        "M=3 K=528 N=40 r=4 bf16, NW=4, two K chunks",
        _lora(3, 528, 40, 4, torch.bfloat16),
    ),
    Case(
        "lora-decode-fp32-oddK",
        "lora_decode",
        False,
        "M=8 K=77 N=19 r=2 fp32, NW=2, per-element W",
        _lora(8, 77, 19, 2, torch.float32),
    ),
    Case(
        "loreft-bf16-positions",
        "reft",
        True,
        "2x37x200 bf16 rank 4, f3+l3 with -1 slots, dropout",
        _reft((2, 37, 200), 4, torch.bfloat16, _first_and_last_3, 0.1),
    ),
    Case(
        "direft-fp32-all-rows",
        "reft",
        False,
        "45x130 fp32 rank 6 (two rank passes), every row",
        _reft((45, 130), 6, torch.float32, None, 0.0, direct=True),
    ),
    Case("adamw-lion-32bit", "optim_32bit", False, "1001 fp32 (tail of 1) and 64x33 bf16, 2 steps", _optim_32bit),
    Case("adamw8bit", "optim_8bit", True, "100x70 fp32 and 4196 bf16, partial blocks, 2 steps", _optim_8bit),
    Case("paged-adamw8bit", "paged", False, "managed memory, prefetch to host and back, 2 paged steps", _paged),
]
FAMILIES = ("nf4", "lora_tc", "lora_simt", "lora_decode", "reft", "optim_32bit", "optim_8bit", "paged")


def select(subset: str, only: str | None) -> list[Case]:
    """The cases of ``subset`` ("all" or "racecheck"), narrowed to the comma-separated ``only``."""
    if subset not in ("all", "racecheck"):
        raise ValueError(f"--subset must be 'all' or 'racecheck', got {subset!r}")
    cases = [c for c in CASES if subset == "all" or c.racecheck]
    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
        unknown = sorted(set(names) - {c.name for c in CASES})
        if unknown or not names:
            raise ValueError(f"--only: unknown case(s) {unknown or only!r}; known: {', '.join(c.name for c in CASES)}")
        cases = [c for c in cases if c.name in names]
    return cases


def run_cases(cases: list[Case], device: str, backend: str, echo=print) -> int:
    """Runs each case, one line each; returns the number that failed."""
    failed = 0
    for case in cases:
        start = time.perf_counter()
        try:
            with ftk.use_backend(backend):  # the set-up too (FTK_BACKEND may name another backend)
                case.run(device, backend)
            if device == "cuda":
                torch.cuda.synchronize()  # a kernel fault surfaces in its own case
            status, detail = "ok", case.what
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the next case runs
            failed += 1
            status, detail = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ms = (time.perf_counter() - start) * 1e3
        echo(f"{status:<4} {case.name:<24} {case.family:<12} {ms:7.0f} ms  {detail}", flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run small cases of every CUDA kernel family of ftkernels (for compute-sanitizer)."
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="(default: cuda)")
    parser.add_argument(
        "--backend", default=None, help="backend under test (default: FTK_BACKEND, else cuda on cuda, reference on cpu)"
    )
    parser.add_argument("--subset", default="all", help="all (memcheck) or racecheck (default: all)")
    parser.add_argument("--only", default=None, metavar="NAMES", help="comma-separated case names")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument(
        "--selftest", action="store_true", help="every case on the CPU with the reference backend (no GPU needed)"
    )
    args = parser.parse_args(argv)
    if args.selftest:
        args.device, args.backend = "cpu", "reference"
    try:
        cases = select(args.subset, args.only)
    except ValueError as e:
        parser.error(str(e))
    if args.list:
        for c in cases:
            print(f"{c.name:<24} {c.family:<12} {'racecheck' if c.racecheck else '':<9}  {c.what}")
        return 0
    backend = args.backend or os.environ.get("FTK_BACKEND") or ("cuda" if args.device == "cuda" else "reference")
    if backend not in ftk._registry.BACKENDS:
        parser.error(f"--backend must be one of {', '.join(ftk._registry.BACKENDS)}, got {backend!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU (use --selftest on a machine without one)")
    if not ftk._registry.backend_available(backend, args.device):
        parser.error(f"--backend {backend} cannot run on {args.device} here")
    print(f"sanitize_cases: {len(cases)} cases ({args.subset}) on {args.device}, backend {backend}", flush=True)
    failed = run_cases(cases, args.device, backend)
    print(f"sanitize_cases: {len(cases) - failed} ok, {failed} failed", flush=True)
    return FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
