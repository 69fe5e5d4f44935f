"""Learning-rate sweeps: short fine-tunes at several learning rates, adaptation against forgetting.

Each learning rate is a normal ``fit`` of the same configuration (run one after another in this
process) with its own TensorBoard version under the sweep directory. A run that finished wrote
``result.json`` and is not repeated when the sweep is restarted; an interrupted one resumes from its
``last.ckpt``. The table (``sweep.csv``, ``sweep.json``), the frontier plot (``sweep.png``) and the
recommendation are rebuilt from the results.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from lightning_ft.atomic import atomic_file

#: How far the default grid reaches either side of the centre learning rate (a factor of 10).
DEFAULT_SPAN = 10.0


def log_grid(center: float, points: int, span: float = DEFAULT_SPAN) -> list[float]:
    """``points`` learning rates log-spaced from ``center / span`` to ``center * span`` (3 significant digits)."""
    if points < 2:
        raise ValueError(f"points={points}: a sweep needs at least two learning rates")
    if center <= 0 or span <= 1:
        raise ValueError(f"the grid needs center > 0 and span > 1 (got center={center}, span={span})")
    low = math.log10(center / span)
    step = 2 * math.log10(span) / (points - 1)
    return [float(f"{10 ** (low + i * step):.3g}") for i in range(points)]


def parse_lrs(text: str) -> list[float]:
    """``"1e-5,1e-4,1e-3"`` -> sorted unique floats; every problem is an error naming the value."""
    values, problems = [], []
    for part in (piece.strip() for piece in text.split(",")):
        try:
            value = float(part)
        except ValueError:
            problems.append(f"{part!r} is not a number")
            continue
        if not value > 0 or math.isinf(value):
            problems.append(f"{part} is not a positive learning rate")
        values.append(value)
    if problems:
        raise ValueError(f"--lrs {text!r}: " + "; ".join(problems))
    values = sorted(set(values))
    if len(values) < 2:
        raise ValueError(f"--lrs {text!r}: a sweep needs at least two different learning rates")
    return values


def run_name(lr: float) -> str:
    """The run's directory (and TensorBoard version) name, e.g. ``lr_2.00e-04``."""
    return f"lr_{lr:.2e}"


@dataclass
class RunResult:
    """One learning rate's outcome. Forgetting is a drop (positive = worse than the base model)."""

    learning_rate: float
    steps: int
    val_loss: float | None
    success_rate: float | None = None
    success_baseline: float | None = None
    acc_baseline: float | None = None
    acc_final: float | None = None
    acc_drop: float | None = None
    max_acc_drop: float | None = None
    kl_final: float | None = None
    within_thresholds: bool = True
    seconds: float = 0.0
    pareto: bool = False

    def adaptation(self) -> float:
        """Higher is better: task success when measured, else minus the validation loss."""
        if self.success_rate is not None:
            return self.success_rate
        return -self.val_loss if self.val_loss is not None else -math.inf

    def forgetting(self) -> float:
        """Lower is better: the final accuracy drop when the benchmark ran, else the final KL."""
        if self.acc_drop is not None:
            return self.acc_drop
        return self.kl_final if self.kl_final is not None else 0.0


def mark_pareto(results: list[RunResult]) -> list[RunResult]:
    """Mark the runs no other run beats on both adaptation and forgetting (ties are not beaten)."""
    for run in results:
        run.pareto = not any(
            other.adaptation() >= run.adaptation() and other.forgetting() <= run.forgetting()
            and (other.adaptation() > run.adaptation() or other.forgetting() < run.forgetting())
            for other in results
        )
    return results


