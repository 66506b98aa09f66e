"""csrc/cuda/paged.cu's launchers on the emulated runtime, whose managed allocations are
tracked: advice and prefetches must lie in one allocation, devices must exist, null and zero
bytes are no-ops (paged_cuda.h). Run by tests/test_cuda_emulated.py with the emulated module
(collected only when named: the file name is not test_*)."""

from __future__ import annotations

import pytest

from ftkernels import _native

pytestmark = pytest.mark.cuda_emulated


@pytest.fixture
def mod():
    return _native.cuda()


def test_alloc_prefetch_both_ways_and_free(mod):
    free0, total = mod.mem_get_info(0)
    ptr = mod.managed_alloc(1000, 0)
    assert ptr != 0 and ptr % 16 == 0
    assert mod.mem_get_info(0) == (free0 - 1000, total)
    mod.managed_prefetch(ptr, 1000, 0, 0)
    mod.managed_prefetch(ptr + 100, 900, -1, 0)  # to the host
    mod.managed_free(ptr)
    assert mod.mem_get_info(0) == (free0, total)


def test_zero_bytes_and_null_are_no_ops(mod):
    assert mod.managed_alloc(0, 0) == 0
    mod.managed_free(0)
    mod.managed_prefetch(0, 100, 0, 0)
    ptr = mod.managed_alloc(64, 0)
    mod.managed_prefetch(ptr, 0, 0, 0)
    mod.managed_free(ptr)


def test_a_prefetch_past_the_allocation_names_the_call(mod):
    ptr = mod.managed_alloc(1000, 0)
    try:
        with pytest.raises(RuntimeError, match="cudaMemPrefetchAsync"):
            mod.managed_prefetch(ptr + 500, 600, 0, 0)
    finally:
        mod.managed_free(ptr)


def test_devices_are_checked_before_anything_runs(mod):
    with pytest.raises(ValueError, match="device 1 is not a CUDA device"):
        mod.managed_alloc(10, 1)
    with pytest.raises(ValueError, match="use -1 for the host"):
        mod.managed_prefetch(0, 0, 3, 0)
    with pytest.raises(ValueError, match="device -1"):
        mod.mem_get_info(-1)


def test_freeing_what_was_not_allocated_names_the_call(mod):
    ptr = mod.managed_alloc(8, 0)
    mod.managed_free(ptr)
    with pytest.raises(RuntimeError, match="cudaFree"):
        mod.managed_free(ptr)
