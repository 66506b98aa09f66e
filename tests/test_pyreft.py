"""pyreft's six intervention types (ftkernels.nn) against their formulas in plain torch, pyreft's
representation specs in add_loreft, and reading the directory pyreft's ReftModel.save writes
(pyvene's config.json and intkey_*.bin), written here as pyreft's and pyvene's code write it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ftkernels.integrations.reft import add_loreft, load_loreft, remove_loreft, save_loreft
from ftkernels.nn import (
    PYREFT_TYPES,
    ConsReFT,
    DiReFT,
    LobiReFT,
    LoReFT,
    NodiReFT,
    NoReFT,
    from_pyreft,
)
from ftkernels.nn.loreft import pyreft_rotation

from conftest import assert_within_torch_error, make_tiny_llama

D, R = 13, 3  # odd d, small rank
POS = [[0, 4], [2, -1]]  # a subset of (2, 5) positions, one slot empty


def _orthonormal_rows(V: torch.Tensor) -> torch.Tensor:
    q, r = torch.linalg.qr(V.T)
    return (q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)).T


def _edit(kind: str, x: torch.Tensor, p: dict) -> torch.Tensor:
    """pyreft's formula of each type on rows x (interventions.py), p the module's parameters."""
    if "parametrizations.rotation.original" in p:
        R_ = _orthonormal_rows(p["parametrizations.rotation.original"].double()).to(x.dtype)
    if "parametrizations.proj.original" in p:
        R_ = _orthonormal_rows(p["parametrizations.proj.original"].double()).to(x.dtype)
    W, b = p.get("learned_source.weight"), p.get("learned_source.bias")
    if kind == "LoReFT":
        return x + ((x @ W.T + b) - x @ R_.T) @ R_
    if kind == "NoReFT":
        P, c = p["proj_layer.weight"], p["proj_layer.bias"]
        return x + ((x @ W.T + b) - (x @ P.T + c)) @ P
    if kind == "ConsReFT":
        return x + (p["learned_source"] - x @ R_.T) @ R_
    if kind == "LobiReFT":
        return x + p["learned_source"] @ R_
    if kind == "DiReFT":
        return x + (x @ W.T + b) @ R_
    if kind == "NodiReFT":
        return x + (x @ W.T + b) @ p["proj_layer.weight"]
    raise AssertionError(kind)


def _module(kind: str, **kw) -> nn.Module:
    torch.manual_seed(1)
    cls = {"LoReFT": LoReFT, "NoReFT": NoReFT, "ConsReFT": ConsReFT, "LobiReFT": LobiReFT}.get(kind)
    if kind == "DiReFT":
        mod = DiReFT(D, R, orthogonal=True, **kw)
    elif kind == "NodiReFT":
        mod = NodiReFT(D, R, add_bias=True, **kw)
    elif kind == "NoReFT":
        mod = NoReFT(D, R, add_bias=True, **kw)
    else:
        mod = cls(D, R, **kw)
    with torch.no_grad():  # away from the init, so every term of the formula counts
        for prm in mod.parameters():
            prm.add_(0.3 * torch.randn_like(prm))
    return mod


KINDS = ["LoReFT", "NoReFT", "ConsReFT", "LobiReFT", "DiReFT", "NodiReFT"]


def _reference(kind, mod, h, grad, dtype):
    """(out, dh, {name: dparam}) of the formula in plain torch autograd in dtype."""
    params = {n: t.detach().to(dtype).requires_grad_() for n, t in mod.named_parameters()}
    x = h.detach().to(dtype).requires_grad_()
    rows = torch.tensor([i * h.shape[1] + q for i, row in enumerate(POS) for q in row if q >= 0])
    flat = x.reshape(-1, D)
    out = flat.index_copy(0, rows, _edit(kind, flat[rows], params)).reshape(x.shape)
    out.backward(grad.to(dtype))
    return out, x.grad, {n: t.grad for n, t in params.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_each_type_is_its_pyreft_formula_values_and_gradients(kind, dtype):
    mod = _module(kind).to(dtype)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, D, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(2, 5, D, generator=g).to(dtype)
    out = mod(h, torch.tensor(POS))
    out.backward(grad)
    oracle = _reference(kind, mod, h, grad, torch.float64)
    own = _reference(kind, mod, h, grad, dtype)
    assert out.dtype == dtype
    assert_within_torch_error(out, oracle[0], own[0], 2.0, f"{kind} out")
    assert_within_torch_error(h.grad, oracle[1], own[1], 2.0, f"{kind} dh")
    for name, prm in mod.named_parameters():
        if kind == "NodiReFT" and name == "proj_layer.bias":  # in pyreft's state_dict, never used
            assert prm.grad is None
            continue
        assert_within_torch_error(prm.grad, oracle[2][name], own[2][name], 2.0, f"{kind} d{name}")
    rest = torch.ones(2, 5, dtype=torch.bool)
    rest[0, 0] = rest[0, 4] = rest[1, 2] = False
    assert torch.equal(out.detach()[rest], h.detach()[rest])  # rows outside the positions untouched


@pytest.mark.parametrize("kind", KINDS)
def test_pyreft_dropout_placement_drops_the_edited_rows_only(kind):
    mod = _module(kind, dropout=0.5, dropout_on="output").train()
    h = torch.randn(2, 5, D)
    pos = torch.tensor(POS)
    torch.manual_seed(3)
    out = mod(h, pos)
    want = mod.eval()(h, pos)  # h + edit, no dropout
    sel = torch.zeros(2, 5, dtype=torch.bool)
    sel[0, 0] = sel[0, 4] = sel[1, 2] = True
    assert torch.equal(out[~sel], h[~sel])
    kept = out[sel] != 0
    assert 0 < kept.sum() < kept.numel()  # 39 elements at p = 0.5
    torch.testing.assert_close(out[sel][kept], 2.0 * want[sel][kept])


def test_bad_options_raise_naming_them():
    with pytest.raises(ValueError, match="act_fn must be None or 'linear'"):
        LoReFT(D, R, act_fn="relu")
    LoReFT(D, R, act_fn="linear")
    with pytest.raises(ValueError, match="dropout_on must be"):
        NoReFT(D, R, dropout_on="input")
    with pytest.raises(TypeError, match="add_bias must be a bool"):
        NodiReFT(D, R, add_bias=1)
    with pytest.raises(ValueError, match="rank must be at most"):
        ConsReFT(D, 14)


@pytest.mark.parametrize("d, r", [(9, 4), (5, 5)])  # Householder (r < d) and matrix_exp (r == d)
def test_pyreft_rotation_is_torchs_orthogonal_parametrisation(d, r):
    torch.manual_seed(0)
    m = nn.Module()
    m.weight = nn.Parameter(nn.init.orthogonal_(torch.empty(d, r)))
    m = nn.utils.parametrizations.orthogonal(m)
    with torch.no_grad():
        m.parametrizations.weight.original.add_(0.2 * torch.randn(d, r).tril(-1))
    sd = m.state_dict()
    got = pyreft_rotation(sd["parametrizations.weight.original"], sd["parametrizations.weight.0.base"])
    torch.testing.assert_close(got, m.weight.detach().T, rtol=1e-5, atol=1e-6)


# ---- pyreft's saved directories, written as pyreft and pyvene write them ----------------------


class _PyreftLike(nn.Module):
    """A pyreft intervention's parameters, buffers and forward (pyreft/interventions.py), in
    plain torch: its state_dict is what pyvene's save puts in intkey_<key>.bin."""

    def __init__(self, kind, d, r, add_bias=True):
        super().__init__()
        self.kind = kind
        self.register_buffer("embed_dim", torch.tensor(d))  # pyvene's Intervention buffers
        self.register_buffer("interchange_dim", torch.tensor(d))
        if kind in ("NoreftIntervention", "NodireftIntervention"):
            self.proj_layer = nn.Linear(d, r, bias=add_bias)
        else:
            rot = nn.Module()
            rot.weight = nn.Parameter(nn.init.orthogonal_(torch.empty(d, r)))
            self.rotate_layer = nn.utils.parametrizations.orthogonal(rot)
            with torch.no_grad():  # as after training: reflectors below the diagonal
                self.rotate_layer.parametrizations.weight.original.add_(0.2 * torch.randn(d, r).tril(-1))
        if kind in ("ConsreftIntervention", "LobireftIntervention"):
            self.learned_source = nn.Parameter(torch.rand(r))
        else:
            self.learned_source = nn.Linear(d, r)

    def forward(self, x):
        k = self.kind
        if k in ("NoreftIntervention", "NodireftIntervention"):
            P = self.proj_layer.weight
            if k == "NoreftIntervention":
                return x + (self.learned_source(x) - self.proj_layer(x)) @ P
            return x + self.learned_source(x) @ P
        Rt = self.rotate_layer.weight  # (d, r)
        if k == "LoreftIntervention":
            return x + (self.learned_source(x) - x @ Rt) @ Rt.T
        if k == "ConsreftIntervention":
            return x + (self.learned_source - x @ Rt) @ Rt.T
        if k == "LobireftIntervention":
            return x + self.learned_source @ Rt.T
        return x + self.learned_source(x) @ Rt.T  # DireftIntervention

    def saved_state_dict(self):
        if self.kind == "LoreftIntervention":  # pyreft's state_dict override
            return {**self.learned_source.state_dict(), "rotate_layer": self.rotate_layer.weight.data}
        return self.state_dict()


