"""The self-test of ``ftk doctor``: every op, forward and backward, on every backend that can run
on each device here, against the reference backend, on small odd shapes.

Shapes: a (37, 69) tensor (odd numel 2553: half a byte of padding, and a partial last block at
blocksize 64 and 256), LoRA rank 3 over a (37, 69) double-quantized NF4 weight, ReFT rank 3
over d = 69 with -1 slots, three optimizer steps over 2553 elements (ten 256-blocks, the last
partial). Dropout is on (p = 0.1) wherever an op has it, so the hashed masks are checked too.

Tolerances are the tests' (docs/ARCHITECTURE.md, "Tests"), relative to each dtype's own error:

- quantization, both directions (``exact``): bit-exact, the codes and values of the reference;
- LoRA and ReFT, values and every gradient (``oracle``): the error against the reference run
  in float64 is at most 2x the error of plain torch autograd in the same dtype, plus 1e-6;
- optimizer steps (``optim``): params and states within 16 fp32 ulps (fp32) or one ulp of the
  16-bit dtype of the reference's; the 8-bit states' codes equal but for 1 in 1000 (an fp32
  value that differs in its last bit may round to the other code at a tie).

An error is ``||out - ref|| / ||ref||`` for values and the fraction of elements that differ for
codes (integer outputs). On 2 cores the CPU rows take 0.4-1.5 s; the Triton rows, interpreted on
the CPU (TRITON_INTERPRET=1), ~3.5 s more.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from .. import _native, _registry
from .._formats import OPTIM_BLOCK, QUANT_TYPES, dropout_scale
from ..backends import reference
from ..functional import create_dynamic_map, dequantize_4bit, quantize_nf4

SHAPE = (37, 69)
BLOCKSIZE, BLOCKSIZE_8BIT, RANK, DROPOUT = 64, 256, 3, 0.1
DTYPES = (torch.float32, torch.bfloat16)
# The backends each device's rows test; the reference is the oracle of every row.
BACKENDS = {"cpu": ("cpu", "triton"), "cuda": ("cuda", "triton")}
ORACLE_FACTOR, ORACLE_EPS = 2.0, 1e-6
CODES_DIFFERING = 1e-3  # the 8-bit optimizer states: fraction of codes that may differ at ties


class Case(NamedTuple):
    """One op's test: ``run(device, dtype, float64)`` returns its named outputs and gradients;
    inputs are made in ``dtype``, then (for the float64 oracle) widened. ``plain(device,
    dtype)``, for the oracle cases, computes the same in plain torch autograd in ``dtype``."""

    op: str
    covers: tuple[str, ...]  # the ops it runs: the op, its backward op, its overloads
    kind: str  # exact | oracle | optim
    run: Callable[[torch.device, torch.dtype, bool], dict[str, torch.Tensor]]
    plain: Callable[[torch.device, torch.dtype], dict[str, torch.Tensor]] | None = None


class Row(NamedTuple):
    op: str
    device: str
    backend: str
    dtype: str
    result: str  # pass | fail | unavailable
    error: float | None  # the error of the output closest to failing (highest error / tolerance)
    tolerance: float | None  # that output's
    worst: str  # that output's name
    note: str  # why it failed or is unavailable


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _seed() -> torch.Tensor:
    return torch.tensor([0x5EED5EED1], dtype=torch.int64)  # a dropout seed (on the CPU, as ops take it)


def _weight(device: torch.device):
    """The (37, 69) NF4 weight with double quantization, quantized by the reference."""
    with _registry.use_backend("reference"):
        return quantize_nf4(
            torch.randn(SHAPE, generator=_gen(2)).to(device), blocksize=BLOCKSIZE, compress_statistics=True
        )


def _weight_args(packed, qs) -> tuple:
    """The 4-bit weight's schema arguments (packed ... nested_blocksize), dtype left out."""
    return (packed, qs.absmax, qs.blocksize, qs.quant_type, list(qs.shape)), (
        qs.state2.absmax,
        qs.state2.code,
        qs.offset.reshape(1),
        qs.state2.blocksize,
    )


