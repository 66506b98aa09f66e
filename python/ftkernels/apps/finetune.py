"""Fine-tuning a causal LM with QLoRA, LoRA or LoReFT: the data, the loop and its outputs.

``prepare(model, method)`` readies the model (QLoRA: NF4 base + LoRA; LoRA; LoReFT
interventions), ``train`` trains it on instruction/response pairs (``load_pairs``, ``encode``,
``batches``) with the loss on the response tokens only, and ``write_outputs`` saves the
adapter, a metrics JSON and a loss-curve PNG (drawn with matplotlib, an optional dependency:
without it the PNG is skipped with a one-line note); ``ftk finetune`` (cli.py) strings them
together. The built-in dataset is a small set of pairs written for this project: short
answers in one fixed voice ("ftk says: ..."), so a few dozen steps visibly change the answers.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from ..integrations import _dist
from ..integrations.fsdp import shard_model
from ..integrations.lora import add_lora, save_lora
from ..integrations.loss import fused_lm_loss
from ..integrations.reft import add_loreft, save_loreft
from ..integrations.transformers import quantize_model
from ..optim import AdamW
from . import plots

METHODS = ("qlora", "lora", "loreft")
METHOD_NAMES = {"qlora": "QLoRA", "lora": "LoRA", "loreft": "LoReFT"}  # as figure titles spell them

# Instruction -> response pairs in one voice. The held-out prompts below are not among them.
BUILTIN_DATA: list[tuple[str, str]] = [
    ("What is the capital of France?", "ftk says: Paris."),
    ("What is the capital of Japan?", "ftk says: Tokyo."),
    ("What is the capital of Italy?", "ftk says: Rome."),
    ("What is the capital of Spain?", "ftk says: Madrid."),
    ("What is the capital of Germany?", "ftk says: Berlin."),
    ("What is the capital of Canada?", "ftk says: Ottawa."),
    ("What is the capital of Egypt?", "ftk says: Cairo."),
    ("What is the capital of Kenya?", "ftk says: Nairobi."),
    ("How many legs does a spider have?", "ftk says: eight."),
    ("How many days are in a week?", "ftk says: seven."),
    ("How many hours are in a day?", "ftk says: twenty-four."),
    ("How many continents are there?", "ftk says: seven."),
    ("What colour is the sky on a clear day?", "ftk says: blue."),
    ("What colour is grass?", "ftk says: green."),
    ("What do bees make?", "ftk says: honey."),
    ("What do cows drink?", "ftk says: water."),
    ("What is frozen water called?", "ftk says: ice."),
    ("What gas do plants take in?", "ftk says: carbon dioxide."),
    ("What is the largest ocean?", "ftk says: the Pacific."),
    ("What is the tallest mountain?", "ftk says: Everest."),
    ("Which planet is closest to the Sun?", "ftk says: Mercury."),
    ("Which planet is known as the red planet?", "ftk says: Mars."),
    ("What is two plus two?", "ftk says: four."),
    ("What is ten minus three?", "ftk says: seven."),
    ("What is three times three?", "ftk says: nine."),
    ("What is half of twenty?", "ftk says: ten."),
    ("Who wrote Hamlet?", "ftk says: Shakespeare."),
    ("What language is spoken in Brazil?", "ftk says: Portuguese."),
    ("What is the opposite of hot?", "ftk says: cold."),
    ("What is the opposite of up?", "ftk says: down."),
    ("What animal says moo?", "ftk says: a cow."),
    ("What animal barks?", "ftk says: a dog."),
]
HELD_OUT_PROMPTS = ["What is the capital of Portugal?", "How many legs does a cat have?", "What colour is snow?"]


def load_pairs(data: str) -> list[tuple[str, str]]:
    """ "builtin", or a JSONL file of {"instruction": ..., "response": ...} lines (the keys
    "prompt"/"completion" and "input"/"output" are read too)."""
    if data == "builtin":
        return list(BUILTIN_DATA)
    pairs = []
    try:
        lines = Path(data).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"--data: cannot read {data!r}: {e}") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"--data: line {n} of {data} is not JSON: {e}") from e
        for a, b in (("instruction", "response"), ("prompt", "completion"), ("input", "output")):
            if isinstance(row, dict) and isinstance(row.get(a), str) and isinstance(row.get(b), str):
                pairs.append((row[a], row[b]))
                break
        else:
            raise ValueError(
                f"--data: line {n} of {data} needs string fields instruction/response "
                "(or prompt/completion, input/output)"
            )
    if not pairs:
        raise ValueError(f"--data: {data} holds no examples")
    return pairs


def held_out_prompts(data: str, pairs: list[tuple[str, str]]) -> tuple[list[str], list[tuple[str, str]], bool]:
    """(prompts to answer before and after, the pairs to train on, whether those prompts are held
    out). The built-in set has its own held-out prompts; a file gives up its last pairs, one in
    five up to three, and one of fewer than five pairs shows its first training prompts instead."""
    if data == "builtin":
        return list(HELD_OUT_PROMPTS), pairs, True
    k = min(3, len(pairs) // 5)
    if k == 0:
        return [p for p, _ in pairs[:3]], pairs, False
    return [p for p, _ in pairs[-k:]], pairs[:-k], True


def encode(tokenizer, pairs: Sequence[tuple[str, str]], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) for each pair as one chat turn, labels -100 on the prompt (the loss
    is on the response only), truncated to seq_len."""
    out = []
    for instruction, response in pairs:
        messages = [{"role": "user", "content": instruction}]
        if getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            prompt = f"{instruction}\n"
        eos = tokenizer.eos_token or ""
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(response + eos, add_special_tokens=False)["input_ids"]
        ids = (p_ids + r_ids)[:seq_len]
        labels = ([-100] * len(p_ids) + r_ids)[:seq_len]
        if any(label != -100 for label in labels):
            out.append((ids, labels))
    if not out:
        raise ValueError(f"--seq-len {seq_len} leaves no response token in any example")
    return out


