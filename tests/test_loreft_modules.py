"""The ReFT modules and position helpers: nn.LoReFT's orthonormality through training and
save/load/resume, pyreft's state_dict both ways, nn.DiReFT, and parse_positions /
reft_positions with padding. Mirrors nn/loreft.py."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import ftkernels as ftk
from ftkernels.nn import DiReFT, LoReFT, parse_positions, reft_positions
from ftkernels.nn.loreft import OrthonormalRows

from reft_oracle import (
    Case,
    assert_close_to_oracle,
)

# ---- the modules ----------------------------------------------------------------------------


def _orthonormality_error(R: torch.Tensor) -> float:
    R = R.detach().double()
    return (R @ R.T - torch.eye(R.shape[0], dtype=torch.float64)).abs().max().item()


def test_orthonormal_rows_parametrisation():
    torch.manual_seed(0)
    V = torch.randn(5, 40)
    R = OrthonormalRows()(V)
    assert _orthonormality_error(R) < 1e-6
    # R spans V's row space, and an orthonormal V maps to itself (right_inverse is the identity).
    torch.testing.assert_close(R.T @ (R @ V.T), V.T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(OrthonormalRows()(R), R, rtol=0, atol=1e-6)


def test_loreft_module_is_the_op_and_keeps_no_d_by_d_state():
    torch.manual_seed(0)
    d, r = 4096, 4
    mod = LoReFT(d, r)
    assert sum(t.numel() for t in [*mod.parameters(), *mod.buffers()]) == 2 * r * d + r
    assert _orthonormality_error(mod.rotation) < 1e-6
    h = torch.randn(2, 3, d)
    want = ftk.loreft(h, mod.rotation, mod.learned_source.weight, mod.learned_source.bias)
    torch.testing.assert_close(mod(h), want)


def test_rotation_is_recomputed_once_a_training_step(monkeypatch):
    calls = []
    forward = OrthonormalRows.forward
    monkeypatch.setattr(OrthonormalRows, "forward", lambda self, V: calls.append(1) or forward(self, V))
    mod = LoReFT(32, 4)
    opt = torch.optim.SGD(mod.parameters(), lr=0.1)
    calls.clear()
    for _ in range(3):
        opt.zero_grad()
        mod(torch.randn(2, 5, 32)).square().sum().backward()
        opt.step()
    assert len(calls) == 3


def _train(mod, opt, steps, seed):
    """Steps of learning to add a fixed rank-3 shift at the edited positions: (first, last) loss."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.randn(3, 48, generator=torch.Generator().manual_seed(0)).sum(0)
    pos = reft_positions(torch.tensor([[1] * 12, [0] * 4 + [1] * 8, [1] * 3 + [0] * 9, [1] * 12]), "f3+l3")
    edited = torch.zeros(4, 12, dtype=torch.bool)
    for i, row in enumerate(pos.tolist()):
        edited[i, [q for q in row if q >= 0]] = True
    mod.train()
    losses = []
    for _ in range(steps):
        h = torch.randn(4, 12, 48, generator=g)
        loss = (mod(h, pos) - h - shift)[edited].square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_stays_orthonormal_through_training_and_save_load_resume():
    torch.manual_seed(0)
    mod = LoReFT(48, 6, dropout=0.1)
    opt = torch.optim.AdamW(mod.parameters(), lr=0.05)
    first, last = _train(mod, opt, 150, seed=1)
    assert _orthonormality_error(mod.rotation) < 1e-5
    assert last < 0.2 * first  # it learns

    buf = io.BytesIO()
    torch.save({"model": mod.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, buf)
    _train(mod, opt, 20, seed=2)  # uninterrupted

    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = LoReFT(48, 6, dropout=0.1)
    resumed.load_state_dict(state["model"])
    assert _orthonormality_error(resumed.rotation) < 1e-5
    ropt = torch.optim.AdamW(resumed.parameters(), lr=0.05)
    ropt.load_state_dict(state["opt"])
    torch.set_rng_state(state["rng"])
    _train(resumed, ropt, 20, seed=2)
    for (name, a), b in zip(mod.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resuming"
    assert _orthonormality_error(resumed.rotation) < 1e-5


def test_loading_a_non_orthonormal_state_still_gives_an_orthonormal_rotation():
    mod = LoReFT(32, 3)
    state = mod.state_dict()
    state["parametrizations.rotation.original"] = torch.randn(3, 32) * 5
    mod.load_state_dict(state)
    assert _orthonormality_error(mod.rotation) < 1e-6


def test_pyreft_state_dict_both_ways():
    # pyreft's LoreftIntervention, written out: R^T as an orthogonal()-parametrised (d x rank)
    # weight, W and b in learned_source; its state_dict is {weight, bias, rotate_layer}.
    torch.manual_seed(0)
    d, r = 40, 3
    rotate = nn.Module()
    rotate.weight = nn.Parameter(nn.init.orthogonal_(torch.empty(d, r)))
    rotate = nn.utils.parametrizations.orthogonal(rotate)
    source = nn.Linear(d, r)
    with torch.no_grad():
        # as after training (the Householder vectors live below the diagonal of `original`)
        rotate.parametrizations.weight.original.add_(0.1 * torch.randn(d, r).tril(-1))
    R_t = rotate.weight.detach()
    state = {"weight": source.weight.detach(), "bias": source.bias.detach(), "rotate_layer": R_t}
    mod = LoReFT.from_pyreft_state_dict(state)
    h = torch.randn(2, 5, d)
    want = h + ((h @ source.weight.detach().T + source.bias.detach()) - h @ R_t) @ R_t.T
    torch.testing.assert_close(mod(h), want, rtol=1e-5, atol=1e-5)
    back = mod.pyreft_state_dict()
    assert back.keys() == state.keys()
    for k in state:
        torch.testing.assert_close(back[k], state[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="keys 'weight', 'bias', 'rotate_layer'"):
        LoReFT.from_pyreft_state_dict({"weight": state["weight"]})
    with pytest.raises(ValueError, match="weight must be"):
        LoReFT.from_pyreft_state_dict({**state, "weight": state["weight"][:, :5]})


def test_direft_module_is_the_op():
    torch.manual_seed(0)
    mod = DiReFT(64, 4, dropout=0.2).eval()
    h = torch.randn(2, 7, 64)
    pos = torch.tensor([[0, 6], [3, -1]])
    want = ftk.direft(h, mod.learned_source.weight, mod.proj, mod.learned_source.bias, pos)
    torch.testing.assert_close(mod(h, pos), want)
    mod.train()
    mod(h, pos).sum().backward()
    assert all(p.grad is not None for p in mod.parameters())


# ---- positions ------------------------------------------------------------------------------


def test_parse_positions():
    assert parse_positions("f7+l7") == (7, 7)
    assert parse_positions("f5") == (5, 0)
    assert parse_positions("l3") == (0, 3)
    for bad in ("", "7", "f7l7", "x1", "f-1", None):
        with pytest.raises(ValueError, match="positions must look like"):
            parse_positions(bad)


def _expected_positions(mask_row, first, last):
    real = [i for i, m in enumerate(mask_row) if m]
    head = real[:first]
    tail = [q for q in real[max(len(real) - last, 0) :] if q not in head]
    return head + [-1] * (first - len(head)) + [-1] * (last - len(tail)) + tail


@pytest.mark.parametrize("padding", ["right", "left"])
def test_positions_with_padding_and_short_prompts(padding):
    lengths = [10, 6, 3, 1, 0]
    seq = 10
    rows = []
    for n in lengths:
        ones, zeros = [1] * n, [0] * (seq - n)
        rows.append(ones + zeros if padding == "right" else zeros + ones)
    mask = torch.tensor(rows)
    for spec, (first, last) in (("f2+l2", (2, 2)), ("f7+l7", (7, 7)), ("f3", (3, 0)), ("l4", (0, 4))):
        got = reft_positions(mask, spec)
        assert got.dtype == torch.int64 and got.shape == (len(lengths), first + last)
        for i, row in enumerate(rows):
            assert got[i].tolist() == _expected_positions(row, first, last), (padding, spec, i)
        # every real token at most once, never a padding token
        for i, row in enumerate(rows):
            picked = [q for q in got[i].tolist() if q >= 0]
            assert len(set(picked)) == len(picked) and all(row[q] for q in picked)


def test_positions_feed_the_op_with_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos = reft_positions(mask, "f1+l1")
    assert pos.tolist() == [[2, 4], [0, 4]]
    case = Case((2, 5, 16, 2, pos.tolist()), torch.float32)
    assert_close_to_oracle(case, case.run())
