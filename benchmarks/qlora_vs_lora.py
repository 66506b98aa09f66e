"""QLoRA against LoRA on the same fp32 base: `ftk finetune`'s defaults (SmolLM2-135M-Instruct,
the built-in data, 60 steps, batch 4, lr 2e-4, seed 0) for both, the base loaded once and
copied, so the only difference is the NF4 base under QLoRA's adapters. The QLoRA paper's claim,
measured here: QLoRA's final training loss within 2% of LoRA's. Both curves, the final losses
(the last step's, and the mean of the last 10 steps, which one batch's draw moves less) and their
ratios go to benchmarks/results/qlora-vs-lora-cpu.json, and the curves to a PNG beside it.

Run: python benchmarks/qlora_vs_lora.py [--steps N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from ftkernels.apps import finetune as ft
from ftkernels.apps.finetune_data import held_out_prompts
from ftkernels.apps.models import load_causal_lm, resolve_model

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default=str(RESULTS / "qlora-vs-lora-cpu.json"))
    args = parser.parse_args()
    base, tokenizer = load_causal_lm(*resolve_model(None))
    _, pairs, _ = held_out_prompts("builtin", ft.load_pairs("builtin"))
    examples = ft.encode(tokenizer, pairs, 128)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    curves, seconds = {}, {}
    for method in ("lora", "qlora"):
        model = copy.deepcopy(base)
        params = ft.prepare(model, method, seed=0)
        t0 = time.perf_counter()
        result = ft.train(model, params, examples, pad, ft.TrainConfig(steps=args.steps), progress=True)
        curves[method], seconds[method] = result.losses, time.perf_counter() - t0
        del model
    last = {m: c[-1] for m, c in curves.items()}
    tail = {m: sum(c[-10:]) / len(c[-10:]) for m, c in curves.items()}
    out = {
        "model": "SmolLM2-135M-Instruct (fp32 base)",
        "steps": args.steps,
        "final_loss": last,
        "final_loss_ratio_qlora_over_lora": last["qlora"] / last["lora"],
        "last10_mean_loss": tail,
        "last10_mean_ratio_qlora_over_lora": tail["qlora"] / tail["lora"],
        "seconds": seconds,
        "curves": curves,
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    try:
        from ftkernels.apps import plots

        plt = plots.pyplot()
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for method, curve in curves.items():
            ax.plot(range(1, len(curve) + 1), curve, label=ft.METHOD_NAMES[method])
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.set_yscale("log")
        ax.set_title("QLoRA and LoRA on SmolLM2-135M-Instruct, built-in data")
        ax.legend()
        fig.tight_layout()
        fig.savefig(Path(args.out).with_suffix(".png"), dpi=110)
    except ImportError as e:
        print(f"no figure: {e}")
    print(json.dumps({k: v for k, v in out.items() if k != "curves"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
