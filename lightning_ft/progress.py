"""Progress a user can read in a log file: plain flushed lines for training and for long set-up stages.

A rich progress bar draws nothing when stdout is not a terminal (``nohup``, SLURM, CI, ``> log``);
these write one ordinary line at a time instead, flushed so ``tail -f`` shows it at once.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.utilities.rank_zero import rank_zero_only
from pytorch_lightning.callbacks import Callback, ProgressBar, RichProgressBar


def say(message: str) -> None:
    """Print one flushed line to stdout, from global rank zero only."""
    if rank_zero_only.rank == 0:
        print(message, flush=True)


def format_duration(seconds: float) -> str:
    """``42s``, ``3m 05s``, ``1h 02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


class PlainProgressBar(ProgressBar):
    """Training progress as one plain line after the first optimizer step and every ``every_n_steps`` after it,
    plus one per validation.

    ``step 20/80 (25%) | loss 1.412 | lr 1.95e-04 | 118 tokens/s | ETA 7m 31s``: the loss is the last logged
    ``train/loss`` (or ``loss``), the learning rate that of the first optimizer's first group, tokens/s the
    rate since the previous line (from the cumulative ``train/tokens`` that FineTuneModule logs), and the
    ETA extrapolates the steps done so far. The ``lightning_ft`` command uses it whenever stdout is not a
    terminal.

    Example::

        trainer = pl.Trainer(callbacks=[PlainProgressBar()], log_every_n_steps=10)

    Args:
        every_n_steps: Optimizer steps between lines; ``None`` follows the trainer's ``log_every_n_steps``.
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"PlainProgressBar: every_n_steps={every_n_steps} must be >= 1 or None")
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._started = 0.0
        self._first_step = 0
        self._last = (0, 0.0, 0.0)  # step, time, tokens at the previous line

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()
        self._first_step = trainer.global_step
        self._last = (trainer.global_step, self._started, self._tokens(trainer))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step, every = trainer.global_step, self.every_n_steps or trainer.log_every_n_steps or 1
        total = self._total(trainer)
        first = step == self._first_step + 1  # the run's first step: the loss every later line is compared with
        if not self._enabled or step == self._last[0] or (step % every and step != total and not first):
            return
        say(self.train_line(trainer, step, total))

    def train_line(self, trainer: pl.Trainer, step: int, total: int | None) -> str:
        """The line for ``step`` of ``total`` (also moves the tokens/s window to now)."""
        now, tokens = time.perf_counter(), self._tokens(trainer)
        last_step, last_time, last_tokens = self._last
        self._last = (step, now, tokens)
        parts = [f"step {step}/{total} ({step / total:.0%})" if total else f"step {step}"]
        metrics = self.get_metrics(trainer, trainer.lightning_module)
        loss = metrics.get("train/loss", metrics.get("loss"))
        if loss is not None:
            parts.append(f"loss {float(loss):.4g}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        if tokens > last_tokens and now > last_time:
            parts.append(f"{(tokens - last_tokens) / (now - last_time):,.0f} tokens/s")
        done = step - self._first_step
        if total and done > 0:
            parts.append(f"ETA {format_duration((now - self._started) / done * (total - step))}")
        return " | ".join(parts)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = self.get_metrics(trainer, pl_module)
        shown = [f"{key} {float(value):.4g}" for key, value in metrics.items()
                 if not key.startswith("train/") and key != "v_num" and isinstance(value, (int, float))]
        say(f"validation at step {trainer.global_step}" + (": " + " | ".join(shown) if shown else ""))

    @staticmethod
    def _total(trainer: pl.Trainer) -> int | None:
        total = trainer.estimated_stepping_batches
        return int(total) if total != float("inf") else None

    @staticmethod
    def _tokens(trainer: pl.Trainer) -> float:
        value = trainer.callback_metrics.get("train/tokens")
        return float(value) if value is not None else 0.0


def choose_progress_bar(callbacks: list[Callback], enabled: bool, interactive: bool) -> list[Callback]:
    """Fit the command's always-on progress bar to the run.

    Args:
        callbacks: The callbacks the command adds itself.
        enabled: The trainer's ``enable_progress_bar``: ``False`` drops every progress bar (Lightning
            refuses a bar it was told not to show).
        interactive: Whether stdout is a terminal; if not, the rich bar becomes a :class:`PlainProgressBar`.
    """
    chosen = []
    for callback in callbacks:
        if isinstance(callback, ProgressBar) and not enabled:
            continue
        if isinstance(callback, RichProgressBar) and not interactive:
            callback = PlainProgressBar()
        chosen.append(callback)
    return chosen


class StageProgress:
    """Plain progress of a long set-up stage: silent if it ends within ``quiet_for`` seconds.

    Example::

        progress = StageProgress("Tokenising", total=len(conversations), unit="conversations")
        for conversation in conversations:
            ...
            progress.advance()
        progress.close()

    Args:
        label: What is being done, e.g. ``"Tokenising train data"``.
        total: Units of work, if known.
        unit: Name of a unit, for the lines.
        quiet_for: Seconds before the first line.
        every: Seconds between lines.
    """

    def __init__(self, label: str, total: int | None = None, unit: str = "items", quiet_for: float = 3.0,
                 every: float = 10.0) -> None:
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.done = 0
        self.started = time.perf_counter()
        self._next = self.started + quiet_for
        self._spoke = False

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.perf_counter()
        if now < self._next:
            return
        self._next = now + self.every
        self._spoke = True
        elapsed = now - self.started
        if self.total:
            eta = elapsed / max(self.done, 1) * (self.total - self.done)
            say(f"{self.label}: {self.done:,}/{self.total:,} {self.unit} ({self.done / self.total:.0%}, "
                f"ETA {format_duration(eta)})")
        else:
            say(f"{self.label}: {self.done:,} {self.unit} ({format_duration(elapsed)})")

    def close(self) -> None:
        """Say how long it took, if anything was said before."""
        if self._spoke:
            say(f"{self.label}: done, {self.done:,} {self.unit} in {format_duration(time.perf_counter() - self.started)}")


@contextmanager
def stage(label: str) -> Iterator[None]:
    """Announce a single long step (one call, no units to count) and say how long it took."""
    say(f"{label} ...")
    started = time.perf_counter()
    yield
    say(f"{label}: done in {format_duration(time.perf_counter() - started)}")


def stdout_is_terminal() -> bool:
    """Whether stdout is an interactive terminal (rich bars draw there; elsewhere plain lines)."""
    return bool(getattr(sys.stdout, "isatty", lambda: False)())
