"""Every loader names the file it cannot read: load_lora, load_loreft (our directories and
pyreft's, with .bin and .safetensors weights) and load_quantized (one file and sharded), each
given a good directory with one file broken: truncated, garbage, empty, missing, corrupt JSON,
a config field missing or of the wrong type, tensors of another rank or model or of the wrong
dtype. The error is FileNotFoundError for a missing file and ValueError otherwise, and its
message holds the broken file's path; a failed load leaves the model as it was."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ftkernels.integrations import (
    add_lora,
    add_loreft,
    load_lora,
    load_loreft,
    load_quantized,
    quantize_model,
    save_lora,
    save_loreft,
    save_quantized,
)
from ftkernels.integrations.lora import lora_modules

from conftest import make_tiny_llama

pytestmark = pytest.mark.transformers

D = 64  # make_tiny_llama's hidden size
PYREFT_KEYS = [f"layer_{i}_comp_block_output_unit_pos_nunit_1#0" for i in (0, 1)]


def _write_pyreft(path, rank: int, suffix: str) -> None:
    """A directory as pyreft's ReftModel.save writes it: NoreftIntervention on layers 0 and 1."""
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(rank)
    for key in PYREFT_KEYS:
        state = {
            "embed_dim": torch.tensor(D),
            "interchange_dim": torch.tensor(D),
            "proj_layer.weight": torch.randn(rank, D, generator=gen),
            "proj_layer.bias": torch.randn(rank, generator=gen),
            "learned_source.weight": torch.randn(rank, D, generator=gen),
            "learned_source.bias": torch.randn(rank, generator=gen),
        }
        if suffix == ".bin":
            torch.save(state, path / f"intkey_{key}.bin")
        else:
            save_file(state, str(path / f"intkey_{key}.safetensors"))
    reps = [[i, "block_output", "pos", 1, rank] + [None] * 9 for i in (0, 1)]
    config = {"representations": reps, "intervention_types": ["<class 'pyreft.interventions.NoreftIntervention'>"] * 2}
    (path / "config.json").write_text(json.dumps(config))


