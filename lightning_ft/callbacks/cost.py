"""What a measuring callback costs: its seconds, and their share of the run's wall time."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class CostMeter:
    """Seconds spent inside :meth:`timing` since :meth:`start`, and their share of the wall time since then."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.seconds = 0.0

    def start(self) -> None:
        self.started, self.seconds = time.perf_counter(), 0.0

    @contextmanager
    def timing(self) -> Iterator[dict[str, float]]:
        """Time the block; the yielded dict holds its ``seconds`` afterwards."""
        record, started = {}, time.perf_counter()
        try:
            yield record
        finally:
            record["seconds"] = time.perf_counter() - started
            self.seconds += record["seconds"]

    def share(self, extra: float = 0.0) -> float | None:
        """Fraction of the wall time since :meth:`start` spent timing (``None`` before the start); ``extra``: what
        it would be after another ``extra`` seconds of timing."""
        if self.started is None:
            return None
        return (self.seconds + extra) / max(time.perf_counter() - self.started + extra, 1e-9)
