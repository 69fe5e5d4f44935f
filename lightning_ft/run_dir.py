"""Claim a run's log directory atomically, so concurrent runs in one root never share a ``version_N``.

Lightning's loggers pick ``version_N`` by listing the directories that exist when they are first asked,
so two runs started together both pick the same one and mix their checkpoints and event files. Here the
directory is created with an exclusive ``mkdir`` (the next number on a collision), and a version the user
fixed is taken only if no other run holds it.
"""

from __future__ import annotations

import os
import sys
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


def _claim_next(logger: pl.loggers.Logger) -> None:
    version = -1
    while True:
        version = max(version + 1, logger._get_next_version())
        logger._version = version
        directory = Path(logger.log_dir)
        directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            directory.mkdir()
        except FileExistsError:
            continue  # another run took this number between the listing and the mkdir
        _write_claim(directory)
        return


def _claim_fixed(logger: pl.loggers.Logger) -> None:
    directory = Path(logger.log_dir)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        _write_claim(directory)
    except FileExistsError:
        owner = (directory / CLAIM_FILE).read_text().strip()
        raise RunDirectoryTaken(f"Log directory {directory} (logger version {logger.version!r}) belongs to another "
                                f"run ({owner}). Choose another version, or leave it unset for the next free "
                                "version_N.") from None
    others = sorted(p.name for p in directory.iterdir() if p.name != CLAIM_FILE)
    if others:
        (directory / CLAIM_FILE).unlink()
        raise RunDirectoryTaken(f"Log directory {directory} (logger version {logger.version!r}) already holds an "
                                f"earlier run ({', '.join(others[:5])}). Choose another version, or leave it unset "
                                "for the next free version_N.")


def claim_run_directories(trainer: pl.Trainer) -> None:
    """Create each versioned logger's directory exclusively before anything is written (global rank zero only).

    Loggers without numbered versions (or ones whose version was already decided) are left alone.
    """
    if rank_zero_only.rank != 0:
        return
    for logger in trainer.loggers:
        if not hasattr(logger, "_get_next_version") or not hasattr(logger, "_version"):
            continue
        if logger._version is None:
            _claim_next(logger)
        else:
            _claim_fixed(logger)
