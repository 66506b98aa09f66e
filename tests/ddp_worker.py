"""Run by tests/test_ddp.py under torchrun (gloo, 2 ranks): a few training steps of a tiny Llama
with LoRA or LoReFT under DistributedDataParallel, then prints whether every rank ended with
the same trainable parameters. Not a test module itself."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from ftkernels.integrations.lora import add_lora  # noqa: E402
from ftkernels.integrations.reft import add_loreft  # noqa: E402
from ftkernels.optim import AdamW  # noqa: E402

from conftest import make_tiny_llama  # noqa: E402


def main(method: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = make_tiny_llama()
    if method == "loreft":
        add_loreft(model, positions="f3+l3")
    else:
        add_lora(model, r=4)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]).clone()
    g = torch.Generator().manual_seed(rank)  # each rank its own data: in sync only if DDP averages
    for _ in range(5):
        ids = torch.randint(3, 100, (2, 10), generator=g)
        loss = ddp(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if rank == 0:
        print("IN_SYNC" if all(torch.equal(gathered[0], t) for t in gathered) else "OUT_OF_SYNC", flush=True)
        print("TRAINED" if not torch.equal(flat, start) else "UNCHANGED", flush=True)
    # Both ranks leave together: a rank that tore its gloo pairs down while the other still
    # used them aborted that one ("terminate called without an active exception") about one
    # run in eight.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
