"""The training state of a model (sharded with FSDP2 or not) through torch.distributed.checkpoint.

``save_training_state`` writes the trainable parameters, the optimizer's per-parameter states and
the caller's counters, each rank its shard; ``load_training_state`` reads them into the same model
sharded over any number of ranks, or unsharded, DCP re-cutting the shards. The frozen 4-bit base is
not in it: it is the model's own, loaded from where the model came from.

Entries, for a trainable parameter ``p`` (DTensors laid out as ``p``, so DCP can re-cut them):

    model.<p>                  the parameter
    optim.<p>.step             int64 scalar
    optim.<p>.exp_avg          fp32, like p (8-bit states dequantized: re-cut on any world size)
    optim.<p>.exp_avg_sq       fp32, like p (AdamW)
    optim.<p>.state1/state2    8-bit states as they are: uint8, like p
    optim.<p>.absmax1/absmax2  their block scales, each rank's padded to one length (Shard(0))
    optim.<p>.gnorm_vec        percentile clipping's 100 norms (unsharded parameters only)
    optim.world_size           the ranks that wrote it
    extra.<k>                  the caller's ints (int64) and floats (float64)

A load on as many ranks as the save reads the 8-bit states and scales as they are, so training
continues bit for bit. On another number of ranks each shard's 256-blocks hold other elements, so
the states are quantized again from the fp32 moments: the signed map's most negative code is
-0.993, not -1, so that is close, not exact.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .._formats import OPTIM_BLOCK
from ..functional import dequantize_blockwise, quantize_blockwise
from ..optim.optimizers import _codes as _optimizer_codes
from . import _dist

__all__ = ["load_training_state", "save_training_state"]

_MOMENTS = {"state1": ("exp_avg", "absmax1", True), "state2": ("exp_avg_sq", "absmax2", False)}


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _as_global(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A state tensor of this rank's shard as a DTensor laid out as its parameter."""
    if not _dist.is_dtensor(like):
        return t
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        t, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


