"""PreferenceModule end to end on the tiny model: ln 2 at step 0, rewards that improve, a PEFT adapter, references."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pref_helpers import write_pair_file

from lightning_ft import FullFineTune, LoRA, SaveHFModel
from lightning_ft.cli import main
from lightning_ft.commands.check_pairs import classes
from lightning_ft.preference import PreferenceDataModule, PreferenceModule

ROOT = Path(__file__).resolve().parents[2]


class FirstLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _data(tmp_path, model_dir, **settings) -> PreferenceDataModule:
    train = write_pair_file(tmp_path / "train.jsonl", 16)
    val = write_pair_file(tmp_path / "val.jsonl", 6, start=40)
    return PreferenceDataModule(train, val, tokenizer=model_dir, batch_size=4, max_length=64, **settings)


def _trainer(tmp_path, steps: int, *callbacks) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks),
                      default_root_dir=tmp_path, limit_val_batches=2)


def test_lora_dpo_starts_at_ln2_improves_rewards_and_exports_a_peft_adapter(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module = PreferenceModule(tiny_model_dir, adapter=LoRA(r=4, dropout=0.1), learning_rate=5e-3, warmup_ratio=0.0)
    data, first = _data(tmp_path, tiny_model_dir), FirstLosses()
    trainer = _trainer(tmp_path, 8, first, SaveHFModel(str(tmp_path / "adapter")))
    before = trainer.validate(module, data, verbose=False)[0]
    trainer.fit(module, data)
    after = trainer.validate(module, data, verbose=False)[0]
    assert first.losses[0] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: policy == reference
    assert before["val/rewards/accuracy"] == 0.0 and before["val/rewards/margin"] == 0.0
    assert after["val/rewards/accuracy"] > before["val/rewards/accuracy"]
    assert after["val/rewards/margin"] > 0 and after["val/loss"] < math.log(2)
    assert set(after) >= {"val/rewards/chosen", "val/rewards/rejected", "val/logps/chosen", "val/ref_logps/rejected"}
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    state = module.model.state_dict()
    for name, value in loaded.state_dict().items():
        if "lora_B" in name:
            assert torch.equal(value, state[name]) and value.abs().sum() > 0


def test_precomputed_reference_equals_the_adapter_disabled_model(tmp_path, tiny_model_dir):
    module = PreferenceModule(tiny_model_dir, adapter=LoRA(r=4), reference="precomputed", learning_rate=5e-3)
    data, first = _data(tmp_path, tiny_model_dir), FirstLosses()
    _trainer(tmp_path, 3, first).fit(module, data)
    assert first.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    batch = data._collator()(data.val_examples[:3])
    assert torch.allclose(batch["ref_logps"].double(), module.reference_logps(batch).double(), atol=1e-4)
    restored = _data(tmp_path, tiny_model_dir)
    restored.setup()
    restored.load_state_dict(data.state_dict())  # a resumed run reuses the values of the untrained model
    assert restored.train_examples[5]["ref_logps"] == data.train_examples[5]["ref_logps"]


@pytest.mark.parametrize("loss", ["ipo", "simpo", "orpo"])
def test_other_objectives_train(tmp_path, tiny_model_dir, loss):
    module = PreferenceModule(tiny_model_dir, adapter=LoRA(r=4), loss=loss, beta=0.5, learning_rate=5e-3)
    data = _data(tmp_path, tiny_model_dir)
    trainer = _trainer(tmp_path, 6)
    before = trainer.validate(module, data, verbose=False)[0]
    trainer.fit(module, data)
    after = trainer.validate(module, data, verbose=False)[0]
    assert after["val/loss"] < before["val/loss"]
    assert ("val/ref_logps/chosen" in after) == (loss == "ipo") and ("val/nll" in after) == (loss == "orpo")


def test_full_fine_tuning_with_precomputed_reference_needs_no_copy(tmp_path, tiny_model_dir):
    module = PreferenceModule(tiny_model_dir, adapter=FullFineTune(), reference="precomputed", learning_rate=1e-3)
    first = FirstLosses()
    _trainer(tmp_path, 2, first).fit(module, _data(tmp_path, tiny_model_dir))
    assert first.losses[0] == pytest.approx(math.log(2), abs=1e-6) and module._reference == []


def test_full_fine_tuning_keeps_a_frozen_copy_as_reference(tmp_path, tiny_model_dir):
    module = PreferenceModule(tiny_model_dir, adapter=FullFineTune(), learning_rate=1e-3)
    first = FirstLosses()
    _trainer(tmp_path, 2, first).fit(module, _data(tmp_path, tiny_model_dir))
    assert first.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    reference, = module._reference
    assert not any(p.requires_grad for p in reference.parameters())
    assert not torch.equal(reference.lm_head.weight, module.model.lm_head.weight)


def test_settings_are_checked_all_at_once():
    with pytest.raises(ValueError, match=r"loss='kto' must be one of.*beta=0 must be > 0.*label_smoothing=0.6"):
        PreferenceModule(loss="kto", beta=0, label_smoothing=0.6)
    with pytest.raises(ValueError, match=r"label_smoothing=0.1 applies to dpo and simpo only, not 'ipo'"):
        PreferenceModule(loss="ipo", label_smoothing=0.1)


def test_quickstart_config_runs_through_the_preference_cli(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = main(["fit", "--config", "configs/preference_quickstart.yaml", "--model.model_name", tiny_model_dir,
                "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.callbacks=[]",
                "--trainer.default_root_dir", str(tmp_path)], **classes())
    assert isinstance(cli.model, PreferenceModule) and cli.trainer.global_step == 2
    assert cli.model.hparams.loss == "dpo" and cli.datamodule.tokenizer == tiny_model_dir
    assert (Path(cli.trainer.log_dir) / "hf_model" / "adapter_config.json").is_file()


def test_first_logged_values_are_step_zeros_and_validation_runs_before_training(tmp_path, tiny_model_dir, capsys):
    import csv

    from pytorch_lightning.loggers import CSVLogger

    from lightning_ft import PlainProgressBar

    module = PreferenceModule(tiny_model_dir, adapter=LoRA(r=4), learning_rate=5e-3, warmup_ratio=0.0)
    trainer = pl.Trainer(max_steps=8, logger=CSVLogger(tmp_path), log_every_n_steps=5, check_val_every_n_epoch=2,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[PlainProgressBar()], default_root_dir=tmp_path, limit_val_batches=2)
    trainer.fit(module, _data(tmp_path, tiny_model_dir))
    rows = list(csv.DictReader(open(Path(trainer.log_dir) / "metrics.csv")))
    losses = [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]
    assert losses[0][0] == 0 and losses[0][1] == pytest.approx(math.log(2), abs=1e-6) and losses[1][0] == 4
    accuracy = [(int(r["step"]), float(r["val/rewards/accuracy"])) for r in rows if r.get("val/rewards/accuracy")]
    assert accuracy[0] == (0, 0.0) and len(accuracy) == 2 and accuracy[-1][0] > 0 and accuracy[-1][1] > 0
    out = capsys.readouterr().out
    assert "step 1/8 (12%) | loss 0.6931" in out and "validation at step 0: " in out


def test_validate_at_start_can_be_turned_off(tmp_path, tiny_model_dir):
    module = PreferenceModule(tiny_model_dir, adapter=LoRA(r=4), validate_at_start=False)
    trainer = _trainer(tmp_path, 1)
    trainer.fit(module, _data(tmp_path, tiny_model_dir))
    assert trainer.fit_loop.epoch_loop.val_loop.batch_progress.total.completed == 0
