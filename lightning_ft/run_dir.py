"""Claim a run's log directory atomically, so concurrent runs in one root never share a ``version_N``.

Lightning's loggers pick ``version_N`` by listing the directories that exist when they are first asked,
so two runs started together both pick the same one and mix their checkpoints and event files. Here the
directory is created with an exclusive ``mkdir`` (the next number on a collision), and a version the user
fixed is taken only if no other run holds it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
from lightning_fabric.utilities.rank_zero import rank_zero_only

from lightning_ft.atomic import process_alive, write_text_atomic
from lightning_ft.progress import say

#: Marker a run leaves in the directory it claimed: the process id and command line that own it.
CLAIM_FILE = ".lightning_ft_run"
#: Marker of a fit that ended (its steps done, or stopped by a callback): never continued by ``--ckpt_path last``.
FINISHED_FILE = ".lightning_ft_finished"


class RunDirectoryTaken(FileExistsError):
    """The log directory of a fixed logger version belongs to another run."""


def _write_claim(directory: Path) -> None:
    with open(directory / CLAIM_FILE, "x") as handle:  # "x": exclusive, fails if another run claimed it first
        handle.write(f"pid {os.getpid()}: {' '.join(sys.argv)}\n")


def _directory(logger: pl.loggers.Logger, version: int | str) -> Path:
    return Path(logger.root_dir) / (version if isinstance(version, str) else f"version_{version}")


def _first_missing(directory: Path) -> Path | None:
    """The highest ancestor of ``directory`` (itself included) that does not exist yet."""
    missing = None
    for path in (directory, *directory.parents):
        if path.exists():
            return missing
        missing = path
    return missing


def _claim_next(logger: pl.loggers.Logger, next_version: Callable[[], int]) -> int:
    version = -1
    while True:
        version = max(version + 1, next_version())
        directory = _directory(logger, version)
        directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            directory.mkdir()
        except FileExistsError:
            continue  # another run took this number between the listing and the mkdir
        _write_claim(directory)
        return version


def _claim_fixed(logger: pl.loggers.Logger, version: int | str) -> int | str:
    directory = _directory(logger, version)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        _write_claim(directory)
    except FileExistsError:
        owner = (directory / CLAIM_FILE).read_text().strip()
        raise RunDirectoryTaken(f"Log directory {directory} (logger version {version!r}) belongs to another run "
                                f"({owner}). Choose another version, or leave it unset for the next free "
                                "version_N.") from None
    others = sorted(p.name for p in directory.iterdir() if p.name != CLAIM_FILE)
    if others:
        (directory / CLAIM_FILE).unlink()
        raise RunDirectoryTaken(f"Log directory {directory} (logger version {version!r}) already holds an earlier "
                                f"run ({', '.join(others[:5])}). Choose another version, or leave it unset for the "
                                "next free version_N.")
    return version


def _claim_continued(logger: pl.loggers.Logger, version: int | str) -> int | str:
    """Take over the directory of an unfinished run to continue it, unless its process is still alive."""
    directory = _directory(logger, version)
    claim = directory / CLAIM_FILE
    owner = claim.read_text().strip() if claim.exists() else ""
    pid = int(owner.split()[1].rstrip(":")) if owner.startswith("pid ") else None
    if pid is not None and pid != os.getpid() and process_alive(pid):
        raise RunDirectoryTaken(f"Run {directory} is still running ({owner}): stop it before continuing it.")
    write_text_atomic(claim, f"pid {os.getpid()}: {' '.join(sys.argv)}\n")
    return version


def unfinished_runs(root: str | os.PathLike) -> list[tuple[Path, Path]]:
    """``(run directory, its newest checkpoint)`` of every ``version_*`` run under ``root`` that holds a checkpoint
    and did not finish, the run with the newest checkpoint first."""
    runs = []
    for directory in Path(root).glob("version_*"):
        if not directory.is_dir() or (directory / FINISHED_FILE).exists():
            continue
        checkpoints = [p for p in directory.rglob("*.ckpt") if p.is_file()]
        if checkpoints:  # the newest, and last.ckpt among equally new ones
            runs.append((directory, max(checkpoints, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"))))
    return sorted(runs, key=lambda run: run[1].stat().st_mtime_ns, reverse=True)


def versioned_loggers(trainer: pl.Trainer) -> list[pl.loggers.Logger]:
    """The trainer's loggers that number their runs ``version_N`` (TensorBoard, CSV)."""
    return [logger for logger in trainer.loggers
            if all(hasattr(logger, name) for name in ("_get_next_version", "_version", "root_dir"))]


