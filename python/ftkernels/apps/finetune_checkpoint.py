"""Checkpoints of ``ftk finetune``: written atomically, checked before they are used.

A checkpoint is a directory ``<out>/checkpoints/checkpoint-<step:06d>/``:

    trainer_state.json           rank 0: the format, the step, what the run was (``identity``:
                                 model, method, adapter shape, optimizer, data fingerprint, ranks),
                                 the data position, the metrics so far, and the size and sha256
                                 of every other file
    state-rank<r>.safetensors    each rank: its trainable parameters (a sharded one: this rank's
                                 shard), its optimizer states as they are (8-bit codes and block
                                 scales included: bit for bit), its RNG states (torch CPU and CUDA,
                                 Python's, NumPy's), with the non-tensor parts as JSON metadata
    adapter/                     the adapter as the final outputs hold it (PEFT's files, or
                                 LoReFT's), for ``ftk generate`` or PEFT to load

Writing goes to ``.tmp-checkpoint-<step>`` beside it; every file is fsynced, then the directory is
renamed into place and its parent fsynced. A run killed at any moment leaves either the complete
new checkpoint or none: the previous one is never touched until the new one is in place, and
``--keep K`` prunes only older complete checkpoints. A write that fails (a full disk) removes the
temporary directory and raises :class:`CheckpointSaveError`, naming the checkpoint and the one
kept. Reading checks the JSON, the format, the identity against the run's (another model, method,
LoRA rank or number of ranks is refused), each file's size and sha256 (truncated or corrupt), and
each tensor's name, shape and dtype, before anything is changed; every refusal is a
:class:`CheckpointError` that names the file. Nothing in a checkpoint is executed: JSON and
safetensors only. Under torch.distributed every rank writes its own state file into one directory
that all ranks see; the collective steps agree on success first, so a failure on one rank is an
error on all, never a hang.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..integrations import _dist
from ..integrations._files import check_tensors, read_json

FORMAT, VERSION = "ftkernels-finetune-checkpoint", 1
STATE = "trainer_state.json"
NAME = re.compile(r"checkpoint-(\d{6,})")
RANK_FILE = re.compile(r"state-rank(\d+)\.safetensors")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (the previous one is kept); errno as the OS gave it."""


def rank_file(rank: int) -> str:
    return f"state-rank{rank}.safetensors"


def name_of(step: int) -> str:
    return f"checkpoint-{step:06d}"


def complete(root: str | os.PathLike) -> list[Path]:
    """The complete checkpoints under root (those with a trainer_state.json), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if NAME.fullmatch(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(NAME.fullmatch(p.name).group(1)))


def resolve(path: str | os.PathLike) -> Path:
    """``--resume DIR``: a checkpoint directory, or a folder of them (its newest complete one)."""
    p = Path(path)
    if (p / STATE).is_file():
        return p
    for root in (p, p / "checkpoints"):
        found = complete(root)
        if found:
            return found[-1]
    if not p.exists():
        raise CheckpointError(f"--resume: {str(p)!r} does not exist")
    raise CheckpointError(f"--resume: {str(p)!r} holds no complete checkpoint ({STATE} missing)")


# ---- what is saved ---------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON) of every generator a step may draw from."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta: dict = {"python": _jsonable(random.getstate())}
    numpy = sys.modules.get("numpy")  # only when something imported it: then it may be drawn from
    if numpy is not None:
        kind, keys, pos, has_gauss, gauss = numpy.random.get_state()
        tensors["rng.numpy"] = torch.from_numpy(keys.astype("int64"))
        meta["numpy"] = [kind, int(pos), int(has_gauss), float(gauss)]
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    random.setstate(_tupled(meta["python"]))
    if "numpy" in meta and "rng.numpy" in tensors:
        import numpy

        kind, pos, has_gauss, gauss = meta["numpy"]
        numpy.random.set_state((kind, tensors["rng.numpy"].numpy().astype("uint32"), pos, has_gauss, gauss))


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, tuple | list) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON) of the optimizer's per-parameter states, by parameter index: tensors as
    they are (uint8 codes stay uint8), numbers (the step) as JSON."""
    tensors, meta = {}, {}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                meta.setdefault(str(idx), {})[k] = v
    return tensors, meta


