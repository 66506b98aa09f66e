"""LinearNF4: a frozen linear layer whose weight is stored in 4 bits (NF4 or FP4).

Storage, for an ``out_features x in_features`` weight: ``weight`` is a uint8 parameter of
``(n + 1) // 2`` packed bytes (shape ``((n + 1) // 2, 1)``, two 4-bit codes a byte), and
``quant_state`` (a :class:`ftkernels.QuantState`) holds the per-block scales. At blocksize 64
with double quantization that is 4.127 bits per weight instead of 16 (bf16) or 32 (fp32).

The state_dict is the one bitsandbytes' ``Linear4bit`` (and Transformers' bitsandbytes 4-bit
checkpoints) write: ``weight``, ``bias``, ``weight.absmax``, ``weight.quant_map``, with double
quantization ``weight.nested_absmax`` and ``weight.nested_quant_map``, and
``weight.quant_state.bitsandbytes__nf4`` (JSON bytes). Loading parses tensors and JSON only.

For FSDP2, :meth:`LinearNF4.shard_for` makes the weight and its quant state one
:class:`~ftkernels.nn.nf4_param.NF4Param` (``quant_state`` is then None); every reader goes
through :meth:`LinearNF4.weight_and_state`, which takes them from either form.

forward dequantizes the whole weight, then runs one dense matmul. That costs a weight-sized
temporary per call; a fused 4-bit matmul replaces it later without changing this interface.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import _native
from .._checks import need_blocksize, need_quant_type
from .._formats import FLOAT_DTYPES, NESTED_BLOCKSIZE
from ..functional import create_dynamic_map, dequantize_4bit, get_4bit_type, quantize_4bit
from ..quant_state import QuantState
from .nf4_param import NF4Param

# NOTE: torch's CPU matmul in bf16 (and fp16) has no fast kernel on most CPUs: bf16 `x @ W` on
# a CPU without AVX512-BF16 or AMX runs ~400x slower than the same matmul in fp32. On such a CPU
# (_native.cpu_gemm16_dtypes) we multiply in fp32 and cast the result back; the dequantized
# weight is exact in fp32 (an NF4 code times an fp32 scale, rounded once to the weight's dtype).
_SLOW_ON_CPU = (torch.float16, torch.bfloat16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _need_compute_dtype(compute_dtype) -> None:
    if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(
            f"compute_dtype must be None (the input's dtype), float32, float16, bfloat16 or "
            f"float64, got {compute_dtype!r}"
        )


def check_layer_input(x, in_features: int, device: torch.device) -> None:
    """What a 4-bit layer's forward needs of x: a float tensor on the weight's device whose last
    dimension is in_features (a clear error naming x otherwise)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {_dtype_name(x.dtype)}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be in_features={in_features}")
    if x.device != device:
        raise ValueError(
            f"x is on {x.device} but the layer's weight is on {device}; "
            "move one of them (layer.to(device) moves the quant state too)"
        )


