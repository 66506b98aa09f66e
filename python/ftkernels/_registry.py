"""The op registry: the one ``torch.library`` of the package, backend selection and dispatch.

How a call flows: ``torch.ops.ftk.<op>`` -> the dispatcher impl that :func:`define` registered
for the tensor's device -> the op's check (``_ops/<family>.py``: the argument contract, shared
by every backend) -> the kernel that ``backends/<name>.py`` registered with
:func:`register_kernel` for the selected backend.

Backends: ``cuda`` (C++/CUDA module), ``triton``, ``cpu`` (C++ module) and ``reference``
(pure torch, the test oracle, and the path for any device torch supports). The default for
each device is :data:`_DEFAULT_ORDER`'s first available backend (docs/ARCHITECTURE.md,
"Backends"); ``FTK_BACKEND`` or :func:`set_backend` overrides it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch

LIB = torch.library.Library("ftk", "DEF")  # noqa: TOR901 - the one library of the package

BACKENDS = ("cuda", "triton", "cpu", "reference")

_KERNELS: dict[tuple[str, str], Callable] = {}
_AVAILABLE: dict[str, Callable[[str], bool]] = {}
_CHECKS: dict[str, Callable] = {}
_KERNEL_OF: dict[str, str] = {}  # each defined op (``op.overload`` for an overload) -> the kernel it runs
_override: str | None = None


# ---- backend selection ---------------------------------------------------------------------


def register_kernel(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements ``ftk::op`` for ``backend`` (called with checked args)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn: Callable) -> Callable:
        _KERNELS[(op, backend)] = fn
        return fn

    return deco


def set_backend(name: str | None) -> None:
    """Force one backend for every op (``None`` restores the defaults)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    global _override
    _override = name


def get_backend() -> str | None:
    """The forced backend: :func:`set_backend`'s, else ``FTK_BACKEND``'s, else ``None``."""
    if _override is not None:
        return _override
    env = os.environ.get("FTK_BACKEND", "").strip().lower()
    if not env:
        return None
    if env not in BACKENDS:
        raise ValueError(f"FTK_BACKEND must be one of {BACKENDS}, got {env!r}")
    return env


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager form of :func:`set_backend`."""
    global _override
    old = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = old


def register_backend(backend: str, available: Callable[[str], bool]) -> None:
    """``available(device_type)`` says whether ``backend`` can run here and now (each backend
    module registers its own at import, so the registry imports none of them)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _AVAILABLE[backend] = available


def has_kernel(kernel: str, backend: str) -> bool:
    """Whether ``backend`` registered a kernel named ``kernel`` (:func:`defined_ops` names them)."""
    return (kernel, backend) in _KERNELS


def backend_available(backend: str, device_type: str) -> bool:
    """Whether ``backend`` can run on tensors of ``device_type`` here and now."""
    available = _AVAILABLE.get(backend)
    return available is not None and bool(available(device_type))


# The backends each device tries, first available first. CPU: measured, `cpu` is faster than
# `reference` for every op (README, "Backends"). CUDA: NOT measured, since no GPU has run these
# kernels yet; `cuda` comes first because it is the one written for the GPU (fused, no
# run-time compilation), `triton` second. What decides it is `ftk bench --device cuda`
# (benchmarks/gpu/verify.sh) op by op: the order becomes the faster backend's per op once those
# figures exist.
_DEFAULT_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


def select_backend(op: str, device_type: str) -> str:
    forced = get_backend()
    if forced is not None:
        if (op, forced) not in _KERNELS:
            raise NotImplementedError(f"ftk::{op} has no {forced!r} kernel")
        if not backend_available(forced, device_type):
            raise RuntimeError(
                f"backend {forced!r} (from FTK_BACKEND or set_backend) cannot run ftk::{op} on "
                f"{device_type} tensors here"
                + (" (Triton runs on the CPU only with TRITON_INTERPRET=1)" if forced == "triton" else "")
            )
        return forced
    for backend in _DEFAULT_ORDER.get(device_type, ("reference",)):
        if (op, backend) in _KERNELS and backend_available(backend, device_type):
            return backend
    return "reference"


def _dispatch(name: str, kernel: str | None = None) -> Callable:
    op, _, overload = name.partition(".")  # an ``.out`` overload runs its op's kernel with out=
    op = kernel or op  # ops that normalise to one computation share a kernel (loreft, direft)

    def impl(*args, **kwargs):
        device_type = _device_of(args).type
        checked = _CHECKS[name](*args, **kwargs)
        if overload == "out":  # mutates out and returns nothing, as custom ops must
            *checked, out = checked
            _KERNELS[(op, select_backend(op, device_type))](*checked, out=out)
            return None
        return _KERNELS[(op, select_backend(op, device_type))](*checked)

    impl.__name__ = f"{name.replace('.', '_')}_impl"
    return impl


def _device_of(args: Sequence) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    raise TypeError("no tensor argument")


def define(name: str, schema: str, fake: Callable, check: Callable, kernel: str | None = None) -> None:
    """Defines ``ftk::name``; its impl runs ``check`` then the kernel registered as ``kernel``
    (default: ``name``) for the selected backend."""
    LIB.define(f"{name}{schema}")
    torch.library.register_fake(f"ftk::{name}", fake, lib=LIB)
    _CHECKS[name] = check
    _KERNEL_OF[name] = kernel or name.partition(".")[0]
    impl = _dispatch(name, kernel)
    # Backend-specific keys first; CompositeExplicitAutograd catches every other device
    # (mps, xpu, ...), which the reference backend serves.
    for key in ("CPU", "CUDA", "CompositeExplicitAutograd"):
        LIB.impl(name, impl, key)


def defined_ops() -> dict[str, str]:
    """Every op :func:`define` defined, in order, with the kernel it runs (the name that
    :func:`select_backend` and :func:`has_kernel` take): ``loreft`` -> ``reft_forward``,
    ``dequantize_4bit.out`` -> ``dequantize_4bit``."""
    return dict(_KERNEL_OF)


def arguments(op: str) -> type:
    """A NamedTuple class of ``ftk::op``'s schema arguments, in schema order, with the schema's
    defaults: checks, fakes and autograd unpack their arguments with it (the dispatcher drops
    trailing arguments left at their defaults) and build the gradient tuple by name, so a new
    schema argument can never shift them."""
    if op not in _ARGUMENTS:
        schema = getattr(torch.ops.ftk, op).default._schema
        fields = [(a.name, object) for a in schema.arguments]
        defaults = [a.default_value for a in schema.arguments if a.has_default_value()]
        cls = NamedTuple(f"{op}_arguments", fields)
        cls.__new__.__defaults__ = tuple(defaults) or None  # the schema's defaults trail
        _ARGUMENTS[op] = cls
    return _ARGUMENTS[op]


def gradients(op: str, **grads) -> tuple:
    """The backward's result for ``ftk::op``: each named input's gradient, ``None`` elsewhere."""
    fields = arguments(op)._fields
    unknown = set(grads) - set(fields)
    if unknown:
        raise KeyError(f"ftk::{op} has no argument {sorted(unknown)}")
    return tuple(grads.get(name) for name in fields)


_ARGUMENTS: dict[str, type] = {}
