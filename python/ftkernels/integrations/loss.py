"""The causal-LM training loss without the logits: the output projection and the cross-entropy
fused, a chunk of rows at a time.

Transformers computes the loss from full logits: batch 4 x 256 tokens of SmolLM2 (vocabulary
49152) makes a 192 MiB fp32 logits tensor, a 192 MiB log-softmax and a 192 MiB gradient, and
log_softmax alone took ~0.28 s each way on the CPU, with each fresh tensor paying ~55 ms of
page faults. Here each chunk's logits (48 MiB on the CPU) turn into their softmax gradient in
place, and the gradient for the hidden states (and, if they train, the head's weight and bias)
is accumulated in the forward: the backward only scales it. One QLoRA step of SmolLM2-135M got
1.10-1.14x faster (benchmarks/bench_finetune.py); the loss and the gradients are those of
``ForCausalLMLoss`` up to fp32 rounding (tests/test_lm_loss.py).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .hf_compat import forward_arguments, warn_once

# Rows per chunk: this many bytes of fp32 logits. On the CPU 48 MiB (256 rows at 49152): in one
# QLoRA step of SmolLM2, 85- and 512-row chunks were 4-6% slower, the head's GEMM losing to
# small chunks and the cache to large ones. A GPU wants fewer, larger GEMMs.
_CHUNK_BYTES_CPU = 48 << 20
_CHUNK_BYTES_GPU = 512 << 20

# Config attributes that change the logits after the head: with any of them set, the fused
# loss would be wrong, so fused_lm_loss leaves such models alone.
_LOGIT_CHANGERS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over valid rows of cross_entropy(h·Wᵀ + b, labels) / divisor, chunk by chunk."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, ignore_index: int, divisor, chunk: int, want_grad: bool):
        need_h, need_w, need_b = (want_grad and n for n in ctx.needs_input_grad[:3])
        dh = torch.empty_like(h) if need_h else None  # every row is written by its chunk
        dw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        db = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for m0 in range(0, h.shape[0], chunk):
            hc, lc = h[m0 : m0 + chunk], labels[m0 : m0 + chunk]
            logits = F.linear(hc, weight, bias).float()  # in the model's dtype, then fp32, as Transformers
            valid = lc != ignore_index
            target = torch.where(valid, lc, 0)
            lse = torch.logsumexp(logits, 1)
            total += torch.where(valid, lse - logits.gather(1, target[:, None])[:, 0], 0.0).sum()
            if not (need_h or need_w or need_b):
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad[torch.arange(len(lc), device=lc.device), target] -= 1.0
            grad.mul_(valid[:, None])
            g = grad.to(weight.dtype)
            if need_h:
                torch.mm(g, weight, out=dh[m0 : m0 + chunk])
            if need_w:
                dw.addmm_(g.T.float(), hc.float())
            if need_b:
                db += grad.sum(0)
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (dh, dw, db)), divisor)
        ctx.needs = (need_h, need_w, need_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total / divisor

    @staticmethod
    def backward(ctx, grad):
        dh, dw, db, divisor = ctx.saved_tensors
        scale = grad / divisor
        need_h, need_w, need_b = ctx.needs
        return (
            dh * scale.to(dh.dtype) if need_h else None,
            (dw * scale).to(ctx.dtypes[0]) if need_w else None,
            (db * scale).to(ctx.dtypes[1]) if need_b else None,
            None,
            None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """cross_entropy(hidden·weightᵀ + bias, labels) without the (rows x vocab) logits: the mean
    over labels != ignore_index, or their sum / num_items_in_batch when that is given (as
    Transformers' loss; all labels ignored gives nan, as torch's mean). hidden is (..., d) and
    labels (...) of the same leading shape, already aligned (no shift here)."""
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got {type(hidden).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be (vocab, {hidden.shape[-1]}), got "
            f"{list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}"
        )
    vocab = weight.shape[0]
    if bias is not None and (not isinstance(bias, torch.Tensor) or list(bias.shape) != [vocab]):
        raise ValueError(f"bias must be ({vocab},) or None")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError("labels must be an int64 or int32 tensor")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels must have shape {list(hidden.shape[:-1])} (hidden without its last "
            f"dimension), got {list(labels.shape)}"
        )
    if labels.device != hidden.device or weight.device != hidden.device:
        raise ValueError(
            f"hidden, weight and labels must be on one device, got {hidden.device}, {weight.device} and {labels.device}"
        )
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    h = hidden.reshape(-1, hidden.shape[-1])
    flat = labels.reshape(-1).long()
    valid = flat != ignore_index
    bad = valid & ((flat < 0) | (flat >= vocab))
    if bool(bad.any()):
        raise ValueError(f"labels must be in [0, {vocab}) or ignore_index={ignore_index}, got {int(flat[bad][0])}")
    if num_items_in_batch is None:
        divisor = valid.sum().float()
    else:
        divisor = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=h.device)
    if chunk_rows is None:
        budget = _CHUNK_BYTES_CPU if h.device.type == "cpu" else _CHUNK_BYTES_GPU
        chunk_rows = max(1, budget // (4 * vocab))
    return _LinearCrossEntropy.apply(h, weight, bias, flat, ignore_index, divisor, chunk_rows, torch.is_grad_enabled())


class _Hidden(nn.Module):
    """Stands in for the output head inside fused_lm_loss: passes the hidden states on."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def _head_name(model: nn.Module) -> str | None:
    """The attribute of model holding its output head, when fused_lm_loss can stand in for it."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not nn.Linear:  # a quantized or adapted head keeps its own forward
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_CHANGERS):
        return None
    return next((name for name, child in model.named_children() if child is head), None)


@functools.cache
def _forward_feeds_the_head_to_the_loss(cls: type, head: str) -> bool | None:
    """Whether ``cls.forward`` computes ``self.loss_function(...)`` on the output of
    ``self.<head>(...)``, as Transformers' causal LMs do (GPT-2 before 4.48, and some models
    still, build ``CrossEntropyLoss()`` themselves: standing in for the head there would feed
    hidden states to a loss over the vocabulary). None when the source cannot be read."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None
    return "self.loss_function(" in source and f"self.{head}(" in source


