"""One training step (forward, backward, AdamW step) of SmolLM2-135M-Instruct, batch 4 x 256
tokens, as a PEFT + bitsandbytes user runs it: the model saved once as safetensors, loaded through
Transformers' ``BitsAndBytesConfig`` (NF4, double quantization, compute dtype = the step's dtype),
PEFT LoRA r=16, alpha 32 on every attention and MLP projection, torch's AdamW. Four models from
the same file, one step of each per round, rounds alternating:

  peft               PEFT's forward (bitsandbytes' Linear4bit, then the LoRA branch as three ops);
  ftk-patched        after ``patch_peft(model)``: the fused op on bitsandbytes' own bytes;
  ftk-patched-loss   also ``fuse_lm_loss_when_training``: what ``FusedCallback`` gives a Trainer.
  peft-dense         PEFT LoRA on the unquantized model: no dequantization at all, the floor a
                     4-bit step's GEMMs approach (the ``*_of_dense`` ratios).

fp32 on the CPU (FTK_BENCH_DTYPE=bf16 for bf16, on a CPU with AVX512-BF16 or AMX), bf16 on a GPU.
Peak memory: on the CPU the VmHWM of a fresh process loading the model and running two steps, on
a GPU torch's peak allocation over two steps.

Targets: ftk-patched at least 1.25x faster than peft on the CPU (1.5x on a GPU), and peak memory no
higher. Run: pytest benchmarks/bench_dropin.py --benchmark-json=benchmarks/results/dropin-cpu.json
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from bench_finetune import DEVICE, DTYPE, SMOLLM2_135M_CONFIG, TARGETS, _dtype, _load

from conftest import QUICK

BATCH, SEQ, RANK, ALPHA = 4, 256, 16, 32
ROUNDS, PEAK_MEMORY = 5, True
if QUICK:
    BATCH, SEQ, ROUNDS, PEAK_MEMORY = 1, 32, 1, False
IMPLS = ("peft", "ftk-patched", "ftk-patched-loss", "peft-dense")


def save_model(folder: Path) -> str:
    """The benchmark's model (bench_finetune's: the packaged SmolLM2 or its architecture with
    random weights) saved as safetensors in folder; returns what it is."""
    if QUICK:  # two of the 30 layers, random: the suite's plumbing, not its figures
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_135M_CONFIG, "num_hidden_layers": 2}))
        what = "SmolLM2-135M-Instruct architecture, 2 layers, random weights"
    else:
        model, what = _load()
    # Read from GGUF, the weights are plain tensors already: saved as a plain checkpoint.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.save_pretrained(folder, safe_serialization=True)
    return what


def load(folder, impl: str):
    """(model, optimizer) for impl, from the saved folder, in training mode."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ftkernels.integrations import fuse_lm_loss_when_training, patch_peft
    from ftkernels.integrations.hf_compat import dtype_kwarg

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=DTYPE
    )
    quantized = {} if impl == "peft-dense" else {"quantization_config": config}
    model = AutoModelForCausalLM.from_pretrained(folder, device_map={"": DEVICE}, **quantized, **dtype_kwarg(DTYPE))
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
    )
    if impl.startswith("ftk"):
        report = patch_peft(model)
        assert not report.fallbacks, str(report)
    if impl == "ftk-patched-loss":
        assert fuse_lm_loss_when_training(model.get_base_model()).active
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    return model, opt


def batch(vocab: int):
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    return {"input_ids": ids, "labels": ids}


def step(model, opt, inputs):
    loss = model(**inputs).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return loss.item()


@pytest.fixture(scope="module")
def saved():
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    with tempfile.TemporaryDirectory() as d:
        what = save_model(Path(d))
        yield Path(d), what


@pytest.fixture(scope="module")
def models(saved):
    folder, _ = saved
    out, peaks, first = {}, {}, {}
    for impl in IMPLS:
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        out[impl] = load(folder, impl)
        inputs = batch(out[impl][0].config.vocab_size)
        first[impl] = step(*out[impl], inputs)
        step(*out[impl], inputs)
        if DEVICE == "cuda":
            peaks[impl] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return out, peaks, first


def peak_rss(folder, impl: str) -> float | None:
    """VmHWM (MiB) of a fresh process that loads impl's model and runs two steps."""
    run = subprocess.run(
        [sys.executable, __file__, str(folder), impl],
        capture_output=True,
        text=True,
        timeout=900,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
        },
    )
    return float(run.stdout.strip().splitlines()[-1]) if run.returncode == 0 else None


def test_ftk_patch_peft_interleaved(benchmark, saved, models):
    """The three steps round-robin, one of each a round: the ratios of their medians are what
    the targets are checked against (a shared machine drifts between separate tests)."""
    folder, what = saved
    steps, peaks, first = models
    inputs = batch(steps["peft"][0].config.vocab_size)
    times = {impl: [] for impl in IMPLS}

    def rounds():
        for _ in range(ROUNDS):
            for impl in IMPLS:
                start = time.perf_counter()
                step(*steps[impl], inputs)
                times[impl].append(time.perf_counter() - start)

    benchmark.group = f"dropin-{DEVICE}-interleaved"
    benchmark.pedantic(rounds, rounds=1, warmup_rounds=0)
    median = {impl: statistics.median(t) for impl, t in times.items()}
    info = {"model": what, "dtype": _dtype, "tokens": BATCH * SEQ}
    info.update({f"{impl}_median_s": t for impl, t in median.items()})
    for impl in ("ftk-patched", "ftk-patched-loss"):
        info[f"{impl}_speedup_vs_peft"] = median["peft"] / median[impl]
        info[f"{impl}_time_of_dense"] = median[impl] / median["peft-dense"]
    info["peft_time_of_dense"] = median["peft"] / median["peft-dense"]
    if PEAK_MEMORY and DEVICE == "cpu":
        for impl in IMPLS:
            mib = peak_rss(folder, impl)
            if mib is not None:
                info[f"{impl}_peak_rss_mib"] = mib
    for impl, mib in peaks.items():
        info[f"{impl}_peak_cuda_mib"] = mib
    benchmark.extra_info.update(info)
    benchmark.extra_info["report"] = sorted(k for k in info if k.endswith(("_s", "_peft", "_mib", "_dense")))
    # the first step: the same weights and data, so the losses agree to rounding (bf16 steps drift apart)
    for impl in ("ftk-patched", "ftk-patched-loss"):
        assert abs(first[impl] - first["peft"]) < 2e-3 * abs(first["peft"]), first


if __name__ == "__main__":  # peak memory of one implementation, in a process of its own
    from ftkernels.apps.finetune import peak_rss_mib

    model, opt = load(sys.argv[1], sys.argv[2])
    inputs = batch(model.config.vocab_size)
    for _ in range(2):
        step(model, opt, inputs)
    print(peak_rss_mib())
