"""The torchrun worker of bench_distributed.py: one QLoRA step of SmolLM2-135M-Instruct on every
rank (gloo, CPU), sharded with FSDP2 (``shard_model``) and replicated with DDP, rounds alternating.
Rank 0 writes the measurements as JSON to ``--out``.

Run by the benchmark as
  python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/_distributed_step.py --out m.json
with OMP_NUM_THREADS=1 (one core a rank). Each round runs, for each implementation, one measured
step (the frozen base's 4-bit bytes sampled at every LoRA layer's forward and backward, the
all-gathers counted) and then one timed step with nothing attached; a step's time is the
slowest rank's.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

IMPLS = ("fsdp2", "ddp")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="where rank 0 writes the measurements (JSON)")
    p.add_argument("--rounds", type=int, default=5, help="rounds, each one warm-up and one timed step an impl")
    p.add_argument("--batch", type=int, default=4, help="global batch (rows), split evenly over the ranks")
    p.add_argument("--seq", type=int, default=256, help="tokens a row")
    p.add_argument(
        "--layers",
        type=int,
        default=0,
        help="0: the packaged SmolLM2-135M-Instruct (or its architecture, random); N: N layers of it, "
        "random, with a 2048-token vocabulary",
    )
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha")
    args = p.parse_args(argv)
    for name in ("rounds", "batch", "rank"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.seq < 2:
        p.error(f"--seq must be at least 2 (the loss predicts the next token), got {args.seq}")
    if args.layers < 0:
        p.error(f"--layers must be 0 (the whole model) or positive, got {args.layers}")
    return args


def base_model(layers: int):
    """(model, what it is), identical on every rank: bench_finetune's (the packaged GGUF or the
    architecture with random weights, seed 0), or ``layers`` of its layers with random weights."""
    from bench_finetune import SMOLLM2_135M_CONFIG, _load

    if layers == 0:
        return _load()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # A 2048-token vocabulary: the 49152 x 576 embedding alone takes most of a quick run's time.
    config = LlamaConfig(**{**SMOLLM2_135M_CONFIG, "num_hidden_layers": layers, "vocab_size": 2048})
    model = LlamaForCausalLM(config)
    return model, f"SmolLM2-135M-Instruct architecture, {layers} layers, vocabulary 2048, random weights"


def build(impl: str, base, args):
    """(module to call, the Transformers model inside it, optimizer) for impl, from a copy of base."""
    from torch.nn.parallel import DistributedDataParallel

    from ftkernels.integrations import add_lora, quantize_model, shard_model
    from ftkernels.optim import AdamW

    model = copy.deepcopy(base)
    quantize_model(model, progress=False)
    torch.manual_seed(1)  # the same LoRA factors on every rank and in both implementations
    add_lora(model, r=args.rank, alpha=args.alpha)
    if impl == "fsdp2":
        wrapped = shard_model(model)
    else:
        wrapped = DistributedDataParallel(model, find_unused_parameters=False)
    model.train()
    opt = AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    return wrapped, model, opt


def step(wrapped, model, opt, batch) -> torch.Tensor:
    """One training step as `ftk finetune` runs it (the head and the loss fused); its loss."""
    from ftkernels.integrations import fused_lm_loss

    with fused_lm_loss(model):
        loss = wrapped(**batch).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


@contextlib.contextmanager
def sampled_live_bytes(model):
    """Yields a list that gets ``live_bytes()`` (every 4-bit byte the process holds: shards and
    gathered wholes) at each LoRA layer's forward and at its backward."""
    from ftkernels.nn import LoRALinear4bit
    from ftkernels.nn.nf4_param import live_bytes

    samples: list[int] = []
    # The first layer's input needs no grad (the embedding is frozen): torch then says its
    # backward hook fires on the output's grad, which is when it is meant to sample.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    def sample(*_):
        samples.append(live_bytes())

    handles = []
    for m in model.modules():
        if isinstance(m, LoRALinear4bit):
            handles.append(m.register_forward_pre_hook(sample))
            handles.append(m.register_full_backward_pre_hook(sample))
    try:
        yield samples
    finally:
        for h in handles:
            h.remove()