def _write_pyreft_dir(path, kind, layers, d=64, r=3, seed=0):
    """ReftModel.save(path): config.json (IntervenableConfig.save_pretrained) and one
    torch.save'd state_dict an intervention, named by pyvene's keys."""
    torch.manual_seed(seed)
    reps, keys, mods, seen = [], [], [], {}
    for layer in layers:
        reps.append([layer, "block_output", "pos", 1, r, None, None, None, None, None, None, None, None, None])
        name = f"layer_{layer}_comp_block_output_unit_pos_nunit_1"
        seen[name] = seen.get(name, -1) + 1
        keys.append(f"{name}#{seen[name]}")
        mods.append(_PyreftLike(kind, d, r))
        with torch.no_grad():  # as after training (`original` already is; its diagonal holds signs)
            for n, prm in mods[-1].named_parameters():
                if not n.endswith("original"):
                    prm.add_(0.1 * torch.randn_like(prm))
    path.mkdir(parents=True, exist_ok=True)
    for key, mod in zip(keys, mods):
        torch.save(mod.saved_state_dict(), path / f"intkey_{key}.bin")
    config = {
        "representations": reps,
        "intervention_types": [f"<class 'pyreft.interventions.{kind}'>"] * len(layers),
        "mode": "parallel",
        "sorted_keys": keys,
        "model_type": "<class 'transformers.models.llama.modeling_llama.LlamaForCausalLM'>",
        "intervention_dimensions": [d] * len(layers),
        "intervention_constant_sources": [True] * len(layers),
        "transformers_version": "4.45.2",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return keys, mods


@pytest.mark.parametrize("kind", sorted(PYREFT_TYPES))
def test_a_pyreft_directory_loads_with_identical_edits(tmp_path, kind):
    _, mods = _write_pyreft_dir(tmp_path, kind, [0, 1])
    model = make_tiny_llama()
    reft = load_loreft(model, tmp_path, positions="f2+l2")
    assert reft.config["share_weights"] and reft.config["layers"] == [0, 1]
    x = torch.randn(2, 6, 64)
    for layer, ref in zip([0, 1], mods):
        ours = reft.interventions[f"layer{layer}"].eval()
        assert ours.dropout_on == "output"
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_a_pyreft_directory_without_shared_weights_trains_and_generates(tmp_path):
    # pyreft's share_weights=False lists the layers twice: first positions, then last.
    _, mods = _write_pyreft_dir(tmp_path, "LoreftIntervention", [0, 1, 0, 1])
    model = make_tiny_llama()
    reft = load_loreft(model, tmp_path, positions="f2+l2")
    assert not reft.config["share_weights"]
    x = torch.randn(1, 4, 64)
    with torch.no_grad():
        torch.testing.assert_close(reft.interventions["layer1_first"](x), mods[1](x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reft.interventions["layer0_last"](x), mods[2](x), rtol=1e-5, atol=1e-5)
    ids = torch.tensor([[5, 9, 13, 17, 21, 25]])
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for p in reft.parameters())
    with torch.no_grad():
        edited = model(ids).logits
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        remove_loreft(model)
        assert not torch.allclose(model(ids).logits, edited)
    assert out.shape == (1, 9)


_ORIG = "rotate_layer.parametrizations.weight.original"


class _NotATensor:
    pass


def test_malformed_pyreft_directories_raise_clear_errors(tmp_path):
    keys, _ = _write_pyreft_dir(tmp_path, "DireftIntervention", [0, 1])
    cfg = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(ValueError, match="positions: .* pyreft directory"):
        load_loreft(make_tiny_llama(), tmp_path)
    good = torch.load(tmp_path / f"intkey_{keys[1]}.bin", weights_only=True)

    def bad(match, state=None, config=None, remove=False, exc=ValueError):
        bin1 = tmp_path / f"intkey_{keys[1]}.bin"
        if remove:
            bin1.unlink()
        elif state is not None:
            torch.save(state, bin1)
        (tmp_path / "config.json").write_text(json.dumps(config or cfg))
        model = make_tiny_llama()
        with pytest.raises(exc, match=match):
            load_loreft(model, tmp_path, positions="l1")
        assert not hasattr(model, "ftk_loreft")  # nothing attached
        torch.save(good, bin1)
        (tmp_path / "config.json").write_text(json.dumps(cfg))

    bad(r"intkey_layer_1_comp_block_output_unit_pos_nunit_1#0.bin: no such file", remove=True, exc=FileNotFoundError)
    wrong = {**good, "learned_source.weight": good["learned_source.weight"][:, :5]}
    bad(r"intkey_layer_1.*\.bin: entry 'learned_source.weight' must be a float tensor of shape \[3, 64\]", wrong)
    bad(r"unexpected \['extra'\]", {**good, "extra": torch.zeros(1)})
    bad(r"missing \['learned_source.bias'\]", {k: v for k, v in good.items() if k != "learned_source.bias"})
    bad(r"entry 'embed_dim' is 32", {**good, "embed_dim": torch.tensor(32)})
    bad(r"cannot read it as a dict of tensors", {**good, "learned_source.bias": _NotATensor()})
    bad(r"must be a tensor", {**good, "learned_source.bias": [1.0, 2.0, 3.0]})
    unknown = {**cfg, "intervention_types": cfg["intervention_types"][:1] + ["<class 'pyreft.X'>"]}
    bad(r"intervention_types\[1\] is \"<class 'pyreft.X'>\"", config=unknown)
    mixed = {**cfg, "intervention_types": cfg["intervention_types"][:1] + ["<class 'a.LoreftIntervention'>"]}
    bad(r"intkey_layer_1.*: not a LoreftIntervention state_dict: missing", config=mixed)
    comp = json.loads(json.dumps(cfg))
    comp["representations"][1][1] = "mlp_output"
    bad(r"representations\[1\]: component 'mlp_output' is not supported", config=comp)
    layer = json.loads(json.dumps(cfg))
    layer["representations"][1][0] = 5
    bad(r"representations\[1\]: layer must be a decoder-layer index in \[0, 2\)", config=layer)
    signs = {**good, _ORIG: good[_ORIG] * 0.5}  # the diagonal's +-1 truncated to 0 by int()
    bad(r"entry 'rotate_layer.parametrizations.weight.original' does not give orthonormal rows", signs)
    bad(r"sorted_keys", config={**cfg, "sorted_keys": ["layer_9_comp_block_output_unit_pos_nunit_1#0"]})
    load_loreft(make_tiny_llama(), tmp_path, positions="l1")  # and the directory itself is fine


# ---- add_loreft with pyreft's specs -----------------------------------------------------------


def test_add_loreft_takes_pyreft_specs_and_the_model_generates(tmp_path):
    model = make_tiny_llama()
    specs = [
        {"layer": 0, "component": "block_output", "low_rank_dimension": 4, "intervention": "NoreftIntervention"},
        {"layer": 1, "component": "block_output", "low_rank_dimension": 4, "intervention": "NoreftIntervention"},
    ]
    reft = add_loreft(model, specs, positions="f1+l1", dropout=0.1)
    assert reft.config["intervention"] == "NoReFT" and reft.config["options"] == {"dropout_on": "output"}
    ids = torch.tensor([[5, 9, 13, 17, 21, 25]])
    with torch.no_grad():
        for p in reft.parameters():
            p.add_(0.5 * torch.randn_like(p))
        model.eval()
        want = model(ids).logits
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10)
    save_loreft(model, tmp_path)
    fresh = make_tiny_llama()
    loaded = load_loreft(fresh, tmp_path)
    assert isinstance(loaded.interventions["layer0"], NoReFT)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, want)


