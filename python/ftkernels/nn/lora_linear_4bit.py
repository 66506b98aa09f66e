"""LoRALinear4bit: QLoRA's layer, a frozen 4-bit base weight plus trainable LoRA factors.

    y = x @ deq(W).T + bias + scaling * (dropout(x) @ lora_A.T) @ lora_B.T

with ``W`` (``out_features x in_features``) in NF4/FP4 and frozen, ``lora_A`` ``r x in_features``,
``lora_B`` ``out_features x r``, ``scaling = lora_alpha / r`` (rsLoRA: ``lora_alpha / sqrt(r)``).
forward is one call of :func:`ftkernels.lora_linear_4bit`: fp32 math whatever the input dtype,
output in the input's dtype, dropout on the LoRA input only (PEFT's placement).

The layer is what a user of PEFT + bitsandbytes gets from ``get_peft_model`` on a model whose
linear layers are ``bnb.nn.Linear4bit``: same initialisation (A Kaiming-uniform with
a = sqrt(5), B zero, so the output equals the base layer at init; with the same torch seed the
same A as PEFT draws), same scaling, same state_dict names.

state_dict (``...`` = the quant-state entries of :class:`~ftkernels.nn.LinearNF4`)::

    base_layer.weight                                 packed uint8, bitsandbytes' Linear4bit format
    base_layer.bias                                   (when the base has one)
    base_layer.weight.absmax, .quant_map, [.nested_absmax, .nested_quant_map,]
    base_layer.weight.quant_state.bitsandbytes__nf4   (JSON bytes; __fp4 for FP4)
    lora_A.weight                                     (r, in_features)
    lora_B.weight                                     (out_features, r)

Mapping to PEFT (a ``LoraLayer`` wrapping a ``Linear4bit``, adapter name ``default``):

    ours                  PEFT module state_dict          PEFT adapter file (adapter_model.*)
    base_layer.<k>        base_layer.<k>  (identical)     (not saved)
    lora_A.weight         lora_A.default.weight           lora_A.weight
    lora_B.weight         lora_B.default.weight           lora_B.weight

r, lora_alpha, lora_dropout and use_rslora are not in the state_dict (PEFT keeps them in
adapter_config.json); build the module with the same values before loading. Loading reads
tensors and JSON only.
"""

from __future__ import annotations

import copy
import math
import sys

import torch
from torch import nn

from .._checks import need_blocksize, need_quant_type
from .._formats import FLOAT_DTYPES, LORA_MAX_RANK
from ..functional import dequantize_4bit, lora_linear_4bit
from ..quant_state import dtype_name
from .linear_nf4 import LinearNF4, check_layer_input

_LORA_DTYPES = FLOAT_DTYPES + (torch.float64,)  # float64: for gradcheck-style tests


def _check_hparams(r, lora_alpha, lora_dropout, use_rslora, lora_dtype) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= LORA_MAX_RANK:
        raise ValueError(f"r must be an int in [1, {LORA_MAX_RANK}], got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be a number in [0, 1), got {lora_dropout!r}")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora must be a bool, got {use_rslora!r}")
    if lora_dtype not in _LORA_DTYPES:
        raise TypeError(f"lora_dtype must be float32, float16, bfloat16 or float64, got {lora_dtype!r}")


def _bnb_linear4bit_class():
    """bitsandbytes' Linear4bit if bitsandbytes is already imported, else None: an object can
    only be a Linear4bit if its module was imported, so bitsandbytes is never imported here."""
    bnb = sys.modules.get("bitsandbytes")
    nn_mod = getattr(bnb, "nn", None) if bnb is not None else None
    return getattr(nn_mod, "Linear4bit", None)


