"""Paged optimizer memory (ftkernels.optim.paged): the budget and its errors against a fake
native layer (runs anywhere), then real managed memory on a GPU (marked cuda; a few MiB at most)."""

from __future__ import annotations

import threading
import types

import pytest
import torch

from ftkernels import _native
from ftkernels.optim import (
    PagedBudgetError,
    paged,
    paged_budget,
    paged_bytes_in_use,
    paged_empty,
    prefetch,
    set_paged_budget,
)

from conftest import HAS_CUDA, cuda_only

GiB, MiB = 1 << 30, 1 << 20


class FakeMemory:
    """Stands in for the CUDA module: records calls, hands out fake pointers."""

    def __init__(self, free: int = 70 * GiB, total: int = 80 * GiB):
        self.free_bytes, self.total_bytes = free, total
        self.info_calls: list[int] = []
        self.allocs: list[tuple[int, int]] = []
        self.freed: list[int] = []
        self.fail_alloc = False
        self._next = 1 << 40

    def mem_get_info(self, device):
        self.info_calls.append(device)
        return self.free_bytes, self.total_bytes

    def alloc(self, nbytes, device):
        self.allocs.append((nbytes, device))
        if self.fail_alloc:
            raise RuntimeError("ftkernels: cudaMallocManaged(&ptr, bytes, cudaMemAttachGlobal) failed: out of memory")
        ptr, self._next = self._next, self._next + nbytes
        return ptr

    def free(self, ptr):
        self.freed.append(ptr)

    def prefetch(self, ptr, nbytes, device, stream):
        raise AssertionError("not used by these tests")


@pytest.fixture
def fake(monkeypatch):
    """A fresh ledger over a fake native layer, with cuda:0 standing in for the device check."""
    mem = FakeMemory()
    monkeypatch.setattr(paged, "_ledger", paged._Ledger(mem))
    monkeypatch.setattr(paged, "_cuda_device", lambda device, what: torch.device("cuda", 0))
    return mem


@pytest.fixture
def fresh_ledger(monkeypatch):
    """The real native layer with a fresh ledger (budget and counters) for one test."""
    ledger = paged._Ledger(paged._CudaMemory())
    monkeypatch.setattr(paged, "_ledger", ledger)
    return ledger


# ---- the budget arithmetic --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("free", "total", "expected"),
    [
        pytest.param(70 * GiB, 80 * GiB, 62 * GiB, id="h100-10pct-margin"),
        pytest.param(6 * GiB, 8 * GiB, 5 * GiB, id="small-gpu-1GiB-floor"),
        pytest.param(GiB // 2, 8 * GiB, 0, id="free-below-margin"),
        pytest.param(0, 0, 0, id="nothing"),
    ],
)
def test_default_budget(free, total, expected):
    assert paged.default_budget(free, total) == expected


def test_default_budget_is_measured_once_per_device():
    mem = FakeMemory(free=10 * GiB, total=20 * GiB)
    ledger = paged._Ledger(mem)
    assert ledger.budget(0) == 8 * GiB  # 10 GiB free - 2 GiB (10% of 20)
    mem.free_bytes = GiB  # later measurements would differ; the first one stands
    ledger.reserve(MiB, 0)
    assert ledger.budget(0) == 8 * GiB
    assert mem.info_calls == [0]
    assert ledger.budget(1) == 0  # a second device is measured on its own first use
    assert mem.info_calls == [0, 1]


def test_override_replaces_the_default_without_measuring():
    mem = FakeMemory()
    ledger = paged._Ledger(mem)
    ledger.set_budget(1000)
    assert ledger.budget(0) == ledger.budget(3) == 1000
    assert mem.info_calls == []
    ledger.set_budget(None)
    assert ledger.budget(0) == paged.default_budget(mem.free_bytes, mem.total_bytes)


def test_reserve_refuses_past_the_budget_and_counts_nothing():
    ledger = paged._Ledger(FakeMemory())
    ledger.set_budget(1000)
    ledger.reserve(600, 0)
    with pytest.raises(PagedBudgetError) as info:
        ledger.reserve(401, 0)
    msg = str(info.value)
    assert "401 bytes" in msg and "requested on cuda:0" in msg
    assert "only 400 bytes" in msg and "600 of 1000 bytes in use" in msg
    assert "set_paged_budget" in msg
    assert ledger.in_use(0) == 600
    ledger.reserve(400, 0)  # exactly the rest fits
    assert ledger.in_use(0) == 1000
    ledger.reserve(1000, 1)  # per device
    assert ledger.in_use() == 2000
    ledger.unreserve(1000, 0)
    ledger.unreserve(1000, 1)
    assert ledger.in_use() == 0


