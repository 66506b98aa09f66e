"""ftkernels.integrations.reft: LoReFT interventions on tiny random Llama, Qwen2 and GPT-2 models
as forward hooks: training, padding on either side in batched forward and generation (with and
without a cache, greedy and sampling: the edit reaches the prompt's positions and never a
generated one), save/load, removal."""

from __future__ import annotations

import pytest
import torch

from ftkernels.integrations import enable_gradient_checkpointing
from ftkernels.integrations.reft import add_loreft, decoder_layers, load_loreft, remove_loreft, save_loreft
from ftkernels.nn import reft_positions

from conftest import make_tiny_causal_lm, make_tiny_llama

pytestmark = pytest.mark.transformers  # also run on the oldest supported Transformers


def _model_with_edit(seed=0, arch="llama", **kw):
    model = make_tiny_causal_lm(arch, seed=seed)
    reft = add_loreft(model, **{"layers": [0, 1], "rank": 4, "positions": "f2+l2", **kw})
    with torch.no_grad():  # a visible edit: W and b away from their init
        for p in reft.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model, reft


def _pad(prompts, side):
    n = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), n, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for i, p in enumerate(prompts):
        sl = slice(n - len(p), n) if side == "left" else slice(0, len(p))
        ids[i, sl] = torch.tensor(p)
        mask[i, sl] = 1
    return ids, mask


def test_only_the_interventions_train_and_the_loss_goes_down():
    model, reft = _model_with_edit(positions="f6+l6")  # every position of the 12-token batch
    base = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("ftk_loreft")}
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.startswith("ftk_loreft"))
    opt = torch.optim.AdamW(reft.parameters(), lr=5e-2)
    ids = torch.arange(48).reshape(4, 12) % 10 + 3  # a counting pattern: learnable
    losses = []
    for _ in range(40):
        loss = model(ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]  # 4.7 -> 3.9 here: rank-4 edits on a 2-layer random model
    for k, v in model.state_dict().items():
        if k in base:
            assert torch.equal(v, base[k]), f"{k} changed"


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("share_weights", [True, False])
def test_batched_forward_with_padding_edits_as_one_prompt_alone(side, share_weights):
    model, _ = _model_with_edit(share_weights=share_weights)
    prompts = [[5, 9, 13, 17, 21, 25, 29], [7, 11, 3]]  # the second shorter than f2+l2
    ids, mask = _pad(prompts, side)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long)).logits[0]
            real = mask[i].bool()
            torch.testing.assert_close(batched[i][real], alone, rtol=1e-4, atol=1e-4)


def test_the_edit_changes_the_output_and_removal_restores_it():
    model, _ = _model_with_edit()
    ids = torch.tensor([[5, 9, 13, 17, 21, 25]])
    with torch.no_grad():
        edited = model(ids).logits
        remove_loreft(model)
        plain = model(ids).logits
        assert not torch.allclose(edited, plain)
        fresh = make_tiny_llama()(ids).logits
    torch.testing.assert_close(plain, fresh)


def test_batched_generation_with_left_padding_matches_each_prompt_alone():
    model, _ = _model_with_edit()
    prompts = [[5, 9, 13, 17, 21, 25, 29], [7, 11, 3]]
    ids, mask = _pad(prompts, "left")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        for i, p in enumerate(prompts):
            alone = model.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=5,
                do_sample=False,
                pad_token_id=0,
            )
            assert out[i, ids.shape[1] :].tolist() == alone[0, len(p) :].tolist()


def test_batched_generation_with_right_padding_edits_each_prompts_own_tokens():
    # Right padding is unusual for generation (new tokens follow the pads), but the prefill must
    # still edit each prompt's own first and last tokens, and the unpadded row is unaffected.
    model, reft = _model_with_edit()
    prompts = [[5, 9, 13, 17, 21, 25, 29], [7, 11, 3]]
    ids, mask = _pad(prompts, "right")
    seen = []
    original = reft._edit
    reft._edit = lambda i, out: seen.append(reft._positions) or original(i, out)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    reft._edit = original
    edited = [set(row) - {-1} for row in seen[0].tolist()]
    assert edited == [{0, 1, 5, 6}, {0, 1, 2}]
    with torch.no_grad():
        alone = model.generate(
            torch.tensor([prompts[0]]),
            attention_mask=torch.ones(1, 7, dtype=torch.long),
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=0,
        )
    assert out[0, 7:].tolist() == alone[0, 7:].tolist()


