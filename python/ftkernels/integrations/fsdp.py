"""Past one GPU: a QLoRA, LoRA or LoReFT model sharded with FSDP2, its 4-bit weights gathered in
4 bits.

``shard_model(model)`` prepares every ``LinearNF4`` (``LoRALinear4bit``'s base included) as one
:class:`~ftkernels.nn.nf4_param.NF4Param` padded for the mesh, then applies ``fully_shard`` to
each decoder layer and to the root. Each rank then holds 1/world of every packed weight, its
absmax codes and nested scales; before a layer's forward FSDP2 all-gathers exactly those bytes
(0.516 bytes a weight at blocksize 64), never a dequantized weight, and the fused
``lora_linear_4bit`` op runs on the gathered whole. Trainable parameters (LoRA factors, ReFT
interventions) are sharded as FSDP2 shards any parameter; ``ftkernels.optim`` steps each rank's
shard.

Checkpoints: ``save_lora`` / ``save_loreft`` gather the adapter and rank 0 writes PEFT's (or the
LoReFT) files, which load into a sharded or an unsharded model; the training state goes through
torch.distributed.checkpoint (``training_state.py``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import nn

from ..nn.linear_nf4 import LinearNF4
from ..nn.lora_linear_4bit import _bnb_linear4bit_class
from ..nn.nf4_param import NF4Param, storage_bytes
from . import _dist
from ._reft_base import decoder_layers

__all__ = ["all_gather_bytes", "nf4_resident_bytes", "shard_model"]


def _bnb_layers(model: nn.Module) -> list[str]:
    cls = _bnb_linear4bit_class()  # None unless bitsandbytes is imported: then there are none
    return [n for n, m in model.named_modules() if cls is not None and isinstance(m, cls)]


def shard_model(
    model: nn.Module,
    mesh=None,
    *,
    reshard_after_forward: bool = True,
    mp_policy=None,
) -> nn.Module:
    """Applies FSDP2's ``fully_shard`` to each decoder layer of ``model`` (Llama/Qwen2/Mistral,
    GPT-2 and GPT-NeoX layouts; any other model is one unit) and to ``model``, its 4-bit
    weights sharded and gathered in 4 bits. Returns ``model`` (now an FSDPModule).

    ``mesh``: a 1-D DeviceMesh (default: every rank of the default process group, on the
    model's device type). ``reshard_after_forward`` is passed to each decoder layer's
    ``fully_shard`` (the root's parameters stay gathered from forward to backward, and its
    frozen dense ones, the embeddings, final norm and an unquantized head, stay replicated where
    torch has ``ignored_params``: whole through every step either way, they would cost a shard
    more and an all-gather a step), ``mp_policy`` (a ``MixedPrecisionPolicy``) to every one; a
    policy casts the trainable and the floating-point frozen parameters it manages, never the
    packed 4-bit payload (uint8).

    Call it after the adapters are added (``add_lora``, ``add_loreft``) and before the optimizer
    is built: FSDP2 replaces every parameter by its sharded DTensor.
    """
    import torch.distributed as dist

    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # FSDP2's public API is torch >= 2.6
        raise RuntimeError(f"shard_model needs FSDP2 (torch >= 2.6); this is torch {torch.__version__}") from None

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not _dist.initialized():
        raise RuntimeError(
            "shard_model: torch.distributed is not initialised; run under torchrun "
            "(or call torch.distributed.init_process_group first)"
        )
    if not isinstance(reshard_after_forward, bool):
        raise TypeError(f"reshard_after_forward must be a bool, got {reshard_after_forward!r}")
    if mp_policy is not None and not isinstance(mp_policy, MixedPrecisionPolicy):
        raise TypeError(f"mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy, got {mp_policy!r}")
    bnb = _bnb_layers(model)
    if bnb:
        raise ValueError(
            f"model: {bnb[0]} is a bitsandbytes Linear4bit, whose quant state FSDP2 loses; quantize "
            "the model with ftkernels.integrations.quantize_model (or LoRALinear4bit.from_linear) instead"
        )
    first = next(iter(model.parameters()), None)
    if first is None:
        raise ValueError("model has no parameters to shard")
    if first.device.type == "meta":
        raise ValueError("model is on the meta device; load its weights before sharding")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(first.device.type, (dist.get_world_size(),))
    if getattr(mesh, "ndim", None) != 1:
        raise ValueError(f"mesh must be a 1-D DeviceMesh, got {mesh!r}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LinearNF4)]
    for name, m in layers:  # every check before anything changes
        if m.is_sharded:
            raise ValueError(f"{name}: its LinearNF4 is already prepared for sharding")
        if m.weight.device.type != mesh.device_type:
            raise ValueError(f"{name}: its weight is on {m.weight.device} but the mesh is {mesh.device_type}")
    if any(_dist.is_dtensor(p) for p in model.parameters()):
        raise ValueError("model is already sharded (its parameters are DTensors)")
    _check_ranks_agree(model, mesh)
    for _, m in layers:
        m.shard_for(mesh.size())
    kwargs = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    try:
        blocks = list(decoder_layers(model))
    except ValueError:  # not a decoder stack the integrations know: one FSDP unit, the root
        blocks = []
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    # The root (embeddings, final norm, head) stays gathered from forward to backward: backward
    # starts with the head, so resharding it would only gather it again at once. Its frozen
    # dense parameters are then whole all through a step anyway: sharded as well, a rank would
    # hold 1 + 1/world copies at its peak and all-gather them every step (SmolLM2-135M's tied
    # fp32 embedding: 113 MB whole, 57 MB a step on 2 ranks), so they stay replicated.
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    frozen = {
        p for p in model.parameters() if not p.requires_grad and id(p) not in in_blocks and not isinstance(p, NF4Param)
    }
    if frozen and "ignored_params" in inspect.signature(fully_shard).parameters:
        kwargs["ignored_params"] = frozen
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return model


def _check_ranks_agree(model: nn.Module, mesh) -> None:
    """FSDP2 keeps each rank's own shard of what that rank holds: ranks that initialised their
    adapters differently would train a model no rank has. One sum a trainable parameter, compared
    across the mesh, catches it."""
    sums = [p.detach().double().sum() for p in model.parameters() if p.requires_grad]
    if not sums:
        return
    mine = torch.stack(sums).to(mesh.device_type)
    low, high = mine.clone(), mine.clone()
    group = mesh.get_group()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN, group=group)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        bad = names[int((low != high).nonzero()[0])]
        raise ValueError(
            f"model: the ranks hold different values of the trainable parameter {bad}; seed torch "
            "alike on every rank before adding the adapters (torch.manual_seed)"
        )


def nf4_resident_bytes(model: nn.Module) -> dict[str, int]:
    """What this rank holds of the model's 4-bit weights, measured on the storages:
    ``held`` (bytes of this rank's packed weights, absmax and nested absmax), ``whole`` (the
    same for the whole weights, as the sharded layout pads them) and ``replicated`` (the
    offsets and code tables every rank keeps: 1,092 bytes a double-quantized layer). Call it
    between steps: inside a forward a layer's weight is its gathered whole.
    :func:`ftkernels.nn.nf4_param.live_bytes` counts every 4-bit byte the process holds."""
    held = whole = replicated = 0
    seen: set[int] = set()
    for m in model.modules():
        if not isinstance(m, LinearNF4):
            continue
        t = _dist.local(m.weight)
        if isinstance(t, NF4Param):
            inner, codes, nested = t._inner(), [t.code, t.nested_code], t.meta.nested
            whole += t.payload_bytes() * (1 if t.whole else t.meta.parts)
        else:
            qs, nested = m.quant_state, m.quant_state.nested
            inner = [t, qs.absmax] + ([qs.state2.absmax] if nested else [])
            codes = [qs.code, qs.state2.code if nested else None]
            whole += sum(x.numel() * x.element_size() for x in inner)
        held += storage_bytes(inner, seen)
        replicated += sum(c.numel() * c.element_size() for c in codes if c is not None) + (4 if nested else 0)
    return {"held": held, "whole": whole, "replicated": replicated}


@contextlib.contextmanager
def all_gather_bytes() -> Iterator[list[int]]:
    """Counts what the all-gathers (``torch.distributed.all_gather_into_tensor`` and, where
    torch has it, ``all_gather_single``, which FSDP2 calls) move while the block runs: yields a
    list that gets each call's input bytes (this rank's contribution)."""
    import torch.distributed as dist

    counts: list[int] = []
    names = [n for n in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, n)]
    real = {n: getattr(dist, n) for n in names}
    depth = [0]

    def counting(name):
        def call(output_tensor, input_tensor, *args, **kwargs):
            if depth[0] == 0:  # one count a collective, even if one name calls the other
                counts.append(input_tensor.numel() * input_tensor.element_size())
            depth[0] += 1
            try:
                return real[name](output_tensor, input_tensor, *args, **kwargs)
            finally:
                depth[0] -= 1

        return call

    for n in names:
        setattr(dist, n, counting(n))
    try:
        yield counts
    finally:
        for n in names:
            setattr(dist, n, real[n])
