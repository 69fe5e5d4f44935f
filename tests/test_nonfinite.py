"""NonFiniteGuard: a NaN or infinite step never touches the weights, and a run that does not recover stops."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from helpers import write_chat_file
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_ft import FineTuneModule, LoRA
from lightning_ft.callbacks import NonFiniteGuard, NonFiniteTrainingError
from lightning_ft.data.datamodule import ChatDataModule


class PoisonedModule(FineTuneModule):
    """Multiplies the loss of the chosen micro-batches by NaN (or their gradients by infinity)."""

    poison: set[int] = set()
    kind = "loss"

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.kind == "loss" and self._micro_batch(batch_idx) in self.poison:
            return loss * float("nan")
        return loss

    def on_after_backward(self):
        if self.kind == "grad" and self._micro_batch(self.trainer.fit_loop.epoch_loop.batch_idx) in self.poison:
            next(p for p in self.parameters() if p.requires_grad).grad[0] = float("inf")

    def _micro_batch(self, batch_idx):
        return self.trainer.fit_loop.epoch_loop.batch_progress.total.ready - 1


class WeightLog(pl.Callback):
    """The trainable weights after every optimizer step."""

    def __init__(self):
        self.weights = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters() if p.requires_grad]


def fit(model_dir, tmp_path, poison, max_steps, kind="loss", accumulate=1, guard=None, checkpoints=False):
    PoisonedModule.poison, PoisonedModule.kind = set(poison), kind
    module = PoisonedModule(model_dir, adapter=LoRA(r=4, dropout=0.0), learning_rate=1e-2, weight_decay=0.1)
    data = ChatDataModule(write_chat_file(tmp_path / "train.jsonl", 32), tokenizer=model_dir, batch_size=2)
    log = WeightLog()
    callbacks = [log] + ([guard] if guard else [])
    if checkpoints:
        callbacks.append(ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1))
    trainer = pl.Trainer(max_steps=max_steps, logger=pl.loggers.CSVLogger(tmp_path), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=checkpoints, default_root_dir=tmp_path,
                         accumulate_grad_batches=accumulate, callbacks=callbacks, log_every_n_steps=1)
    return trainer, module, log, data


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize(("kind", "accumulate"), [("loss", 1), ("loss", 2), ("grad", 1)])
def test_a_non_finite_step_is_skipped_without_touching_the_weights(tiny_model_dir, tmp_path, kind, accumulate):
    # Micro-batch 2 * accumulate is the first of optimizer step 3 (global_step 2 -> 3).
    trainer, module, log, data = fit(tiny_model_dir, tmp_path, {2 * accumulate}, max_steps=5, kind=kind,
                                     accumulate=accumulate)
    with pytest.warns(UserWarning, match="Step 3: non-finite loss or gradient norm"):
        trainer.fit(module, data)
    assert _same(log.weights[3], log.weights[2])  # AdamW with weight decay would move them: it did not run
    assert not _same(log.weights[4], log.weights[3])  # training goes on afterwards
    assert all(torch.isfinite(w).all() for w in log.weights[5])
    guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))  # added by the module
    assert guard.skipped_steps == 1 and guard.consecutive == 0
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1.0


def test_consecutive_skips_stop_the_run_and_no_checkpoint_holds_nan(tiny_model_dir, tmp_path):
    trainer, module, log, data = fit(tiny_model_dir, tmp_path, range(2, 100), max_steps=20,
                                     guard=NonFiniteGuard(max_consecutive_skips=3), checkpoints=True)
    with pytest.raises(NonFiniteTrainingError, match=r"stopped at step 5: .* 3 step\(s\) in a row \(steps 3-5.*"
                                                     r"Lower the learning rate .* bfloat16 or float32"):
        trainer.fit(module, data)
    assert max(log.weights) == 4  # step 5 raised before its end
    files = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert [f.name for f in files] == [f"epoch=0-step={i}.ckpt" for i in range(1, 5)]
    for file in files:
        state = torch.load(file, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["state_dict"].values()), file


def test_a_run_that_ends_on_skipped_steps_fails(tiny_model_dir, tmp_path):
    trainer, module, _, data = fit(tiny_model_dir, tmp_path, {3}, max_steps=4)
    with pytest.warns(UserWarning, match="Step 4"), pytest.raises(NonFiniteTrainingError, match="step 4"):
        trainer.fit(module, data)


def test_writers_refuse_non_finite_weights_and_keep_the_earlier_output(tiny_model_dir, tmp_path):
    from lightning_ft.checkpoint_io import AtomicCheckpointIO

    module = FineTuneModule(tiny_model_dir, adapter=LoRA(r=4))
    module.configure_model()
    target = tmp_path / "hf_model"
    module.save_pretrained(target)
    before = sorted(p.name for p in target.iterdir())
    with torch.no_grad():
        next(p for p in module.parameters() if p.requires_grad)[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"Refusing to write .*hf_model: 1 tensor\(s\) hold NaN"):
        module.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == before
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"earlier")
    with pytest.raises(ValueError, match="Refusing to write checkpoint"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": module.state_dict()}, ckpt)
    assert ckpt.read_bytes() == b"earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_model", "last.ckpt"]


def test_guard_settings_are_checked():
    with pytest.raises(ValueError, match="max_consecutive_skips=0 must be >= 1"):
        NonFiniteGuard(max_consecutive_skips=0)