def test_only_the_prompt_is_edited_during_generation():
    # Decode steps (one new token over the cache) pass through: generating with the edit equals
    # running the edited prompt once and continuing without edits on later tokens.
    model, reft = _model_with_edit()
    calls = []
    original = reft._edit
    reft._edit = lambda i, out: calls.append(reft._positions is not None) or original(i, out)
    with torch.no_grad():
        model.generate(
            torch.tensor([[5, 9, 13, 17]]),
            attention_mask=torch.ones(1, 4, dtype=torch.long),
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=0,
        )
    assert calls[:2] == [True, True] and not any(calls[2:])  # 2 layers edited on the prefill only


def test_save_and_load_round_trip(tmp_path):
    model, _ = _model_with_edit(share_weights=False)
    ids = torch.tensor([[5, 9, 13, 17, 21, 25]])
    with torch.no_grad():
        want = model(ids).logits
    save_loreft(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loreft_config.json", "loreft_model.safetensors"]
    fresh = make_tiny_llama()
    load_loreft(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, want)


def test_bad_arguments_and_bad_files(tmp_path):
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="layers must be"):
        add_loreft(model, layers=[2])
    with pytest.raises(ValueError, match="positions must look like"):
        add_loreft(model, positions="first5")
    with pytest.raises(ValueError, match="rank must be at most"):
        add_loreft(model, rank=65)
    add_loreft(model, layers=[0])
    with pytest.raises(ValueError, match="already has LoReFT"):
        add_loreft(model)
    save_loreft(model, tmp_path)
    (tmp_path / "loreft_config.json").write_text('{"embed_dim": 64}')
    with pytest.raises(ValueError, match="must hold exactly"):
        load_loreft(make_tiny_llama(), tmp_path)


def test_training_positions_are_the_prompts():
    # labels -100 mark the prompt: f2+l2 of the prompt, not of prompt + response.
    model, reft = _model_with_edit()
    ids = torch.arange(3, 13)[None]  # 10 tokens: a 6-token prompt, a 4-token response
    labels = ids.clone()
    labels[0, :6] = -100
    with torch.no_grad():
        model(ids, attention_mask=torch.ones_like(ids), labels=labels)
    assert reft._positions.tolist() == [[0, 1, 4, 5]]
    with torch.no_grad():
        model(ids, attention_mask=torch.ones_like(ids), labels=ids)  # no prompt marked: every token
    assert reft._positions.tolist() == [[0, 1, 8, 9]]


# ---- generation: which positions the edit reaches ------------------------------------------

PROMPTS = {  # (prompts, padding side)
    "unbatched": ([[5, 9, 13, 17, 21, 25]], "left"),
    "batched-unpadded": ([[5, 9, 13, 17, 21, 25], [7, 11, 3, 8, 40, 2]], "left"),
    "left-padded": ([[5, 9, 13, 17, 21, 25, 29], [7, 11, 3]], "left"),
    "right-padded": ([[5, 9, 13, 17, 21, 25, 29], [7, 11, 3]], "right"),
}


class _EditLog:
    """Records, for every forward of the model, the (row, column) cells each intervention
    changed: a cell is edited when the intervention's output differs from its input there."""

    def __init__(self, model, reft):
        self.calls = []  # per model forward: (seq, {layer name: (batch, seq) bool})
        self.handles = [model.register_forward_pre_hook(self._call, with_kwargs=True)]
        for name, module in reft.interventions.items():
            self.handles.append(module.register_forward_hook(self._edited(name)))

    def _edited(self, name):
        def hook(mod, args, out):  # returns None: the output stays as it is
            self.calls[-1][1][name] = (out != args[0]).any(-1)

        return hook

    def _call(self, model, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        self.calls.append((x.shape[1], {}))

    def close(self):
        for h in self.handles:
            h.remove()


def _expected_cells(mask, first=2, last=2) -> set:
    cells = set()
    for row, m in enumerate(mask.tolist()):
        real = [j for j, v in enumerate(m) if v]
        chosen = real if len(real) <= first + last else real[:first] + real[-last:]
        cells |= {(row, j) for j in chosen}
    return cells


def _generate(model, ids, mask, *, use_cache, sample, new=4):
    torch.manual_seed(1)
    kw = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0} if sample else {"do_sample": False}
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, pad_token_id=0, use_cache=use_cache, **kw
        )


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("case", list(PROMPTS))
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampling"])
def test_generation_edits_the_prompt_and_never_a_generated_token(arch, case, use_cache, sample):
    model, reft = _model_with_edit(arch=arch)
    prompts, side = PROMPTS[case]
    ids, mask = _pad(prompts, side)
    log = _EditLog(model, reft)
    out = _generate(model, ids, mask, use_cache=use_cache, sample=sample)
    log.close()
    assert out.shape == (len(prompts), ids.shape[1] + 4)
    want = _expected_cells(mask)
    names = set(reft.interventions)
    if use_cache:  # a prefill over the prompt, then one-token steps over the cache
        assert [seq for seq, _ in log.calls] == [ids.shape[1]] + [1] * 3
        edits = [
            (offset, cells)
            for offset, (_, cells) in zip([0, ids.shape[1], ids.shape[1] + 1, ids.shape[1] + 2], log.calls)
        ]
    else:  # every step re-runs the whole sequence: the same prompt cells each time
        assert [seq for seq, _ in log.calls] == [ids.shape[1] + t for t in range(4)]
        edits = [(0, cells) for _, cells in log.calls]
    for step, (offset, cells) in enumerate(edits):
        if use_cache and step > 0:
            assert not any(c.any() for c in cells.values()), f"decode step {step} edited a generated token"
            continue
        assert set(cells) == names, f"step {step}: interventions that ran: {sorted(cells)}"
        for name, changed in cells.items():
            got = {(r, offset + j) for r, j in changed.nonzero().tolist()}
            assert got == want, f"step {step}, {name}: edited {sorted(got)}, the prompt's cells are {sorted(want)}"


