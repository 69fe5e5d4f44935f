"""Checkpoints written atomically beside their final name, and never with NaN weights."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from lightning_fabric.utilities.types import _PATH

from lightning_ft.atomic import atomic_file, clean_stale_staging, refuse_non_finite


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, writing each ``.ckpt`` through :func:`~lightning_ft.atomic.atomic_file`.

    The checkpoint goes to a staging file in the checkpoint's own directory (not ``$TMPDIR``), is synced
    to disk and renamed into place: after a full disk or a ``kill -9`` every file under a final name is
    complete, and an earlier ``last.ckpt`` is kept. A checkpoint whose weights or optimizer state hold NaN
    or infinity is refused before anything is written. Remote paths (``s3://``...) keep Lightning's writer.

    :class:`~lightning_ft.FineTuneModule` installs it in place of Lightning's default ``TorchCheckpointIO``
    (see :func:`use_atomic_checkpoints`); pass it yourself as ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        refuse_non_finite({"state_dict": checkpoint.get("state_dict", {}),
                           "optimizer_states": checkpoint.get("optimizer_states", [])}, f"checkpoint {path}")
        if "://" in str(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        try:
            with atomic_file(os.fspath(path)) as staging:
                torch.save(checkpoint, staging)
        except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
            free = shutil.disk_usage(os.path.dirname(os.fspath(path)) or ".").free
            raise OSError(f"Could not write checkpoint {path} ({str(error).splitlines()[0]}; {free / 2**20:.0f} MiB "
                          "free there): nothing was written under that name and earlier checkpoints are kept. "
                          "Free some space or set trainer.default_root_dir / checkpoint.dirpath elsewhere.") from error

    def load_checkpoint(self, path: _PATH, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if "://" not in str(path):
            clean_stale_staging(os.path.dirname(os.fspath(path)) or ".")  # a write killed midway, beside it
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def use_atomic_checkpoints(trainer: pl.Trainer) -> None:
    """Swap the strategy's default ``TorchCheckpointIO`` for :class:`AtomicCheckpointIO` (a user's own is kept)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
