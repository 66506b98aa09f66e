"""The distributed half of test_fsdp.py: run by torchrun (gloo, CPU), each rank runs the named
scenarios and rank 0 writes one JSON a scenario into the output folder (``<scenario>-<world
size>.json``; checkpoints and adapters go there too, for the next launch to read).
test_fsdp.py runs the same functions in one process, unsharded, as the reference.

    python -m torch.distributed.run --standalone --nproc-per-node N tests/fsdp_worker.py OUT SCENARIO...

Every model is a tiny random decoder from conftest (hidden 64, 2 layers); batches are 8
sequences of 12 tokens with a varying number of masked labels, so that ranks see different
token counts and the loss weighting matters.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ftkernels.apps import finetune as ft  # noqa: E402
from ftkernels.integrations import (  # noqa: E402
    _dist,
    add_lora,
    add_loreft,
    all_gather_bytes,
    load_training_state,
    nf4_resident_bytes,
    quantize_model,
    save_lora,
    save_loreft,
    save_training_state,
    shard_model,
)
from ftkernels.integrations._reft_base import decoder_layers  # noqa: E402
from ftkernels.nn import LinearNF4, LoRALinear4bit  # noqa: E402
from ftkernels.optim import AdamW, AdamW8bit  # noqa: E402

from conftest import make_tiny_causal_lm  # noqa: E402

BATCH, SEQ, VOCAB = 8, 12, 128


def batch(step: int) -> dict[str, torch.Tensor]:
    """The global batch of a step, the same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    for row in range(BATCH):  # rows keep 4..11 labelled tokens: the ranks' counts differ
        labels[row, : int(torch.randint(1, 9, (1,), generator=g))] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def qlora(arch: str = "llama", quantize: bool = True) -> nn.Module:
    """A tiny QLoRA model: NF4 base (double quantization), LoRA r=4 with B drawn small (not
    zero, so that every factor has a gradient from the first step). Plain LoRA unquantized."""
    model = make_tiny_causal_lm(arch, vocab_size=VOCAB)
    if quantize:
        quantize_model(model, progress=False)
    torch.manual_seed(1)
    add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.train()


def loreft() -> nn.Module:
    model = make_tiny_causal_lm("llama", vocab_size=VOCAB)
    quantize_model(model, progress=False)
    torch.manual_seed(1)
    add_loreft(model, layers="all", rank=2, positions="f3+l3")
    return model.train()


def uneven() -> nn.Module:
    """Layers whose block counts and rows divide by no world size: 7 x 13 (91 weights, 2
    blocks of 64), 13 x 7 and 5 x 13, one FSDP unit (no decoder layers)."""
    torch.manual_seed(0)
    dims = [(13, 7), (7, 13), (13, 5)]
    layers = [LoRALinear4bit.from_linear(nn.Linear(i, o), r=3, lora_alpha=6) for i, o in dims]
    with torch.no_grad():
        for m in layers:
            m.lora_B.weight.normal_(0, 0.1)
    return nn.Sequential(*layers).train()


def frozen_bytes(model: nn.Module) -> dict[str, list[int]]:
    """Each LinearNF4's packed bytes and absmax, as the fused op receives them."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LinearNF4):
            packed, qs = m.weight_and_state()
            out[name] = [packed.reshape(-1).tolist(), qs.absmax.reshape(-1).tolist()]
    return out


def spy_frozen(model: nn.Module, seen: dict) -> None:
    """Records what each LinearNF4's forward reads (the gathered whole, under FSDP2)."""
    for name, m in model.named_modules():
        if isinstance(m, LinearNF4):
            real = m.weight_and_state

            def record(real=real, name=name):
                packed, qs = real()
                seen[name] = [packed.reshape(-1).tolist(), qs.absmax.reshape(-1).tolist()]
                return packed, qs

            m.weight_and_state = record