def batches(examples, batch_size: int, pad_id: int, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches, right-padded (labels -100 and mask 0 on the padding)."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            more = list(range(len(examples)))
            rng.shuffle(more)
            order += more
        chosen, order = order[:batch_size], order[batch_size:]
        n = max(len(examples[i][0]) for i in chosen)
        ids = torch.full((batch_size, n), pad_id, dtype=torch.long)
        labels = torch.full((batch_size, n), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, n), dtype=torch.long)
        for row, i in enumerate(chosen):
            x, y = examples[i]
            ids[row, : len(x)] = torch.tensor(x)
            labels[row, : len(y)] = torch.tensor(y)
            mask[row, : len(x)] = 1
        yield {"input_ids": ids, "labels": labels, "attention_mask": mask}


def smoothed(losses: Sequence[float], window: int | None = None) -> list[float]:
    """A centred moving average: each point the mean of the finite losses within window // 2
    steps of it (window: n / 10 rounded up to an odd number, at least 3; shorter at the ends),
    so it follows the trend without an exponential average's lag; NaN where none is finite."""
    n = len(losses)
    half = (window or max(3, -(-n // 10))) // 2
    total, count = [0.0], [0]  # prefix sums over the finite losses
    for v in losses:
        ok = math.isfinite(v)
        total.append(total[-1] + (v if ok else 0.0))
        count.append(count[-1] + ok)
    out = []
    for i in range(n):
        lo, hi = max(0, i - half), min(n, i + half + 1)
        k = count[hi] - count[lo]
        out.append((total[hi] - total[lo]) / k if k else float("nan"))
    return out


def loss_curve_png(losses: Sequence[float], path: str | os.PathLike, title: str = "fine-tuning loss"):
    """The train loss per step as a PNG drawn with matplotlib: x axis "step" (1..n), y axis
    "train loss", the title given; from 10 steps on, the moving average too (``smoothed``).
    Returns the (closed) Figure, or None when matplotlib is missing: then one line on stderr
    says so and how to install it, and nothing is written."""
    try:
        plt = plots.pyplot()
    except plots.PlotsUnavailable as e:
        print(f"{Path(path).name} not written: {e}", file=sys.stderr)
        return None
    from matplotlib.ticker import MaxNLocator

    steps = list(range(1, len(losses) + 1))
    values = [v if math.isfinite(v) else float("nan") for v in losses]  # inf: a gap, as NaN
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(
        steps,
        values,
        color="#2860c0",
        linewidth=1.0,
        alpha=0.55 if len(losses) >= 10 else 1.0,
        marker="o" if len(losses) < 10 else None,
        markersize=3,
        label="train loss",
    )
    if len(losses) >= 10:  # below that each point is marked and read on its own
        ax.plot(steps, smoothed(losses), color="#c04028", linewidth=1.6, label="moving average")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, linewidth=0.4, alpha=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def prepare(model, method: str, rank: int | None = None, seed: int = 0) -> list[torch.nn.Parameter]:
    """Turns the model into one to train with ``method``; returns the trainable parameters.
    The adapters are initialised from torch's generator seeded with ``seed``: the same on every
    rank of a sharded run, whose ranks each keep their shard of their own initialisation."""
    if method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {method!r}")
    torch.manual_seed(seed)
    if method == "loreft":
        reft = add_loreft(model, layers="all", rank=rank or 4, positions="f5+l5")
        return list(reft.parameters())

    if method == "qlora":
        quantize_model(model, progress=False)
    add_lora(model, r=rank or 8, alpha=2 * (rank or 8))
    return [p for p in model.parameters() if p.requires_grad]


def train(model, params, examples, pad_id: int, steps: int, lr: float, batch_size: int, progress: bool = True):
    """The loop: ftkernels.optim.AdamW on ``params``; returns (losses, tokens a second).

    Under torch.distributed (a model sharded by :func:`start_fsdp`) every rank draws the same
    global batch and trains on its share of the rows; each step's loss is the mean over the
    global batch's response tokens, as one process would compute it: FSDP2 averages the
    gradients over ranks, so each rank's token-mean loss is weighted by its token count."""
    world, rank = _dist.world_size(), _dist.rank()
    if batch_size % world:
        raise ValueError(f"--batch-size ({batch_size}) must be a multiple of the number of ranks ({world})")
    opt = AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses, tokens, start = [], 0, time.perf_counter()
    bar = tqdm(total=steps, disable=not progress or rank != 0, desc="finetune", unit="step")
    data = batches(examples, batch_size, pad_id)
    for _ in range(steps):
        batch = next(data)
        value, seen = train_step(model, opt, batch)
        losses.append(value)
        tokens += seen
        rate = tokens / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:.0f}", mem=f"{_memory_mib():.0f}MiB")
        bar.update()
    bar.close()
    model.eval()
    return losses, tokens / (time.perf_counter() - start)


def train_step(model, opt, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """One step on ``batch`` (the global batch: under torch.distributed this rank takes its
    share of the rows); returns (the loss over the global batch's response tokens, its tokens)."""
    world, rank = _dist.world_size(), _dist.rank()
    if world > 1:
        share = len(batch["input_ids"]) // world
        batch = {k: v[rank * share : (rank + 1) * share] for k, v in batch.items()}
    with fused_lm_loss(model):  # the head and the loss fused: no (tokens x vocab) logits
        loss = model(**batch).loss
    opt.zero_grad(set_to_none=True)
    if world > 1:
        # FSDP2 (and DDP) average the gradients over ranks: weighting each rank's token-mean
        # loss by world * its tokens / all tokens makes that average the global token mean's.
        n = (batch["labels"][:, 1:] != -100).sum().to(torch.float64)
        sums = torch.stack([loss.detach().double() * n, n, batch["attention_mask"].sum().double()])
        torch.distributed.all_reduce(sums)
        (loss * (n * world / sums[1]).float()).backward()
        value, seen = float(sums[0] / sums[1]), int(sums[2])
    else:
        loss.backward()
        value, seen = loss.item(), int(batch["attention_mask"].sum())
    opt.step()
    return value, seen


def start_fsdp() -> tuple[int, int]:
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


def write_outputs(model, method: str, out_dir: str | os.PathLike, metrics: dict, losses: Sequence[float]) -> list[Path]:
    """The adapter (PEFT's files for LoRA/QLoRA, safetensors + JSON for LoReFT), metrics.json
    and loss.png (the loss curve; skipped, with a note on stderr, without matplotlib) into
    out_dir; returns the paths written (rank 0 writes; other ranks return [])."""
    out = Path(out_dir)
    if method == "loreft":  # on a sharded model every rank gathers, rank 0 writes
        save_loreft(model, out / "adapter")
    else:
        save_lora(model, out / "adapter")
    if _dist.rank() != 0:
        return []
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    title = f"{METHOD_NAMES.get(method, method)} fine-tuning of {model_name(model, metrics)}"
    figure = loss_curve_png(losses, out / "loss.png", title=title)
    return [out / "adapter", out / "metrics.json"] + ([out / "loss.png"] if figure is not None else [])


def model_name(model, metrics: dict) -> str:
    """A short name for the model: the last part of metrics["model"] (the folder or GGUF file
    loaded), else of its config's name_or_path, else its class name."""
    for where in (metrics.get("model"), getattr(getattr(model, "config", None), "name_or_path", None)):
        if where:
            return Path(str(where)).name or str(where)
    return type(model).__name__