def _reference_greedy(model, reft, ids, mask, new=4):
    """Greedy decoding by hand, without a cache, the interventions applied at the prompt's
    positions of every re-run: what generate must produce with the edit on the prompt alone."""
    positions = reft_positions(mask, reft.config["positions"])
    remove_loreft(model)

    def edit(i):
        def hook(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h = reft.interventions[f"layer{i}"](h, positions)
            return (h, *out[1:]) if isinstance(out, tuple) else h

        return hook

    layers = decoder_layers(model)
    handles = [layers[i].register_forward_hook(edit(i)) for i in reft.config["layers"]]
    seq, m = ids, mask
    with torch.no_grad():
        for _ in range(new):
            pos = (m.cumsum(-1) - 1).clamp(min=0)  # as generate makes them from the mask
            logits = model(seq, attention_mask=m, position_ids=pos).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
    for h in handles:
        h.remove()
    return seq


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("case", ["unbatched", "batched-unpadded", "left-padded"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_generation_equals_decoding_by_hand_with_the_prompt_edited(arch, case, use_cache):
    model, reft = _model_with_edit(arch=arch)
    prompts, side = PROMPTS[case]
    ids, mask = _pad(prompts, side)
    got = _generate(model, ids, mask, use_cache=use_cache, sample=False)
    assert got.tolist() == _reference_greedy(model, reft, ids, mask).tolist()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_without_a_mask_and_with_beams(arch):
    # No attention_mask given to generate (Transformers 5 also drops an all-ones one before the
    # forward): no padding, every prompt token real. Beam search repeats each row num_beams times.
    model, reft = _model_with_edit(arch=arch)
    ids = torch.tensor([[5, 9, 13, 17, 21, 25], [7, 11, 3, 8, 40, 2]])
    log = _EditLog(model, reft)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
        model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, num_beams=2, pad_token_id=0)
    log.close()
    plain, beams = log.calls[:3], log.calls[3:]  # 3 new tokens: a prefill and 2 steps each
    assert len(beams) == 3
    for calls, rows in ((plain, 2), (beams, 4)):
        prefill, *steps = calls
        assert not any(c.any() for _, cells in steps for c in cells.values())
        want = _expected_cells(torch.ones(rows, 6))
        for changed in prefill[1].values():
            assert set(map(tuple, changed.nonzero().tolist())) == want


def test_direct_calls_over_a_cache_edit_only_the_prompt():
    # model(prompt) then model(next token, cache): the prompt is edited, the step is not,
    # whichever keyword this Transformers version names the cache by.
    model, reft = _model_with_edit()
    ids = torch.tensor([[5, 9, 13, 17, 21, 25]])
    log = _EditLog(model, reft)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.get("cache", out.get("past_key_values"))
        name = "cache" if "cache" in out else "past_key_values"
        model(torch.tensor([[7]]), **{name: cache}, use_cache=True)
    log.close()
    (_, prefill), (_, step) = log.calls
    assert all(set(map(tuple, c.nonzero().tolist())) == _expected_cells(torch.ones(1, 6)) for c in prefill.values())
    assert not any(c.any() for c in step.values())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    # The checkpointed blocks re-run their forward (and with it the edit hooks) in the backward:
    # the edit must be the same there, at the same positions.
    ids = torch.arange(48).reshape(4, 12) % 10 + 3
    labels = ids.clone()
    labels[:, :5] = -100
    grads = []
    for checkpointing in (False, True):
        model, reft = _model_with_edit(arch=arch)
        model.train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        model(ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
        grads.append([p.grad for p in reft.parameters()])
    assert all(g is not None and g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
