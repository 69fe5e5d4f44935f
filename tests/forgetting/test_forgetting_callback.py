"""ForgettingCheck in real fits on the tiny model: baseline, thresholds, logging, checkpoints, resume, summary."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from forgetting_helpers import fit, write_benchmark
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_ft import FineTuneModule, FullFineTune, LoRA
from lightning_ft import ForgettingCheck as ExportedCheck
from lightning_ft.callbacks import ForgettingCheck
from lightning_ft.forgetting import CheckRecord


def check(tmp_path, **kwargs) -> ForgettingCheck:
    settings = dict(benchmark_path=write_benchmark(tmp_path / "bench.jsonl"), max_prompts=2, batch_size=8,
                    max_time_share=None)  # every scheduled check runs: the tests count them
    return ForgettingCheck(**{**settings, **kwargs})


def lora_module(model_dir, learning_rate=5e-2):
    return FineTuneModule(model_dir, adapter=LoRA(r=4, alpha=16, dropout=0.0), learning_rate=learning_rate,
                          warmup_ratio=0.0, decay="constant")


def test_exported_from_package_root():
    assert ExportedCheck is ForgettingCheck


def test_invalid_settings_are_reported_together():
    with pytest.raises(ValueError, match=r"Invalid ForgettingCheck settings: max_items=-1 must be >= 0 or None; "
                                         r"every_n_steps=0 must be >= 1 or None; max_kl=-0.1 must be >= 0 or None; "
                                         r"top_k=0 must be >= 1; action='halt' must be one of warn, stop, both"):
        ForgettingCheck(max_items=-1, every_n_steps=0, max_kl=-0.1, top_k=0, action="halt")
    with pytest.raises(ValueError, match="leave nothing to measure"):
        ForgettingCheck(max_items=0, max_prompts=0)


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_baseline_before_first_step_then_kl_grows_and_stop_action_ends_training(tiny_model_dir, tmp_path, adapter):
    module = (lora_module(tiny_model_dir) if adapter == "lora"
              else FineTuneModule(tiny_model_dir, adapter=FullFineTune(), learning_rate=1e-2, warmup_ratio=0.0))
    callback = check(tmp_path, every_n_steps=1, max_kl=1e-9, max_accuracy_drop=None, action="stop", top_k=16)
    trainer = fit(module, tmp_path, [callback], steps=10)
    baseline, after = callback.history
    assert baseline.step == 0 and baseline.metrics["kl"] == 0.0 and baseline.ok
    assert after.step == 1 and after.metrics["kl"] > 1e-6 and not after.ok
    assert trainer.should_stop and trainer.global_step == 1  # stopped at the first check that crossed max_kl
    assert (callback.probe.reference is None) == (adapter == "lora")  # LoRA needs no cached base
    assert trainer.callback_metrics["forgetting/ok"].item() == 0.0
    assert trainer.callback_metrics["forgetting/score"].item() == pytest.approx(after.metrics["acc"] - 2.0)
    assert module.model.training  # train mode restored after each check


def test_warn_action_warns_loudly_and_keeps_training(tiny_model_dir, tmp_path):
    callback = check(tmp_path, every_n_steps=2, max_kl=1e-9, action="warn")
    with pytest.warns(UserWarning, match=r"FORGETTING at step 2: KL from the base model is .*, above max_kl=1e-09"):
        trainer = fit(lora_module(tiny_model_dir), tmp_path, [callback], steps=4)
    assert trainer.global_step == 4 and [record.step for record in callback.history] == [0, 2, 4]
    assert trainer.progress_bar_metrics["forgetting/ok"] == 0.0
    assert "forgetting/acc" in trainer.progress_bar_metrics


def test_accuracy_drop_threshold(tiny_model_dir, tmp_path):
    callback = check(tmp_path, max_accuracy_drop=0.0, action="warn")
    callback.history = [CheckRecord(step=0, metrics={"acc": 0.5, "acc_norm": 0.5, "kl": 0.0}, ok=True, seconds=0.0)]
    assert callback._failures({"acc": 0.5, "kl": 3.0}) == []
    assert callback._failures({"acc": 1 / 3, "kl": 0.0}) == [
        "acc fell 0.167 below the baseline (0.500 -> 0.333), more than max_accuracy_drop=0.0"]


def test_validation_logs_for_model_checkpoint_and_tensorboard(tiny_model_dir, tmp_path):
    callback = check(tmp_path)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="forgetting/score", mode="max", save_top_k=1)
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    trainer = fit(lora_module(tiny_model_dir, 5e-3), tmp_path, [callback, checkpoint], steps=4,
                  val_check_interval=2, enable_checkpointing=True, logger=logger, num_sanity_val_steps=1)
    assert [record.step for record in callback.history] == [0, 2, 4]  # sanity check not scored
    scores = [callback._score(record) for record in callback.history[1:]]
    assert checkpoint.best_model_path and checkpoint.best_model_score.item() == pytest.approx(max(scores))
    metrics = trainer.callback_metrics
    assert {"forgetting/acc", "forgetting/acc_delta", "forgetting/acc_norm", "forgetting/kl", "forgetting/ok",
            "forgetting/time_share", "forgetting/subject/geography/acc"} <= set(metrics)
    assert 0.0 < metrics["forgetting/time_share"].item() < 1.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    steps = [event.step for event in events.Scalars("forgetting/acc")]
    assert steps == [0, 2, 4] and "forgetting/kl" in events.Tags()["scalars"]


def test_state_dict_round_trip_and_fingerprint(tiny_model_dir, tmp_path):
    callback = check(tmp_path, top_k=8)
    fit(FineTuneModule(tiny_model_dir, adapter=FullFineTune(), learning_rate=1e-3), tmp_path, [callback], steps=1)
    path = tmp_path / "state.pt"
    torch.save(callback.state_dict(), path)
    restored = check(tmp_path, top_k=8)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.history == callback.history and restored.baseline == callback.baseline
    assert all(torch.equal(a["values"], b["values"]) for a, b in zip(restored.probe.reference, callback.probe.reference))
    with pytest.raises(ValueError, match="baseline was measured on other benchmark items, prompts"):
        check(tmp_path, top_k=8, max_items=3).load_state_dict(callback.state_dict())


def test_resume_keeps_the_baseline_and_does_not_measure_it_again(tiny_model_dir, tmp_path):
    first = check(tmp_path)
    trainer = fit(lora_module(tiny_model_dir), tmp_path, [first], steps=2)
    trainer.save_checkpoint(tmp_path / "resume.ckpt")
    second = check(tmp_path, every_n_steps=1)
    calls = []
    original = second.probe.measure
    second.probe.measure = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    trainer = fit(lora_module(tiny_model_dir), tmp_path, [second], steps=3, ckpt_path=tmp_path / "resume.ckpt")
    assert trainer.global_step == 3 and len(calls) == 1  # only step 3: the baseline came from the checkpoint
    assert second.history[:2] == first.history and second.history[-1].step == 3


def test_end_of_fit_summary_table(tiny_model_dir, tmp_path, capsys):
    callback = check(tmp_path, every_n_steps=1, max_kl=1e-9)
    with pytest.warns(UserWarning, match="FORGETTING"):
        fit(lora_module(tiny_model_dir), tmp_path, [callback], steps=1)
    out = capsys.readouterr().out
    assert "Forgetting check: baseline (step 0) vs final (step 1)" in out
    for row in ("acc", "acc_norm", "kl", "subject/geography/acc", "subject/arithmetic/acc"):
        assert f" {row} " in out
    assert "2 checks" in out and "of training wall time" in out and "thresholds crossed at step 1" in out
    assert math.isfinite(callback._cost.share())


def test_user_lightning_module_with_model_attr_and_tokenizer_spec(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

        def training_step(self, batch, batch_idx):
            return self.lm(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    ids = torch.randint(3, 1000, (4, 12))
    loader = torch.utils.data.DataLoader([{"input_ids": row} for row in ids], batch_size=2)
    callback = check(tmp_path, model_attr="lm", tokenizer=tiny_model_dir, every_n_steps=2)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[callback])
    trainer.fit(Plain(), loader)
    assert [record.step for record in callback.history] == [0, 2]
    assert callback.history[-1].metrics["kl"] > 0.0  # full fine-tuning: KL against the cached top-k
    missing = check(tmp_path)
    with pytest.raises(ValueError, match=r"needs the Hugging Face model at `pl_module.model`.*set `model_attr`"):
        pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, callbacks=[missing]).fit(Plain(), loader)
