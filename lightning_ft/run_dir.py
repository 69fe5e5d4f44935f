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

#: Marker a run leaves in the directory it claimed: the process id and command line that own it.
CLAIM_FILE = ".lightning_ft_run"


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


class RunDirectoryClaim(pl.Callback):
    """Claims each versioned logger's directory when Lightning first asks for its version, and gives it back
    if the run fails before writing anything into it (bad data stops a run with nothing left behind)."""

    def __init__(self) -> None:
        self.claimed: list[tuple[Path, Path]] = []  # (run directory, highest directory created for it)

    def claim(self, logger: pl.loggers.Logger, fixed: int | str | None, next_version: Callable[[], int]) -> int | str:
        top = _first_missing(_directory(logger, fixed if fixed is not None else next_version()))
        version = _claim_next(logger, next_version) if fixed is None else _claim_fixed(logger, fixed)
        directory = _directory(logger, version)
        self.claimed.append((directory, top if top is not None and directory.is_relative_to(top) else directory))
        return version

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


def claim_run_directories(trainer: pl.Trainer) -> None:
    """Make each versioned logger (TensorBoard, CSV) claim its directory exclusively when it first needs it.

    Global rank zero only: the other processes get their directories from rank zero. Loggers without
    numbered versions are left alone.
    """
    if rank_zero_only.rank != 0:
        return
    claim = RunDirectoryClaim()
    for logger in trainer.loggers:
        if not all(hasattr(logger, name) for name in ("_get_next_version", "_version", "root_dir")):
            continue
        fixed, logger._version = logger._version, None
        # The logger resolves an unset version through _get_next_version: that call now claims it.
        logger._get_next_version = partial(claim.claim, logger, fixed, logger._get_next_version)
    trainer.callbacks.append(claim)