class LinearNF4(nn.Module):
    """A frozen ``nn.Linear`` replacement with a 4-bit weight (bitsandbytes' format).

    Build one from a trained layer with :meth:`from_linear`; the constructor makes a layer
    whose weight is all zeros until a state_dict is loaded into it (a bitsandbytes
    ``Linear4bit`` state_dict, or a plain ``nn.Linear`` one, which is then quantized).

    ``compute_dtype`` is the dtype of the matmul (``None``: the input's dtype); the output has
    the input's dtype, as in bitsandbytes. On the CPU, fp16/bf16 matmuls run in fp32 instead.
    The weight and bias do not require grad; gradients flow to the input.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        *,
        blocksize: int = 64,
        compress_statistics: bool = True,
        quant_type: str = "nf4",
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        need_blocksize(blocksize)
        need_quant_type(quant_type)
        _need_compute_dtype(compute_dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.blocksize = blocksize
        self.compress_statistics = bool(compress_statistics)
        self.quant_type = quant_type
        self._dense: dict | None = None  # see dequantized_weights()
        n = in_features * out_features
        self.weight = nn.Parameter(torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device), requires_grad=False)
        self.quant_state = _zero_state(
            n, (out_features, in_features), dtype, blocksize, quant_type, compress_statistics, device
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        compress_statistics: bool = True,
        quant_type: str = "nf4",
        compute_dtype: torch.dtype | None = None,
    ) -> LinearNF4:
        """Quantize ``linear``'s weight on its device; the bias is kept as is (same dtype)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        if w.is_meta:
            raise ValueError("linear: its weight is on the meta device (no values to quantize)")
        if w.dtype not in FLOAT_DTYPES:
            raise TypeError(f"linear.weight must be float32, float16 or bfloat16, got {_dtype_name(w.dtype)}")
        if linear.bias is not None and linear.bias.device != w.device:
            raise ValueError(f"linear.bias is on {linear.bias.device} but linear.weight is on {w.device}")
        need_blocksize(blocksize)
        need_quant_type(quant_type)
        _need_compute_dtype(compute_dtype)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features = linear.in_features
        layer.out_features = linear.out_features
        layer.compute_dtype = compute_dtype
        layer.blocksize = blocksize
        layer.compress_statistics = bool(compress_statistics)
        layer.quant_type = quant_type
        layer._dense = None
        with torch.no_grad():
            packed, state = quantize_4bit(
                w.detach(), blocksize=blocksize, compress_statistics=compress_statistics, quant_type=quant_type
            )
        layer.weight = nn.Parameter(packed, requires_grad=False)
        layer.quant_state = state
        if linear.bias is not None:
            # The same storage as the source layer: replacing a model's layers costs no copy.
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        else:
            layer.register_parameter("bias", None)
        return layer

    def dequantize(self) -> torch.Tensor:
        """The weight as a dense ``out_features x in_features`` tensor in its original dtype."""
        return dequantize_4bit(*self.weight_and_state())

    # ---- sharding -----------------------------------------------------------------------

    def weight_and_state(self) -> tuple[torch.Tensor, QuantState]:
        """(packed weight, quant state) as the ops take them. A layer prepared for sharding
        (:meth:`shard_for`) reads both from its NF4Param, which FSDP2 gathers before forward."""
        w = self.weight
        local = getattr(w, "_local_tensor", None)  # a DTensor: one rank's shard, between forwards
        if isinstance(local, NF4Param):
            local._need_whole("weight_and_state")
        if isinstance(w, NF4Param):
            return w.packed_weight(), w.quant_state()
        return w, self.quant_state

    @property
    def is_sharded(self) -> bool:
        """Whether the weight is an NF4Param (prepared by shard_for, sharded by fully_shard)."""
        return self.quant_state is None

    def shard_for(self, parts: int) -> None:
        """Makes the weight and its quant state one NF4Param padded for ``parts`` equal shards,
        the parameter ``fully_shard`` then splits (see ``ftkernels.nn.nf4_param``). The values
        are unchanged; ``quant_state`` becomes None (the parameter holds it)."""
        if self.is_sharded:
            raise ValueError("this LinearNF4 is already prepared for sharding")
        if self.weight.is_meta:
            raise ValueError("this LinearNF4's weight is on the meta device; load its state_dict first")
        param = NF4Param.from_quantized(self.weight.detach(), self.quant_state, parts)
        self.weight = nn.Parameter(param, requires_grad=False)
        self.quant_state = None
        if self._dense is not None:
            self._dense.clear()

    # ---- forward ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_layer_input(x, self.in_features, self.weight.device)
        mm_dtype = self.compute_dtype or x.dtype
        if x.device.type == "cpu" and mm_dtype in _SLOW_ON_CPU and mm_dtype not in _native.cpu_gemm16_dtypes():
            mm_dtype = torch.float32
        w = self._dense.get(mm_dtype) if self._dense is not None else None
        if w is None:
            w = self.dequantize().to(mm_dtype)
            if self._dense is not None:
                self._dense[mm_dtype] = w
        bias = self.bias.to(mm_dtype) if self.bias is not None else None
        return F.linear(x.to(mm_dtype), w, bias).to(x.dtype)

    # ---- devices and serialisation ------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # .to(device) / .cuda() / .cpu() move the parameters through fn; the quant state is
        # not a parameter, so follow the packed weight. Dtype casts (.half()) leave it alone:
        # the scales stay fp32 and the codes uint8, as the format requires.
        module = super()._apply(fn, recurse)
        if self._dense is not None:
            self._dense.clear()
        if self.quant_state is not None and self.quant_state.absmax.device != self.weight.device:
            self.quant_state.to(self.weight.device)
        return module

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight, then bias
        state = self.quant_state
        if state is None:
            if not isinstance(self.weight, NF4Param):
                return  # a shard (a DTensor of an NF4Param chunk): saved as it is, with no JSON entry
            # Gathered (or prepared, unsharded): bitsandbytes' format, as an unsharded layer writes it.
            packed, state = self.weight_and_state()
            destination[prefix + "weight"] = packed if keep_vars else packed.detach()
        for k, v in state.as_dict(packed=True).items():
            destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        wkey = prefix + "weight"
        if self.is_sharded:
            raise ValueError(
                f"{wkey}: this LinearNF4 is prepared for sharding (shard_for / shard_model); "
                "load its state_dict before sharding the model"
            )
        # The weight and its quant-state entries are read here; nn.Module's loader handles the
        # bias (shape checks, assign=True, meta tensors) once they are out of its way.
        entries = {k[len(wkey) + 1 :]: state_dict.pop(k) for k in list(state_dict) if k.startswith(wkey + ".")}
        weight = state_dict.pop(wkey, None)
        if weight is None and entries:
            raise ValueError(f"state_dict has quant-state entries for {wkey!r} ({sorted(entries)}) but no {wkey!r}")
        assign = local_metadata.get("assign_to_params_buffers", False)
        # Checked before anything is written, so a bad checkpoint leaves the layer as it was.
        new = self._read_weight(wkey, weight, entries, assign) if weight is not None else None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if new is not None:  # else nn.Module's loader has reported wkey as missing
            if wkey in missing_keys:
                missing_keys.remove(wkey)
            self._set_weight(*new, assign)

    def _read_weight(self, wkey: str, weight, entries: dict, assign: bool) -> tuple[torch.Tensor, QuantState]:
        """(packed weight, quant state) from the state_dict entries, validated."""
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"{wkey} must be a tensor, got {type(weight).__name__}")
        device = weight.device if assign else self.weight.device
        shape = (self.out_features, self.in_features)
        if not entries:
            if weight.is_floating_point() and tuple(weight.shape) == shape:
                # A plain nn.Linear state_dict: quantize it with this layer's settings.
                if weight.dtype not in FLOAT_DTYPES:
                    raise ValueError(
                        f"{wkey} must be float32, float16 or bfloat16 to be quantized, got {_dtype_name(weight.dtype)}"
                    )
                with torch.no_grad():
                    return quantize_4bit(
                        weight.detach().to(device),
                        blocksize=self.blocksize,
                        compress_statistics=self.compress_statistics,
                        quant_type=self.quant_type,
                    )
            if weight.dtype == torch.uint8:
                raise ValueError(
                    f"{wkey} holds packed 4-bit data but the state_dict has no "
                    f"'{wkey}.quant_state.bitsandbytes__nf4' (or __fp4) entry to describe it"
                )
            raise ValueError(
                f"{wkey} has shape {tuple(weight.shape)} and dtype {_dtype_name(weight.dtype)}; "
                f"expected packed uint8 with quant-state entries, or a float {shape} weight"
            )
        if weight.dtype != torch.uint8:
            raise ValueError(f"{wkey} must be uint8 (bnb_4bit_quant_storage='uint8'), got {_dtype_name(weight.dtype)}")
        try:
            state = QuantState.from_dict(entries, device=device)
        except ValueError as e:
            raise ValueError(f"state_dict entries '{wkey}.*': {e}") from None
        if tuple(state.shape) != shape:
            raise ValueError(
                f"'{wkey}.quant_state.bitsandbytes__{state.quant_type}' has shape "
                f"{list(state.shape)} but this layer is {list(shape)} (out x in)"
            )
        state.check_packed(weight, name=wkey)
        return weight.detach().reshape(-1, 1), state

    def _set_weight(self, packed: torch.Tensor, state: QuantState, assign: bool) -> None:
        with torch.no_grad():
            if not assign and packed.shape == self.weight.shape and not self.weight.is_meta:
                self.weight.copy_(packed)
            else:
                self.weight = nn.Parameter(packed.to(state.absmax.device), requires_grad=False)
        self.quant_state = state.to(self.weight.device)
        if self._dense is not None:
            self._dense.clear()
        self.blocksize = state.blocksize
        self.quant_type = state.quant_type
        self.compress_statistics = state.nested

    def extra_repr(self) -> str:
        cd = "input" if self.compute_dtype is None else _dtype_name(self.compute_dtype)
        sharded = ", sharded" if self.is_sharded else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, quant_type={self.quant_type}, blocksize={self.blocksize}, "
            f"double_quant={self.compress_statistics}, dtype={_dtype_name(self.weight_dtype)}, "
            f"compute_dtype={cd}{sharded}"
        )

    @property
    def weight_dtype(self) -> torch.dtype:
        """The original dtype of the weight (the dequantized dtype)."""
        if self.quant_state is not None:
            return self.quant_state.dtype
        local = getattr(self.weight, "_local_tensor", self.weight)
        return local.meta.dtype


