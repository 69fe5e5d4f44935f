"""Resident memory of memory-mapped Arrow files: read a page, and it stays in the process's RSS.

``datasets`` memory-maps its Arrow files. Every page a pass over the data reads stays mapped into the
process (counted in its resident set) until the kernel needs the memory back, so one pass over a million
conversations leaves the whole file resident. :class:`MappedPages` drops this process's mappings of those
pages now and then during a pass (``madvise(MADV_DONTNEED)`` on the read-only mappings of the dataset's own
files, found in ``/proc/self/maps``): nothing is lost, the pages stay in the kernel's page cache and a later
read maps them again. Linux only; elsewhere, and for a dataset held in memory, it does nothing.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from collections.abc import Iterable
from typing import Any

#: Release once this many batches have been read.
EVERY = 16


def _madvise() -> Any:
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_MADVISE = _madvise()


def dataset_files(dataset: Any) -> list[str]:
    """The Arrow files behind a ``datasets.Dataset`` (none for one held in memory)."""
    return [entry["filename"] for entry in getattr(dataset, "cache_files", None) or []]


class MappedPages:
    """Drops this process's resident pages of read-only memory maps of ``files``, every :data:`EVERY` calls of
    :meth:`tick` (and at once with :meth:`release`).

    Args:
        files: The memory-mapped files, e.g. :func:`dataset_files` of the dataset being read.
    """

    def __init__(self, files: Iterable[str]) -> None:
        self.files = {os.path.realpath(file) for file in files}
        self.count = 0

    def tick(self) -> None:
        self.count += 1
        if self.count % EVERY == 0:
            self.release()

    def release(self) -> None:
        if _MADVISE is None or not self.files:
            return
        try:
            with open("/proc/self/maps") as maps:
                lines = maps.read().splitlines()
        except OSError:
            return
        for line in lines:
            fields = line.split(maxsplit=5)
            # Read-only mappings only: their pages are the file's, re-read on the next access.
            if len(fields) == 6 and "w" not in fields[1] and fields[5] in self.files:
                start, end = (int(bound, 16) for bound in fields[0].split("-"))
                _MADVISE(start, end - start, mmap.MADV_DONTNEED)


class Releasing:
    """``function`` as a ``datasets.map`` function that releases the mapped pages of ``dataset``'s files as it
    goes, in whichever process runs it (picklable for the map's workers).

    Args:
        function: The map function.
        dataset: The dataset being mapped.
    """

    def __init__(self, function: Any, dataset: Any) -> None:
        self.function, self.files = function, dataset_files(dataset)
        self._pages: MappedPages | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"function": self.function, "files": self.files, "_pages": None}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._pages is None:
            self._pages = MappedPages(self.files)
        try:
            return self.function(*args, **kwargs)
        finally:
            self._pages.tick()