def _leaves(inputs: dict, wide: bool) -> dict:
    """The float inputs as fresh leaves requiring grad (widened to float64 if ``wide``)."""
    return {k: (t.double() if wide else t.clone()).requires_grad_() for k, t in inputs.items()}


def _grads(outputs: dict, leaves: dict) -> dict:
    return {**outputs, **{f"d{k}": t.grad for k, t in leaves.items()}}


def _run_quantize_4bit(device, dtype, wide):
    A = torch.randn(SHAPE, generator=_gen(1)).to(device, dtype)
    out = {}
    for qt in QUANT_TYPES:
        out[f"packed {qt}"], out[f"absmax {qt}"] = torch.ops.ftk.quantize_4bit(A, BLOCKSIZE, qt)
    return out


def _run_dequantize_4bit(device, dtype, wide):
    packed, qs = _weight(device)
    head, nested = _weight_args(packed, qs)
    into = torch.empty(SHAPE, dtype=dtype, device=device)
    torch.ops.ftk.dequantize_4bit.out(*head, dtype, *nested, out=into)
    with _registry.use_backend("reference"):
        fp4, fp4_absmax = torch.ops.ftk.quantize_4bit(torch.randn(SHAPE, generator=_gen(3)).to(device), 128, "fp4")
    return {
        "nested nf4": torch.ops.ftk.dequantize_4bit(*head, dtype, *nested),
        "out=": into,
        "fp4": torch.ops.ftk.dequantize_4bit(fp4, fp4_absmax, 128, "fp4", list(SHAPE), dtype),
    }


def _run_quantize_blockwise(device, dtype, wide):
    A = torch.randn(SHAPE, generator=_gen(4)).to(device, dtype)
    q, absmax = torch.ops.ftk.quantize_blockwise(A, create_dynamic_map().to(device), BLOCKSIZE_8BIT)
    return {"codes": q, "absmax": absmax}


def _run_dequantize_blockwise(device, dtype, wide):
    code = create_dynamic_map().to(device)
    with _registry.use_backend("reference"):
        A = torch.randn(SHAPE, generator=_gen(5)).to(device)
        q, absmax = torch.ops.ftk.quantize_blockwise(A, code, BLOCKSIZE_8BIT)
    return {"values": torch.ops.ftk.dequantize_blockwise(q, absmax, code, BLOCKSIZE_8BIT, dtype)}


def _lora_inputs(device, dtype):
    n, k = SHAPE
    g = _gen(6)
    shapes = {"x": (2, 5, k), "A": (RANK, k), "B": (n, RANK), "bias": (n,)}
    scales = {"x": 1.0, "A": k**-0.5, "B": 0.5, "bias": 1.0}
    inputs = {name: (torch.randn(size, generator=g) * scales[name]).to(device, dtype) for name, size in shapes.items()}
    return inputs, torch.randn(2, 5, n, generator=g).to(device, dtype)


def _run_lora(device, dtype, wide):
    head, nested = _weight_args(*_weight(device))
    inputs, dy = _lora_inputs(device, dtype)
    t = _leaves(inputs, wide)
    y = torch.ops.ftk.lora_linear_4bit(t["x"], *head, *nested, t["A"], t["B"], 1.75, t["bias"], DROPOUT, _seed())
    y.backward(dy.to(y.dtype))
    return _grads({"y": y}, t)


