"""Preemption loses nothing: a stopping signal saves a resumable checkpoint of the step the run is at."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from functools import partial
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lightning_ft.callbacks.run_report import _shown, command
from lightning_ft.progress import say


class SaveOnPreemption(pl.Callback):
    """Save where the run is on SIGTERM, SIGINT or SLURM's requeue signal, and exit with a status that says so.

    Spot instances, SLURM time limits and evicted pods send SIGTERM and give seconds. Lightning's signal
    connector then stops the loop after the optimizer step in flight (``trainer.received_sigterm``); SIGINT
    (Ctrl+C) and SLURM's requeue signal (``#SBATCH --signal=SIGUSR1@90``) are routed to the same stop instead of
    a ``KeyboardInterrupt`` in the middle of a step. At that point this callback writes a resumable checkpoint
    (model or adapter, optimizer, scheduler, data position, RNG, every callback's state) atomically as the run's
    ``last.ckpt``, prints one line with the command that continues it, and sets the exit status to 128 + the
    signal number (143 for SIGTERM, as shells report it), so no scheduler takes the run for finished. Under
    ``SLURMEnvironment(auto_requeue=True)`` Lightning's own handler still saves its HPC checkpoint and requeues
    the job. A second Ctrl+C interrupts at once. ``kill -9`` leaves no time for any of this: the periodic
    checkpoints (``checkpoint.every_n_train_steps``) are then what ``--ckpt_path last`` continues from.

    ``lightning_ft fit`` adds it to every run. Example::

        trainer = pl.Trainer(callbacks=[SaveOnPreemption()])
        trainer.fit(module, data)  # SIGTERM: exit status 143, runs/.../checkpoints/last.ckpt at that step
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self.saved: str | None = None
        self._previous: dict[int, Any] = {}

    @staticmethod
    def _signals(trainer: pl.Trainer) -> list[int]:
        environment = trainer._accelerator_connector.cluster_environment
        requeue = environment.requeue_signal if isinstance(environment, SLURMEnvironment) else None
        return list(dict.fromkeys(s for s in (signal.SIGTERM, signal.SIGINT, requeue or signal.SIGUSR1) if s))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning registered its own handlers (its SLURM requeue handler only registers on a free signal).
        self.signal, self.saved = None, None
        if sys.platform == "win32" or not _in_main_thread():
            return
        for signum in self._signals(trainer):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, partial(self._received, trainer))

    def _received(self, trainer: pl.Trainer, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt  # a second Ctrl+C: out now
        self.signal = self.signal or signum
        previous = self._previous.get(signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)  # Lightning's: its SIGTERM notifier, SLURM's HPC save and requeue
        trainer._signal_connector.received_sigterm = True  # the loop stops after the step in flight

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if _in_main_thread():
            for signum, previous in self._previous.items():
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    @staticmethod
    def checkpoint_path(trainer: pl.Trainer) -> str:
        """The run's ``last.ckpt``: where ``ModelCheckpoint(save_last=True)`` writes it, else under the log dir."""
        checkpoint = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath), None)
        if checkpoint is not None:
            return os.path.join(checkpoint.dirpath, checkpoint.CHECKPOINT_NAME_LAST + checkpoint.FILE_EXTENSION)
        return os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints", "last.ckpt")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        signum = self.signal or signal.SIGTERM
        self.saved = self.checkpoint_path(trainer)
        trainer.save_checkpoint(self.saved)
        exception.code = 128 + signum
        say(f"Stopped by {signal.Signals(signum).name} at step {trainer.global_step}: saved {_shown(self.saved)}. "
            f"Continue with: {continue_command(self.saved)}")


def continue_command(path: str) -> str:
    """The command line that continues this run: ``lightning_ft fit ... --ckpt_path last`` when started so."""
    args = sys.argv[1:]
    if not args or args[0] != "fit":
        return f"trainer.fit(..., ckpt_path={path!r})"
    kept, skip = [], False
    for arg in args:
        if skip or arg.startswith("--ckpt_path="):
            skip = False
            continue
        if arg == "--ckpt_path":
            skip = True
            continue
        kept.append(arg)
    return f"{command('lightning_ft', 'lightning_ft')} {shlex.join([*kept, '--ckpt_path', 'last'])}"


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