def test_budget_error_is_a_memory_error_and_a_runtime_error():
    assert issubclass(PagedBudgetError, MemoryError)
    assert issubclass(PagedBudgetError, RuntimeError)


def test_lowering_the_budget_below_use_refuses_later_requests():
    ledger = paged._Ledger(FakeMemory())
    ledger.set_budget(1000)
    ledger.reserve(800, 0)
    ledger.set_budget(500)
    with pytest.raises(PagedBudgetError, match="only 0 bytes"):
        ledger.reserve(1, 0)


def test_counter_is_thread_safe():
    ledger = paged._Ledger(FakeMemory())
    ledger.set_budget(10 * 64)
    granted = []
    barrier = threading.Barrier(16)

    def worker():
        barrier.wait()
        for _ in range(200):
            try:
                ledger.reserve(64, 0)
            except PagedBudgetError:
                continue
            granted.append(1)
            assert ledger.in_use(0) <= 10 * 64
            ledger.unreserve(64, 0)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert granted and ledger.in_use() == 0


# ---- the public functions over the fake layer ----------------------------------------------------


def test_paged_empty_refuses_before_allocating(fake):
    set_paged_budget(4 * MiB)
    with pytest.raises(PagedBudgetError, match=r"4194308 bytes .* requested on cuda:0, but only 4194304 bytes"):
        paged_empty((MiB + 1,), torch.float32)
    assert fake.allocs == []
    assert paged_bytes_in_use() == 0


def test_failed_allocation_returns_its_reservation(fake):
    fake.fail_alloc = True
    with pytest.raises(RuntimeError, match="cudaMallocManaged"):
        paged_empty((3, 5), torch.bfloat16)
    assert fake.allocs == [(30, 0)]
    assert paged_bytes_in_use() == 0 and paged_bytes_in_use(0) == 0


def test_buffer_frees_once_and_returns_its_bytes(fake):
    ledger = paged._ledger
    ledger.reserve(96, 0)
    ptr = fake.alloc(96, 0)
    buf = paged._ManagedBuffer(ptr, 96, 0, ledger)
    cai = buf.__cuda_array_interface__
    assert cai["version"] == 3 and cai["data"] == (ptr, False) and cai["shape"] == (96,)
    assert cai["typestr"] == "|u1" and cai["stream"] is None
    assert ledger.owner(ptr) == (96, 0) and paged_bytes_in_use("cuda:0") == 96
    buf.release()
    buf.release()
    assert fake.freed == [ptr] and ledger.owner(ptr) is None and paged_bytes_in_use() == 0
    ledger.reserve(8, 0)
    buf = paged._ManagedBuffer(fake.alloc(8, 0), 8, 0, ledger)
    del buf  # the tensor's deleter dropping the last reference does the same
    assert len(fake.freed) == 2 and paged_bytes_in_use() == 0


def test_paged_budget_uses_the_ledger(fake):
    assert paged_budget() == paged.default_budget(fake.free_bytes, fake.total_bytes)
    set_paged_budget(123)
    assert paged_budget() == 123
    set_paged_budget(None)
    assert paged_budget() == paged.default_budget(fake.free_bytes, fake.total_bytes)


@pytest.mark.parametrize("bad", [1.5, True, "1", [1]], ids=repr)
def test_set_paged_budget_rejects_non_ints(fake, bad):
    with pytest.raises(TypeError, match="set_paged_budget"):
        set_paged_budget(bad)


def test_set_paged_budget_rejects_negatives(fake):
    with pytest.raises(ValueError, match=">= 0"):
        set_paged_budget(-1)


@pytest.mark.parametrize(
    ("shape", "dtype", "error", "match"),
    [
        pytest.param("12", torch.float32, TypeError, "shape", id="str-shape"),
        pytest.param((2, 1.5), torch.float32, TypeError, "shape must hold ints", id="float-dim"),
        pytest.param((2, -1), torch.float32, ValueError, "negative", id="negative-dim"),
        pytest.param((2,), "float32", TypeError, "dtype", id="str-dtype"),
    ],
)
def test_paged_empty_checks_its_arguments(shape, dtype, error, match):
    with pytest.raises(error, match=match):
        paged_empty(shape, dtype)


def test_stale_cuda_module_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_native, "cuda", lambda: types.SimpleNamespace())
    with pytest.raises(RuntimeError, match="built before paged memory.*rebuild"):
        paged._CudaMemory().mem_get_info(0)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error raised without a GPU")
