"""Fine-tuning a causal LM with QLoRA, LoRA or LoReFT: the model, the optimizer, the schedule and
the loop, with checkpoints, resume and evaluation.

``prepare(model, method, ...)`` readies the model (QLoRA: NF4 base + LoRA; LoRA; LoReFT
interventions), ``train(model, params, examples, pad_id, config, ...)`` trains it on encoded
examples (finetune_data.py) and returns a :class:`Result`; ``write_outputs`` saves the adapter,
metrics and figures (finetune_outputs.py); ``ftk finetune`` (finetune_cmd.py) strings them
together. One optimizer step is ``train_step``: ``grad_accum`` micro-batches, each token of the
step weighted alike (each micro-batch's token-mean loss times its share of the step's tokens,
counted over all ranks before the first backward), so accumulating 4 batches of 1 is the step on
the batch of 4; then the gradient norm is clipped and the optimizer steps.

Resuming is bit for bit: a checkpoint (finetune_checkpoint.py) holds the trainable parameters, the
optimizer's states as they are, every RNG state at the end of its step and the number of batches
drawn; the learning rate is a function of the step. Evaluation draws no random numbers (dropout is
off in eval mode), so it changes nothing a later step computes. SIGINT and SIGTERM end the run
after the step in progress, with a checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..integrations import _dist
from ..integrations.fsdp import shard_model
from ..integrations.hf_compat import enable_gradient_checkpointing
from ..integrations.lora import add_lora
from ..integrations.loss import fused_lm_loss
from ..integrations.reft import add_loreft
from ..integrations.transformers import quantize_model
from ..optim import AdamW, AdamW8bit, Lion, PagedAdamW8bit
from . import finetune_checkpoint as ckpt
from .finetune_data import (  # noqa: F401  (the data's names, re-exported for the loop's users)
    BUILTIN_DATA,
    HELD_OUT_PROMPTS,
    Batches,
    batches,
    encode,
    eval_batches,
    fingerprint,
    held_out_prompts,
    load_pairs,
)
from .finetune_outputs import (  # noqa: F401
    METHOD_NAMES,
    MetricsLog,
    adapter_writer,
    loss_curve_png,
    lr_png,
    model_name,
    smoothed,
    write_outputs,
)

METHODS = ("qlora", "lora", "loreft")
LORA_RANK, LOREFT_RANK, LOREFT_POSITIONS = 8, 4, "f5+l5"  # prepare's defaults (ftk estimate reads them)
OPTIMIZERS = {"adamw": AdamW, "adamw8bit": AdamW8bit, "paged-adamw8bit": PagedAdamW8bit, "lion": Lion}
SCHEDULERS = ("constant", "linear", "cosine")


def prepare(
    model,
    method: str,
    rank: int | None = None,
    seed: int = 0,
    *,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules=None,
    gradient_checkpointing: bool = False,
) -> list[torch.nn.Parameter]:
    """Turns the model into one to train with ``method``; returns the trainable parameters.
    LoRA's rank defaults to 8 and alpha to twice the rank, LoReFT's rank to 4 (every layer, the
    first and last 5 positions). The adapters are initialised from torch's generator seeded with
    ``seed``: the same on every rank of a distributed run. Gradient checkpointing is
    Transformers' own, non-reentrant (a frozen base needs no input gradients then)."""
    if method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {method!r}")
    torch.manual_seed(seed)
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
        enable_gradient_checkpointing(model)
    if method == "loreft":
        if target_modules is not None:
            raise ValueError("--target-modules applies to LoRA and QLoRA; LoReFT edits every layer's output")
        reft = add_loreft(model, layers="all", rank=rank or LOREFT_RANK, positions=LOREFT_POSITIONS, dropout=dropout)
        return list(reft.parameters())
    if method == "qlora":
        quantize_model(model, progress=False)
    r = rank or LORA_RANK
    add_lora(model, r=r, alpha=2 * r if alpha is None else alpha, dropout=dropout, target_modules=target_modules)
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """One of OPTIMIZERS (ftkernels.optim: the 8-bit and paged states as bitsandbytes keeps them)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {tuple(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay)


def lr_factor(kind: str, step: int, warmup: int, total: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) over the peak, as Transformers'
    get_{constant,linear,cosine}_schedule_with_warmup give it: a linear warm-up from 0 over
    ``warmup`` steps, then constant, linear to 0 at ``total``, or half a cosine to 0 at ``total``."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if kind == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"--lr-scheduler must be one of {SCHEDULERS}, got {kind!r}")


@dataclass
class TrainConfig:
    """The loop's options (``ftk finetune``'s, of the same names)."""

    steps: int = 60
    lr: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # Transformers' default; 0 turns clipping off
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    seed: int = 0
    eval_every: int = 0  # 0: the eval loss at the last step only (when there is eval data)
    save_every: int = 0  # 0: no checkpoints but on SIGINT/SIGTERM
    keep: int = 0  # 0: keep every checkpoint

    def check(self, world: int | None = None) -> None:
        """ValueError naming the option that is out of range (``world``: the ranks; default: now)."""
        world = _dist.world_size() if world is None else world
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "keep"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be positive, got {self.lr}")
        for name in ("max_grad_norm", "weight_decay"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {v}")
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"--lr-scheduler must be one of {SCHEDULERS}, got {self.lr_scheduler!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {tuple(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.batch_size % world:
            raise ValueError(f"--batch-size ({self.batch_size}) must be a multiple of the number of ranks ({world})")


@dataclass
class Result:
    history: list[dict] = field(default_factory=list)  # one row a step (the metrics.jsonl rows)
    tokens_per_second: float = 0.0
    resumed_from: Path | None = None
    resumed_at: int = 0  # the step of that checkpoint
    checkpoint: Path | None = None  # the last one written
    interrupted: int | None = None  # the signal that ended the run early

    @property
    def losses(self) -> list[float]:
        return [row["loss"] for row in self.history]


def _inner(model):
    """The module under a DistributedDataParallel wrapper."""
    return getattr(model, "module", model) if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _forward_backward(model, batch: dict[str, torch.Tensor], weight: float) -> torch.Tensor:
    """One micro-batch: its token-mean loss (detached), its gradient times ``weight`` added."""
    loss = model(**batch).loss
    (loss * weight if weight != 1.0 else loss).backward()
    return loss.detach()


def _gradient_sync(model, on: bool):
    """DDP and FSDP2 reduce gradients on a backward; within an accumulation window only the last does."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if on else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2's fully_shard
        model.set_requires_gradient_sync(on)
    return contextlib.nullcontext()


