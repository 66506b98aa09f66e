"""The model behind ``ftk estimate``: a decoder's sizes from its config (:func:`architecture`),
what autograd keeps layer by layer, the loss's memory and the moment of the peak.

A decoder layer (Transformers' Llama layout) is walked op by op, tracking which tensors require
grad, and each op adds what its backward keeps (``derivatives.yaml`` saves a tensor only for a
gradient that is needed: a frozen linear layer keeps nothing for its input's gradient, its
weight is enough):

- RMSNorm: its input in fp32 (a copy when the model is 16-bit) and the (tokens x 1) rsqrt when
  the input requires grad; the normalised input when its weight trains (full).
- a linear layer keeps its input when its weight trains (full), when it is QLoRA's fused op
  (``ftk::lora_linear_4bit`` saves x) or LoRA's (lora_A needs x; in 16 bits ``LoRALinear``
  casts x to fp32 first, a copy for each layer), plus for LoRA lora_A's (tokens x r) output.
- SDPA (flash or memory-efficient, causal, no padding mask, K/V heads not repeated): q after
  the rotary embedding, k, v, the output (which o_proj reads in place) and an fp32 logsumexp a
  head and token. The cos/sin tables once.
- SiLU keeps its input (the gate projection), the product keeps both factors.
- LoReFT (``ftk::loreft``) keeps the layer's output it edits, z (slots x rank, fp32) and, from
  the QR of its parametrisation, R and Q.
- Transformers' KV cache (on in training unless checkpointing turns it off) holds each layer's
  K and V until the forward returns: extra only where SDPA keeps none.

A layer whose input needs no grad (the first, behind a frozen embedding) keeps only what its
trainable parts need. With gradient checkpointing each layer keeps its input (and, where
Transformers checkpoints ``forward`` but not the module's hooks, LoReFT's edit outside it) and
its activations come back one layer at a time in the backward.

The backward is modelled at each layer in turn: the activations of the layers below, the
gradients of the layers above, and the layer's working set (the incoming gradient, and the
gradients of the MLP's product and of both its factors).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from ..integrations.loss import _CHUNK_BYTES_CPU, _CHUNK_BYTES_GPU

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Arch:
    """A decoder's sizes, as :func:`architecture` reads them from a config."""

    model_type: str
    d: int
    i: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_fp32: bool = False


# The families whose layout the model below follows: (q/k/v bias, o bias, MLP bias) as read
# from the config, per-head q/k norms, and the norm's output in fp32 (Gemma scales by 1 + w in fp32).
_FAMILIES = {
    "llama": dict(qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias"),
    "mistral": dict(),
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qkv_bias="attention_bias", o_bias="attention_bias", qk_norm=True),
    "gemma": dict(qkv_bias="attention_bias", o_bias="attention_bias", norm_fp32=True),
}


def _int_attr(config, name: str, default=None) -> int:
    v = getattr(config, name, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"config.{name} must be a positive int, got {v!r}")
    return v


