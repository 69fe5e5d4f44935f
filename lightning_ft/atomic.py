"""Writes that land complete or not at all, and never with NaN weights.

Every file or directory is written beside its target under a staging name (``.lft-staging-<pid>-...``),
synced to disk and renamed into place, so a crash, a kill or a full disk leaves the old content or the
new one under the final name, never a truncated mix. Staging entries a dead process left behind are
removed the next time something is written to the same directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

#: Prefix of every staging file and directory, followed by the writing process's id.
STAGING_PREFIX = ".lft-staging-"
#: Staging entries older than this process whose writer is gone are debris (see :func:`clean_stale_staging`).
_PROCESS_STARTED = time.time()
_cleaned: set[Path] = set()


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries) to disk: a rename must not land before the data does."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        handle = os.open(path, flags)
    except OSError:
        return  # directories cannot be opened on some platforms; the rename is still atomic
    try:
        os.fsync(handle)
    except OSError:
        pass  # some file systems do not sync directories
    finally:
        os.close(handle)


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _writer_alive(name: str) -> bool:
    pid = name[len(STAGING_PREFIX):].split("-", 1)[0]
    return pid.isdigit() and process_alive(int(pid))


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block: another process asking for the same
    lock waits until it is released, also when the holder dies (the system drops a dead process's locks).

    Advisory, with ``fcntl.flock`` where the platform has it; elsewhere the block runs unlocked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def clean_stale_staging(directory: str | os.PathLike) -> list[Path]:
    """Remove staging entries in ``directory`` older than this process whose writing process is gone.

    A ``kill -9`` during a write (a checkpoint, an export, the conversion of a GGUF model into the cache)
    leaves one behind; a live writer's entry is kept. Each directory is scanned once per process.

    Returns:
        The entries removed.
    """
    directory = Path(directory)
    if directory in _cleaned or not directory.is_dir():
        return []
    _cleaned.add(directory)
    removed = []
    for entry in directory.glob(f"{STAGING_PREFIX}*"):
        try:
            stale = entry.lstat().st_mtime < _PROCESS_STARTED and not _writer_alive(entry.name)
        except FileNotFoundError:
            continue  # its writer just renamed or removed it
        if stale:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def staging_name(target: Path) -> str:
    """The prefix of a staging entry for ``target``: marks it as debris-if-abandoned, with its writer's id."""
    return f"{STAGING_PREFIX}{os.getpid()}-{target.name}."


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` that replaces it only if the block finishes without error.

    The new content is synced to disk before the rename, so after a crash or a full disk ``target`` holds
    either its old content or the complete new one, never a truncated file.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(target.parent)
    handle, staging = tempfile.mkstemp(dir=target.parent, prefix=staging_name(target), suffix=target.suffix)
    os.close(handle)
    try:
        yield Path(staging)
        _fsync(Path(staging))
        os.replace(staging, target)
        _fsync(target.parent)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = True, keep_existing: bool = False
                     ) -> Iterator[Path]:
    """Yield a staging directory that replaces ``target`` only if the block finishes without error.

    Args:
        target: The directory to create or replace.
        overwrite: ``False`` refuses an existing non-empty ``target`` before anything is written.
        keep_existing: A ``target`` that exists when the block finishes is kept and the new content dropped:
            for caches, where another process that wrote the same entry first must not be disturbed.
    """
    target = Path(target)
    if not overwrite and target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} already exists and is not empty: choose another directory or overwrite it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(target.parent)
    staging = Path(tempfile.mkdtemp(prefix=staging_name(target), dir=target.parent))
    try:
        yield staging
        os.chmod(staging, 0o755)
        for file in staging.rglob("*"):
            _fsync(file)
        _fsync(staging)
        if keep_existing and target.exists():
            return
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=staging_name(target) + "old-", dir=target.parent))
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
        _fsync(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_file`: readers see the old text or the new, never half."""
    with atomic_file(path) as staging:
        staging.write_text(text)


def _named_tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _named_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from _named_tensors(value, f"{prefix}.{index}" if prefix else str(index))


def refuse_non_finite(tensors: Any, what: str) -> None:
    """Raise ``ValueError`` naming the tensors of ``tensors`` that hold NaN or infinity, before ``what`` is written.

    Args:
        tensors: A state dict, or nested dicts and lists of tensors (an optimizer's state).
        what: The file or directory about to be written, for the message.
    """
    bad = [name for name, tensor in _named_tensors(tensors)
           if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise ValueError(f"Refusing to write {what}: {len(bad)} tensor(s) hold NaN or infinite values "
                         f"(e.g. {', '.join(bad[:3])}); nothing was written and any earlier file is kept.")