def _plain_lora(device, dtype):
    """The layer in plain torch autograd in ``dtype`` with the same mask: the dtype's own error."""
    packed, qs = _weight(device)
    with _registry.use_backend("reference"):
        W = dequantize_4bit(packed, qs).to(dtype)
    inputs, dy = _lora_inputs(device, dtype)
    t = _leaves(inputs, False)
    x2 = t["x"].reshape(-1, SHAPE[1])
    keep = reference.dropout_keep(x2.shape[0], x2.shape[1], DROPOUT, int(_seed()), device)
    xd = torch.where(keep, x2 * dropout_scale(DROPOUT), torch.zeros((), dtype=dtype, device=device))
    y = x2 @ W.T + 1.75 * ((xd @ t["A"].T) @ t["B"].T) + t["bias"]
    y = y.reshape(2, 5, SHAPE[0])
    y.backward(dy)
    return _grads({"y": y}, t)


POSITIONS = [[0, 4, -1], [8, -1, 2]]  # (batch, k) slots of h (2, 9, d); -1 edits nothing


def _reft_inputs(op, device, dtype):
    d = SHAPE[1]
    g = _gen(7)
    first = torch.linalg.qr(torch.randn(d, RANK, generator=g, dtype=torch.float64))[0].T.float()  # R: orthonormal rows
    names = ("R", "W") if op == "loreft" else ("W1", "W2")
    inputs = {
        "h": torch.randn(2, 9, d, generator=g),
        names[0]: first if op == "loreft" else torch.randn(RANK, d, generator=g) / d**0.5,
        names[1]: torch.randn(RANK, d, generator=g) / d**0.5,
        "b": torch.randn(RANK, generator=g),
    }
    grad = torch.randn(2, 9, d, generator=g)
    return {k: v.to(device, dtype) for k, v in inputs.items()}, grad.to(device, dtype), names


def _reft_runner(op: str) -> Callable:
    def run(device, dtype, wide):
        inputs, grad, names = _reft_inputs(op, device, dtype)
        t = _leaves(inputs, wide)
        positions = torch.tensor(POSITIONS, device=device)
        # z, the forward's saved state, is checked through the gradients that read it.
        out, _ = getattr(torch.ops.ftk, op)(t["h"], t[names[0]], t[names[1]], t["b"], positions, DROPOUT, _seed())
        out.backward(grad.to(out.dtype))
        return _grads({"out": out}, t)

    return run


def _plain_reft(op: str) -> Callable:
    """The edit in plain torch autograd in ``dtype``, row by row with gather and index_add."""

    def plain(device, dtype):
        inputs, grad, names = _reft_inputs(op, device, dtype)
        t = _leaves(inputs, False)
        h = t["h"]
        d, seq = h.shape[-1], h.shape[-2]
        rows = torch.tensor([i * seq + q for i, row in enumerate(POSITIONS) for q in row if q >= 0], device=device)
        h2 = h.reshape(-1, d)
        x = h2[rows]
        P, Q, b = t[names[0]], t[names[1]], t["b"]
        edit = (x @ Q.T + b - x @ P.T) @ P if op == "loreft" else (x @ P.T + b) @ Q
        keep = reference.dropout_keep(rows, d, DROPOUT, int(_seed()), device)
        edit = torch.where(keep, edit * dropout_scale(DROPOUT), torch.zeros((), dtype=dtype, device=device))
        out = h2.index_add(0, rows, edit).reshape(h.shape)
        out.backward(grad)
        return _grads({"out": out}, t)

    return plain


def _steps(device, dtype, seed):
    """(param, the three gradients) of an optimizer case."""
    g = _gen(seed)
    param = torch.randn(SHAPE, generator=g).to(device, dtype)
    return param, [torch.randn(SHAPE, generator=g).to(device, dtype) for _ in range(3)]


def _run_adamw(device, dtype, wide):
    param, grads = _steps(device, dtype, 8)
    m, v = (torch.zeros(SHAPE, device=device) for _ in range(2))
    for t, grad in enumerate(grads, 1):
        torch.ops.ftk.adamw_step(param, grad, m, v, 1e-2, 0.9, 0.999, 1e-8, 0.1, t)
    return {"param": param, "exp_avg": m, "exp_avg_sq": v}