class LoRALinear4bit(nn.Module):
    """A frozen 4-bit linear layer (``base_layer``, a :class:`LinearNF4`) plus trainable LoRA
    factors ``lora_A`` (``nn.Linear(in_features, r, bias=False)``) and ``lora_B``
    (``nn.Linear(r, out_features, bias=False)``).

    Build one from a layer with :meth:`from_linear`. The constructor makes a layer whose base
    weight is all zeros (the skeleton a state_dict is loaded into) and whose LoRA factors are
    initialised as PEFT does. The LoRA factors are ``lora_dtype`` (fp32 by default, as PEFT
    keeps them); the base weight, its quant state and its bias never require grad.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        bias: bool = True,
        *,
        use_rslora: bool = False,
        blocksize: int = 64,
        compress_statistics: bool = True,
        quant_type: str = "nf4",
        dtype: torch.dtype = torch.float32,
        lora_dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        super().__init__()
        _check_hparams(r, lora_alpha, lora_dropout, use_rslora, lora_dtype)
        base = LinearNF4(
            in_features,
            out_features,
            bias=bias,
            blocksize=blocksize,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            dtype=dtype,
            device=device,
        )
        self._setup(base, r, lora_alpha, lora_dropout, use_rslora, lora_dtype)

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        base: nn.Module,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        *,
        blocksize: int | None = None,
        compress_statistics: bool | None = None,
        quant_type: str | None = None,
        use_rslora: bool = False,
        lora_dtype: torch.dtype = torch.float32,
    ) -> LoRALinear4bit:
        """Wrap ``base`` with LoRA factors of rank ``r``.

        ``base`` may be:

        - an ``nn.Linear`` (fp32/fp16/bf16): its weight is quantized on its device with
          :func:`ftkernels.quantize_4bit` (``blocksize`` 64, ``compress_statistics`` True and
          ``quant_type`` "nf4" unless given); the bias keeps its dtype and storage;
        - a :class:`ftkernels.nn.LinearNF4`: it becomes ``base_layer`` itself (shared, not copied,
          as PEFT wraps its base layer);
        - a bitsandbytes ``Linear4bit``: its packed bytes and quant state are converted to ours
          through the serialised format both share, without requantizing. The bitsandbytes
          layer is left as it is. One quantized on no device yet (still a float weight) is
          quantized here with its own blocksize, compress_statistics and quant_type.

        For a base that is already quantized, ``blocksize``, ``compress_statistics`` and
        ``quant_type``, where given, must match its own (it is never requantized).
        """
        _check_hparams(r, lora_alpha, lora_dropout, use_rslora, lora_dtype)
        if blocksize is not None:
            need_blocksize(blocksize)
        if quant_type is not None:
            need_quant_type(quant_type)
        if compress_statistics is not None and not isinstance(compress_statistics, bool):
            raise TypeError(f"compress_statistics must be a bool or None, got {compress_statistics!r}")
        bnb_cls = _bnb_linear4bit_class()
        if isinstance(base, LinearNF4):
            base_layer = base
        elif bnb_cls is not None and isinstance(base, bnb_cls):  # before nn.Linear: a subclass of it
            base_layer = _from_bnb_linear4bit(base, blocksize, compress_statistics, quant_type)
        elif isinstance(base, nn.Linear):
            _check_dense_base(base)
            base_layer = LinearNF4.from_linear(
                base,
                blocksize=64 if blocksize is None else blocksize,
                compress_statistics=True if compress_statistics is None else compress_statistics,
                quant_type="nf4" if quant_type is None else quant_type,
            )
        else:
            raise TypeError(
                "base must be a torch.nn.Linear, an ftkernels.nn.LinearNF4 or a "
                f"bitsandbytes.nn.Linear4bit, got {type(base).__module__}.{type(base).__name__}"
            )
        qs = base_layer.quant_state
        for name, given, actual in (
            ("blocksize", blocksize, qs.blocksize),
            ("compress_statistics", compress_statistics, qs.nested),
            ("quant_type", quant_type, qs.quant_type),
        ):
            if given is not None and given != actual:
                raise ValueError(
                    f"{name}={given!r} but the base layer is already quantized with "
                    f"{name}={actual!r} (a quantized base is not requantized)"
                )
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(base_layer, r, lora_alpha, lora_dropout, use_rslora, lora_dtype)
        return layer

    def _setup(self, base_layer: LinearNF4, r, lora_alpha, lora_dropout, use_rslora, lora_dtype) -> None:
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.base_layer = base_layer
        device = base_layer.weight.device
        # As PEFT does it, so the same torch seed gives the same A: two nn.Linear built on the
        # CPU in fp32 (their own default init draws from the CPU generator), then A drawn again
        # by reset_lora_parameters, then moved to the base's device and cast. On the meta
        # device nothing is drawn.
        init_device = "meta" if device.type == "meta" else "cpu"
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=init_device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=init_device, dtype=torch.float32)
        self.reset_lora_parameters()
        self.lora_A.to(device=device, dtype=lora_dtype)
        self.lora_B.to(device=device, dtype=lora_dtype)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's ``init_lora_weights=True``: A Kaiming-uniform (a = sqrt(5), i.e. uniform in
        +-1/sqrt(in_features), nn.Linear's default), B zero, so the LoRA branch starts at zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    # ---- what PEFT's LoraLayer exposes --------------------------------------------------

    @property
    def weight(self) -> nn.Parameter:
        """The base layer's packed 4-bit weight (as PEFT's ``layer.weight``)."""
        return self.base_layer.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.base_layer.bias

    # ---- forward ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        check_layer_input(x, self.in_features, base.weight.device)
        packed, state = base.weight_and_state()
        return lora_linear_4bit(
            x,
            packed,
            state,
            self.lora_A.weight,
            self.lora_B.weight,
            self.scaling,
            base.bias,
            dropout_p=self.lora_dropout,
            training=self.training,
        )

    # ---- merging --------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense ``nn.Linear`` with ``weight = deq(W) + (lora_B @ lora_A) * scaling`` (in fp32,
        in PEFT's order, then cast to ``dtype``: default the base weight's original dtype) and
        the base bias (a copy, cast likewise). This module is unchanged.

        PEFT's ``merge()`` on a Linear4bit computes the same sum and then requantizes it to
        4 bits; quantize the merged layer (``LinearNF4.from_linear``) for the same result.
        """
        if dtype is None:
            dtype = self.base_layer.weight_dtype
        if dtype not in FLOAT_DTYPES + (torch.float64,):
            raise TypeError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype!r}")
        base = self.base_layer
        # NOTE: deq(W) in fp32 (code * absmax, exact), as forward's op uses it; not rounded to
        # the base's dtype first, as bitsandbytes.functional.dequantize_4bit (so PEFT's merge)
        # does: for a bf16 base that rounding alone moves a weight by up to 2^-9 relative.
        # The same values for an fp32 base.
        packed, state = base.weight_and_state()
        qs32 = copy.copy(state)
        qs32.dtype = torch.float32
        w = dequantize_4bit(packed, qs32)
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        # Built on the meta device, then given its tensors: no init kernels, no RNG draws.
        dense = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device="meta")
        dense.weight = nn.Parameter((w + delta).to(dtype))
        if base.bias is not None:
            dense.bias = nn.Parameter(base.bias.detach().to(dtype, copy=True))
        return dense

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, "
            f"use_rslora={self.use_rslora}"
        )