def load_optimizer_state(opt, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {int(i): dict(v) for i, v in meta.items()}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = t
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


# ---- writing ---------------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> None:
    """Writes and fsyncs one file (every checkpoint byte but the adapter's goes through here)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _agree(ok: bool) -> bool:
    """Whether every rank succeeded (a collective under torch.distributed)."""
    if not _dist.initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def _digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def save(root, step: int, trainer: dict, tensors: dict[str, torch.Tensor], rank_meta: dict, write_adapter) -> Path:
    """Writes checkpoint ``step`` under root (every rank calls it): ``trainer`` (rank 0's JSON),
    this rank's ``tensors`` and ``rank_meta``, and ``write_adapter(dir)`` (called on every rank, a
    collective for a sharded model). Returns its path; CheckpointSaveError when a write fails."""
    root, rank = Path(root), _dist.rank()
    final, tmp = root / name_of(step), root / f".tmp-{name_of(step)}"
    kept = complete(root)
    error: BaseException | None = None
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-checkpoint-*"):  # left by a run killed while saving
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
    except OSError as e:
        error = e
    if _agree(error is None):
        try:
            meta = {"ftk": json.dumps(rank_meta)}
            _write(tmp / rank_file(rank), st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))
        except (OSError, SafetensorError) as e:
            error = e
    if _agree(error is None):
        try:
            write_adapter(tmp / "adapter")
            if rank == 0:
                files = sorted(p for p in tmp.rglob("*") if p.is_file())
                for p in files:
                    if p.parent != tmp:
                        _fsync(p)  # the adapter's files, written by safetensors and json
                trainer = {"format": FORMAT, "version": VERSION, "step": step, **trainer}
                trainer["files"] = {str(p.relative_to(tmp)): _digest(p) for p in files}
                _write(tmp / STATE, (json.dumps(trainer, indent=1) + "\n").encode())
                for d in (tmp / "adapter", tmp):
                    _fsync(d)
                if final.exists():  # a run resumed from an older checkpoint saves this step again
                    trash = root / f".tmp-old-{final.name}"
                    final.rename(trash)
                    shutil.rmtree(trash)
                tmp.rename(final)
                _fsync(root)
        except (OSError, SafetensorError) as e:
            error = e
    if not _agree(error is None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        why = f"{error.strerror or error}" if isinstance(error, OSError) else str(error or "another rank failed")
        code = error.errno if isinstance(error, OSError) and error.errno else errno.EIO
        keep = f"the previous checkpoint {kept[-1]} is kept" if kept else "no earlier checkpoint exists"
        raise CheckpointSaveError(code, f"saving checkpoint {final} failed: {why}; {keep}")
    return final


def prune(root, keep: int) -> list[Path]:
    """Removes all but the ``keep`` newest complete checkpoints (rank 0; keep 0: none removed)."""
    if keep < 1 or _dist.rank() != 0:
        return []
    gone = complete(root)[:-keep]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


# ---- reading ---------------------------------------------------------------------------------


def read(path, identity: dict) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(trainer JSON, this rank's tensors, this rank's JSON metadata) of the checkpoint at path,
    after every check in the module docstring; CheckpointError naming the file otherwise. Each
    rank checks the files all ranks read (the JSON, the adapter) and its own state file, read
    once for its digest and its tensors."""
    path = Path(path)
    state_file = path / STATE
    try:
        trainer = read_json(state_file, "trainer state")
    except FileNotFoundError as e:
        raise CheckpointError(f"{state_file}: missing, {path} is not a complete checkpoint") from e
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    if trainer.get("format") != FORMAT:
        raise CheckpointError(f"{state_file}: not an ftk finetune checkpoint")
    if trainer.get("version") != VERSION:
        raise CheckpointError(
            f"{state_file}: format version {trainer.get('version')!r}, this ftkernels reads {VERSION}"
        )
    for key in ("step", "identity", "files", "progress", "history"):
        if key not in trainer:
            raise CheckpointError(f"{state_file}: lacks {key!r} (corrupt)")
    saved = trainer["identity"]
    for key, now in identity.items():
        if saved.get(key) != now:
            raise CheckpointError(
                f"{state_file}: written by a run with {key} = {saved.get(key)!r}; this run has {now!r}"
            )
    own = rank_file(_dist.rank())
    if own not in trainer["files"]:
        raise CheckpointError(f"{path / own}: missing from the checkpoint")
    data = b""
    for name, want in trainer["files"].items():
        if RANK_FILE.fullmatch(name) and name != own:
            continue  # another rank's: that rank checks it
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint")
        raw = f.read_bytes()
        if len(raw) != want["size"]:
            raise CheckpointError(f"{f}: {len(raw)} bytes, the checkpoint wrote {want['size']} (truncated)")
        if hashlib.sha256(raw).hexdigest() != want["sha256"]:
            raise CheckpointError(f"{f}: its sha256 differs from the one the checkpoint recorded (corrupt)")
        if name == own:
            data = raw
    try:
        tensors = st_load(data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])  # valid: st_load read it
        rank_meta = json.loads((header.get("__metadata__") or {}).get("ftk", "{}"))
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path / own}: not a valid safetensors file ({e})") from e
    return trainer, tensors, rank_meta


def check_params(f: Path, tensors: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
    """The state file's ``param.<name>`` tensors are exactly ``params``' names, each of its shape
    and dtype (``_files.check_tensors``); CheckpointError naming f otherwise."""
    saved = {k: v for k, v in tensors.items() if k.startswith("param.")}
    try:
        check_tensors(saved, {f"param.{n}": (p.shape, p.dtype) for n, p in params.items()}, f)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