def _run_lion(device, dtype, wide):
    param, grads = _steps(device, dtype, 9)
    m = torch.zeros(SHAPE, device=device)
    for grad in grads:
        torch.ops.ftk.lion_step(param, grad, m, 1e-3, 0.9, 0.99, 0.1)
    return {"param": param, "exp_avg": m}


def _run_adamw8bit(device, dtype, wide):
    param, grads = _steps(device, dtype, 10)
    blocks = -(-param.numel() // OPTIM_BLOCK)
    states = [torch.zeros(SHAPE, dtype=torch.uint8, device=device) for _ in range(2)]
    absmax = [torch.zeros(blocks, device=device) for _ in range(2)]
    codes = create_dynamic_map().to(device), create_dynamic_map(signed=False).to(device)
    for t, grad in enumerate(grads, 1):
        torch.ops.ftk.adamw8bit_step(param, grad, *states, *absmax, *codes, 1e-3, 0.9, 0.999, 1e-8, 0.01, t)
    return {"param": param, "state1": states[0], "state2": states[1], "absmax1": absmax[0], "absmax2": absmax[1]}


CASES = (
    Case("quantize_4bit", ("quantize_4bit",), "exact", _run_quantize_4bit),
    Case("dequantize_4bit", ("dequantize_4bit", "dequantize_4bit.out"), "exact", _run_dequantize_4bit),
    Case("quantize_blockwise", ("quantize_blockwise",), "exact", _run_quantize_blockwise),
    Case("dequantize_blockwise", ("dequantize_blockwise",), "exact", _run_dequantize_blockwise),
    Case("lora_linear_4bit", ("lora_linear_4bit", "lora_linear_4bit_backward"), "oracle", _run_lora, _plain_lora),
    Case("loreft", ("loreft", "reft_backward"), "oracle", _reft_runner("loreft"), _plain_reft("loreft")),
    Case("direft", ("direft", "reft_backward"), "oracle", _reft_runner("direft"), _plain_reft("direft")),
    Case("adamw_step", ("adamw_step",), "optim", _run_adamw),
    Case("lion_step", ("lion_step",), "optim", _run_lion),
    Case("adamw8bit_step", ("adamw8bit_step",), "optim", _run_adamw8bit),
)


# ---- comparison ------------------------------------------------------------------------------


def _error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| (||got - ref|| where ref is 0); the fraction of differing
    elements for integer tensors; inf when the shapes differ."""
    if got.shape != ref.shape:
        return math.inf
    if not ref.is_floating_point():
        return (got != ref).double().mean().item() if ref.numel() else 0.0
    diff = torch.linalg.vector_norm(got.double() - ref.double()).item()
    norm = torch.linalg.vector_norm(ref.double()).item()
    return diff / norm if norm > 0 else diff


def _optim_tolerance(t: torch.Tensor) -> float:
    if not t.is_floating_point():
        return CODES_DIFFERING
    if t.dtype == torch.float32:
        return 16 * torch.finfo(torch.float32).eps
    return torch.finfo(t.dtype).eps  # one ulp of a 16-bit rounding of nearly the same value


def _run(case: Case, device: torch.device, dtype: torch.dtype, backend: str, wide: bool = False):
    with _registry.use_backend(backend), torch.enable_grad():
        return {k: v.detach() for k, v in case.run(device, dtype, wide).items()}


def _judge(case: Case, got: dict, refs: dict) -> tuple[str, float | None, float | None, str, str]:
    """(result, error, tolerance, output, note) of the output closest to failing."""
    worst = None
    for name, ref in refs["ref"].items():
        out, want = got.get(name), refs["dtypes"][name]
        if out is None or out.dtype != want:
            return "fail", None, None, name, f"{name}: {'missing' if out is None else out.dtype}, not {want}"
        err = _error(out, ref)
        if case.kind == "exact":
            tol = 0.0
        elif case.kind == "optim":
            tol = _optim_tolerance(ref)
        else:
            tol = ORACLE_FACTOR * refs["own"][name] + ORACLE_EPS
        ok = err <= tol  # False for NaN
        badness = (not ok, err / tol if tol > 0 else (math.inf if err > 0 else 0.0), err)
        if worst is None or badness > worst[0]:
            worst = (badness, err, tol, name)
    _, err, tol, name = worst
    if err <= tol:
        return "pass", err, tol, name, ""
    return "fail", err, tol, name, f"{name}: error {err:.3g} > tolerance {tol:.3g}"


def _references(case: Case, device: torch.device, dtype: torch.dtype) -> dict:
    """The reference's outputs (float64 for the oracle cases, with plain torch's error in
    ``dtype`` against them), and the dtype each output must have."""
    ref = _run(case, device, dtype, "reference")
    refs = {"ref": ref, "dtypes": {k: v.dtype for k, v in ref.items()}}
    if case.kind == "oracle":
        oracle = _run(case, device, dtype, "reference", wide=True)
        with torch.enable_grad():
            own = {k: v.detach() for k, v in case.plain(device, dtype).items()}
        refs.update(ref=oracle, own={k: _error(own[k], v) for k, v in oracle.items()})
    return refs


def first_line(e: BaseException) -> str:
    """``Type: the message's first line``: an error in one line."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def unavailable_reason(backend: str, device_type: str) -> str:
    """Why ``backend`` cannot run on ``device_type`` here (it has no kernels there, its module
    is not built, Triton is missing or not interpreted)."""
    if backend == "triton":
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on the CPU only under TRITON_INTERPRET=1"
        if device_type == "cuda" and not torch.cuda.is_available():
            return "no usable GPU"
        return "triton does not import"
    module = {"cpu": "_ftk_cpu", "cuda": "_ftk_cuda"}.get(backend)
    if module is not None:
        mod, err = _native.load_status(module)
        if mod is None:
            return f"{module} not built: {first_line(err)}" if err else f"{module} not built"
        if backend == "cuda" and device_type == "cuda":
            return "no usable GPU"
    return f"{backend} does not run on {device_type}"


