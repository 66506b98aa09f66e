"""The measured side of ``ftk estimate``: the peak of live tensor memory over real training steps.

:func:`measured_peak` prepares a model as ``ftk finetune`` does (``finetune.prepare``; "full"
trains every parameter), runs two steps of ``finetune.train_step`` under torch.profiler with
``profile_memory=True`` and adds up its ``[memory]`` events (each allocation and free with its
time): the running sum's maximum is the peak above the start, and the bytes live at the start
(parameters, buffers, 4-bit quant states and the batch, each storage once) are added to it.
That is what ``torch.cuda.max_memory_allocated`` reports on a GPU (which rounds each block up
to 512 bytes), and unlike the resident set size it leaves out the libraries (~400 MB) and the
pages the allocator keeps after a free. Markers at the start and end of each forward and
around each optimizer step say in which phase the peak fell and what a forward keeps for the
backward.
"""

from __future__ import annotations

import copy
import gc
from dataclasses import asdict, dataclass

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ..integrations.hf_compat import enable_gradient_checkpointing
from ..integrations.transformers import model_bytes
from . import finetune as ft
from .estimate import METHODS

OPTIMIZERS = ft.OPTIMIZERS
_MARK = "ftk.estimate."
_PHASES = {"forward": "forward", "backward": "backward", "optimizer": "optimizer step", "after": "after the step"}


@dataclass
class Measured:
    """What :func:`measured_peak` saw, in bytes. ``peak`` is the largest sum of live tensors;
    ``phase`` where it fell ("step 2 forward", "step 2 backward", "step 1 optimizer step", ...)."""

    peak: int
    phase: str
    weights: int  # frozen parameters, buffers and quant states
    adapter: int  # trainable parameters
    gradients: int  # .grad of the trainable parameters after the last step
    optimizer_states: int
    forward_retained: int  # live after the last forward minus before it: activations and the loss's state
    steps: int
    phases: dict[str, int]  # the peak within each phase ("step 2 backward": ...)

    def to_dict(self) -> dict:
        return asdict(self)


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _vocab_size(model, tokenizer_or_vocab) -> int:
    n = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(tokenizer_or_vocab, bool):
        raise TypeError("tokenizer_or_vocab must be a tokenizer or a vocabulary size, got a bool")
    if isinstance(tokenizer_or_vocab, int):
        if tokenizer_or_vocab < 1:
            raise ValueError(f"tokenizer_or_vocab: a vocabulary size must be at least 1, got {tokenizer_or_vocab}")
        v = tokenizer_or_vocab
    else:
        try:
            v = len(tokenizer_or_vocab)
        except TypeError:
            raise TypeError(
                f"tokenizer_or_vocab must be a tokenizer (len() gives its vocabulary) or an int, "
                f"got {type(tokenizer_or_vocab).__name__}"
            ) from None
    return min(v, n) if isinstance(n, int) and n > 0 else v


