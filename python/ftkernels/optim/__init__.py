"""Optimizers with fused steps (AdamW, 8-bit AdamW, Lion), optionally paged: states in CUDA
unified (managed) memory, which the driver pages between GPU and host."""

from .optimizers import AdamW, AdamW8bit, Lion, PagedAdamW, PagedAdamW8bit, PagedLion
from .paged import PagedBudgetError, paged_budget, paged_bytes_in_use, paged_empty, prefetch, set_paged_budget

__all__ = [
    "AdamW",
    "AdamW8bit",
    "Lion",
    "PagedAdamW",
    "PagedAdamW8bit",
    "PagedBudgetError",
    "PagedLion",
    "paged_budget",
    "paged_bytes_in_use",
    "paged_empty",
    "prefetch",
    "set_paged_budget",
]
