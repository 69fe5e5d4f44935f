"""Validate once before the first training step, so every ``val/`` curve starts at the untrained model."""

from __future__ import annotations

import pytorch_lightning as pl
from typing_extensions import override


class ValidateAtStart(pl.Callback):
    """Run the fit's own validation loop once before the first optimizer step.

    Lightning validates only after training batches, so the first ``val/`` point of a run is already trained.
    This callback puts a point at step 0: the starting value every later one is compared with (for preference
    runs with an adapter, ``val/rewards/accuracy`` and ``val/rewards/margin`` start at 0, since the policy is
    the reference). It uses the fit's validation loop, so ``limit_val_batches``, the loggers, the progress bar
    and callbacks that act on validation (``ForgettingCheck``, ``EarlyStopping``) see it like any other.
    A resumed run (global step > 0) is not validated again.

    Example::

        trainer = pl.Trainer(callbacks=[ValidateAtStart()], val_check_interval=20)
    """

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step > 0 or not trainer.enable_validation:
            return
        connector = trainer._logger_connector
        first_loop_iter = connector._first_loop_iter  # restored as Lightning's epoch loop does around validation
        trainer.validating = True
        trainer.fit_loop.epoch_loop.val_loop.run()
        trainer.training = True
        connector._first_loop_iter = first_loop_iter
