"""For tests that stop a training subprocess: it says on stdout when a checkpoint is on disk, so the test
waits for that line instead of polling the file system with sleeps."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl

#: The line's first word; the global step of the checkpoint follows it.
CHECKPOINTED = "CHECKPOINTED"


class AnnounceCheckpoint(pl.Callback):
    """Print ``CHECKPOINTED <step>`` at the first batch after a checkpoint was saved (the file is complete then)."""

    def __init__(self) -> None:
        self.saved_step: int | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.saved_step = trainer.global_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.saved_step is not None:
            print(f"{CHECKPOINTED} {self.saved_step}", flush=True)
            self.saved_step = None


#: Printed by :class:`PauseAtStep` when the run waits for its signal.
PAUSED = "PAUSED"


class PauseAtStep(pl.Callback):
    """Print ``PAUSED <step>`` after optimizer step ``step`` and wait (60 s at most) for a stopping signal, so a
    test's SIGTERM lands exactly after that step, however fast or slow the machine."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step != self.step:
            return
        print(f"{PAUSED} {self.step}", flush=True)
        deadline = time.monotonic() + 60
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.02)
