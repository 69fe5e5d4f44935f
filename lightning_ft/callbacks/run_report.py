"""Say what a fit will do before it starts, and where its results are and how to use them when it ends."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_ft.callbacks.export import SaveHFModel
from lightning_ft.progress import format_duration, say


def _shown(path: str | os.PathLike) -> str:
    """A path relative to the working directory when it lies below it (what a user would type)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def command(name: str, module: str) -> str:
    """How to start console script ``name`` from here: its name if it is on PATH next to this Python,
    else its path in this Python's bin directory, else ``python -m module``."""
    beside = Path(sys.executable).parent / name
    found = shutil.which(name)
    if found and (not beside.exists() or Path(found).resolve() == beside.resolve()):
        return name
    if beside.exists():
        return _shown(beside)
    return f"{_shown(sys.executable)} -m {module}"


def describe_adapter(adapter: Any) -> str:
    """``LoRA (r=16, alpha=32, all-linear)``, ``full fine-tuning``, or the peft config's type."""
    if adapter is None:
        return "its own training_step"
    method = getattr(adapter, "method", None)
    if method == "full":
        return "full fine-tuning"
    settings = [f"{key}={getattr(adapter, key):g}" for key in ("r", "alpha") if hasattr(adapter, key)]
    targets = getattr(adapter, "target_modules", None)
    if targets:
        settings.append(targets if isinstance(targets, str) else ",".join(targets))
    name = type(getattr(adapter, "config", adapter)).__name__
    return f"{name} ({', '.join(settings)})" if settings else name


class RunReport(pl.Callback):
    """Print the plan of a fit when it starts and, when it ends, where the model is and what to run next.

    The plan: model, method, trainable parameters, data counts, optimizer steps, precision and the run
    directory. The end: wall time, the adapter (or model) directory written by :class:`SaveHFModel`, a
    ``lightning_ft chat`` command for it and a ``tensorboard`` command for the run. Rank zero only.

    Example::

        trainer = pl.Trainer(callbacks=[SaveHFModel(), RunReport()])
    """

    def __init__(self) -> None:
        self._started = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()
        log_dir = trainer.log_dir  # every rank asks: it broadcasts from rank zero
        lines = [self._headline(pl_module)]
        stats = getattr(trainer.datamodule, "stats", None) or {}
        if stats.get("train_conversations") is not None:
            lines.append(f"  data:      {stats['train_conversations']:,} train + {stats['val_conversations']:,} val "
                         f"conversations, {stats['tokens']:,} tokens ({stats['trained_tokens']:,} trained)")
        lines.append(f"  steps:     {self._steps(trainer)}")
        lines.append(f"  precision: {trainer.precision} on {trainer.strategy.root_device.type} "
                     f"x {trainer.world_size}")
        lines.append(f"  outputs:   {_shown(log_dir or trainer.default_root_dir)}")
        say("\n".join(lines))

    @staticmethod
    def _headline(pl_module: pl.LightningModule) -> str:
        model = getattr(pl_module, "hparams", {}).get("model_name", type(pl_module).__name__)
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in pl_module.parameters())
        return (f"Fine-tuning {model} with {describe_adapter(getattr(pl_module, 'adapter', None))}: "
                f"{trainable / 1e6:,.1f}M of {total / 1e6:,.0f}M parameters trained")

    @staticmethod
    def _steps(trainer: pl.Trainer) -> str:
        steps = trainer.estimated_stepping_batches
        text = f"{int(steps):,} optimizer steps" if steps != float("inf") else "until stopped"
        batches = trainer.num_training_batches
        if batches != float("inf") and trainer.max_epochs and trainer.max_epochs > 0:
            text += f" (at most {trainer.max_epochs} epochs of {int(batches):,} batches"
            if trainer.accumulate_grad_batches > 1:
                text += f", {trainer.accumulate_grad_batches} per step"
            text += ")"
        return text

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        saved = next((cb.saved_to for cb in trainer.callbacks if isinstance(cb, SaveHFModel) and cb.saved_to), None)
        finished = "stopped early" if trainer.should_stop and not trainer.fit_loop.done else "done"
        lines = [f"Fine-tuning {finished} after {trainer.global_step:,} steps in "
                 f"{format_duration(time.perf_counter() - self._started)}."]
        if saved is not None:
            lines.append(f"  model:       {_shown(saved)}")
            source = "--adapter" if (Path(saved) / "adapter_config.json").is_file() else "--merged"
            lines.append(f"  chat:        {command('lightning_ft', 'lightning_ft')} chat {source} {_shown(saved)}"
                         + self._system_hint(trainer))
        else:
            lines.append(f"  run:         {_shown(trainer.log_dir or trainer.default_root_dir)}")
        boards = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if boards:
            lines.append(f"  TensorBoard: {command('tensorboard', 'tensorboard.main')} --logdir "
                         f"{_shown(boards[0].root_dir)}")
        say("\n".join(lines))

    @staticmethod
    def _system_hint(trainer: pl.Trainer) -> str:
        system = getattr(trainer.datamodule, "system_prompt", None)
        if system:
            return f" --system {shlex.quote(system)}"
        return "  (add --system with your data's system prompt)"
