"""ftkernels.integrations.reft: LoReFT interventions on a tiny random Llama as forward hooks:
training, padding on either side in batched forward and generation, save/load, removal."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from ftkernels.integrations.reft import add_loreft, load_loreft, remove_loreft, save_loreft


def _model_with_edit(seed=0, **kw):
    model = make_tiny_llama(seed=seed)
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
            alone = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                   max_new_tokens=5, do_sample=False, pad_token_id=0)
            assert out[i, ids.shape[1]:].tolist() == alone[0, len(p):].tolist()


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
        alone = model.generate(torch.tensor([prompts[0]]), attention_mask=torch.ones(1, 7, dtype=torch.long),
                               max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out[0, 7:].tolist() == alone[0, 7:].tolist()


def test_only_the_prompt_is_edited_during_generation():
    # Decode steps (one new token over the cache) pass through: generating with the edit equals
    # running the edited prompt once and continuing without edits on later tokens.
    model, reft = _model_with_edit()
    calls = []
    original = reft._edit
    reft._edit = lambda i, out: calls.append(reft._positions is not None) or original(i, out)
    with torch.no_grad():
        model.generate(torch.tensor([[5, 9, 13, 17]]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                       max_new_tokens=3, do_sample=False, pad_token_id=0)
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