def _blocks_max(p: torch.Tensor) -> int:
    """The most 256-blocks any rank's shard of p has (FSDP2 shards dim 0 as torch.chunk)."""
    if not _dist.is_dtensor(p):
        return -(-p.numel() // OPTIM_BLOCK)
    rows = -(-p.shape[0] // p.device_mesh.size())
    return -(-rows * (p.numel() // max(p.shape[0], 1)) // OPTIM_BLOCK)


def _scales_global(scales: torch.Tensor, p: torch.Tensor, length: int) -> torch.Tensor:
    """This rank's block scales padded to ``length``, as one Shard(0) part of all ranks'."""
    padded = scales.new_zeros(length)
    padded[: scales.numel()] = scales
    if not _dist.is_dtensor(p):
        return padded
    from torch.distributed.tensor import DTensor, Shard

    mesh = p.device_mesh
    return DTensor.from_local(padded, mesh, [Shard(0)], run_check=False, shape=(length * mesh.size(),), stride=(1,))


def _code(device, signed: bool) -> torch.Tensor:
    """The 8-bit map of a moment, as the optimizer keeps it on the device."""
    codes = _optimizer_codes(device)
    return codes.signed if signed else codes.unsigned


def _optimizer_entries(optimizer, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"world_size": torch.tensor(_dist.world_size(), dtype=torch.int64)}
    for name, p in params.items():
        st = optimizer.state.get(p)
        if not st:
            continue
        out[f"{name}.step"] = torch.tensor(int(st["step"]), dtype=torch.int64)
        for k, v in st.items():
            if not isinstance(v, torch.Tensor) or k in ("absmax1", "absmax2"):
                continue
            if k in _MOMENTS:
                moment, scales, signed = _MOMENTS[k]
                code = _code(v.device, signed)
                flat = dequantize_blockwise(v.reshape(-1), absmax=st[scales], code=code, blocksize=OPTIM_BLOCK)
                out[f"{name}.{moment}"] = _as_global(flat.reshape(v.shape), p)
                out[f"{name}.{k}"] = _as_global(v, p)
                out[f"{name}.{scales}"] = _scales_global(st[scales], p, _blocks_max(p))
            elif k == "gnorm_vec":
                out[f"{name}.{k}"] = v
            else:
                out[f"{name}.{k}"] = _as_global(v, p)
    return out


def save_training_state(model: nn.Module, optimizer, checkpoint_dir: str | os.PathLike, extra=None) -> None:
    """Writes the trainable parameters, ``optimizer``'s states (an ``ftkernels.optim``
    optimizer: AdamW, Lion, their 8-bit and paged forms) and ``extra`` (a dict of str to int or
    float: step counters, the data position) to ``checkpoint_dir`` with DCP, each rank its
    shard. Every rank must call it."""
    import torch.distributed.checkpoint as dcp

    extra = _check_extra(extra)
    _need_ftk_optimizer(optimizer)
    params = _trainable(model)
    if not params:
        raise ValueError("model has no trainable parameters to save")
    state = {"model": dict(params), "optim": _optimizer_entries(optimizer, params), "extra": extra}
    dcp.save(state, checkpoint_id=os.fspath(checkpoint_dir), no_dist=not _dist.initialized())


def load_training_state(model: nn.Module, optimizer, checkpoint_dir: str | os.PathLike) -> dict:
    """Reads what :func:`save_training_state` wrote into ``model`` (sharded on any number of
    ranks, or unsharded) and ``optimizer`` (built over the same trainable parameters); returns
    ``extra``. Every rank must call it."""
    import torch.distributed.checkpoint as dcp

    _need_ftk_optimizer(optimizer)
    src = os.fspath(checkpoint_dir)
    try:
        meta = dcp.FileSystemReader(src).read_metadata()
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot read the checkpoint in {src}: {e}") from e
    saved = meta.state_dict_metadata
    params = _trainable(model)
    missing = sorted(f"model.{n}" for n in params if f"model.{n}" not in saved)
    if missing or "optim.world_size" not in saved:
        raise ValueError(
            f"{src}: the checkpoint does not fit the model: missing {(missing or ['optim.world_size'])[:3]}"
        )
    no_dist = not _dist.initialized()
    head = {"optim": {"world_size": torch.zeros((), dtype=torch.int64)}}
    dcp.load(head, checkpoint_id=src, no_dist=no_dist)
    same_layout = int(head["optim"]["world_size"]) == _dist.world_size()
    dest: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        if f"optim.{name}.step" not in saved:
            continue
        local = _dist.local(p)
        dest[f"{name}.step"] = torch.zeros((), dtype=torch.int64)
        raw = same_layout and optimizer._uses_8bit(local)
        for k, (moment, scales, _) in _MOMENTS.items():
            if raw and f"optim.{name}.{k}" in saved:
                dest[f"{name}.{k}"] = _as_global(torch.zeros_like(local, dtype=torch.uint8), p)
                dest[f"{name}.{scales}"] = _scales_global(torch.zeros(0, device=local.device), p, _blocks_max(p))
            elif f"optim.{name}.{moment}" in saved:
                dest[f"{name}.{moment}"] = _as_global(torch.zeros_like(local, dtype=torch.float32), p)
        if f"optim.{name}.gnorm_vec" in saved:
            dest[f"{name}.gnorm_vec"] = torch.zeros(100, dtype=torch.float32, device=local.device)
    extra_keys = [k[len("extra.") :] for k in saved if k.startswith("extra.")]
    state = {
        "model": {n: p.detach() for n, p in params.items()},
        "optim": dest,
        "extra": {k: torch.zeros((), dtype=saved[f"extra.{k}"].properties.dtype) for k in extra_keys},
    }
    dcp.load(state, checkpoint_id=src, no_dist=no_dist)
    _restore_optimizer(optimizer, params, state["optim"])
    return {k: v.item() for k, v in state["extra"].items()}


def _restore_optimizer(optimizer, params: dict[str, torch.Tensor], entries: dict[str, torch.Tensor]) -> None:
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, p in params.items():
        if f"{name}.step" not in entries:
            continue
        if id(p) not in held:
            raise ValueError(f"optimizer: it does not hold the model's parameter {name}")
        local = _dist.local(p)
        st = optimizer.state[p]
        st.clear()
        st["step"] = int(entries[f"{name}.step"])
        eight_bit = optimizer._uses_8bit(local)
        for k, (moment, scales, signed) in _MOMENTS.items():
            if f"{name}.{k}" in entries:  # the 8-bit state as it was written
                st[k] = _alloc(optimizer, local, _dist.local(entries[f"{name}.{k}"]))
                nblocks = -(-local.numel() // OPTIM_BLOCK)
                st[scales] = _dist.local(entries[f"{name}.{scales}"])[:nblocks].clone()
            elif f"{name}.{moment}" in entries:
                value = _dist.local(entries[f"{name}.{moment}"]).to(local.device)
                if eight_bit:
                    code = _code(local.device, signed)
                    q, qs = quantize_blockwise(value.reshape(-1), code=code, blocksize=OPTIM_BLOCK)
                    st[k] = _alloc(optimizer, local, q.reshape(local.shape))
                    st[scales] = qs.absmax.float()
                else:
                    st[moment] = _alloc(optimizer, local, value)
        if f"{name}.gnorm_vec" in entries:
            st["gnorm_vec"] = entries[f"{name}.gnorm_vec"].to(local.device)


def _alloc(optimizer, p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """value copied into a state tensor of the optimizer's kind (managed memory when paged)."""
    return optimizer._alloc(p, value.shape, value.dtype).copy_(value)


def _need_ftk_optimizer(optimizer) -> None:
    if not all(hasattr(optimizer, a) for a in ("_uses_8bit", "_alloc", "state", "param_groups")):
        raise TypeError(
            f"optimizer must be an ftkernels.optim optimizer (AdamW, AdamW8bit, Lion, their paged forms), "
            f"got {type(optimizer).__name__}"
        )


def _check_extra(extra) -> dict[str, torch.Tensor]:
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict of str to int/float, got {type(extra).__name__}")
    out = {}
    for k, v in extra.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"extra[{k!r}] must be an int or a float under a str key, got {v!r}")
        out[k] = torch.tensor(v, dtype=torch.int64 if isinstance(v, int) else torch.float64)
    return out
