"""The end-of-fit summary: baseline against final for every metric, as a rich table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.console import Console
from rich.table import Table

from lightning_ft.forgetting.history import CheckRecord


def _rows(baseline: Mapping[str, float], final: Mapping[str, float], metric: str) -> list[str]:
    """Headline metrics first, then lm-eval's, then the chosen metric per subject."""
    head = [key for key in ("acc", "acc_norm", "kl") if key in baseline]
    lm_eval = sorted(key for key in baseline if key.startswith("lm_eval/"))
    subjects = sorted(key for key in baseline if key.startswith("subject/") and key.endswith(f"/{metric}"))
    return [key for key in head + lm_eval + subjects if key in final]


def summary_table(history: Sequence[CheckRecord], metric: str = "acc",
                  time_share: float | None = None, skipped: int = 0) -> Table:
    """Baseline (the first record), final (the last) and the change, with where thresholds were crossed.

    Args:
        history: The records of :class:`~lightning_ft.ForgettingCheck`, the baseline first.
        metric: ``"acc"`` or ``"acc_norm"``: which per-subject accuracy to list.
        time_share: Fraction of wall time spent scoring, for the caption.
        skipped: Scheduled checks skipped to stay within the time budget.
    """
    first, last = history[0], history[-1]
    table = Table(title=f"Forgetting check: baseline (step {first.step}) vs final (step {last.step})")
    for column in ("metric", "baseline", "final", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key in _rows(first.metrics, last.metrics, metric):
        before, after = first.metrics[key], last.metrics[key]
        change = after - before
        worse = change > 0 if key == "kl" else change < 0
        shown = f"[red]{change:+.4f}[/red]" if worse and abs(change) > 1e-12 else f"{change:+.4f}"
        table.add_row(key, f"{before:.4f}", f"{after:.4f}", shown)
    failed = [record.step for record in history if not record.ok]
    notes = [f"{len(history)} checks, {sum(record.seconds for record in history):.1f} s scoring"]
    if time_share is not None:
        notes.append(f"{time_share:.1%} of training wall time")
    if skipped:
        notes.append(f"{skipped} scheduled checks skipped (max_time_share)")
    notes.append(f"thresholds crossed at step {', '.join(map(str, failed))}" if failed else "within thresholds")
    table.caption = "; ".join(notes)
    return table


def print_summary(history: Sequence[CheckRecord], metric: str = "acc", time_share: float | None = None,
                  skipped: int = 0) -> None:
    """Print :func:`summary_table` to standard output."""
    Console().print(summary_table(history, metric, time_share, skipped))