def _serves(model: nn.Module) -> str | None:
    """The head's attribute name when fused_lm_loss can serve model, else None (and why, once)."""
    name = _head_name(model)
    if name is None:
        return None
    prop = inspect.getattr_static(type(model), "loss_function", None)
    if not isinstance(prop, property) or prop.fset is None:
        warn_once(
            f"loss:{type(model).__name__}",
            f"ftkernels: {type(model).__name__}.loss_function cannot be "
            "replaced (Transformers < 4.48); fused_lm_loss computes the plain loss",
        )
        return None
    if _forward_feeds_the_head_to_the_loss(type(model), name) is False:
        warn_once(
            f"loss:{type(model).__name__}",
            f"ftkernels: {type(model).__name__}.forward does not compute "
            f"self.loss_function(self.{name}(...)); fused_lm_loss computes the plain loss",
        )
        return None
    return name


def supports_fused_lm_loss(model: nn.Module) -> bool:
    """Whether fused_lm_loss changes how model computes its loss (a Transformers causal LM with
    a plain nn.Linear head whose logits go straight into ``self.loss_function``)."""
    return _serves(model) is not None


class _Swap:
    """Puts the fused loss in place of model's head and ``loss_function`` (``enter``) and puts
    them back (``exit``): the property's setter keeps the function in the instance
    (``_loss_function`` in 4.48-5.x), so whatever it writes is restored as it was and no
    private name is assumed."""

    def __init__(self, model: nn.Module, name: str, chunk_rows: int | None):
        self.model, self.name, self.head = model, name, getattr(model, name)
        self.chunk_rows = chunk_rows
        self.calls = {"labels": False, "fused": False}
        self.saved: dict | None = None

    def loss(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **_):
        self.calls["fused"] = True
        if shift_labels is None:  # tokens < n predict n, as ForCausalLMLoss
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        head = self.head
        return linear_cross_entropy(
            logits,
            head.weight,
            head.bias,
            shift_labels.to(logits.device),
            ignore_index,
            num_items_in_batch,
            self.chunk_rows,
        )

    def enter(self) -> None:
        model = self.model
        self.saved = dict(model.__dict__)
        setattr(model, self.name, _Hidden())
        model.loss_function = self.loss
        self.written = {k for k in model.__dict__ if k not in self.saved or model.__dict__[k] is not self.saved[k]} - {
            "_modules"
        }

    def exit(self) -> None:
        if self.saved is None:
            return
        model, saved = self.model, self.saved
        setattr(model, self.name, self.head)
        for k in self.written:
            if k in saved:
                model.__dict__[k] = saved[k]
            else:
                del model.__dict__[k]
        self.saved = None

    def check(self, mod) -> None:
        if self.calls["labels"] and not self.calls["fused"]:
            raise RuntimeError(
                f"fused_lm_loss: {type(mod).__name__}.forward was given labels but did not call "
                "self.loss_function, so its loss would be over hidden states; call it outside "
                "the fused_lm_loss block"
            )