def _tiny_llama_other():
    """A Llama of make_tiny_llama's layout but a twice wider MLP: another model's checkpoint."""
    import transformers

    config = make_tiny_llama().config
    config.intermediate_size = 256
    torch.manual_seed(1)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """Good directories, each once, and the same of another rank or model (the mismatches)."""
    root = tmp_path_factory.mktemp("good")
    for name, r in (("lora", 4), ("lora-other", 8)):
        model = make_tiny_llama()
        add_lora(model, r=r)
        save_lora(model, root / name)
    for name, r in (("loreft", 4), ("loreft-other", 2)):
        model = make_tiny_llama()
        add_loreft(model, layers=[0, 1], rank=r)
        save_loreft(model, root / name)
    for suffix in (".bin", ".safetensors"):
        _write_pyreft(root / f"pyreft{suffix}", 4, suffix)
        _write_pyreft(root / f"pyreft{suffix}-other", 2, suffix)
    for name, model in (("quantized", make_tiny_llama()), ("quantized-other", _tiny_llama_other())):
        quantize_model(model, progress=False)
        save_quantized(model, root / name)
    # The same checkpoint in two shards and the index Transformers writes for them.
    sharded = root / "quantized-sharded"
    shutil.copytree(root / "quantized", sharded)
    state = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for shard, names in shards.items():
        save_file({k: state[k] for k in names}, str(sharded / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, names in shards.items() for k in names}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


# loader -> (good directory, its weights file, its config file, load(directory, model)); the
# model is a fresh make_tiny_llama() (load_quantized builds its own).
LOADERS = {
    "lora": ("lora", "adapter_model.safetensors", "adapter_config.json", lambda p, m: load_lora(m, p)),
    "loreft": ("loreft", "loreft_model.safetensors", "loreft_config.json", lambda p, m: load_loreft(m, p)),
    "pyreft-bin": (
        "pyreft.bin",
        f"intkey_{PYREFT_KEYS[1]}.bin",
        "config.json",
        lambda p, m: load_loreft(m, p, positions="f2+l2"),
    ),
    "pyreft-safetensors": (
        "pyreft.safetensors",
        f"intkey_{PYREFT_KEYS[1]}.safetensors",
        "config.json",
        lambda p, m: load_loreft(m, p, positions="f2+l2"),
    ),
    "quantized": ("quantized", "model.safetensors", "config.json", lambda p, m: load_quantized(p)),
    "quantized-sharded": (
        "quantized-sharded",
        "model-00002-of-00002.safetensors",
        "config.json",
        lambda p, m: load_quantized(p),
    ),
}


def _fails(loader: str, path, broken, exc=ValueError) -> str:
    """Loading ``path`` raises ``exc`` naming the broken file and leaves the model as it was;
    returns the message."""
    model = make_tiny_llama()
    with pytest.raises(exc) as info:
        LOADERS[loader][3](path, model)
    assert str(broken) in str(info.value), f"{broken} not named in: {info.value}"
    assert not lora_modules(model) and not hasattr(model, "ftk_loreft"), "a failed load changes nothing"
    assert all(p.requires_grad for p in model.parameters()), "a failed load changes nothing"
    return str(info.value)


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_the_good_directories_load(good, tmp_path, loader):
    src, _, _, load = LOADERS[loader]
    model = make_tiny_llama()
    loaded = load(shutil.copytree(good / src, tmp_path / src), model)
    if loader.startswith("quantized"):
        assert sum(type(m).__name__ == "LinearNF4" for m in loaded.modules()) == 14  # 7 projections x 2 layers
    elif loader == "lora":
        assert len(lora_modules(model)) == 14
    else:
        assert sorted(model.ftk_loreft.interventions) == ["layer0", "layer1"]


def _truncate_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


_GARBAGE = bytes(range(256)) * 4  # not UTF-8, no sane safetensors header (its length reads as ~7e16)

WEIGHT_DAMAGE = {
    "truncated-half": (_truncate_half, ValueError),
    "truncated-3-bytes": (lambda data: data[:3], ValueError),
    "garbage": (lambda data: _GARBAGE, ValueError),
    "empty": (lambda data: b"", ValueError),
    "missing": (None, FileNotFoundError),
}


@pytest.mark.parametrize("damage", sorted(WEIGHT_DAMAGE))
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_a_damaged_weights_file_is_named(good, tmp_path, loader, damage):
    src, weights, _, load = LOADERS[loader]
    path = shutil.copytree(good / src, tmp_path / src)
    fn, exc = WEIGHT_DAMAGE[damage]
    if fn is None:
        (path / weights).unlink()
    else:
        (path / weights).write_bytes(fn((path / weights).read_bytes()))
    message = _fails(loader, path, path / weights, exc)
    if damage.startswith("truncated") and weights.endswith(".safetensors"):
        assert "not a valid safetensors file (truncated or corrupt" in message


CONFIG_DAMAGE = {
    "truncated": (_truncate_half, ValueError),
    "garbage": (lambda text: _GARBAGE, ValueError),
    "empty": (lambda text: b"", ValueError),
    "not-an-object": (lambda text: b"[1, 2]", ValueError),
    "missing": (None, FileNotFoundError),
}


@pytest.mark.parametrize("damage", sorted(CONFIG_DAMAGE))
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_a_damaged_config_is_named(good, tmp_path, loader, damage):
    src, _, config, load = LOADERS[loader]
    path = shutil.copytree(good / src, tmp_path / src)
    fn, exc = CONFIG_DAMAGE[damage]
    if fn is None:
        (path / config).unlink()
    else:
        (path / config).write_bytes(fn((path / config).read_bytes()))
    named = path / ("loreft_config.json" if damage == "missing" and loader.startswith("pyreft") else config)
    message = _fails(loader, path, named, exc)
    if damage in ("truncated", "garbage"):
        assert "not valid JSON" in message


def _edit_json(path, edit):
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _quant(config):
    return config["quantization_config"]


# loader -> [(edit of its config, what the message says)]: a field missing or of the wrong type
FIELD_DAMAGE = {
    "lora": [
        (lambda c: c.pop("r"), "lacks the required field 'r'"),
        (lambda c: c.update(r="4"), "'r' must be an int"),
        (lambda c: c.update(lora_alpha=True), "'lora_alpha' must be a number"),
        (lambda c: c.update(target_modules=5), "'target_modules' must be a string or a list of strings"),
        (lambda c: c.update(target_modules="(q_proj"), "not a valid regex"),
        (lambda c: c.update(use_rslora="no"), "'use_rslora' must be a bool"),
        (lambda c: c.update(lora_dropout=1.5), "lora_dropout must be a number in [0, 1)"),
        (lambda c: c.update(alpha_pattern={"q_proj": 32}), "alpha_pattern (per-layer alphas) is not supported"),
        (lambda c: c.update(peft_type="IA3"), "peft_type is 'IA3'"),
    ],
    "loreft": [
        (lambda c: c.pop("rank"), "must hold exactly"),
        (lambda c: c.update(rank="4"), "'rank' must be an int"),
        (lambda c: c.update(share_weights=1), "'share_weights' must be a bool"),
        (lambda c: c.update(positions=5), "'positions' must be a string"),
        (lambda c: c.update(layers=[0, 7]), "layers must be distinct decoder-layer indices"),
        (lambda c: c.update(embed_dim=32), "hidden size 32"),
    ],
    "pyreft": [
        (lambda c: c.pop("representations"), "needs 'representations'"),
        (lambda c: c.update(intervention_types="NoreftIntervention"), "needs 'representations'"),
        (lambda c: c["representations"][1].__setitem__(4, "4"), "low_rank_dimension must be an int"),
    ],
    "quantized": [
        (lambda c: c.update(quantization_config="bnb"), "'quantization_config' must be an object"),
        (lambda c: _quant(c).update(bnb_4bit_use_double_quant="yes"), "'bnb_4bit_use_double_quant' must be a bool"),
        (lambda c: _quant(c).update(bnb_4bit_compute_dtype="os"), "bnb_4bit_compute_dtype must name a float dtype"),
        (lambda c: _quant(c).update(bnb_4bit_quant_type="int4"), "quant_type"),
    ],
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_a_config_field_missing_or_of_the_wrong_type_is_named(good, tmp_path, loader):
    src, _, config, load = LOADERS[loader]
    for i, (edit, says) in enumerate(FIELD_DAMAGE[loader.split("-")[0]]):
        path = shutil.copytree(good / src, tmp_path / f"{i}")
        _edit_json(path / config, edit)
        message = _fails(loader, path, path / config)
        assert says in message, message


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_tensors_of_another_rank_or_model_are_named(good, tmp_path, loader):
    src, weights, _, load = LOADERS[loader]
    path = shutil.copytree(good / src, tmp_path / src)
    other = f"{src}-other" if not loader.endswith("sharded") else "quantized-other"
    if loader.endswith("sharded"):  # the other model's tensors in place of this shard's
        theirs = load_file(str(good / other / "model.safetensors"))
        ours = load_file(str(path / weights))
        save_file({k: theirs[k] for k in ours}, str(path / weights), metadata={"format": "pt"})
    else:
        shutil.copyfile(good / other / weights, path / weights)
    message = _fails(loader, path, path / weights)
    assert "shape" in message, message


# loader -> the tensor given an integer dtype
WRONG_DTYPE = {
    "lora": "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    "loreft": "layer0.parametrizations.rotation.original",
    "pyreft": "learned_source.weight",
    "quantized": "model.norm.weight",
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_a_tensor_of_the_wrong_dtype_is_named(good, tmp_path, loader):
    src, weights, _, load = LOADERS[loader]
    path = shutil.copytree(good / src, tmp_path / src)
    if loader.endswith("bin"):
        state = torch.load(path / weights, weights_only=True)
    else:
        state = load_file(str(path / weights))
    key = WRONG_DTYPE[loader.split("-")[0]]
    if key not in state:  # a shard without it, or another spelling of the same entry
        key = next(k for k in state if state[k].is_floating_point())
    state[key] = state[key].to(torch.int32)
    if loader.endswith("bin"):
        torch.save(state, path / weights)
    else:
        save_file(state, str(path / weights))
    message = _fails(loader, path, path / weights)
    assert "int32" in message, message


def test_a_bad_index_is_named(good, tmp_path):
    index = "model.safetensors.index.json"
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"

    def copy(name):
        return shutil.copytree(good / "quantized-sharded", tmp_path / name)

    path = copy("corrupt")
    (path / index).write_text((path / index).read_text()[:40])
    assert "not valid JSON" in _fails("quantized", path, path / index)
    path = copy("no-map")
    _edit_json(path / index, lambda c: c.pop("weight_map"))
    assert "lacks the required field 'weight_map'" in _fails("quantized", path, path / index)
    path = copy("outside")
    _edit_json(path / index, lambda c: c["weight_map"].update({"model.norm.weight": "../model.safetensors"}))
    assert "shard's file name in the same folder" in _fails("quantized", path, path / index)
    path = copy("shard-missing")
    (path / second).unlink()
    assert str(path / index) in _fails("quantized", path, path / second, FileNotFoundError)
    path = copy("mapped-elsewhere")  # a tensor in the first shard that the index puts in the second
    ours, theirs = load_file(str(path / first)), load_file(str(path / second))
    moved = sorted(theirs)[0]
    save_file({**ours, moved: theirs[moved]}, str(path / first))
    save_file({k: v for k, v in theirs.items() if k != moved}, str(path / second))
    assert "maps to" in _fails("quantized", path, path / first)
    path = copy("lacks")  # a tensor the index puts in the second shard, which does not hold it
    theirs = load_file(str(path / second))
    save_file({k: v for k, v in theirs.items() if k != sorted(theirs)[0]}, str(path / second))
    assert "lacks" in _fails("quantized", path, path / second)


def test_a_missing_directory_is_a_file_not_found_error(tmp_path):
    for loader in ("lora", "loreft", "quantized"):
        _fails(loader, tmp_path / "nope", tmp_path / "nope", FileNotFoundError)