def train_step(model, opt, batch, *, max_grad_norm: float = 0.0) -> tuple[float, int]:
    """One optimizer step on ``batch``: a batch dict, or a list of them (gradient accumulation).
    Each is the global batch: under torch.distributed this rank takes its share of the rows.
    Returns (the loss over all the step's response tokens, the tokens seen over all ranks)."""
    micro = batch if isinstance(batch, list) else [batch]
    world, rank = _dist.world_size(), _dist.rank()
    if world > 1:
        share = len(micro[0]["input_ids"]) // world
        micro = [{k: v[rank * share : (rank + 1) * share] for k, v in m.items()} for m in micro]
    counts = [(m["labels"][:, 1:] != -100).sum().to(torch.float64) for m in micro]
    sums = torch.stack([sum(counts), sum(m["attention_mask"].sum() for m in micro).double()])
    if world > 1:
        torch.distributed.all_reduce(sums)
    total = sums[0]
    opt.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), dtype=torch.float64)
    with fused_lm_loss(_inner(model)):  # the head and the loss fused: no (tokens x vocab) logits
        for j, (m, n) in enumerate(zip(micro, counts)):
            # DDP and FSDP2 average the gradients over ranks: weighting each micro-batch's token-mean
            # loss by world * its tokens / the step's tokens makes that average the step's token mean.
            with _gradient_sync(model, j == len(micro) - 1):
                loss = _forward_backward(model, m, float(n * world / total))
            loss_sum += loss.double() * n
    if world > 1:
        torch.distributed.all_reduce(loss_sum)
    if max_grad_norm > 0:
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    return float(loss_sum / total), int(sums[1])


