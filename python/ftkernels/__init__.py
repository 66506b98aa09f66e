"""ftkernels: kernels for fine-tuning LLMs on one GPU.

NF4/FP4 4-bit weights with double-quantized constants (byte-compatible with bitsandbytes),
each op in CUDA C++, Triton, C++ CPU and pure torch behind one torch.library registry.
"""

from . import (
    _ops,  # noqa: F401  (defines torch.ops.ftk.*)
    backends,  # noqa: F401  (registers the kernels)
    nn,  # noqa: F401  (ftkernels.nn.LinearNF4)
    optim,  # noqa: F401  (ftkernels.optim.PagedAdamW8bit)
)
from ._registry import get_backend, set_backend, use_backend
from .functional import (
    create_dynamic_map,
    dequantize_4bit,
    dequantize_blockwise,
    dequantize_fp4,
    dequantize_nf4,
    direft,
    get_4bit_type,
    lora_linear_4bit,
    loreft,
    quantize_4bit,
    quantize_blockwise,
    quantize_fp4,
    quantize_nf4,
)
from .quant_state import QuantState

__version__ = "0.1.0"

__all__ = [
    "QuantState",
    "create_dynamic_map",
    "dequantize_4bit",
    "dequantize_blockwise",
    "dequantize_fp4",
    "dequantize_nf4",
    "direft",
    "get_4bit_type",
    "get_backend",
    "lora_linear_4bit",
    "loreft",
    "quantize_4bit",
    "quantize_blockwise",
    "quantize_fp4",
    "quantize_nf4",
    "set_backend",
    "use_backend",
]
