"""The named native ABI (csrc/bindings_params.h): every parameter struct is a keyword-only class
whose fields are the C++ members, a bad field is a clear exception naming it, and the codes
and limits ftkernels._formats mirrors equal the ones each compiled module exports, and each
module reports how it was built (build_info)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys

import pytest
import torch

import ftkernels as ftk
from ftkernels import _formats, _native
from ftkernels._ops.quant import Weight4bit

MODULES = ["_ftk_cpu", "_ftk_cuda"]


@pytest.fixture(params=MODULES)
def mod(request):
    m = _native._load(request.param)
    if m is None:
        pytest.skip(f"{request.param} is not built")
    return m


def _off(mod):
    return mod.Dropout(enabled=False, seed=0, threshold=0, scale=1.0)


def _weight_kwargs():
    return dict(
        packed=16,
        rows=4,
        cols=8,
        blocksize=64,
        quant_type=0,
        absmax=32,
        absmax_q=0,
        nested_absmax=0,
        nested_code=0,
        offset=0,
        nested_blocksize=256,
    )


def _hyper_kwargs():
    return dict(zip(_native.OPTIM_HYPER_FIELDS, _formats.optim_hyper(1e-3, 0.9, 0.999, 1e-8, 0.01, 1)))


# A valid set of keywords for each struct (the launchers are never called with these).
SAMPLES = {
    "Weight4bit": lambda mod: _weight_kwargs(),
    "Dropout": lambda mod: dict(enabled=True, seed=-5, threshold=1 << 20, scale=1.25),
    "OptimHyper": lambda mod: _hyper_kwargs(),
    "Quantize4bitParams": lambda mod: dict(A=16, n=8, dtype=0, blocksize=64, quant_type=1, packed=32, absmax=48),
    "Dequantize4bitParams": lambda mod: dict(w=mod.Weight4bit(**_weight_kwargs()), dtype=2, out=64),
    "QuantizeBlockwiseParams": lambda mod: dict(A=16, n=8, dtype=1, code=32, blocksize=256, out=48, absmax=64),
    "DequantizeBlockwiseParams": lambda mod: dict(A=16, n=8, absmax=32, code=48, blocksize=256, dtype=0, out=64),
    "LoraDropoutParams": lambda mod: {"in": 16, "dtype": 0, "rows": 2, "cols": 3, "dropout": _off(mod), "out": 32},
    "LoraMatmulParams": lambda mod: dict(
        mode=1,
        X=16,
        dtype=2,
        M=4,
        W=mod.Weight4bit(**_weight_kwargs()),
        bias=0,
        bias_dtype=0,
        L=32,
        R=48,
        R_dtype=1,
        r=8,
        scaling=2.0,
        dropout=_off(mod),
        out=64,
    ),
    "ReftForwardParams": lambda mod: dict(
        h=16, dtype=0, n_rows=4, d=8, r=2, rows=0, n_slots=4, P=32, Q=48, b=64, dropout=_off(mod), out=80, z=96
    ),
    "ReftBackwardParams": lambda mod: dict(
        grad=16,
        h=32,
        dtype=0,
        n_rows=4,
        d=8,
        r=2,
        rows=0,
        n_slots=4,
        P=48,
        Q=64,
        z=80,
        dropout=_off(mod),
        dh=96,
        dP=0,
        dQ=0,
        db=0,
        workspace=0,
        workspace_floats=0,
    ),
    "Optim32bitParams": lambda mod: dict(
        kind=1,
        param=16,
        param_dtype=2,
        grad=32,
        grad_dtype=0,
        n=100,
        state1=48,
        state2=0,
        hyper=mod.OptimHyper(**_hyper_kwargs()),
    ),
    "Optim8bitParams": lambda mod: dict(
        param=16,
        param_dtype=0,
        grad=32,
        grad_dtype=1,
        n=100,
        state1=48,
        state2=64,
        absmax1=80,
        absmax2=96,
        code1=112,
        code2=128,
        hyper=mod.OptimHyper(**_hyper_kwargs()),
    ),
}

# Fields of each kind, for the wrong-type cases: (struct, field).
ENUM_FIELDS = [
    ("Quantize4bitParams", "dtype"),
    ("Quantize4bitParams", "quant_type"),
    ("Weight4bit", "quant_type"),
    ("Dequantize4bitParams", "dtype"),
    ("QuantizeBlockwiseParams", "dtype"),
    ("DequantizeBlockwiseParams", "dtype"),
    ("LoraDropoutParams", "dtype"),
    ("LoraMatmulParams", "mode"),
    ("LoraMatmulParams", "dtype"),
    ("LoraMatmulParams", "bias_dtype"),
    ("LoraMatmulParams", "R_dtype"),
    ("ReftForwardParams", "dtype"),
    ("ReftBackwardParams", "dtype"),
    ("Optim32bitParams", "kind"),
    ("Optim32bitParams", "param_dtype"),
    ("Optim8bitParams", "grad_dtype"),
]
NESTED_FIELDS = [
    ("Dequantize4bitParams", "w"),
    ("LoraDropoutParams", "dropout"),
    ("LoraMatmulParams", "W"),
    ("LoraMatmulParams", "dropout"),
    ("ReftForwardParams", "dropout"),
    ("ReftBackwardParams", "dropout"),
    ("Optim32bitParams", "hyper"),
    ("Optim8bitParams", "hyper"),
]
INT_FIELDS = [
    ("Weight4bit", "rows"),
    ("Weight4bit", "blocksize"),
    ("Quantize4bitParams", "n"),
    ("LoraMatmulParams", "M"),
    ("LoraMatmulParams", "r"),
    ("ReftForwardParams", "n_slots"),
    ("ReftBackwardParams", "workspace_floats"),
    ("Dropout", "threshold"),
    ("Dropout", "seed"),
]
POINTER_FIELDS = [
    ("Weight4bit", "packed"),
    ("LoraMatmulParams", "X"),
    ("Optim8bitParams", "code2"),
    ("ReftForwardParams", "rows"),
]


def test_every_struct_is_bound_with_its_fields(mod):
    for name, sample in SAMPLES.items():
        kwargs = sample(mod)
        s = getattr(mod, name)(**kwargs)
        assert set(getattr(mod, name)._fields) == set(kwargs), name
        for field, value in kwargs.items():
            got = getattr(s, field)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert got == pytest.approx(value, rel=1e-7), (name, field)
            elif isinstance(value, bool):
                assert got is value
            else:  # a nested struct: compared through its repr
                assert repr(got) == repr(value), (name, field)
        assert repr(s).startswith(name + "(")


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_a_missing_field_is_a_type_error_naming_it(mod, name):
    kwargs = SAMPLES[name](mod)
    for field in kwargs:
        partial = {k: v for k, v in kwargs.items() if k != field}
        with pytest.raises(TypeError, match=rf"{name}: missing field '{field}'"):
            getattr(mod, name)(**partial)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_an_unknown_field_or_a_positional_argument_is_a_type_error(mod, name):
    kwargs = SAMPLES[name](mod)
    with pytest.raises(TypeError, match=rf"{name}: unknown field 'n_cols'"):
        getattr(mod, name)(**kwargs, n_cols=3)
    with pytest.raises(TypeError, match=rf"{name} takes keyword arguments only"):
        getattr(mod, name)(*kwargs.values())
    with pytest.raises(TypeError, match=rf"{name} takes keyword arguments only"):
        getattr(mod, name)(1, **kwargs)


@pytest.mark.parametrize("name, field", NESTED_FIELDS)
def test_a_nested_struct_field_takes_only_that_struct(mod, name, field):
    kwargs = SAMPLES[name](mod)
    wrong = mod.Quantize4bitParams(**SAMPLES["Quantize4bitParams"](mod))
    for bad in (wrong, (1, 2), {"enabled": False}, 0, None):
        with pytest.raises(TypeError, match=rf"{name}\.{field}: expected a "):
            getattr(mod, name)(**{**kwargs, field: bad})


@pytest.mark.parametrize("name, field", INT_FIELDS + POINTER_FIELDS)
def test_a_float_for_an_int_field_is_a_type_error_naming_it(mod, name, field):
    kwargs = SAMPLES[name](mod)
    for bad in (2.0, "3", None):
        with pytest.raises(TypeError, match=rf"{name}\.{field}: expected "):
            getattr(mod, name)(**{**kwargs, field: bad})


@pytest.mark.parametrize("name, field", ENUM_FIELDS)
def test_an_unknown_enum_code_is_a_value_error_naming_the_field(mod, name, field):
    kwargs = SAMPLES[name](mod)
    for code in (7, -1, 2**40):
        with pytest.raises(ValueError, match=rf"^{field}: unknown .* code {code}$"):
            getattr(mod, name)(**{**kwargs, field: code})
    with pytest.raises(TypeError, match=rf"{name}\.{field}: expected an int"):
        getattr(mod, name)(**{**kwargs, field: 0.0})


def test_dtype_codes_read_as_the_example_says(mod):
    with pytest.raises(ValueError, match=r"^dtype: unknown dtype code 7$"):
        mod.Dequantize4bitParams(w=mod.Weight4bit(**_weight_kwargs()), dtype=7, out=0)


def test_pointers_and_seeds_cross_as_ints(mod):
    w = mod.Weight4bit(**{**_weight_kwargs(), "packed": 2**64 - 16})
    assert w.packed == 2**64 - 16
    with pytest.raises(ValueError, match="Weight4bit.packed"):
        mod.Weight4bit(**{**_weight_kwargs(), "packed": -1})
    with pytest.raises(TypeError, match="Weight4bit.packed"):
        mod.Weight4bit(**{**_weight_kwargs(), "packed": True})
    # The seed is an int64 used as its 64-bit pattern: negative seeds round-trip.
    for seed in (-(2**63), -1, 0, 2**63 - 1):
        assert mod.Dropout(enabled=True, seed=seed, threshold=0, scale=1.0).seed == seed
    with pytest.raises(ValueError, match="Dropout.seed"):
        mod.Dropout(enabled=True, seed=2**63, threshold=0, scale=1.0)


def test_the_constants_equal_the_python_ones(mod):
    c = mod.constants
    assert c["DTYPE_CODE"] == {str(dt).removeprefix("torch."): code for dt, code in _formats.DTYPE_CODE.items()}
    assert c["QUANT_TYPE_CODE"] == _formats.QUANT_TYPE_CODE
    assert tuple(c["BLOCKSIZES_4BIT"]) == tuple(_formats.BLOCKSIZES_4BIT)
    assert tuple(c["BLOCKSIZES_8BIT"]) == tuple(_formats.BLOCKSIZES_8BIT)
    assert c["NESTED_BLOCKSIZE"] == _formats.NESTED_BLOCKSIZE
    assert (c["LORA_FORWARD"], c["LORA_GRAD_INPUT"]) == (_formats.LORA_FORWARD, _formats.LORA_GRAD_INPUT)
    assert c["LORA_MAX_RANK"] == _formats.LORA_MAX_RANK
    assert c["REFT_MAX_RANK"] == _formats.REFT_MAX_RANK
    assert (c["OPTIM_ADAMW"], c["OPTIM_LION"]) == (_formats.OPTIM_ADAMW, _formats.OPTIM_LION)
    assert c["OPTIM_BLOCK"] == _formats.OPTIM_BLOCK
    # The orders the Python tuples are zipped in: ftk::OptimHyper's and ftk::Dropout's.
    assert tuple(c["OPTIM_HYPER_FIELDS"]) == _native.OPTIM_HYPER_FIELDS == tuple(mod.OptimHyper._fields)
    assert len(_formats.optim_hyper(1e-3, 0.9, 0.999, 1e-8, 0.0, 3)) == len(_native.OPTIM_HYPER_FIELDS)
    assert _native.DROPOUT_FIELDS == tuple(mod.Dropout._fields)
    assert len(_formats.dropout_args(0.1, 7)) == len(_native.DROPOUT_FIELDS)


def test_the_python_builders_fill_the_structs_by_name(mod):
    w = torch.randn(24, 40)
    packed, qs = ftk.quantize_nf4(w, blocksize=64, compress_statistics=True)
    out = torch.empty(24, 40)
    w4 = Weight4bit(
        packed,
        qs.absmax,
        qs.blocksize,
        qs.quant_type,
        list(qs.shape),
        qs.state2.absmax,
        qs.state2.code,
        qs.offset.reshape(1),
        qs.state2.blocksize,
    )
    p = _native.dequantize_4bit_params(mod, w4, out)
    assert (p.w.rows, p.w.cols, p.w.blocksize) == (24, 40, 64)
    assert p.w.absmax == 0 and p.w.absmax_q == qs.absmax.data_ptr()  # double quantization: the codes
    assert p.w.nested_blocksize == qs.state2.blocksize and p.out == out.data_ptr()
    assert p.dtype == _formats.DTYPE_CODE[torch.float32]
    # Any shape is rows x cols: cols the last dimension, 1 x n for 0-d and 1-d.
    assert _native.rows_cols([2, 3, 5]) == (6, 5)
    assert _native.rows_cols([7]) == (1, 7)
    assert _native.rows_cols([]) == (1, 1)
    d = _native.dropout_params(mod, 0.25, -3)
    assert (d.enabled, d.seed, d.threshold, d.scale) == (True, -3, 1 << 22, pytest.approx(4 / 3))
    assert not _native.dropout_params(mod, 0.25, None).enabled


def test_the_two_modules_keep_their_own_classes():
    cpu, cuda = _native._load("_ftk_cpu"), _native._load("_ftk_cuda")
    if cpu is None or cuda is None:
        pytest.skip("needs both modules built")
    assert cpu.Weight4bit is not cuda.Weight4bit
    # Each registers its own class of the same C++ struct; pybind11 converts one module's
    # instance for the other, in nested fields and launcher arguments alike.
    p = cuda.Dequantize4bitParams(w=cpu.Weight4bit(**_weight_kwargs()), dtype=0, out=0)
    assert type(p.w) is cuda.Weight4bit and p.w.cols == 8
    with pytest.raises(ValueError, match="out must not be null"):  # converted, then refused by check(p)
        cpu.dequantize_4bit(p, 1)


BUILD_INFO_KEYS = {
    "_ftk_cpu": {"compiler", "build_type", "flags", "openmp", "isa_baseline", "isa_levels"},
    "_ftk_cuda": {"compiler", "build_type", "cuda_architectures", "cudart_version"},
}


def test_build_info_says_how_the_module_was_built(mod):
    """The build facts `ftk doctor` prints, as CMakeLists.txt passed them."""
    name = mod.__name__.rpartition(".")[2]
    info = mod.build_info
    assert set(info) == BUILD_INFO_KEYS[name]
    assert all(isinstance(info[k], str) and info[k] for k in ("compiler", "build_type"))
    if name == "_ftk_cpu":
        assert isinstance(info["openmp"], bool) and isinstance(info["flags"], str)
        assert info["isa_baseline"] in ("x86-64", "avx2", "avx512f", "aarch64", "generic")
        # The level every CPU kernel runs at follows the cap (FTK_CPU_ISA), up to the CPU's widest.
        levels = ("baseline", "avx2", "avx512")
        assert mod.cpu_isa() in levels and mod.cpu_isa_max() in levels
        old = mod.set_isa_limit(0)
        try:
            assert mod.cpu_isa() == "baseline" and mod.isa_limit() == 0
            mod.set_isa_limit(2)
            assert mod.cpu_isa() == mod.cpu_isa_max()
        finally:
            mod.set_isa_limit(old)
        flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else None
        if flags is not None and platform.machine() == "x86_64":
            for feature in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16"):
                assert mod.cpu_has(feature) == (feature in flags), feature
            for feature in ("amx_bf16", "amx_fp16"):  # also needs the OS to save tile state (XCR0)
                assert not mod.cpu_has(feature) or feature in flags, feature
        assert mod.cpu_has("no_such_feature") is False
    else:
        # A CMake architecture list ("80-real;90-virtual"), with its ';' restored.
        entries = info["cuda_architectures"].split(";")
        assert all(re.fullmatch(r"\d+[af]?(-real|-virtual)?|all|all-major|native", e) for e in entries), entries
        assert isinstance(info["cudart_version"], int) and info["cudart_version"] >= 11000
        assert isinstance(mod.driver_version(), int) and mod.driver_version() >= 0  # 0: no driver; never raises


@pytest.mark.parametrize("value, level", [("baseline", "baseline"), ("AVX2", "avx2"), ("native", None), ("", None)])
def test_ftk_cpu_isa_caps_the_cpu_kernels(value, level):
    """FTK_CPU_ISA, read when the module loads, sets the level every CPU kernel runs at."""
    if not _native.cpu_available():
        pytest.skip("the CPU module is not built")
    mod = _native.cpu()
    if level == "avx2" and mod.cpu_isa_max() == "baseline":
        level = "baseline"
    code = "from ftkernels import _native; m = _native.cpu(); print(m.cpu_isa(), m.cpu_isa_max())"
    env = {**os.environ, "FTK_CPU_ISA": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    got, widest = out.split()
    assert got == (level or widest)


def test_bad_ftk_cpu_isa_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("FTK_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="FTK_CPU_ISA must be one of baseline, avx2, avx512, native, got 'sse9'"):
        _native.cpu_isa_limit_from_env()


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_cpu_sources_build_for_other_architectures():
    """The CPU module passes no x86-only compiler option, and its non-x86 path (every kernel
    at the baseline level, no intrinsics) compiles: FTK_GENERIC_CPU selects it on x86 too."""
    import shutil

    cmake = (REPO / "CMakeLists.txt").read_text()
    assert not re.search(r"-m(arch|tune|cpu|avx|sse|fma|f16c|bmi|prefer-vector-width)\b", cmake)
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None or not (REPO / "csrc").is_dir():
        pytest.skip("needs a C++ compiler and the sources")
    procs = [
        subprocess.Popen(
            [
                cxx,
                "-std=c++17",
                "-fsyntax-only",
                "-Werror",
                "-DFTK_GENERIC_CPU",
                f"-I{REPO / 'csrc/include'}",
                str(src),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for src in sorted((REPO / "csrc/cpu").glob("*.cpp"))
    ]
    errors = [p.communicate()[1] for p in procs if p.wait() != 0]
    assert not errors, errors[0]