@contextlib.contextmanager
def dequantized_weights(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, each LinearNF4 under ``module`` dequantizes its weight on its first
    call and reuses that dense copy; on exit the copies are dropped.

    The outputs are the same (same dequantized values, same matmul); what changes is cost.
    Generating n tokens dequantizes every weight n times without this: for SmolLM2-135M on 2
    CPU cores, 24 greedy tokens take ~15 s with the C++ dequantize and ~100 s with the pure-torch
    one, against ~3 s dense. The price is dense weights in memory while the block runs.
    """
    layers = [m for m in module.modules() if isinstance(m, LinearNF4)]
    for m in layers:
        m._dense = {}
    try:
        yield module
    finally:
        for m in layers:
            m._dense = None


def _zero_state(n, shape, dtype, blocksize, quant_type, nested, device) -> QuantState:
    """A state whose every block scale is 0 (the weight dequantizes to zeros), built without
    running the quantizer: the placeholder a checkpoint is loaded into."""
    nblocks = -(-n // blocksize)
    code = get_4bit_type(quant_type, device)
    if not nested:
        return QuantState(
            absmax=torch.zeros(nblocks, dtype=torch.float32, device=device),
            shape=shape,
            code=code,
            blocksize=blocksize,
            quant_type=quant_type,
            dtype=dtype,
        )
    # With double quantization absmax = map[q] * nested_absmax + offset: 0 when both are 0.
    state2 = QuantState(
        absmax=torch.zeros(math.ceil(nblocks / NESTED_BLOCKSIZE), dtype=torch.float32, device=device),
        code=create_dynamic_map().to(device),
        blocksize=NESTED_BLOCKSIZE,
        dtype=torch.float32,
    )
    return QuantState(
        absmax=torch.zeros(nblocks, dtype=torch.uint8, device=device),
        shape=shape,
        code=code,
        blocksize=blocksize,
        quant_type=quant_type,
        dtype=dtype,
        offset=torch.zeros((), dtype=torch.float32, device=device),
        state2=state2,
    )