def _check(method, batch_size, seq_len, optimizer, steps) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}")
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("steps", steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def _prepare(model, method: str) -> list[torch.nn.Parameter]:
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return list(model.parameters())
    return ft.prepare(model, method, rank=None, seed=0)


def _mark(name: str) -> None:
    with record_function(_MARK + name):  # an empty range: a time stamp among the memory events
        pass


def measured_peak(
    model,
    tokenizer_or_vocab,
    method: str,
    batch_size: int,
    seq_len: int,
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    steps: int = 2,
    seed: int = 0,
    fused_loss: bool = True,
) -> Measured:
    """Trains ``model`` (changed in place: pass a copy to keep it) with ``method`` for ``steps``
    steps of random tokens (batch_size x seq_len, every token labelled, no padding) on the CPU
    and returns the peak of live tensor memory with its breakdown (:class:`Measured`).
    ``tokenizer_or_vocab``: a tokenizer or a vocabulary size, the range of the token ids. A step
    is ``finetune.train_step``; ``fused_loss=False`` runs the same step with Transformers' own
    loss over the full logits instead of the fused one."""
    _check(method, batch_size, seq_len, optimizer, steps)
    for name, v in (("gradient_checkpointing", gradient_checkpointing), ("fused_loss", fused_loss)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {v!r}")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(
            f"model: measured_peak profiles the CPU allocator, but the model is on {device}; "
            "on a GPU read torch.cuda.max_memory_allocated instead"
        )
    vocab = _vocab_size(model, tokenizer_or_vocab)
    params = _prepare(model, method)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, use_reentrant=False)
    model.train()  # Transformers checkpoints a layer only in training mode
    if gradient_checkpointing and not any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} did not enable it on any layer")
    opt = OPTIMIZERS[optimizer](params, lr=1e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen).to(device)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    trainable = [p for p in params if p.requires_grad]
    adapter = _storage_bytes(trainable)
    start = model_bytes(model) + _storage_bytes(batch.values())
    step = [0]
    hooks = [
        model.register_forward_pre_hook(lambda *_: _mark(f"{step[0]}.forward")),
        model.register_forward_hook(lambda *_: _mark(f"{step[0]}.backward")),
        opt.register_step_pre_hook(lambda *_: _mark(f"{step[0]}.optimizer")),
        opt.register_step_post_hook(lambda *_: _mark(f"{step[0]}.after")),
    ]
    # Garbage left in reference cycles (an earlier model and its hooks) would otherwise be freed
    # inside the profile, whose running sum would then drop by bytes it never saw allocated.
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for i in range(steps):
                step[0] = i + 1
                if fused_loss:
                    ft.train_step(model, opt, batch)
                else:
                    _unfused_step(model, opt, batch)
    finally:
        if collecting:
            gc.enable()
        for h in hooks:
            h.remove()
    events = []
    for e in prof.profiler.kineto_results.events():
        name = e.name()
        if name == "[memory]":
            events.append((e.start_ns(), 1, e.nbytes(), ""))
        elif name.startswith(_MARK):
            events.append((e.start_ns(), 0, 0, name[len(_MARK) :]))
    events.sort()
    live, phase, at, phases = 0, "0.start", {}, {}
    for _, kind, nbytes, name in events:
        if kind == 0:
            phase = name
            at[name] = live
            phases.setdefault(name, live)
            continue
        live += nbytes
        phases[phase] = max(phases.get(phase, 0), live)
    retained = at.get(f"{steps}.backward", 0) - at.get(f"{steps}.forward", 0)
    top_phase = max(phases, key=phases.__getitem__)
    grads = _storage_bytes(p.grad for p in trainable)
    states = _storage_bytes(v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))
    weights = start - adapter - _storage_bytes(batch.values())
    return Measured(
        peak=start + phases[top_phase],
        phase=_phase_name(top_phase),
        weights=weights,
        adapter=adapter,
        gradients=grads,
        optimizer_states=states,
        forward_retained=retained,
        steps=steps,
        phases={_phase_name(k): start + v for k, v in phases.items()},
    )


def _unfused_step(model, opt, batch) -> None:
    """``finetune.train_step``'s order (zero the gradients, forward, backward, step), with the
    model's own loss over the (tokens x vocab) logits."""
    opt.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    opt.step()


def _phase_name(mark: str) -> str:
    """ "2.backward" -> "step 2 backward"."""
    step, what = mark.split(".")
    return "start" if what == "start" else f"step {step} {_PHASES[what]}"


def compare(
    model,
    tokenizer_or_vocab,
    methods=METHODS,
    batch_size: int = 2,
    seq_len: int = 128,
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
) -> list[dict]:
    """For each method, ``estimate`` of the model's config (in the model's dtype, fp32 or bf16,
    with the CPU's loss chunks) beside ``measured_peak`` of a copy of the model (the model itself
    is left as it is): one dict a method with both totals in bytes, their ratio, where each put
    the peak, and both breakdowns."""
    from .estimate import estimate

    dtypes = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    weight_dtype = next(model.parameters()).dtype
    if weight_dtype not in dtypes:
        raise ValueError(f"model: its weights must be float32 or bfloat16, got {weight_dtype}")
    out = []
    for method in methods:
        est = estimate(
            model.config,
            method,
            batch_size,
            seq_len,
            optimizer=optimizer,
            gradient_checkpointing=gradient_checkpointing,
            dtype=dtypes[weight_dtype],
            device="cpu",
        )
        got = measured_peak(
            copy.deepcopy(model), tokenizer_or_vocab, method, batch_size, seq_len, optimizer, gradient_checkpointing
        )
        out.append(
            {
                "method": method,
                "batch_size": batch_size,
                "seq_len": seq_len,
                "optimizer": optimizer,
                "gradient_checkpointing": gradient_checkpointing,
                "dtype": dtypes[weight_dtype],
                "estimate_bytes": est.total,
                "measured_bytes": got.peak,
                "ratio": est.total / got.peak,
                "estimate_peak_at": est.peak_at,
                "measured_peak_at": got.phase,
                "estimate_rows": {r.name: r.bytes for r in est.rows},
                "measured": got.to_dict(),
            }
        )
    return out
