"""ftk finetune's checkpoints: a run stopped at any point and resumed ends bit for bit where an
uninterrupted one does (qlora and loreft, 8-bit AdamW, gradient accumulation, a stop inside an
accumulation window, SIGKILL in a subprocess, SIGTERM in-process), bad checkpoints are refused
naming the file, and a failed save keeps the previous checkpoint. On a tiny random Llama with
rank-64 adapters, so that their 64x64 factors (4,096 elements) take 8-bit optimizer states."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from test_finetune import CharTokenizer

from ftkernels.apps import finetune as ft
from ftkernels.apps import finetune_checkpoint as ckpt

from conftest import make_tiny_llama

pytest.importorskip("transformers")  # the loop's own logic: run on the newest Transformers only

DATA = ft.BUILTIN_DATA[:12]


class Crash(Exception):
    """Stands in for a process dying mid-step (SIGKILL itself is tested in a subprocess)."""


def run(out, method="qlora", steps=6, resume=None, crash_at=None, monkeypatch=None, **options):
    """Trains a fresh tiny model; ``crash_at``: the micro-batch (1-based) whose forward raises."""
    model = make_tiny_llama()
    params = ft.prepare(model, method, rank=64, seed=0)
    examples = ft.encode(CharTokenizer(), DATA, seq_len=32)
    options = {"lr": 1e-2, "batch_size": 2, "grad_accum": 2, "optimizer": "adamw8bit", "save_every": 2} | options
    config = ft.TrainConfig(steps=steps, **options)
    if crash_at is not None:
        calls, real = [0], ft._forward_backward

        def dying(*args):
            calls[0] += 1
            if calls[0] == crash_at:
                raise Crash
            return real(*args)

        monkeypatch.setattr(ft, "_forward_backward", dying)
    try:
        result = ft.train(
            model, params, examples, 0, config, out_dir=out, resume=resume, identity={"method": method}, progress=False
        )
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()
    return result, model


def adapter_bytes(model, method, folder) -> bytes:
    ft.adapter_writer(model, method)(folder)
    name = "loreft_model.safetensors" if method == "loreft" else "adapter_model.safetensors"
    return (folder / name).read_bytes()


@pytest.mark.parametrize(
    "method, crash_at",
    [("qlora", 7), ("loreft", 9)],  # micro-batch 7: inside step 4's window; 9: step 5's first
)
def test_stopped_and_resumed_is_bit_identical(tmp_path, monkeypatch, method, crash_at):
    whole, model = run(tmp_path / "whole", method)
    with pytest.raises(Crash):
        run(tmp_path / "cut", method, crash_at=crash_at, monkeypatch=monkeypatch)
    kept = ckpt.complete(tmp_path / "cut" / "checkpoints")
    assert [p.name for p in kept] == ["checkpoint-000002", "checkpoint-000004"][: (crash_at - 1) // 4]
    resumed, model2 = run(tmp_path / "cut", method, resume=tmp_path / "cut")
    assert resumed.resumed_at == 2 * ((crash_at - 1) // 4)
    assert resumed.losses == whole.losses  # the same curve, float for float
    assert adapter_bytes(model, method, tmp_path / "a") == adapter_bytes(model2, method, tmp_path / "b")
    state = ckpt.read(kept[-1], {})[1]
    assert any(k.endswith(".state1") and v.dtype == torch.uint8 for k, v in state.items())  # 8-bit states saved
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == whole.losses


def test_keep_prunes_the_older_checkpoints(tmp_path):
    run(tmp_path, "lora", steps=6, save_every=1, keep=2, optimizer="adamw", grad_accum=1)
    assert [p.name for p in ckpt.complete(tmp_path / "checkpoints")] == ["checkpoint-000005", "checkpoint-000006"]
    adapter = tmp_path / "checkpoints" / "checkpoint-000006" / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, monkeypatch):
    calls, real = [0], ft._forward_backward

    def signalled(*args):
        calls[0] += 1
        if calls[0] == 3:  # inside step 2's window: the step finishes, then the checkpoint
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(ft, "_forward_backward", signalled)
    result, _ = run(tmp_path, "lora", steps=6, save_every=0)
    assert result.interrupted == signal.SIGTERM and len(result.history) == 2
    assert result.checkpoint == tmp_path / "checkpoints" / "checkpoint-000002"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint at step 2 of a QLoRA run, to damage copies of."""
    out = tmp_path_factory.mktemp("saved")
    run(out, "qlora", steps=2)
    return out / "checkpoints" / "checkpoint-000002"


def damaged(saved, tmp_path, how):
    import shutil

    copy = tmp_path / "checkpoint-000002"
    shutil.copytree(saved, copy)
    how(copy)
    return copy


def _truncate(name, keep=None):
    def how(d):
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: len(data) // 2 if keep is None else keep])

    return how