def test_add_loreft_spec_forms():
    d = 64
    cases = [
        ({"layer": 1, "component": "block_output", "low_rank_dimension": 2, "intervention": LobiReFT}, LobiReFT),
        ([{"layer": 0, "intervention": LobiReFT(d, 2)}, {"layer": 1, "intervention": LobiReFT(d, 2)}], LobiReFT),
        ([{"layer": 0, "intervention_type": "DireftIntervention", "low_rank_dimension": 2}], DiReFT),
        ([{"layer": 0}, {"layer": 1}, {"layer": 0}, {"layer": 1}], LoReFT),
    ]
    for spec, cls in cases:
        model = make_tiny_llama()
        reft = add_loreft(model, spec, rank=2, positions="f1+l1")
        assert all(isinstance(m, cls) for m in reft.interventions.values())
        assert all(m.rank == 2 for m in reft.interventions.values())
    assert reft.config == {  # the plain LoReFT config keeps save_loreft's original six keys
        "embed_dim": 64, "layers": [0, 1], "rank": 2, "positions": "f1+l1", "share_weights": False, "dropout": 0.0
    }  # fmt: skip
    assert add_loreft(make_tiny_llama(), cases[2][0], positions="f1").interventions["layer0"].orthogonal


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"layer": 0, "component": "mlp_output"}, "component 'mlp_output' is not supported"),
        ({"layer": 0, "unit": "h.pos"}, "unit 'h.pos' is not supported"),
        ({"layer": 0, "intervention": "VanillaIntervention"}, "intervention must be an ftkernels.nn intervention"),
        ({"layer": 0, "subspace_partition": [[0, 2]]}, "subspace_partition is not supported"),
        ({"layer": 0, "dropout": 0.1}, r"unknown keys \['dropout'\]"),
        ({"layer": 0, "low_rank_dimension": 3, "intervention": LoReFT(64, 2)}, "low_rank_dimension is 3"),
        ({"layer": 0, "intervention": LoReFT(32, 2)}, "hidden size 32"),
        ([{"layer": 0}, {"layer": 1, "intervention": "DiReFT"}], "must be of one type"),
        ([{"layer": 0}, {"layer": 0}, {"layer": 1}], "must list each layer once"),
    ],
)
def test_add_loreft_rejects_unsupported_specs(spec, match):
    model = make_tiny_llama()
    with pytest.raises(ValueError, match=match):
        add_loreft(model, spec)
    assert not hasattr(model, "ftk_loreft") and all(p.requires_grad for p in model.parameters())


def test_from_pyreft_checks_the_state_dict():
    mod = _PyreftLike("ConsreftIntervention", D, R)
    ours = from_pyreft("ConsreftIntervention", mod.saved_state_dict())
    x = torch.randn(3, D)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), mod(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown pyreft intervention type 'Foo'"):
        from_pyreft("Foo", {})
    with pytest.raises(ValueError, match=r"sd: entry 'learned_source' must be a float tensor of shape \[3\]"):
        from_pyreft("ConsreftIntervention", {**mod.saved_state_dict(), "learned_source": torch.zeros(4)}, where="sd")


def test_add_loreft_takes_a_pyreft_intervention_object():
    DireftIntervention = type("DireftIntervention", (_PyreftLike,), {})  # pyreft's class name
    torch.manual_seed(0)
    obj = DireftIntervention("DireftIntervention", 64, 2)
    obj.dropout = nn.Dropout(0.05)
    reft = add_loreft(make_tiny_llama(), {"layer": 1, "component": "block_output", "intervention": obj}, positions="l1")
    ours = reft.interventions["layer1"]
    assert isinstance(ours, DiReFT) and ours.orthogonal and ours.dropout == 0.05 and ours.dropout_on == "output"
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), obj(x), rtol=1e-5, atol=1e-5)