@torch.no_grad()
def evaluate(model, examples, pad_id: int, batch_size: int) -> float:
    """The token-mean loss over ``examples`` in eval mode. Replicated ranks (DDP) each take their
    rows and sum over all; sharded ones (FSDP2) each run them all, as every forward there is a
    collective that each rank must make as often as the others."""
    inner = _inner(model)
    was_training = inner.training
    inner.eval()
    world, rank = _dist.world_size(), _dist.rank()
    if any(_dist.is_dtensor(p) for p in inner.parameters()):
        world, rank = 1, 0
    sums = torch.zeros(2, dtype=torch.float64)
    with fused_lm_loss(inner):
        for b in eval_batches(examples[rank::world], batch_size, pad_id):
            n = (b["labels"][:, 1:] != -100).sum()
            if n:
                sums += torch.stack([inner(**b).loss.double() * n, n.double()])
    if world > 1:
        torch.distributed.all_reduce(sums)
    inner.train(was_training)
    return float(sums[0] / sums[1]) if sums[1] else float("nan")


class _StopSignals:
    """SIGINT/SIGTERM set a flag the loop reads after each step (a second one aborts at once)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)

    def agreed(self) -> int | None:
        """The signal any rank got (a collective under torch.distributed)."""
        if not _dist.initialized():
            return self.signum
        flag = torch.tensor([self.signum or 0], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in _inner(model).named_parameters() if p.requires_grad}


def _identity(model, examples, config: TrainConfig, identity: dict | None) -> dict:
    """What a checkpoint must match to be resumed from: the caller's (model, method, ...), the
    trainable parameters' names and shapes, the data, and the options that shape the steps."""
    named = _trainable(model)
    return {
        **(identity or {}),
        "trainable": {n: list(p.shape) for n, p in named.items()},
        "data": fingerprint(examples),
        "world_size": _dist.world_size(),
        "optimizer": config.optimizer,
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        "seed": config.seed,
    }


