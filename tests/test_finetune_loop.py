"""ftk finetune's loop and options on a tiny random Llama: the schedules against Transformers'
own, accumulation against the whole batch, chat conversations trained on the assistant turns
only, the eval loss, each optimizer, dtype and gradient checkpointing, the figures, the options'
errors, and the same command under torchrun with 2 ranks (DistributedDataParallel over gloo)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from test_finetune import CharTokenizer

from ftkernels.apps import finetune as ft
from ftkernels.apps.finetune_data import split_eval

from conftest import make_tiny_llama

pytest.importorskip("transformers")  # the Transformers-facing tests are marked `transformers`


class ChatCharTokenizer(CharTokenizer):
    """CharTokenizer with a ChatML-like template: "<role>|content;" a turn."""

    chat_template = "role|content;"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>|{m['content']};" for m in messages)
        return text + ("<assistant>|" if add_generation_prompt else "")


def trained(method="lora", examples=None, **options):
    model = make_tiny_llama()
    params = ft.prepare(model, method, rank=4, seed=0)
    examples = examples or ft.encode(CharTokenizer(), ft.BUILTIN_DATA[:8], seq_len=32)
    config = ft.TrainConfig(**({"steps": 3, "lr": 1e-2, "batch_size": 2} | options))
    return ft.train(model, params, examples, 0, config, progress=False), model


@pytest.mark.transformers
@pytest.mark.parametrize("kind", ft.SCHEDULERS)
def test_schedules_match_transformers(kind):
    import transformers

    make = getattr(transformers, f"get_{kind}_schedule_with_warmup")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = make(opt, 3) if kind == "constant" else make(opt, 3, 11)
    theirs = []
    for _ in range(11):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [0.5 * ft.lr_factor(kind, step, 3, 11) for step in range(11)]
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)


def test_the_loop_steps_on_the_schedule():
    result, _ = trained(steps=5, lr_scheduler="cosine", warmup_steps=2)
    assert [r["lr"] for r in result.history] == [1e-2 * ft.lr_factor("cosine", s, 2, 5) for s in range(5)]


def test_accumulating_four_batches_of_one_is_the_batch_of_four():
    whole, m4 = trained(batch_size=4, grad_accum=1)
    accum, m1 = trained(batch_size=1, grad_accum=4)
    assert accum.losses == pytest.approx(whole.losses, rel=1e-5)
    for (name, a), b in zip(m4.named_parameters(), m1.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("name", ft.OPTIMIZERS)
def test_each_optimizer_trains(name):
    result, _ = trained(optimizer=name, steps=2, weight_decay=0.01)
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_clipping_bounds_the_gradient_norm(monkeypatch):
    seen = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, m: seen.append(m) or real(p, m))
    trained(steps=2, max_grad_norm=0.5)
    trained(steps=2, max_grad_norm=0.0)
    assert seen == [0.5, 0.5]  # clipped at 0.5 on each step; 0 turns it off


@pytest.mark.transformers
def test_gradient_checkpointing_gives_the_same_losses():
    for method in ("lora", "loreft"):
        plain, _ = trained(method, steps=2)
        model = make_tiny_llama()
        params = ft.prepare(model, method, rank=4, seed=0, gradient_checkpointing=True)
        assert model.model.gradient_checkpointing
        examples = ft.encode(CharTokenizer(), ft.BUILTIN_DATA[:8], seq_len=32)
        config = ft.TrainConfig(steps=2, lr=1e-2, batch_size=2)
        again = ft.train(model, params, examples, 0, config, progress=False)
        assert again.losses == pytest.approx(plain.losses, rel=1e-6)


def test_bf16_base_with_fp32_adapters():
    model = make_tiny_llama().to(torch.bfloat16)
    params = ft.prepare(model, "qlora", rank=4, seed=0)
    assert {p.dtype for p in params} == {torch.float32}
    examples = ft.encode(CharTokenizer(), ft.BUILTIN_DATA[:8], seq_len=32)
    result = ft.train(model, params, examples, 0, ft.TrainConfig(steps=2, lr=1e-2, batch_size=2), progress=False)
    assert all(4 < v < 6 for v in result.losses)  # ln(128) = 4.85: a random model's loss


def test_chat_conversations_train_on_the_assistant_turns_only():
    tok = ChatCharTokenizer()
    chat = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "ok"},
        ]
    }
    ((ids, labels),) = ft.encode(tok, [chat], seq_len=200)
    text = tok.apply_chat_template(chat["messages"])
    assert ids == tok(text)["input_ids"]  # the whole conversation, in order
    trained_text = "".join(chr(0) if y == -100 else text[i] for i, y in enumerate(labels))
    assert trained_text.replace(chr(0), " ").split() == ["yo;", "ok;"]  # each answer and its end of turn


def test_a_template_that_rewrites_earlier_turns_is_refused():
    class Rewriting(ChatCharTokenizer):
        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            return f"{len(messages)}" + super().apply_chat_template(messages, tokenize, add_generation_prompt)

    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(ValueError, match="renders earlier turns differently"):
        ft.encode(Rewriting(), [chat], seq_len=64)
    with pytest.raises(ValueError, match="need a tokenizer with a chat template"):
        ft.encode(CharTokenizer(), [chat], seq_len=64)


def test_load_chat_lines(tmp_path):
    f = tmp_path / "chat.jsonl"
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    f.write_text(json.dumps(chat) + "\n" + json.dumps({"instruction": "c", "response": "d"}) + "\n")
    assert ft.load_pairs(str(f)) == [chat, ("c", "d")]
    for bad, match in (
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "message 0 must be"),
        ({"messages": [{"role": "user", "content": "x"}]}, "the conversation has no assistant turn"),
    ):
        f.write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=f"line 1 of {f}: {match}"):
            ft.load_pairs(str(f))


def test_eval_loss_is_the_token_mean_and_changes_no_step():
    examples = ft.encode(CharTokenizer(), ft.BUILTIN_DATA[:10], seq_len=32)
    train, held = split_eval(examples, 0.2, seed=0)
    assert len(held) == 2 and len(train) == len(examples) - 2 and not set(map(str, held)) & set(map(str, train))
    plain, _ = trained(examples=train, steps=4)
    model2 = make_tiny_llama()
    params = ft.prepare(model2, "lora", rank=4, seed=0)
    config = ft.TrainConfig(steps=4, lr=1e-2, batch_size=2, eval_every=2)
    evaluated = ft.train(model2, params, train, 0, config, eval_examples=held, progress=False)
    assert evaluated.losses == plain.losses  # evaluating draws no random numbers
    assert [r["step"] for r in evaluated.history if "eval_loss" in r] == [2, 4]
    total = count = 0.0
    with torch.no_grad():
        for ids, labels in held:  # one at a time: Transformers' loss on each, token-weighted
            n = sum(y != -100 for y in labels[1:])
            out = model2(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            total, count = total + out.loss.item() * n, count + n
    assert evaluated.history[-1]["eval_loss"] == pytest.approx(total / count, rel=1e-5)


def test_figures_have_their_axes(tmp_path):
    pytest.importorskip("matplotlib")
    fig = ft.loss_curve_png([3.0, 2.5, 2.0, 1.8], tmp_path / "loss.png", eval_points=[(2, 2.7), (4, 2.1)])
    (ax,) = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("step", "loss")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train loss", "eval loss"]
    assert list(ax.get_lines()[1].get_xdata()) == [2, 4]
    fig = ft.lr_png([0.0, 1e-3, 2e-3], tmp_path / "lr.png")
    assert (fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()) == ("step", "learning rate")
    assert all((tmp_path / f).read_bytes()[:4] == b"\x89PNG" for f in ("loss.png", "lr.png"))


@pytest.mark.parametrize(
    "args, match",
    [
        (["--grad-accum", "0"], "--grad-accum must be at least 1"),
        (["--warmup-steps", "-1"], "--warmup-steps must be 0 or more"),
        (["--max-grad-norm", "-1"], "--max-grad-norm must be 0 or more"),
        (["--weight-decay", "nan"], "--weight-decay must be 0 or more"),
        (["--save-every", "-2"], "--save-every must be 0 or more"),
        (["--keep", "-1"], "--keep must be 0 or more"),
        (["--rank", "0"], "--rank must be at least 1"),
        (["--alpha", "0"], "--alpha must be positive"),
        (["--dropout", "1"], r"--dropout must be in \[0, 1\)"),
        (["--eval-every", "5"], "--eval-every needs --eval-data or --eval-split"),
        (["--eval-split", "0.1", "--eval-data", "x.jsonl"], "pass one of them"),
        (["--eval-split", "1.5"], "--eval-split must be between 0 and 1"),
        (["--target-modules", ","], "--target-modules must name at least one layer"),
        (["--target-modules", "nope_proj"], "match no linear layer"),
        (["--method", "loreft", "--target-modules", "q_proj"], "--target-modules applies to LoRA"),
        (["--lr-scheduler", "step"], "invalid choice: 'step'"),
        (["--optimizer", "sgd"], "invalid choice: 'sgd'"),
        (["--dtype", "fp8"], "invalid choice: 'fp8'"),
        (["--resume", "no-such-dir"], "--resume: 'no-such-dir' does not exist"),
        (["--eval-data", "missing.jsonl"], "--eval-data: cannot read"),
    ],
)
def test_each_bad_option_is_a_usage_error(tiny_model_dir, tmp_path, capsys, args, match):
    from ftkernels.apps import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["finetune", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--steps", "1", *args])
    assert e.value.code == 2
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.slow
def test_torchrun_two_ranks_is_one_run(tiny_model_dir, tmp_path):
    """`torchrun --nproc-per-node 2 -m ftkernels.apps.cli finetune`: DDP over gloo, one set of
    outputs, and the losses of the same global batch in one process."""
    from ftkernels.apps import cli

    args = ["finetune", "--model", str(tiny_model_dir), "--method", "lora", "--steps", "3", "--batch-size", "4"]
    args += ["--seq-len", "24", "--max-new-tokens", "1", "--lr", "1e-2", "--grad-accum", "2", "--save-every", "1"]
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "ftkernels.apps.cli", *args, "--out", str(tmp_path / "two")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("method:   lora") == 1 and run.stdout.count("written:") == 1  # rank 0 alone
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert two["world_size"] == 2 and two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    saved = tmp_path / "two" / "checkpoints" / "checkpoint-000003"
    assert sorted(p.name for p in saved.glob("state-rank*")) == ["state-rank0.safetensors", "state-rank1.safetensors"]
    # FSDP2: two steps and a checkpoint, then the third from it; each rank saved its shards
    fsdp = [*cmd[:-1], str(tmp_path / "fsdp"), "--fsdp"]
    steps = fsdp.index("--steps") + 1
    for n, more in (("2", []), ("3", ["--resume"])):
        fsdp[steps] = n
        run = subprocess.run(fsdp + more, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    sharded = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    assert sharded["resumed_from"].endswith("checkpoint-000002") and sharded["fsdp"]
    assert sharded["losses"] == pytest.approx(one["losses"], rel=1e-5)