@contextlib.contextmanager
def fused_lm_loss(model: nn.Module, chunk_rows: int | None = None) -> Iterator[bool]:
    """Inside the block, ``model(input_ids, labels=...)`` computes the loss with
    ``linear_cross_entropy``: the head and the loss fused, no logits made. Its ``logits`` output
    is then the final hidden states (batch, seq, hidden), not the logits: use the block for
    training steps. Yields whether the model was changed; a model this cannot serve (see
    ``supports_fused_lm_loss``) runs as usual, with a one-line warning when the reason is its
    Transformers code. A forward given labels that does not reach the fused loss raises
    RuntimeError rather than return a loss over hidden states. Hooks, LoRA and LoReFT layers and
    gradient checkpointing are unaffected; the head and the loss are put back on exit."""
    name = _serves(model)
    if name is None:
        yield False
        return
    swap = _Swap(model, name, chunk_rows)

    def before(mod, args, kwargs):
        swap.calls["labels"] = forward_arguments(mod, args, kwargs).get("labels") is not None
        swap.calls["fused"] = False

    def after(mod, args, kwargs, output):
        swap.check(mod)

    swap.enter()
    hooks = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield True
    finally:
        for h in hooks:
            h.remove()
        swap.exit()


class FusedLossHandle:
    """What :func:`fuse_lm_loss_when_training` returns: ``remove()`` takes its hooks off."""

    def __init__(self, hooks):
        self._hooks = hooks

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def fuse_lm_loss_when_training(model: nn.Module, chunk_rows: int | None = None) -> FusedLossHandle:
    """From now on, each forward of ``model`` in training mode that is given ``labels`` computes
    its loss as inside :func:`fused_lm_loss` (its ``logits`` output is then the hidden states);
    every other forward (eval mode, no labels, as Trainer's label smoothing and
    ``compute_loss_func`` call it, or a call with TRL's own ``fused_lm_head``) runs as usual
    and returns the logits. ``handle.remove()`` ends it; ``handle.active`` is False when the
    model cannot be served (``supports_fused_lm_loss``)."""
    name = _serves(model)
    if name is None:
        return FusedLossHandle([])
    swap = _Swap(model, name, chunk_rows)

    def before(mod, args, kwargs):
        swap.calls["fused"] = False
        call = forward_arguments(mod, args, kwargs)
        swap.calls["labels"] = (
            mod.training and call.get("labels") is not None and not kwargs.get("fused_lm_head", False)
        )
        if swap.calls["labels"]:
            swap.enter()

    def after(mod, args, kwargs, output):
        swap.exit()
        swap.check(mod)

    return FusedLossHandle(
        [
            model.register_forward_pre_hook(before, with_kwargs=True),
            # always_call: the head is put back when the forward raises too
            model.register_forward_hook(after, with_kwargs=True, always_call=True),
        ]
    )