def continue_last_run(trainer: pl.Trainer) -> str | None:
    """``--ckpt_path last``: the newest checkpoint of the newest unfinished run under the first versioned logger's
    root, whose ``version_N`` this run then continues (same TensorBoard run, same outputs); ``None`` when there
    is none to continue. Says which, in one line."""
    loggers = versioned_loggers(trainer)
    if not loggers:
        return "last"  # no numbered runs to choose from: Lightning's own meaning (the ModelCheckpoint's last.ckpt)
    runs = unfinished_runs(loggers[0].root_dir)
    if not runs:
        say(f"No unfinished run under {loggers[0].root_dir} to continue (--ckpt_path last): starting a fresh run")
        return None
    directory, checkpoint = runs[0]
    number = directory.name.split("_", 1)[1]
    version = int(number) if number.isdigit() else directory.name
    for logger in loggers:
        logger._version = version
    say(f"Continuing the unfinished run {directory} from {checkpoint.name}")
    return str(checkpoint)


class RunDirectoryClaim(pl.Callback):
    """Claims each versioned logger's directory when Lightning first asks for its version, and gives it back
    if the run fails before writing anything into it (bad data stops a run with nothing left behind). A fit
    that ends marks its directories finished, so ``--ckpt_path last`` never continues it."""

    def __init__(self, continuing: bool = False) -> None:
        self.claimed: list[tuple[Path, Path]] = []  # (run directory, highest directory created for it)
        self.continuing = continuing

    def claim(self, logger: pl.loggers.Logger, fixed: int | str | None, next_version: Callable[[], int]) -> int | str:
        if self.continuing and fixed is not None:
            version = _claim_continued(logger, fixed)
            self.claimed.append((_directory(logger, version), _directory(logger, version)))
            return version
        top = _first_missing(_directory(logger, fixed if fixed is not None else next_version()))
        version = _claim_next(logger, next_version) if fixed is None else _claim_fixed(logger, fixed)
        directory = _directory(logger, version)
        self.claimed.append((directory, top if top is not None and directory.is_relative_to(top) else directory))
        return version

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for directory, _ in self.claimed:
            write_text_atomic(directory / FINISHED_FILE, f"step {trainer.global_step}\n")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        for directory, top in self.claimed:
            if [p.name for p in directory.iterdir()] != [CLAIM_FILE]:
                continue  # the run wrote something: keep it for the post-mortem
            (directory / CLAIM_FILE).unlink()
            for path in (directory, *directory.parents):
                try:
                    path.rmdir()  # only empty directories, only up to the first one this claim created
                except OSError:
                    break
                if path == top:
                    break
        self.claimed.clear()


def claim_run_directories(trainer: pl.Trainer, continuing: bool = False) -> None:
    """Make each versioned logger (TensorBoard, CSV) claim its directory exclusively when it first needs it;
    ``continuing``: the version set by :func:`continue_last_run` is taken over rather than refused.

    Global rank zero only: the other processes get their directories from rank zero. Loggers without
    numbered versions are left alone.
    """
    if rank_zero_only.rank != 0:
        return
    claim = RunDirectoryClaim(continuing)
    for logger in versioned_loggers(trainer):
        fixed, logger._version = logger._version, None
        # The logger resolves an unset version through _get_next_version: that call now claims it.
        logger._get_next_version = partial(claim.claim, logger, fixed, logger._get_next_version)
    trainer.callbacks.append(claim)