def recommend(results: list[RunResult]) -> tuple[RunResult | None, str]:
    """The best-adapting run whose forgetting stayed within the thresholds, and a one-line reason."""
    if not results:
        return None, "no finished runs"
    adaptation = "task success" if results[0].success_rate is not None else "validation loss"
    within = [run for run in results if run.within_thresholds]
    if not within:
        least = min(results, key=lambda run: (run.forgetting(), run.learning_rate))
        return None, (f"no learning rate stayed within the forgetting thresholds; the least forgetting was at "
                      f"lr={least.learning_rate:g} ({_forgetting_text(least)}): try lower learning rates, replay "
                      "(data.replay_ratio) or a KL penalty (model.kl_beta)")
    best = max(within, key=lambda run: (run.adaptation(), -run.forgetting(), -run.learning_rate))
    shown = f"{best.success_rate:.1%}" if best.success_rate is not None else f"{best.val_loss:.4f}"
    return best, (f"lr={best.learning_rate:g}: best {adaptation} ({shown}) of the {len(within)} of {len(results)} "
                  f"learning rates whose forgetting stayed within the thresholds ({_forgetting_text(best)})")


def _forgetting_text(run: RunResult) -> str:
    parts = []
    if run.acc_drop is not None:
        parts.append(f"accuracy drop {run.acc_drop:+.3f}")
    if run.kl_final is not None:
        parts.append(f"KL {run.kl_final:.3g}")
    return ", ".join(parts) or "no forgetting measured"


def fingerprint(fit_args: list[str], steps: int) -> str:
    """Identifies a sweep's configuration: restarting with other settings in the same directory is refused."""
    texts = []
    for arg in fit_args:
        path = Path(arg)
        texts.append(path.read_text() if arg.endswith((".yaml", ".yml", ".json")) and path.is_file() else arg)
    return hashlib.sha256(json.dumps([texts, steps]).encode()).hexdigest()[:16]


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory, renamed into place."""
    with atomic_file(path) as staging:
        staging.write_text(text)


def write_tables(directory: Path, results: list[RunResult], recommended: RunResult | None, reason: str) -> None:
    """``sweep.json`` (every field plus the recommendation) and ``sweep.csv`` (one row per learning rate)."""
    rows = [asdict(run) for run in results]
    write_atomic(directory / "sweep.json", json.dumps({
        "runs": rows, "recommended_lr": recommended.learning_rate if recommended else None, "reason": reason,
    }, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(RunResult)])
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(directory / "sweep.csv", buffer.getvalue())


def plot_frontier(results: list[RunResult], out: Path, recommended: RunResult | None,
                  max_drop: float | None = None) -> Path:
    """Adaptation against forgetting, one labelled point per learning rate, the Pareto frontier drawn."""
    from lightning_ft.plotting import require_matplotlib, save_figure

    plt = require_matplotlib()
    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    success = results[0].success_rate is not None
    ys = [run.success_rate if success else run.val_loss for run in results]
    xs = [run.forgetting() for run in results]
    axis.scatter(xs, ys, c=["tab:green" if run.within_thresholds else "tab:red" for run in results], zorder=3)
    for run, x, y in zip(results, xs, ys):
        axis.annotate(f"{run.learning_rate:.0e}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    frontier = sorted((x, y) for run, x, y in zip(results, xs, ys) if run.pareto)
    if len(frontier) > 1:
        axis.plot(*zip(*frontier), color="tab:blue", linewidth=1, label="Pareto frontier", zorder=2)
    if recommended is not None:
        axis.scatter([recommended.forgetting()], [recommended.success_rate if success else recommended.val_loss],
                     s=220, facecolors="none", edgecolors="black", label="recommended", zorder=4)
    uses_accuracy = results[0].acc_drop is not None
    if max_drop is not None and uses_accuracy:
        axis.axvline(max_drop, color="red", linestyle="--", linewidth=1, label="max_accuracy_drop")
    axis.set_xlabel("forgetting: benchmark accuracy drop" if uses_accuracy else "forgetting: KL from the base model")
    axis.set_ylabel("task success rate (higher is better)" if success else "validation loss (lower is better)")
    axis.set_title("Learning-rate sweep: adaptation vs forgetting (green: within thresholds)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    try:
        return save_figure(figure, out)
    finally:
        plt.close(figure)
