"""The cases the NF4/FP4 and 8-bit tests share (test_nf4.py, test_nf4_bnb.py): dtypes,
blocksizes, odd shapes with readable ids, and sample inputs with non-finite specials."""

from __future__ import annotations

import pytest
import torch

DTYPES = [pytest.param(d, id=str(d).replace("torch.", "")) for d in (torch.float32, torch.float16, torch.bfloat16)]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
# odd numel, a partial last block, one element, rows that do not align with blocks
SHAPES = [pytest.param(s, id="x".join(map(str, s))) for s in [(0,), (1,), (7,), (4097,), (96, 70), (3, 5001)]]
QUANT_TYPES = ["nf4", "fp4"]


def sample(shape, dtype, seed=0, specials=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.5
    if specials and x.numel() > 300:
        flat = x.view(-1)
        flat[64:128] = 0.0  # an all-zero block at blocksize 32 and 64
        flat[200] = float("nan")  # NaN poisons its block's absmax
        flat[290] = float("-inf")
    return x.to(dtype)