def architecture(config) -> Arch:
    """The sizes the estimate needs, read from a Transformers config (ValueError naming the
    attribute when one is missing or wrong, or when the model type is not modelled)."""
    if not hasattr(config, "model_type"):
        raise TypeError(f"config must be a Transformers PretrainedConfig, got {type(config).__name__}")
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        raise ValueError(
            f"config: model_type {model_type!r} is not modelled; supported: {', '.join(sorted(_FAMILIES))}"
        )
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        if getattr(config, name, None):
            raise ValueError(f"config.{name}: mixture-of-experts models are not modelled")
    fam = _FAMILIES[model_type]
    d, heads = _int_attr(config, "hidden_size"), _int_attr(config, "num_attention_heads")
    kv = heads if getattr(config, "num_key_value_heads", None) is None else _int_attr(config, "num_key_value_heads")
    if heads % kv:
        raise ValueError(f"config.num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
    head_dim = _int_attr(config, "head_dim") if getattr(config, "head_dim", None) is not None else d // heads

    def flag(key: str) -> bool:  # a family's constant, or the config attribute it names
        v = fam.get(key, False)
        return bool(getattr(config, v, False)) if isinstance(v, str) else v

    return Arch(
        model_type=model_type,
        d=d,
        i=_int_attr(config, "intermediate_size"),
        layers=_int_attr(config, "num_hidden_layers"),
        heads=heads,
        kv_heads=kv,
        head_dim=head_dim,
        vocab=_int_attr(config, "vocab_size"),
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=flag("qkv_bias"),
        o_bias=flag("o_bias"),
        mlp_bias=flag("mlp_bias"),
        qk_norm=flag("qk_norm"),
        norm_fp32=flag("norm_fp32"),
    )


def linears(a: Arch) -> list[tuple[str, int, int]]:
    """(name, out, in) of one decoder layer's linear layers."""
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    return [
        ("q_proj", q, a.d),
        ("k_proj", kv, a.d),
        ("v_proj", kv, a.d),
        ("o_proj", a.d, q),
        ("gate_proj", a.i, a.d),
        ("up_proj", a.i, a.d),
        ("down_proj", a.d, a.i),
    ]


def layer_others(a: Arch) -> list[int]:
    """Element counts of one decoder layer's other parameters: biases and norms."""
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    out = [a.d, a.d] + ([a.head_dim, a.head_dim] if a.qk_norm else [])
    out += [q, kv, kv] if a.qkv_bias else []
    out += [a.d] if a.o_bias else []
    out += [a.i, a.i, a.d] if a.mlp_bias else []
    return out


@dataclass(frozen=True)
class Run:
    arch: Arch
    method: str
    batch: int
    seq: int
    elem: int  # bytes of an activation: 4 (fp32) or 2 (bf16)
    targets: tuple[str, ...]  # LoRA's layers
    rank: int
    slots: int  # LoReFT's positions a sequence
    checkpointing: bool
    fused_loss: bool = True
    device: str = "cuda"  # the fused loss's chunk size depends on it

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


@dataclass
class Moment:
    """Bytes live at one moment, beyond the parameters and optimizer states."""

    where: str
    activations: int
    gradients: int
    loss: int

    @property
    def total(self) -> int:
        return self.activations + self.gradients + self.loss


@functools.cache
def hooks_inside_checkpoint() -> bool:
    """Whether Transformers' checkpointing covers a decoder layer's forward hooks (where LoReFT
    edits): its GradientCheckpointingLayer checkpoints ``__call__`` in 4.x, only ``forward`` in
    5.x. Read from the class, or from its source when the module is not imported yet (importing
    it imports the modelling code, ~2 s)."""
    module = sys.modules.get("transformers.modeling_layers")
    if module is not None:
        return "__call__" in vars(module.GradientCheckpointingLayer)
    spec = importlib.util.find_spec("transformers.modeling_layers")
    if spec is None or not spec.origin:  # before 4.52 the model checkpoints decoder_layer.__call__
        return True
    source = Path(spec.origin).read_text(encoding="utf-8")
    start = source.find("class GradientCheckpointingLayer")
    end = source.find("\nclass ", start + 1)
    return start < 0 or "def __call__" in source[start : end if end > 0 else None]


@dataclass
class Layer:
    """What one decoder layer keeps for the backward, in bytes."""

    inside: int  # the layer's own activations
    edit: int  # LoReFT's, on its output
    cache: int  # K and V that only the forward's KV cache holds (no saved tensor has them)
    out_grad: bool  # whether its output requires grad


def layer_saved(run: Run, grad_in: bool) -> Layer:
    """What one decoder layer keeps, given whether its input requires grad."""
    a, t, e = run.arch, run.tokens, run.elem
    full, lora = run.method == "full", run.method in ("lora", "qlora")
    q_dim, kv_dim = a.heads * a.head_dim, a.kv_heads * a.head_dim
    saved, kept = 0, set()

    def norm(x_rg: bool, width: int, rows: int) -> bool:
        nonlocal saved
        if x_rg:
            saved += t * width * 4 + rows * 4  # the input in fp32 and its rsqrt
        if full:
            saved += t * width * (4 if a.norm_fp32 else e)  # the normalised input, for the weight
        return x_rg or full

    def linear(x: str, x_rg: bool, name: str, width: int) -> bool:
        nonlocal saved
        adapted = lora and name in run.targets
        if full or (adapted and (run.method == "qlora" or e == 4)):
            if x not in kept:  # one tensor, however many layers keep it
                kept.add(x)
                saved += t * width * e
        elif adapted:
            saved += t * width * 4  # LoRALinear's fp32 copy of a 16-bit x
        if adapted and run.method == "lora":
            saved += t * run.rank * 4  # lora_A's output, for lora_B's weight
        return x_rg or full or adapted

    n1 = norm(grad_in, a.d, t)
    q, k, v = (linear("n1", n1, name, a.d) for name in LINEAR_NAMES[:3])
    if a.qk_norm:
        q = norm(q, q_dim, t * a.heads)
        k = norm(k, kv_dim, t * a.kv_heads)
    attn = q or k or v
    if attn:
        kept.add("attn")
        saved += t * (2 * q_dim + 2 * kv_dim) * e + t * a.heads * 4
    # Transformers makes a KV cache in training too (use_cache defaults to True; checkpointing
    # turns it off): until the forward returns it holds every layer's K and V, extra memory only
    # where SDPA keeps none.
    cache = 0 if attn or run.checkpointing else t * 2 * kv_dim * e
    o = linear("attn", attn, "o_proj", q_dim)
    h1 = grad_in or o
    n2 = norm(h1, a.d, t)
    g, u = (linear("n2", n2, name, a.d) for name in LINEAR_NAMES[4:6])
    saved += t * a.i * e * (int(g) + int(u) + int(g))  # SiLU's input; the product's two factors
    m = g or u
    out = linear("m", m, "down_proj", a.i) or h1
    if run.method == "loreft":
        return Layer(saved, t * a.d * e + intervention_bytes(run), cache, True)
    return Layer(saved, 0, cache, out)


def intervention_bytes(run: Run) -> int:
    """LoReFT's small saved tensors a layer: z (slots x rank) and R, Q and the R factor of the
    rotation's QR (the layer's output it edits is counted apart)."""
    a, r = run.arch, run.rank
    return run.batch * run.slots * r * 4 + 2 * a.d * r * 4 + r * r * 4 + r * 4


def _down_input(run: Run) -> int:
    """Bytes of the input the down projection keeps (0 when it keeps none)."""
    t, i, e = run.tokens, run.arch.i, run.elem
    if run.method == "full" or (run.method == "qlora" and "down_proj" in run.targets):
        return t * i * e
    if run.method == "lora" and "down_proj" in run.targets:
        return t * i * 4
    return 0


def _layer_work(run: Run) -> int:
    """A layer's backward working set at its fullest, in the MLP's product: the incoming
    gradient, the product's gradient and those of both its factors, less the down
    projection's saved input, freed by then (the attention's dq, dk, dv are smaller)."""
    a, t, e = run.arch, run.tokens, run.elem
    q_dim, kv_dim = a.heads * a.head_dim, a.kv_heads * a.head_dim
    return t * e * (a.d + max(3 * a.i, 2 * q_dim + 2 * kv_dim)) - _down_input(run)


def activations(
    run: Run, grads_layer: int, grads_first: int, grads_head: int, grads_all: int, loss_fwd: int, loss_bwd: int
) -> Moment:
    """The moment of the largest live total: the end of the forward (every saved activation and
    the loss), the backward of the loss, of each layer, or its end (``grads_all``, every
    gradient). ``grads_layer``: gradient bytes of one decoder layer, ``grads_first`` those its
    backward makes before the MLP's product (the down projection's, LoReFT's), ``grads_head`` those
    of the final norm and the head (a tied one: the embedding; an untied embedding's gradient comes
    last)."""
    a, t, e = run.arch, run.tokens, run.elem
    base = 3 * t * 8 + 2 * run.seq * a.head_dim * e  # the batch; the rotary cos/sin
    if run.method == "full":
        base += t * 8  # the embedding's indices
    final = t * a.d * 4 + t * 4 + (t * a.d * (4 if a.norm_fp32 else e) if run.method == "full" else 0)
    layers, grad_in = [], run.method == "full"
    for _ in range(a.layers):
        layers.append(layer_saved(run, grad_in))
        grad_in = layers[-1].out_grad
    if run.checkpointing:
        # Each checkpoint keeps its layer's input; the layer's own activations come back in the
        # backward, the inner layer's (its input requires grad, as Transformers arranges).
        outside = not hooks_inside_checkpoint()
        keep = [t * a.d * e + (x.edit if outside else 0) for x in layers]
        at_layer = [t * a.d * e + layer_saved(run, True).inside] * a.layers
    else:
        keep = [x.inside + x.edit for x in layers]
        at_layer = [x.inside for x in layers]  # the edit on its output is undone before the MLP
    cache = sum(x.cache for x in layers)
    work = _layer_work(run)
    # The embedding's backward, last: a tied one's (vocab x d) gradient is added to the head's; the
    # unfused head's arrives as a transposed view, so that sum is out of place, one more of them.
    tied_embedding = a.vocab * a.d * e * (1 if run.fused_loss else 2) if run.method == "full" and a.tied else 0
    moments = [
        Moment("end of forward", base + sum(keep) + cache + final, 0, loss_fwd),  # the step zeroes .grad first
        Moment("backward", base + sum(keep) + final, 0, loss_bwd),  # the loss's: no gradient made yet
    ]
    for k in range(a.layers - 1, -1, -1):
        below = base + sum(keep[:k]) + at_layer[k] + work
        moments.append(Moment("backward", below, grads_head + (a.layers - 1 - k) * grads_layer + grads_first, 0))
    moments.append(Moment("end of backward", base, grads_all + tied_embedding, 0))
    return max(moments, key=lambda m: m.total)


def chunk_rows(run: Run) -> int:
    """Rows of fp32 logits the fused loss makes at a time (``linear_cross_entropy``'s rule)."""
    budget = _CHUNK_BYTES_CPU if run.device == "cpu" else _CHUNK_BYTES_GPU
    return max(1, budget // (4 * run.arch.vocab))


def _chunk_peak(prev: int, rows: int, v: int, d: int, e: int, need_w: bool) -> int:
    """Bytes the fused loss's loop holds at its fullest while it does chunk ``rows`` with the
    previous chunk's logits (and 16-bit gradient) still referenced: logsumexp makes an fp32
    (rows x vocab) temporary beside the logits; 16-bit weights add the logits' fp32 copy and a
    16-bit gradient for the matmuls, and a trained head an fp32 copy of it for dW."""
    if e == 4:
        return (prev + 2 * rows) * v * 4
    held = prev * v * 6
    out = max(held + rows * v * 8, prev * v * 2 + rows * v * 6)
    if need_w:
        out = max(out, rows * v * 10 + rows * d * 4)
    return out


def loss_bytes(run: Run) -> tuple[int, int]:
    """(bytes at the end of the forward, bytes at the loss's backward) of the head and the loss.

    Fused: the final hidden states (the loss's input), dh (and dW for a trained head) that the
    forward computes and keeps, and the chunk loop's logits. Unfused: Transformers' logits, their
    fp32 copy (16-bit) and log-softmax; the backward holds the log-softmax, its gradient and the
    logits' gradient, three (tokens x vocab) fp32 tensors."""
    a, t, e = run.arch, run.tokens, run.elem
    need_w = run.method == "full"
    hidden, labels = t * a.d * e, t * 8 + t
    if not run.fused_loss:
        keep_h = hidden if need_w else 0  # the head's input, for its weight's gradient
        fwd = hidden + t * a.vocab * (e + (4 if e != 4 else 0) + 4) + labels
        return fwd, keep_h + 3 * t * a.vocab * 4 + labels
    c = min(chunk_rows(run), t)
    sizes = [(0, c)]
    if t > c:
        sizes.append((c, min(c, t - c)))
    chunk = max(_chunk_peak(p, r, a.vocab, a.d, e, need_w) for p, r in sizes)
    dw = a.vocab * a.d * 4 if need_w else 0
    fwd = 2 * hidden + dw + chunk + labels
    bwd = 2 * hidden + 2 * dw + (a.vocab * a.d * e if need_w and e != 4 else 0)
    return fwd, bwd


def loss_note(run: Run) -> str:
    if not run.fused_loss:
        return f"unfused: {run.tokens:,} x {run.arch.vocab:,} fp32 logits, log-softmax and gradients"
    c = min(chunk_rows(run), run.tokens)
    return f"fused head + loss: {c:,}-row chunks of {run.arch.vocab:,} logits" + (
        ", dW kept from the forward" if run.method == "full" else ""
    )