@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: paged_empty((4,)), id="paged_empty"),
        pytest.param(lambda: prefetch(torch.zeros(4)), id="prefetch"),
        pytest.param(lambda: paged_budget(), id="paged_budget"),
    ],
)
def test_without_cuda_the_functions_say_so(fresh_ledger, call):
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        call()
    assert paged_bytes_in_use() == 0


# ---- real managed memory (a few MiB at most) -------------------------------------------------------


@cuda_only
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8], ids=str)
@pytest.mark.parametrize("shape", [(1,), (7,), (96, 70), (3, 5, 33)], ids=str)
def test_cuda_paged_tensor_is_a_cuda_tensor(fresh_ledger, shape, dtype):
    t = paged_empty(shape, dtype)
    assert t.is_cuda and t.device == torch.device("cuda", torch.cuda.current_device())
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
    nbytes = t.numel() * t.element_size()
    assert paged_bytes_in_use() == nbytes
    assert fresh_ledger.owner(t.untyped_storage().data_ptr()) == (nbytes, t.device.index)
    # Written and read by torch kernels, as an optimizer state would be.
    src = torch.arange(t.numel(), device="cuda").reshape(shape).to(dtype)
    t.copy_(src)
    if dtype.is_floating_point:
        t.mul_(0.5).add_(1)
        src = src * 0.5 + 1
    torch.testing.assert_close(t, src, rtol=0, atol=0)
    torch.testing.assert_close(t.cpu(), src.cpu(), rtol=0, atol=0)
    del t
    assert paged_bytes_in_use() == 0


@cuda_only
@pytest.mark.cuda
def test_cuda_prefetch_both_ways(fresh_ledger):
    t = paged_empty((256, 1024), torch.float32)  # 1 MiB
    t.normal_()
    want = t.clone()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # enqueued on torch's current stream, which is this one
        prefetch(t, "cpu")
        prefetch(t[::2, 3:], device="cpu")  # a strided view prefetches the span it covers
        t.add_(1)  # ordered after the prefetch on the same stream; pages fault back to the GPU
        prefetch(t)
        prefetch(t[7], torch.device("cuda", t.device.index))
    stream.synchronize()
    torch.testing.assert_close(t, want + 1, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not in paged memory"):
        prefetch(torch.zeros(4, device="cuda"))
    with pytest.raises(ValueError, match="paged CUDA tensor"):
        prefetch(torch.zeros(4))
    prefetch(t[:0])  # empty: nothing to move


@cuda_only
@pytest.mark.cuda
def test_cuda_freed_when_the_last_view_dies(fresh_ledger):
    t = paged_empty((64, 64), torch.float32)
    view = t[1:, ::3]
    flat = t.view(-1)
    nbytes = 64 * 64 * 4
    del t
    assert paged_bytes_in_use() == nbytes
    flat.fill_(2)
    assert view.sum().item() == 2 * view.numel()
    del flat
    assert paged_bytes_in_use() == nbytes
    del view
    assert paged_bytes_in_use() == 0
    # Many allocate/free rounds return to zero (no leak in the count or the driver).
    for _ in range(32):
        paged_empty((1024,), torch.float16).zero_()
    torch.cuda.synchronize()
    assert paged_bytes_in_use() == 0


@cuda_only
@pytest.mark.cuda
def test_cuda_budget_refusal(fresh_ledger):
    set_paged_budget(2 * MiB)
    a = paged_empty((MiB,), torch.uint8)
    b = paged_empty((MiB // 2,), torch.float16)  # exactly the rest
    assert paged_bytes_in_use() == 2 * MiB
    with pytest.raises(PagedBudgetError, match=r"4 bytes .* requested on cuda:\d, but only 0 bytes"):
        paged_empty((1,), torch.float32)
    del a
    c = paged_empty((MiB // 4,), torch.float32)  # fits again once a is freed
    assert paged_bytes_in_use() == 2 * MiB
    del b, c
    assert paged_bytes_in_use() == 0


@cuda_only
@pytest.mark.cuda
def test_cuda_default_budget_and_empty_tensors(fresh_ledger):
    free, total = torch.cuda.mem_get_info()
    budget = paged_budget()
    # Measured at this first use: free memory minus max(1 GiB, 10% of total), give or take what
    # moved between the two measurements.
    assert abs(budget - paged.default_budget(free, total)) <= 64 * MiB
    assert budget <= max(total - max(GiB, total // 10), 0)
    e = paged_empty((0, 5), torch.float32)
    assert e.is_cuda and e.shape == (0, 5) and paged_bytes_in_use() == 0
    prefetch(e)