def gather_groups(model, world: int) -> dict[int, tuple[int, int, list[str]]]:
    """What one all-gather of each FSDP2 module moves from this rank, keyed by its byte count:
    (nf4 bytes: the NF4Params' packed bytes, absmax and nested absmax shards; other bytes: the
    dense parameters' shards, padded on dim 0 as FSDP2 pads them; the modules). Call between
    steps, while the parameters are sharded."""
    from torch.distributed.fsdp import FSDPModule

    from ftkernels.nn.nf4_param import NF4Param

    groups: dict[int, tuple[int, int, list[str]]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, FSDPModule):
            continue
        nested = [n for n, m in mod.named_modules() if n and isinstance(m, FSDPModule)]
        nf4 = other = 0
        for pname, p in mod.named_parameters():
            if any(pname.startswith(n + ".") for n in nested):
                continue  # gathered by that module's own all-gather
            if not hasattr(p, "to_local"):
                continue  # not FSDP2's: the root's frozen dense parameters stay replicated
            local = p.to_local()
            if isinstance(local, NF4Param):
                nf4 += local.payload_bytes()
            elif p.dim() == 0:
                other += p.element_size()
            else:
                rows = -(-p.shape[0] // world)
                other += rows * (p.numel() // p.shape[0]) * p.element_size()
        size = nf4 + other
        if size in groups and groups[size][:2] != (nf4, other):
            raise RuntimeError(
                f"FSDP2 modules {groups[size][2][0]} and {name or '<root>'} gather {size} bytes each, "
                "split differently: the all-gathers cannot be attributed"
            )
        entry = groups.setdefault(size, (nf4, other, []))
        entry[2].append(name or "<root>")
    return groups


def split_gathers(calls: list[int], groups) -> dict:
    """The all-gathers of one step split into NF4 payload and other parameters; a call that is
    no FSDP2 module's shard is counted as unaccounted."""
    nf4 = other = unaccounted = 0
    for size in calls:
        if size in groups:
            nf4 += groups[size][0]
            other += groups[size][1]
        else:
            unaccounted += size
    return {
        "bytes_per_step": sum(calls),
        "calls_per_step": len(calls),
        "bytes_per_call": calls,
        "nf4_bytes_per_step": nf4,
        "other_bytes_per_step": other,
        "unaccounted_bytes_per_step": unaccounted,
    }


def slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def largest(n: int) -> int:
    t = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def mean_over_ranks(x: torch.Tensor) -> float:
    t = x.double().reshape(1)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def main(argv: list[str]) -> int:
    from ftkernels.integrations import all_gather_bytes, nf4_resident_bytes

    args = parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise ValueError(f"--batch ({args.batch}) must be a multiple of the number of ranks ({world})")
    base, what = base_model(args.layers)
    models = {impl: build(impl, base, args) for impl in IMPLS}
    del base
    vocab = models["ddp"][1].config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    share = args.batch // world
    mine = ids[rank * share : (rank + 1) * share]
    batch = {"input_ids": mine, "labels": mine}

    # Between steps: what each rank holds of the frozen base, and what each FSDP2 all-gather moves.
    resident = {impl: nf4_resident_bytes(models[impl][1]) for impl in IMPLS}
    groups = gather_groups(models["fsdp2"][1], world)
    payload = resident["fsdp2"]["whole"] // world  # the NF4Params' bytes an all-gather pass brings
    times = {impl: [] for impl in IMPLS}
    peaks = {impl: [] for impl in IMPLS}
    gathers = {impl: [] for impl in IMPLS}
    first_loss = {}
    for _ in range(args.rounds):
        for impl in IMPLS:
            wrapped, model, opt = models[impl]
            sampler = sampled_live_bytes(model) if impl == "fsdp2" else contextlib.nullcontext([])
            with sampler as samples, all_gather_bytes() as calls:
                loss = step(wrapped, model, opt, batch)
            first_loss.setdefault(impl, mean_over_ranks(loss))
            if impl == "fsdp2":
                if not samples:
                    raise RuntimeError("fsdp2: no LoRALinear4bit ran, nothing sampled")
                peak = max(samples) + resident[impl]["replicated"]
            else:  # plain weights: the frozen base is the same bytes all through the step
                peak = resident[impl]["held"] + resident[impl]["replicated"]
            peaks[impl].append(largest(peak))
            gathers[impl].append(split_gathers(calls, groups))
            dist.barrier()
            start = time.perf_counter()
            step(wrapped, model, opt, batch)
            times[impl].append(slowest(time.perf_counter() - start))

    out = {
        "model": what,
        "world": world,
        "threads_per_rank": torch.get_num_threads(),
        "global_batch": [args.batch, args.seq],
        "tokens_per_step": args.batch * args.seq,
        "lora": {"r": args.rank, "alpha": args.alpha},
        "rounds": args.rounds,
        "nf4_whole_bytes": resident["fsdp2"]["whole"],
        "nf4_payload_bytes_per_rank": payload,
        "nf4_replicated_bytes": resident["fsdp2"]["replicated"],
        "fsdp2_gather_groups": {str(k): {"nf4": v[0], "other": v[1], "modules": v[2]} for k, v in groups.items()},
        "impls": {},
    }
    for impl in IMPLS:
        out["impls"][impl] = {
            "step_s": times[impl],
            "median_step_s": statistics.median(times[impl]),
            "first_loss": first_loss[impl],
            "frozen_base_held_bytes": resident[impl]["held"],
            "frozen_base_peak_bytes": max(peaks[impl]),
            "all_gather": gathers[impl][0],
            "all_gather_bytes_per_round": [g["bytes_per_step"] for g in gathers[impl]],
        }
    if rank == 0:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_finetune, conftest
    sys.exit(main(sys.argv[1:]))