# ---- conversions -------------------------------------------------------------------------------


def _check_dense_base(base: nn.Linear) -> None:
    w = base.weight
    if w.is_meta:
        raise ValueError("base: its weight is on the meta device (no values to quantize)")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"base.weight must be float32, float16 or bfloat16, got {dtype_name(w.dtype)} ({type(base).__name__})"
        )


def _from_bnb_linear4bit(base: nn.Module, blocksize, compress_statistics, quant_type) -> LinearNF4:
    """A LinearNF4 holding a bitsandbytes Linear4bit's weight: its packed bytes and quant state,
    read through the state_dict format both use (tensors and JSON), not requantized."""
    w = base.weight
    # FSDP can drop the parameter's quant_state; Linear4bit keeps a copy on the module.
    qs = getattr(w, "quant_state", None) or getattr(base, "quant_state", None)
    if qs is None:
        if not w.is_floating_point():
            raise ValueError("base: this bitsandbytes Linear4bit has packed data but no quant_state")
        # Not quantized yet (bitsandbytes quantizes on .to(device)): quantize it here with the
        # settings bitsandbytes would have used.
        dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        dense.weight = nn.Parameter(w.detach(), requires_grad=False)
        if base.bias is not None:
            dense.bias = nn.Parameter(base.bias.detach(), requires_grad=False)
        _check_dense_base(dense)
        return LinearNF4.from_linear(
            dense,
            blocksize=blocksize or getattr(w, "blocksize", 64),
            compress_statistics=(
                getattr(w, "compress_statistics", True) if compress_statistics is None else compress_statistics
            ),
            quant_type=quant_type or getattr(w, "quant_type", "nf4"),
        )
    data = w.data
    if getattr(qs, "packing_format_for_cpu", False):
        data, qs = _undo_bnb_cpu_packing(data, qs)
    packed = data.contiguous().view(torch.uint8).reshape(-1)  # any bnb_4bit_quant_storage dtype
    n = base.in_features * base.out_features
    if packed.numel() > (n + 1) // 2 and data.dtype != torch.uint8:
        packed = packed[: (n + 1) // 2]  # storage dtypes wider than a byte round the size up
    sd = {"weight": packed.reshape(-1, 1)}
    for k, v in qs.as_dict(packed=True).items():
        sd["weight." + k] = v
    if base.bias is not None:
        sd["bias"] = base.bias.detach()
    # A skeleton on the meta device; loading takes the settings from the entries' JSON and
    # checks shapes, sizes and codes.
    layer = LinearNF4(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
    try:
        layer.load_state_dict(sd, assign=True)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"base: cannot read this bitsandbytes Linear4bit's weight: {e}") from None
    return layer


def _undo_bnb_cpu_packing(data: torch.Tensor, qs):
    """bitsandbytes >= 0.49 repacks a CPU Linear4bit's weight for its AVX512-BF16 kernel at its
    first eval-mode, no-grad forward (codes reordered, absmax decoded to bf16, transposed).
    Undo it as bitsandbytes' own state_dict() does, on a copy of the state (the layer is left
    alone).

    NOTE: that repacking is lossy: the absmax values are rounded to bf16 and, for a
    double-quantized weight, bitsandbytes re-quantizes them (its inverse), so the bytes differ
    from what the layer held before its first forward; the 4-bit codes come back exactly.
    """
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        raise ValueError(
            "base: this bitsandbytes Linear4bit holds its CPU-repacked weight and this "
            "bitsandbytes has no inverse to read it; convert the layer before its first "
            "eval-mode forward on the CPU"
        ) from None
    data, qs = _convert_weight_packed_for_cpu_inverse(data, copy.copy(qs))
    if not qs.nested and (qs.absmax.dim() != 1 or qs.absmax.dtype != torch.float32):
        # bitsandbytes' inverse leaves a non-nested absmax as bf16 (blocks_per_row, rows).
        qs.absmax = qs.absmax.T.reshape(-1).float()
    return data, qs
