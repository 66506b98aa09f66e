"""Backend kernels, each registered in ftkernels._registry with register_kernel(op, backend)."""

from . import cpu, cuda, reference, triton  # noqa: F401  (importing registers the kernels)
