"""The ops, one module per family: schema, argument check, fake and autograd of each.

Importing this package defines every ``torch.ops.ftk.*`` op in the registry (``_registry``):

- ``quant``: quantize_4bit, dequantize_4bit (and .out), quantize_blockwise, dequantize_blockwise
- ``lora``: lora_linear_4bit, lora_linear_4bit_backward
- ``reft``: loreft, direft, reft_backward
- ``optim``: adamw_step, lion_step, adamw8bit_step

A backend (``backends/``) registers kernels for these ops; it receives what the op's check
returned. The NF4 ops have no autograd; the LoRA and ReFT ops attach theirs with
``torch.library.register_autograd``, so ``torch.compile`` and ``opcheck`` see it.
"""

from . import lora, optim, quant, reft  # noqa: F401  (importing defines the ops)