def _restore(model, opt, data: Batches, path: Path, identity: dict) -> tuple[dict, list[dict]]:
    trainer, tensors, meta = ckpt.read(path, identity)
    named = _trainable(model)
    f = path / ckpt.rank_file(_dist.rank())
    ckpt.check_params(f, tensors, {n: _dist.local(p) for n, p in named.items()})
    with torch.no_grad():
        for n, p in named.items():
            _dist.local(p).copy_(tensors[f"param.{n}"])
    try:
        ckpt.load_optimizer_state(opt, tensors, meta["optimizer"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise ckpt.CheckpointError(f"{f}: its optimizer state does not fit this run's optimizer ({e})") from e
    ckpt.set_rng_state(tensors, meta["rng"])
    data.skip(trainer["progress"]["batches_drawn"])
    return trainer, trainer["history"]


def _save(root, step, model, opt, data, history, identity, write_adapter) -> Path:
    named = _trainable(model)
    tensors = {f"param.{n}": _dist.local(p).detach().cpu() for n, p in named.items()}
    opt_tensors, opt_meta = ckpt.optimizer_state(opt)
    rng_tensors, rng_meta = ckpt.rng_state()
    trainer = {"identity": identity, "progress": {"batches_drawn": data.drawn}, "history": history}
    meta = {"optimizer": opt_meta, "rng": rng_meta}
    return ckpt.save(root, step, trainer, {**tensors, **opt_tensors, **rng_tensors}, meta, write_adapter)


def train(
    model,
    params,
    examples,
    pad_id: int,
    config: TrainConfig | None = None,
    *,
    eval_examples=None,
    out_dir: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    identity: dict | None = None,
    write_adapter=None,
    progress: bool = True,
) -> Result:
    """The loop (see the module docstring) on ``params``; returns its :class:`Result`.

    ``out_dir``: where metrics.jsonl and checkpoints/ go (None: neither). ``resume``: a checkpoint
    (or a folder of them) to continue from, checked against ``identity`` (what the caller knows of
    the run: model, method, ...) and what the loop knows. ``write_adapter(dir)`` writes the adapter
    into each checkpoint (None: the model's LoRA or LoReFT files). Under torch.distributed every
    rank draws the same global batch and trains on its share of the rows; rank 0 writes."""
    config = config or TrainConfig()
    config.check()
    opt = make_optimizer(config.optimizer, params, config.lr, config.weight_decay)
    inner = _inner(model)
    if write_adapter is None:
        write_adapter = adapter_writer(inner, "loreft" if hasattr(inner, "ftk_loreft") else "lora")
    model.train()
    data = Batches(examples, config.batch_size, pad_id, seed=config.seed)
    ident = _identity(model, examples, config, identity)
    result = Result()
    if resume is not None:
        result.resumed_from = ckpt.resolve(resume)
        _, result.history = _restore(model, opt, data, result.resumed_from, ident)
        result.resumed_at = len(result.history)
        if result.resumed_at > config.steps:
            raise ckpt.CheckpointError(
                f"{result.resumed_from}: at step {result.resumed_at} already, past --steps {config.steps}"
            )
    root = Path(out_dir) / "checkpoints" if out_dir is not None else None
    log = MetricsLog(out_dir)
    log.start(result.history)
    start_step, tokens, start = len(result.history), 0, time.perf_counter()
    bar = tqdm(total=config.steps, initial=start_step, disable=not progress or _dist.rank() != 0, desc="finetune")
    try:
        with _StopSignals() as stop:
            for step in range(start_step, config.steps):
                lr = config.lr * lr_factor(config.lr_scheduler, step, config.warmup_steps, config.steps)
                for group in opt.param_groups:
                    group["lr"] = lr
                micro = [next(data) for _ in range(config.grad_accum)]
                loss, seen = train_step(model, opt, micro, max_grad_norm=config.max_grad_norm)
                tokens += seen
                row = {"step": step + 1, "loss": loss, "lr": lr}
                row["tokens_per_s"] = tokens / (time.perf_counter() - start)
                row["memory_mib"] = round(_memory_mib(), 1)
                last = step + 1 == config.steps
                if eval_examples and ((config.eval_every and (step + 1) % config.eval_every == 0) or last):
                    row["eval_loss"] = evaluate(model, eval_examples, pad_id, config.batch_size)
                result.history.append(row)
                log.write(row)
                shown = {"loss": f"{loss:.3f}", "lr": f"{lr:.2g}", "tok_s": f"{row['tokens_per_s']:.0f}"}
                if "eval_loss" in row:
                    shown["eval"] = f"{row['eval_loss']:.3f}"
                bar.set_postfix(shown | {"mem": f"{row['memory_mib']:.0f}MiB"})
                bar.update()
                signum = stop.agreed()
                if root is not None and (signum or (config.save_every and (step + 1) % config.save_every == 0)):
                    result.checkpoint = _save(root, step + 1, model, opt, data, result.history, ident, write_adapter)
                    ckpt.prune(root, config.keep)
                if signum:
                    result.interrupted = signum
                    break
    finally:
        bar.close()
        log.close()
    result.tokens_per_second = tokens / max(time.perf_counter() - start, 1e-9)
    model.eval()
    return result


def start_distributed() -> tuple[int, int]:
    """Joins torchrun's process group (gloo: the loop runs on the CPU), or makes a one-process
    group when not under torchrun; returns (rank, world size)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group("gloo")
        else:
            import socket

            with socket.socket() as s:  # a free local port for the one-process group
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def shard(model) -> list[torch.nn.Parameter]:
    """``shard_model(model)``; returns the trainable parameters (FSDP2's sharded ones)."""
    shard_model(model)
    return [p for p in model.parameters() if p.requires_grad]


def _memory_mib() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mib()


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB. On Linux VmHWM: getrusage's ru_maxrss keeps
    the peak of whatever ran before exec, so a subprocess of a 5 GiB parent reports >= 5 GiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:  # not on Linux/macOS
        return float("nan")
