"""Optimizer states in CUDA unified (managed) memory: real torch CUDA tensors the driver can page.

A paged tensor's bytes come from ``cudaMallocManaged`` (csrc/cuda/paged.cu), advised to live
on its GPU: kernels use it like any CUDA tensor, and when the GPU runs short the driver moves
pages to the host instead of failing. :func:`prefetch` moves a tensor's pages ahead of use, on
torch's current stream.

How the memory becomes a tensor. Each allocation is owned by a small object that exposes
``__cuda_array_interface__`` (version 3), and ``torch.as_tensor`` wraps it without copying.
torch's consumer (``tensor_from_cuda_array_interface`` in torch/csrc/utils/tensor_numpy.cpp)
wraps the pointer with ``at::from_blob`` after a ``Py_INCREF`` of the object, and the blob's
deleter drops that reference, so the object, and with it the managed range, lives exactly as
long as the last tensor or view sharing that storage; its ``__del__`` then frees the range and
returns the bytes to the budget. No weakref.finalize is needed on top. Because this is torch's
behaviour rather than a documented promise, :func:`paged_empty` checks at run time that torch
took the reference and did not copy, and refuses to hand out a tensor if a torch release stops
doing either. This was preferred over ``torch.cuda.MemPool`` with a
``CUDAPluggableAllocator``: that needs C symbols loaded by path from the pybind11 module, an
API that has changed between torch releases, and a caching allocator that would keep freed
blocks, so a freed state would not come back to the budget when its tensor dies. (The CUDA
array interface path needs numpy, a dependency of the package already.)

The budget. Over-subscribing managed memory (more managed bytes than the GPU has free) makes
the driver thrash pages between host and GPU, and can stall the GPU for minutes. Allocations
are therefore counted per device against a budget, checked before anything is allocated; a
request past it raises :class:`PagedBudgetError`. The default budget of a device is its free
memory at first use (``cudaMemGetInfo``, measured once, before any paged bytes exist there)
minus a margin of 10% of its total memory, at least 1 GiB: the training step allocates its
activations, gradients and cuBLAS/NCCL workspaces through torch's caching allocator after the
states exist (8 GiB of an 80 GiB H100), and a small GPU still needs room for the CUDA context
and a few workspaces (the 1 GiB floor). :func:`set_paged_budget` replaces it for every device.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Sequence

import torch

from .. import _native

__all__ = [
    "PagedBudgetError",
    "paged_budget",
    "paged_bytes_in_use",
    "paged_empty",
    "prefetch",
    "set_paged_budget",
]

MARGIN_FRACTION = 0.10  # of the GPU's total memory, left to torch's own allocations
MARGIN_MIN_BYTES = 1 << 30  # 1 GiB at least, for small GPUs
CPU_DEVICE_ID = -1  # cudaCpuDeviceId: the host, for managed_prefetch


class PagedBudgetError(MemoryError, RuntimeError):
    """A paged allocation past the budget; raised before anything is allocated.

    A ``MemoryError`` (it is one) and a ``RuntimeError`` (as torch's own out-of-memory error is),
    so either ``except`` catches it.
    """


def default_budget(free: int, total: int) -> int:
    """The default budget of a GPU with ``free`` of ``total`` bytes free at first use."""
    margin = max(MARGIN_MIN_BYTES, int(total * MARGIN_FRACTION))
    return max(int(free) - margin, 0)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


# ---- the native calls (a seam: tests swap in a fake) ----------------------------------------


class _CudaMemory:
    """The four native calls paged memory makes, from the CUDA module."""

    @staticmethod
    def _mod():
        mod = _native.cuda()  # RuntimeError when the CUDA module was not built
        if not hasattr(mod, "managed_alloc"):
            raise RuntimeError(
                "ftkernels' CUDA module was built before paged memory existed (it has no "
                "managed_alloc); rebuild it from source (pip install .)"
            )
        return mod

    def mem_get_info(self, device: int) -> tuple[int, int]:
        return self._mod().mem_get_info(device)

    def alloc(self, nbytes: int, device: int) -> int:
        return self._mod().managed_alloc(nbytes, device)

    def free(self, ptr: int) -> None:
        self._mod().managed_free(ptr)

    def prefetch(self, ptr: int, nbytes: int, device: int, stream: int) -> None:
        self._mod().managed_prefetch(ptr, nbytes, device, stream)


class _Ledger:
    """The budget, the bytes in use per device, and the live allocations; thread-safe.

    NOTE: the lock is reentrant. A paged tensor can die, and its buffer's ``__del__`` return
    bytes here, whenever Python runs the garbage collector, which may be while this same
    thread is inside a locked section (say, building an error message); a plain Lock would
    then deadlock.
    """

    def __init__(self, memory) -> None:
        self.memory = memory
        self._lock = threading.RLock()
        self._override: int | None = None
        self._defaults: dict[int, int] = {}  # device -> default budget, measured at first use
        self._in_use: dict[int, int] = {}  # device -> bytes
        self._live: dict[int, tuple[int, int]] = {}  # pointer -> (bytes, device)

    def set_budget(self, nbytes: int | None) -> None:
        with self._lock:
            self._override = nbytes

    def override(self) -> int | None:
        with self._lock:
            return self._override

    def budget(self, device: int) -> int:
        with self._lock:
            if self._override is not None:
                return self._override
            b = self._defaults.get(device)
            if b is None:  # first use of this device: measured once, before any paged bytes exist
                free, total = self.memory.mem_get_info(device)
                b = self._defaults[device] = default_budget(free, total)
            return b

    def in_use(self, device: int | None = None) -> int:
        with self._lock:
            if device is None:
                return sum(self._in_use.values())
            return self._in_use.get(device, 0)

    def reserve(self, nbytes: int, device: int, what: str = "paged_empty") -> None:
        """Counts nbytes in use on device, or raises PagedBudgetError and counts nothing."""
        with self._lock:
            budget = self.budget(device)
            used = self._in_use.get(device, 0)
            available = max(budget - used, 0)
            if nbytes > available:
                raise PagedBudgetError(
                    f"{what}: {nbytes} bytes ({_mib(nbytes)}) requested on cuda:{device}, but only {available} "
                    f"bytes ({_mib(available)}) of the paged budget are available ({used} of {budget} bytes "
                    "in use); free paged tensors, or raise the budget with "
                    "ftkernels.optim.set_paged_budget(bytes) if the GPU has room (over-subscribing "
                    "managed memory can stall the GPU)"
                )
            self._in_use[device] = used + nbytes

    def unreserve(self, nbytes: int, device: int) -> None:
        with self._lock:
            left = self._in_use.get(device, 0) - nbytes
            if left > 0:
                self._in_use[device] = left
            else:
                self._in_use.pop(device, None)

    def track(self, ptr: int, nbytes: int, device: int) -> None:
        with self._lock:
            self._live[ptr] = (nbytes, device)

    def untrack(self, ptr: int) -> None:
        with self._lock:
            self._live.pop(ptr, None)

    def owner(self, ptr: int) -> tuple[int, int] | None:
        """(bytes, device) of the live paged allocation starting at ptr, else None."""
        with self._lock:
            return self._live.get(ptr)


_ledger = _Ledger(_CudaMemory())


class _ManagedBuffer:
    """Owns one managed allocation. Once wrapped, torch holds the only strong reference; the
    last tensor sharing the storage dropping it frees the range (``__del__``)."""

    __slots__ = ("_ledger", "device", "nbytes", "ptr")

    def __init__(self, ptr: int, nbytes: int, device: int, ledger: _Ledger) -> None:
        self.ptr, self.nbytes, self.device, self._ledger = ptr, nbytes, device, ledger
        ledger.track(ptr, nbytes, device)

    @property
    def __cuda_array_interface__(self) -> dict:
        # Bytes, viewed as the caller's dtype afterwards: the interface has no bfloat16 typestr.
        # stream None: nothing is pending on the range (cudaMallocManaged is synchronous).
        return {
            "shape": (self.nbytes,),
            "typestr": "|u1",
            "data": (self.ptr, False),
            "strides": None,
            "version": 3,
            "stream": None,
        }

    def release(self) -> None:
        """Frees the range once (later calls do nothing). cudaFree synchronises the device, so
        work torch queued on the tensor finishes before the pages go."""
        ptr, self.ptr = self.ptr, 0
        if not ptr:
            return
        try:
            self._ledger.memory.free(ptr)
        finally:  # the pointer is dropped either way; its bytes leave the count with it
            self._ledger.untrack(ptr)
            self._ledger.unreserve(self.nbytes, self.device)

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            if not sys.is_finalizing():  # at exit the CUDA module may already be torn down
                raise


# ---- arguments -------------------------------------------------------------------------------


def _require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"ftkernels.optim.{what} needs a CUDA device, and torch.cuda.is_available() is False "
            "(no GPU, no driver, or a CPU-only torch)"
        )


def _cuda_device(device, what: str) -> torch.device:
    """A CUDA device with its index (the current device when device is None or 'cuda')."""
    _require_cuda(what)
    if isinstance(device, int) and not isinstance(device, bool):
        device = torch.device("cuda", device)
    dev = torch.device("cuda") if device is None else torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"{what}: device must be a CUDA device, got {dev}")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if not 0 <= dev.index < torch.cuda.device_count():
        raise ValueError(f"{what}: device {dev} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return dev


def _check_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (Sequence, torch.Size)) or isinstance(shape, (str, bytes)):
        raise TypeError(f"paged_empty: shape must be an int or a sequence of ints, got {type(shape).__name__}")
    out = []
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"paged_empty: shape must hold ints, got {shape!r}")
        if s < 0:
            raise ValueError(f"paged_empty: shape must not be negative, got {tuple(shape)}")
        out.append(int(s))
    return tuple(out)


# ---- public functions -------------------------------------------------------------------------


def paged_empty(shape: int | Sequence[int], dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """An uninitialised CUDA tensor in managed memory, freed when its last view dies.

    ``device``: a CUDA device (``"cuda:1"``, ``torch.device``, an index); None is the current
    one. The bytes count against the paged budget until the tensor is freed; a request past it
    raises :class:`PagedBudgetError` before anything is allocated. An empty shape allocates
    nothing (a plain empty CUDA tensor) and counts nothing.
    """
    shape = _check_shape(shape)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"paged_empty: dtype must be a torch.dtype, got {dtype!r}")
    dev = _cuda_device(device, "paged_empty")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype, device=dev)
    ledger = _ledger
    ledger.reserve(nbytes, dev.index)
    try:
        ptr = ledger.memory.alloc(nbytes, dev.index)
    except BaseException:
        ledger.unreserve(nbytes, dev.index)
        raise
    buf = _ManagedBuffer(ptr, nbytes, dev.index, ledger)  # from here on, buf's death frees the range
    refs = sys.getrefcount(buf)
    with torch.cuda.device(dev):
        raw = torch.as_tensor(buf, dtype=torch.uint8, device=dev)
    taken = sys.getrefcount(buf) - refs
    if raw.data_ptr() != ptr or taken < 1:
        del raw  # before buf: the range must outlive every tensor on it
        raise RuntimeError(
            "paged_empty: this torch did not wrap __cuda_array_interface__ in place "
            f"({'it copied the data' if taken >= 1 else 'it kept no reference to the owner'}); paged "
            f"memory cannot be handed out safely with torch {torch.__version__}"
        )
    del buf  # torch's reference is now the only one
    return raw.view(dtype).view(shape)


def prefetch(tensor: torch.Tensor, device=None) -> None:
    """Moves the pages of a paged tensor (one from :func:`paged_empty`, or a view of one) to its
    GPU (``device=None``), another GPU, or the host (``device="cpu"``).

    Enqueued on torch's current stream of the tensor's device, so it orders with the torch work
    around it; it never synchronises. Only the bytes the tensor spans move.
    """
    _require_cuda("prefetch")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"prefetch: tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cuda":
        raise ValueError(f"prefetch: tensor must be a paged CUDA tensor (from paged_empty), got one on {tensor.device}")
    if tensor.numel() == 0:
        return
    ledger = _ledger
    if ledger.owner(tensor.untyped_storage().data_ptr()) is None:
        raise ValueError(
            "prefetch: tensor is not in paged memory (it was not made by ftkernels.optim.paged_empty); "
            "only managed memory can be prefetched"
        )
    if device is not None and torch.device(device).type == "cpu":
        target = CPU_DEVICE_ID
    else:
        target = tensor.device.index if device is None else _cuda_device(device, "prefetch").index
    # The span from the first element to one past the last (torch strides are never negative).
    span = (sum((s - 1) * st for s, st in zip(tensor.shape, tensor.stride())) + 1) * tensor.element_size()
    with torch.cuda.device(tensor.device):
        ledger.memory.prefetch(tensor.data_ptr(), span, target, torch.cuda.current_stream(tensor.device).cuda_stream)


def set_paged_budget(nbytes: int | None) -> None:
    """Sets the paged budget, in bytes, of every device; None restores the default (each GPU's
    free memory at first use minus 10% of its total, at least 1 GiB). Lowering it below the
    bytes in use frees nothing; later requests are refused until enough is freed."""
    if nbytes is not None:
        if isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError(f"set_paged_budget: nbytes must be an int or None, got {nbytes!r}")
        if nbytes < 0:
            raise ValueError(f"set_paged_budget: nbytes must be >= 0, got {nbytes}")
    _ledger.set_budget(None if nbytes is None else int(nbytes))


def paged_budget(device=None) -> int:
    """The paged budget of ``device`` (the current CUDA device when None), in bytes: the one set
    with :func:`set_paged_budget`, else the default, measured on first use of the device."""
    override = _ledger.override()
    if override is not None:
        return override
    return _ledger.budget(_cuda_device(device, "paged_budget").index)


def paged_bytes_in_use(device=None) -> int:
    """Bytes of live paged tensors on ``device``, or on every device when None."""
    if device is None:
        return _ledger.in_use()
    if isinstance(device, int) and not isinstance(device, bool):
        return _ledger.in_use(device)
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"paged_bytes_in_use: device must be a CUDA device or None, got {dev}")
    return _ledger.in_use(dev.index if dev.index is not None else _cuda_device(dev, "paged_bytes_in_use").index)