def sharded_param_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of this rank's shard of every parameter as FSDP2 all-gathers them (an NF4Param by
    its payload), for the decoder layers and for the rest (the root's own FSDP unit)."""
    try:
        blocks = {id(p) for p in decoder_layers(model).parameters()}
    except ValueError:
        blocks = set()
    out = {"layers": 0, "root": 0}
    for p in model.parameters():
        if not _dist.is_dtensor(p):
            continue  # not FSDP2's: the root's frozen dense parameters stay replicated
        t = _dist.local(p)
        n = t.payload_bytes() if hasattr(t, "payload_bytes") else t.numel() * t.element_size()
        out["layers" if id(p) in blocks else "root"] += n
    return out


def train(model, opt, steps: int, start: int = 0) -> list[float]:
    if isinstance(model, nn.Sequential):
        return [_uneven_step(model, opt, start + i) for i in range(steps)]
    return [ft.train_step(model, opt, batch(start + i))[0] for i in range(steps)]


def _uneven_step(model, opt, step: int) -> float:
    """A regression step of the uneven stack: 8 rows, each rank its equal share (FSDP2's
    gradient average is then the global mean's)."""
    g = torch.Generator().manual_seed(2000 + step)
    x, y = torch.randn(BATCH, 13, generator=g), torch.randn(BATCH, 5, generator=g)
    share, r = BATCH // _dist.world_size(), _dist.rank()
    loss = torch.nn.functional.mse_loss(model(x[r * share : (r + 1) * share]), y[r * share : (r + 1) * share])
    opt.zero_grad()
    loss.backward()
    opt.step()
    value = loss.detach().clone()
    if _dist.initialized():
        torch.distributed.all_reduce(value)
    return float(value) / _dist.world_size()


def probe_logits(model) -> list[float]:
    with torch.no_grad():
        return model(input_ids=batch(99)["input_ids"][:2]).logits.reshape(-1)[:64].tolist()


def prepare(kind: str, shard: bool, **shard_kwargs) -> nn.Module:
    kinds = {
        "llama": lambda: qlora("llama"),
        "qwen2": lambda: qlora("qwen2"),
        "lora": lambda: qlora("llama", quantize=False),
        "loreft": loreft,
        "uneven": uneven,
    }
    model = kinds[kind]()
    if shard:
        shard_model(model, **shard_kwargs)
    return model


def optimizer(model, kind: str = "adamw", lr: float = 5e-3):
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adamw8bit":
        return AdamW8bit(params, lr=lr, min_8bit_size=16)
    return AdamW(params, lr=lr)


# ---- scenarios: each returns what rank 0 writes --------------------------------------------------


def scenario_train(kind: str, shard: bool, steps: int = 5, **shard_kwargs) -> dict:
    """Five steps; the bytes the layers compute with; what the ranks hold and gather."""
    model = prepare(kind, False)
    before = frozen_bytes(model)
    if shard:
        shard_model(model, **shard_kwargs)
    seen: dict = {}
    spy_frozen(model, seen)
    opt = optimizer(model)
    counts: list[int] = []
    losses = []
    for i in range(steps):
        with all_gather_bytes() as c:
            losses += train(model, opt, 1, start=i)
        counts.append(sum(c))
        calls = len(c)
    out = {"losses": losses, "same_bytes": seen == before and len(seen) == len(before)}
    if shard:
        out.update(resident=nf4_resident_bytes(model), gathered=counts, calls=calls, shard=sharded_param_bytes(model))
    return out


def scenario_memorize(shard: bool) -> dict:
    """LoReFT on a (sharded) 4-bit base, five steps on one batch: the loss must fall."""
    model = prepare("loreft", shard)
    opt = optimizer(model, lr=2e-2)
    return {"losses": [ft.train_step(model, opt, batch(0))[0] for _ in range(5)]}


def scenario_mixed_precision(shard: bool) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    out = scenario_train("llama", shard, mp_policy=policy) if shard else scenario_train("llama", False)
    return out


def scenario_dcp_save(folder: str, opt_kind: str) -> dict:
    """Three steps, a checkpoint, two steps more."""
    model = prepare("llama", _dist.initialized())
    opt = optimizer(model, opt_kind)
    first = train(model, opt, 3)
    save_training_state(model, opt, folder, extra={"step": 3, "seed": 7})
    return {"first": first, "then": train(model, opt, 2, start=3)}


def scenario_dcp_load(folder: str, opt_kind: str) -> dict:
    model = prepare("llama", _dist.initialized())
    opt = optimizer(model, opt_kind)
    extra = load_training_state(model, opt, folder)
    return {"extra": extra, "then": train(model, opt, 2, start=extra["step"])}


def scenario_ddp() -> dict:
    """QLoRA, LoRA and LoReFT under DistributedDataParallel, each rank its rows of the global batch:
    the losses of one process, and every rank's parameters the same after the steps."""
    out = {}
    for kind in ("llama", "lora", "loreft"):
        model = prepare(kind, False)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = optimizer(model)
        out[kind] = train(ddp, opt, 5)
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
        everyone = [torch.zeros_like(flat) for _ in range(_dist.world_size())]
        torch.distributed.all_gather(everyone, flat)
        out[f"{kind}-in-sync"] = all(torch.equal(everyone[0], t) for t in everyone)
    return out


def scenario_save_adapters(folder: str) -> dict:
    """Train the sharded QLoRA and LoReFT models 3 steps, save their adapters (gathered, rank 0
    writes), record logits to compare with the files loaded into an unsharded model."""
    out = {}
    for kind, save in (("llama", save_lora), ("loreft", save_loreft)):
        model = prepare(kind, True)
        train(model, optimizer(model), 3)
        save(model, os.path.join(folder, kind))
        out[kind] = probe_logits(model.eval())
    return out


def scenario_load_adapters(folder: str) -> dict:
    """The saved adapters loaded into fresh models, then sharded."""
    from ftkernels.integrations import load_lora, load_loreft

    out = {}
    for kind, load in (("llama", load_lora), ("loreft", load_loreft)):
        model = make_tiny_causal_lm("llama", vocab_size=VOCAB)
        quantize_model(model, progress=False)
        load(model, os.path.join(folder, kind))
        shard_model(model)
        out[kind] = probe_logits(model.eval())
    return out


def scenario_disagree() -> dict:
    """Ranks that initialised their adapters differently are refused."""
    model = make_tiny_causal_lm("llama", vocab_size=VOCAB)
    quantize_model(model, progress=False)
    torch.manual_seed(_dist.rank())
    add_lora(model, r=2, alpha=4)
    try:
        shard_model(model)
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def scenario_finetune(model_dir: str, out_dir: str) -> dict:
    from ftkernels.apps import cli

    rc = cli.main(
        ["finetune", "--fsdp", "--model", model_dir, "--steps", "2", "--max-new-tokens", "2", "--out", out_dir]
    )
    return {"rc": rc}


SCENARIOS = {
    "train-llama": lambda out: scenario_train("llama", True),
    "train-qwen2": lambda out: scenario_train("qwen2", True),
    "train-llama-keep": lambda out: scenario_train("llama", True, reshard_after_forward=False),
    "train-loreft": lambda out: scenario_train("loreft", True),
    "train-uneven": lambda out: scenario_train("uneven", True, steps=3),
    "loreft-memorize": lambda out: scenario_memorize(True),
    "mixed-precision": lambda out: scenario_mixed_precision(True),
    "dcp-save": lambda out: {k: scenario_dcp_save(os.path.join(out, f"dcp-{k}"), k) for k in ("adamw", "adamw8bit")},
    "dcp-load": lambda out: {k: scenario_dcp_load(os.path.join(out, f"dcp-{k}"), k) for k in ("adamw", "adamw8bit")},
    "ddp": lambda out: scenario_ddp(),
    "save-adapters": lambda out: scenario_save_adapters(out),
    "load-adapters": lambda out: scenario_load_adapters(out),
    "disagree": lambda out: scenario_disagree(),
    "finetune": lambda out: scenario_finetune(os.path.join(out, "tiny"), os.path.join(out, "finetune")),
}


def main(argv: list[str]) -> None:
    out, names = argv[0], argv[1:]
    torch.distributed.init_process_group("gloo")
    try:
        for name in names:
            result = SCENARIOS[name](out)
            if _dist.rank() == 0:
                result["world_size"] = _dist.world_size()
                Path(out, f"{name}-{_dist.world_size()}.json").write_text(json.dumps(result))
    finally:
        # Both ranks leave together: a rank that tears its gloo pairs down while the other still
        # uses them can abort that one ("terminate called without an active exception").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
