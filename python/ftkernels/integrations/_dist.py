"""What the savers and loaders need to know of torch.distributed: a sharded parameter (a
DTensor, as FSDP2 leaves it between steps) is gathered whole before it is written, written by
rank 0 alone, and a loaded tensor is cut back into this rank's shard. Without a process group
each of these is the plain-tensor case."""

from __future__ import annotations

import torch


def is_dtensor(t) -> bool:
    """Whether t is a DTensor (checked without importing torch.distributed.tensor)."""
    return isinstance(t, torch.Tensor) and hasattr(t, "device_mesh") and hasattr(t, "to_local")


def need_unsharded(model, what: str) -> None:
    """Adapters are added before sharding: FSDP2 manages only the parameters it was given."""
    if any(is_dtensor(p) for p in model.parameters()):
        raise ValueError(f"{what}: the model is sharded (shard_model / fully_shard); add adapters before sharding it")


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if initialized() else 1


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor is all-gathered (a collective: every rank must call it)."""
    return t.full_tensor() if is_dtensor(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the same storage), else t."""
    return t.to_local() if is_dtensor(t) else t


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``whole`` cut as ``like`` is sharded (a DTensor with like's mesh and placements, from
    each rank's own copy of ``whole``: no communication), else whole itself."""
    if not is_dtensor(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def assign_(param: torch.Tensor, whole: torch.Tensor) -> None:
    """param <- whole, where param may be a DTensor (this rank copies its own shard)."""
    with torch.no_grad():
        if is_dtensor(param):
            param.to_local().copy_(shard_like(whole, param).to_local())
        else:
            param.copy_(whole)


def barrier() -> None:
    if initialized():
        torch.distributed.barrier()
