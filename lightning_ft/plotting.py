"""PNG plots from TensorBoard logs: training curves of several runs side by side (``lightning_ft plot``).

matplotlib is optional (the ``plot`` extra) and imported only here, when a plot is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_ft.atomic import atomic_file

#: What ``lightning_ft plot`` draws when no ``--tags`` are given: forgetting, drift and adaptation.
DEFAULT_TAGS = ("forgetting/acc", "forgetting/kl", "val/loss")


def require_matplotlib() -> Any:
    """Import matplotlib with the non-interactive backend, or say which extra installs it."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("Plotting needs matplotlib: pip install 'lightning_ft[plot]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def event_files(run: str | Path) -> list[Path]:
    """The TensorBoard event files of one run: ``run`` is a version directory or a directory holding one."""
    run = Path(run)
    if run.is_file():
        return [run]
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run directory")
    files = sorted(run.rglob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"{run}: no TensorBoard event files under it")
    versions = sorted({f.parent for f in files})
    if len(versions) > 1:
        listing = ", ".join(str(v) for v in versions)
        raise ValueError(f"{run} holds {len(versions)} runs ({listing}); pass one of them")
    return files


def read_scalars(run: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run as ``tag -> [(step, value), ...]`` sorted by step (the last write of a step wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    merged: dict[str, dict[int, float]] = {}
    for path in event_files(run):
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            points = merged.setdefault(tag, {})
            for event in accumulator.Scalars(tag):
                points[event.step] = event.value
    return {tag: sorted(points.items()) for tag, points in merged.items()}


def save_figure(figure: Any, out: str | Path) -> Path:
    """Write a matplotlib figure to ``out`` atomically (a temporary file in the same directory, renamed)."""
    with atomic_file(out) as staging:
        figure.savefig(staging, dpi=120, bbox_inches="tight", format=Path(out).suffix.lstrip(".") or "png")
    return Path(out)


def plot_runs(runs: dict[str, str | Path], out: str | Path, tags: tuple[str, ...] | list[str] = DEFAULT_TAGS,
              hlines: dict[str, float] | None = None, title: str | None = None) -> Path:
    """One panel per tag, one line per run; ``hlines`` draws a dashed line on a tag's panel (a threshold).

    Args:
        runs: Label -> run directory (or event file).
        out: The PNG written.
        tags: Scalar tags to draw; a tag no run logged is an error naming the tags that exist.
        hlines: Tag -> value of a horizontal reference line.
        title: Figure title.
    """
    plt = require_matplotlib()
    scalars = {label: read_scalars(path) for label, path in runs.items()}
    logged = sorted({tag for run in scalars.values() for tag in run})
    missing = [tag for tag in tags if not any(tag in run for run in scalars.values())]
    if missing:
        raise ValueError(f"No run logged {', '.join(missing)}; logged tags: {', '.join(logged)}")
    figure, axes = plt.subplots(1, len(tags), figsize=(4.6 * len(tags), 3.6), squeeze=False)
    for axis, tag in zip(axes[0], tags):
        for label, run in scalars.items():
            if tag in run:
                steps, values = zip(*run[tag])
                axis.plot(steps, values, marker="o", markersize=3, label=label)
        if hlines and tag in hlines:
            axis.axhline(hlines[tag], color="red", linestyle="--", linewidth=1, label="threshold")
        axis.set_title(tag)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        figure.suptitle(title)
    try:
        return save_figure(figure, out)
    finally:
        plt.close(figure)
