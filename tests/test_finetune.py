"""ftkernels.apps.finetune: data, the loop and its outputs for each method, on a tiny random Llama
with a character-level stand-in tokenizer (the real model runs in the CLI test)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from ftkernels.apps import finetune as ft

from conftest import make_tiny_llama

pytestmark = pytest.mark.transformers  # also run on the oldest supported Transformers


class CharTokenizer:
    """Characters to ids (mod the vocab); enough of a tokenizer for encode()."""

    chat_template = None
    eos_token = "\x03"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 120 for c in text]}


def test_load_pairs(tmp_path):
    assert ft.load_pairs("builtin") == ft.BUILTIN_DATA
    f = tmp_path / "d.jsonl"
    f.write_text('{"instruction": "a", "response": "b"}\n\n{"prompt": "c", "completion": "d"}\n')
    assert ft.load_pairs(str(f)) == [("a", "b"), ("c", "d")]
    f.write_text('{"question": "a"}\n')
    with pytest.raises(ValueError, match="line 1 .* needs string fields"):
        ft.load_pairs(str(f))
    f.write_text("not json\n")
    with pytest.raises(ValueError, match="is not JSON"):
        ft.load_pairs(str(f))


def test_held_out_prompts_are_not_trained_on():
    prompts, train, held = ft.held_out_prompts("builtin", ft.BUILTIN_DATA)
    assert held and train == ft.BUILTIN_DATA and not set(prompts) & {p for p, _ in train}
    pairs = [(f"q{i}", f"a{i}") for i in range(12)]
    prompts, train, held = ft.held_out_prompts("file.jsonl", pairs)
    assert held and prompts == ["q10", "q11"] and train == pairs[:10]
    prompts, train, held = ft.held_out_prompts("file.jsonl", pairs[:4])
    assert not held and prompts == ["q0", "q1", "q2"] and train == pairs[:4]


def test_encode_masks_the_prompt_and_batches_pad():
    ex = ft.encode(CharTokenizer(), [("hi", "yo"), ("abc", "d")], seq_len=64)
    ids, labels = ex[0]
    assert labels[:3] == [-100] * 3 and labels[3:] == ids[3:]  # "hi\n" masked, "yo" + eos trained
    batch = next(ft.batches(ex, 2, pad_id=0))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


@pytest.mark.parametrize("method", ft.METHODS)
def test_each_method_trains_and_writes_its_outputs(method, tmp_path):
    torch.manual_seed(0)
    model = make_tiny_llama()
    params = ft.prepare(model, method, rank=4)
    examples = ft.encode(CharTokenizer(), ft.BUILTIN_DATA, seq_len=48)
    config = ft.TrainConfig(steps=25, lr=2e-2, batch_size=8)
    result = ft.train(model, params, examples, 0, config, out_dir=tmp_path, progress=False)
    losses = result.losses
    # a 2-layer random model on character ids: the loss falls slowly (4.9 -> 4.5 over 25 steps)
    assert sum(losses[-5:]) / 5 < 0.98 * sum(losses[:5]) / 5 and result.tokens_per_second > 0
    ft.write_outputs(model, method, tmp_path, {"method": method, "final_loss": losses[-1]}, result.history)
    assert json.loads((tmp_path / "metrics.json").read_text())["method"] == method
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 26)) and [r["loss"] for r in rows] == losses
    assert all(r["lr"] == 2e-2 and r["tokens_per_s"] > 0 and r["memory_mib"] > 0 for r in rows)
    for png in ("loss.png", "lr.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert names == (
        ["loreft_config.json", "loreft_model.safetensors"]
        if method == "loreft"
        else ["adapter_config.json", "adapter_model.safetensors"]
    )


def test_bad_method():
    with pytest.raises(ValueError, match="--method must be one of"):
        ft.prepare(make_tiny_llama(), "dora")


def test_smoothed_is_a_centred_moving_average():
    assert ft.smoothed([1.0, 2.0, 3.0, 4.0]) == pytest.approx([1.5, 2.0, 3.0, 3.5])  # window 3
    s = ft.smoothed([4.0, float("nan"), 2.0, float("inf"), float("nan")])
    assert s[:4] == pytest.approx([4.0, 3.0, 2.0, 2.0]) and math.isnan(s[4])  # non-finite losses skipped
    assert len(ft.smoothed([1.0] * 95)) == 95 and ft.smoothed([1.0] * 95, window=21)[50] == 1.0


def test_loss_curve_is_a_matplotlib_png_with_labelled_axes(tmp_path):
    pytest.importorskip("matplotlib")
    losses = [5.0 - 0.1 * i for i in range(25)] + [float("inf")]
    fig = ft.loss_curve_png(losses, tmp_path / "loss.png", title="LoRA fine-tuning of tiny")
    (ax,) = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("step", "loss", "LoRA fine-tuning of tiny")
    raw, smooth = ax.get_lines()  # 26 steps: the losses and their moving average
    assert list(raw.get_xdata()) == list(range(1, 27)) and len(smooth.get_ydata()) == 26
    data = (tmp_path / "loss.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"Matplotlib" in data[:4096]  # its Software tEXt chunk


def test_without_matplotlib_the_outputs_are_written_but_the_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    model = make_tiny_llama()
    ft.prepare(model, "lora", rank=4)
    history = [{"step": i + 1, "loss": v, "lr": 1e-3} for i, v in enumerate([2.0, 1.5, 1.0])]
    ft.write_outputs(model, "lora", tmp_path, {"method": "lora"}, history)
    err = capsys.readouterr().err
    missing = "not written: matplotlib is not installed (pip install matplotlib)\n"
    assert err == f"loss.png {missing}lr.png {missing}"
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "adapter").is_dir()
    assert not (tmp_path / "loss.png").exists()
