"""ftkernels.integrations.trainer: Transformers' Trainer and TRL's SFTTrainer, 5 steps each on a
tiny Llama loaded in 4 bits by bitsandbytes with PEFT LoRA, with and without the callback: the
fused run's losses equal the plain run's and go down."""

from __future__ import annotations

import pytest
import torch

from conftest import load_bnb_4bit, make_tiny_causal_lm

pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from transformers import Trainer, TrainingArguments  # noqa: E402

from ftkernels import optim  # noqa: E402
from ftkernels.integrations import FusedCallback, fused_trainer_kwargs, optimizer_cls_and_kwargs  # noqa: E402

pytestmark = pytest.mark.transformers

STEPS = 5
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    p = tmp_path_factory.mktemp("llama")
    make_tiny_causal_lm("llama").save_pretrained(p)
    return p


def rows(n=8, seq=12, vocab=128):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    return [{"input_ids": r, "labels": r.clone(), "attention_mask": torch.ones_like(r)} for r in ids]


def args_for(tmp_path, **kw):
    kw = {
        "output_dir": str(tmp_path),
        "max_steps": STEPS,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "seed": 0,
        "data_seed": 0,
        # Transformers < 5 finds no labels argument on a PeftModel (its forward takes **kwargs),
        # so evaluate() would report no loss
        "label_names": ["labels"],
        **kw,
    }
    return kw


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def assert_fused_run_matches_plain(train, calls):
    """train(fused) -> (trainer, its logged losses): the plain run never calls the fused op, the
    fused one patches all 14 layers and calls it at least once a layer a step, and both runs log
    the same decreasing losses. Returns the fused run's trainer and callback."""
    _, plain = train(False)
    assert not calls
    trainer, fused = train(True)
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, FusedCallback))
    assert callback.report.patched == 14 and len(calls) >= 14 * STEPS
    assert len(fused) == len(plain) == STEPS and fused[-1] < fused[0]
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(plain), rtol=2e-3, atol=1e-4)
    return trainer, callback


def test_trainer_with_callback_matches_plain_run(saved, tmp_path, count_fused_lora):
    def train(fused: bool):
        torch.manual_seed(0)
        model = peft.get_peft_model(load_bnb_4bit(saved), peft.LoraConfig(r=8, lora_alpha=16, target_modules=PROJ))
        args = TrainingArguments(**args_for(tmp_path / str(fused)))
        extra = fused_trainer_kwargs(args) if fused else {"optimizer_cls_and_kwargs": optimizer_cls_and_kwargs(args)}
        trainer = Trainer(model=model, args=args, train_dataset=rows(), **extra)
        trainer.train()
        return trainer, losses(trainer)

    trainer, callback = assert_fused_run_matches_plain(train, count_fused_lora)
    assert callback.fused_loss_active
    assert isinstance(
        trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer, optim.AdamW8bit
    )
    # training ends with the loss hooks off (evaluation sees the logits) and the layers still fused
    assert callback._loss is None and type(trainer.model.get_base_model().lm_head) is torch.nn.Linear
    count_fused_lora.clear()
    assert trainer.evaluate(rows(4))["eval_loss"] > 0 and len(count_fused_lora) == 14


def test_sft_trainer_with_peft_config_and_callback_matches_plain_run(saved, tmp_path, count_fused_lora):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(128)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t0", eos_token="t1"
    )
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict({"input_ids": torch.randint(3, 128, (8, 12), generator=g).tolist()})

    def train(fused: bool):
        torch.manual_seed(0)
        args = trl.SFTConfig(**args_for(tmp_path / str(fused)), gradient_checkpointing=False)
        extra = fused_trainer_kwargs(args) if fused else {"optimizer_cls_and_kwargs": optimizer_cls_and_kwargs(args)}
        trainer = trl.SFTTrainer(
            model=load_bnb_4bit(saved),
            args=args,
            train_dataset=data,
            processing_class=tok,
            peft_config=peft.LoraConfig(r=8, lora_alpha=16, target_modules=PROJ),
            **extra,
        )
        trainer.train()
        return trainer, losses(trainer)

    assert_fused_run_matches_plain(train, count_fused_lora)


def test_trainer_helpers_reject_bad_arguments(tmp_path):
    args = TrainingArguments(**args_for(tmp_path))
    with pytest.raises(ValueError, match="optimizer must be one of"):
        optimizer_cls_and_kwargs(args, "SGD")
    with pytest.raises(TypeError, match="args must be a transformers.TrainingArguments"):
        optimizer_cls_and_kwargs({"lr": 1e-3})
    with pytest.raises(TypeError, match="fused_loss must be a bool"):
        FusedCallback(fused_loss="yes")
    with pytest.raises(ValueError, match="chunk_rows must be a positive int"):
        FusedCallback(chunk_rows=0)
    cls, kwargs = optimizer_cls_and_kwargs(args, "Lion")
    assert cls is optim.Lion and kwargs == {"lr": 5e-3, "betas": (0.9, 0.999)}