def _row(case: Case, device_type: str, backend: str, dt: str, result: str, note: str, *judged) -> Row:
    err, tol, name = judged or (None, None, "")
    return Row(case.op, device_type, backend, dt, result, err, tol, name, note)


def run_selftest(device_types: list[str]) -> dict:
    """Every case on every (device, backend, dtype) of ``device_types``: {rows, seconds}."""
    t0 = time.perf_counter()
    rows = []
    for case in CASES:
        kernels = [_registry.defined_ops()[op] for op in case.covers]
        for device_type in device_types:
            device = torch.device(device_type)
            for dtype in DTYPES:
                dt = str(dtype).removeprefix("torch.")
                refs = None  # computed for the first backend that runs
                for backend in BACKENDS[device_type]:
                    if not all(_registry.has_kernel(k, backend) for k in kernels):
                        rows.append(_row(case, device_type, backend, dt, "unavailable", "no kernel"))
                        continue
                    if not _registry.backend_available(backend, device_type):
                        reason = unavailable_reason(backend, device_type)
                        rows.append(_row(case, device_type, backend, dt, "unavailable", reason))
                        continue
                    if refs is None:
                        try:
                            refs = _references(case, device, dtype)
                        except Exception as e:  # the oracle itself fails: so does every row of it
                            refs = f"reference: {first_line(e)}"
                    if isinstance(refs, str):
                        rows.append(_row(case, device_type, backend, dt, "fail", refs))
                        continue
                    try:
                        result, err, tol, name, note = _judge(case, _run(case, device, dtype, backend), refs)
                    except Exception as e:
                        result, err, tol, name, note = "fail", None, None, "", first_line(e)
                    rows.append(_row(case, device_type, backend, dt, result, note, err, tol, name))
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def untested_ops() -> list[str]:
    """The defined ops that no case runs (empty while CASES covers the registry)."""
    covered = {op for case in CASES for op in case.covers}
    return [op for op in _registry.defined_ops() if op not in covered]