def _flip(name):
    def how(d):
        data = bytearray((d / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (d / name).write_bytes(bytes(data))

    return how


def _edit_state(change):
    def how(d):
        state = json.loads((d / ckpt.STATE).read_text())
        change(state)
        (d / ckpt.STATE).write_text(json.dumps(state))

    return how


@pytest.mark.parametrize(
    "how, file, match",
    [
        (_truncate("state-rank0.safetensors"), "state-rank0.safetensors", "truncated"),
        (_truncate("state-rank0.safetensors", keep=3), "state-rank0.safetensors", "truncated"),
        (_flip("state-rank0.safetensors"), "state-rank0.safetensors", "corrupt"),
        (_flip("adapter/adapter_model.safetensors"), "adapter_model.safetensors", "corrupt"),
        (lambda d: (d / "state-rank0.safetensors").unlink(), "state-rank0.safetensors", "missing"),
        (_truncate(ckpt.STATE), ckpt.STATE, "JSON"),
        (lambda d: (d / ckpt.STATE).unlink(), ckpt.STATE, "missing"),
        (_edit_state(lambda s: s.update(format="other")), ckpt.STATE, "not an ftk finetune checkpoint"),
        (_edit_state(lambda s: s.update(version=99)), ckpt.STATE, "format version 99"),
        (_edit_state(lambda s: s["identity"].update(world_size=2)), ckpt.STATE, "world_size = 2"),
    ],
)
def test_a_bad_checkpoint_is_refused_naming_the_file(saved, tmp_path, how, file, match):
    bad = damaged(saved, tmp_path, how)
    with pytest.raises(ckpt.CheckpointError, match=match) as e:
        run(tmp_path / "out", "qlora", steps=4, resume=bad)
    assert file in str(e.value) and str(bad) in str(e.value)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"method": "lora"}, "method = 'qlora'"),  # the same LoRA factors, on a dense base
        ({"optimizer": "adamw"}, "optimizer = 'adamw8bit'"),
        ({"grad_accum": 1}, "grad_accum = 2"),
    ],
)
def test_a_checkpoint_of_another_run_is_refused(saved, tmp_path, change, match):
    change = dict(change)
    method = change.pop("method", "qlora")
    with pytest.raises(ckpt.CheckpointError, match=match) as e:
        run(tmp_path, method, steps=4, resume=saved, **change)
    assert str(saved / ckpt.STATE) in str(e.value)


def test_another_lora_rank_is_refused(saved, tmp_path):
    model = make_tiny_llama()
    params = ft.prepare(model, "qlora", rank=8, seed=0)
    examples = ft.encode(CharTokenizer(), DATA, seq_len=32)
    config = ft.TrainConfig(steps=4, batch_size=2, grad_accum=2, optimizer="adamw8bit")
    with pytest.raises(ckpt.CheckpointError, match=r"trainable = .*\[64, 64\].*this run has .*\[8, 64\]"):
        ft.train(model, params, examples, 0, config, resume=saved, progress=False)


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real, writes = ckpt._write, [0]

    def disk_full(path, data):
        writes[0] += 1
        if writes[0] > 2:  # the first checkpoint's two files go through; the second's fail half-way
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ckpt, "_write", disk_full)
    with pytest.raises(ckpt.CheckpointSaveError, match="No space left on device") as e:
        run(tmp_path, "lora", steps=6)
    first = tmp_path / "checkpoints" / "checkpoint-000002"
    assert e.value.errno == errno.ENOSPC and f"the previous checkpoint {first} is kept" in str(e.value)
    assert ckpt.complete(tmp_path / "checkpoints") == [first]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # the half-written one is gone
    ckpt.read(first, {})  # intact: sizes and checksums as written


KILLER = """
import os, signal, sys
from ftkernels.apps import cli, finetune as ft, finetune_checkpoint as ckpt

kill_at, where = int(sys.argv[1]), sys.argv[2]
calls = [0]
def counted(real):
    def f(*args):
        calls[0] += 1
        if calls[0] == kill_at:
            if where == "write":  # half the file, then death: a checkpoint being written
                path, data = args
                open(path, "wb").write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)
    return f
if where == "write":
    ckpt._write = counted(ckpt._write)
else:
    ft._forward_backward = counted(ft._forward_backward)
sys.exit(cli.main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_sigkill_then_resume_through_the_cli(tiny_model_dir, tmp_path):
    """`ftk finetune` killed with SIGKILL inside step 4's accumulation window, and again while
    writing the second checkpoint, then `--resume`: the adapter bytes and losses of a whole run."""
    from ftkernels.apps import cli

    args = ["finetune", "--model", str(tiny_model_dir), "--method", "qlora", "--steps", "4", "--batch-size", "2"]
    args += ["--grad-accum", "2", "--optimizer", "adamw8bit", "--rank", "64", "--save-every", "2", "--seq-len", "24"]
    args += ["--max-new-tokens", "1", "--lr", "1e-2"]
    assert cli.main([*args, "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for kill_at, where in ((7, "step"), (3, "write")):  # micro-batch 7 of 8; the 3rd file written
        out = tmp_path / where
        cut = [*args, "--out", str(out)]
        killed = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(KILLER), str(kill_at), where, *cut], env=env, capture_output=True
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
        assert [p.name for p in ckpt.complete(out / "checkpoints")] == ["checkpoint-000002"]
        assert cli.main([*cut, "--resume"]) == 0
        resumed = json.loads((out / "metrics.json").read_text())
        assert resumed["losses"] == whole["losses"] and resumed["resumed_from"].endswith("checkpoint-000002")
        name = "adapter/adapter_model.safetensors"
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 4


def test_ctrl_c_through_the_cli_saves_and_exits_130(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from ftkernels.apps import cli

    real = ft._forward_backward

    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 1: it finishes, then the save
        return real(*args)

    monkeypatch.setattr(ft, "_forward_backward", interrupted)
    args = ["finetune", "--model", str(tiny_model_dir), "--method", "lora", "--steps", "3", "--batch-size", "2"]
    code = cli.main([*args, "--seq-len", "24", "--max-new-tokens", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 128 + signal.SIGINT and "stopped:  SIGINT after step 1 of 3" in out and "--resume" in out
    assert [p.name for p in ckpt.complete(tmp_path / "checkpoints")] == ["checkpoint-000001"]
    assert not (tmp_path / "metrics.json").exists()  # the run did not finish: no final outputs
