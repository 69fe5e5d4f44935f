"""One trial's outcome, the recommendation, and the ``sweep.csv`` / ``sweep.json`` tables."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lightning_ft.atomic import write_text_atomic


@dataclass
class RunResult:
    """One trial's outcome. Forgetting is a drop (positive = worse than the base model).

    ``state`` is Optuna's: ``complete``, ``pruned`` (the forgetting alarm fired at ``pruned_at``),
    ``fail`` or ``running``; ``params`` holds the searched keys other than the learning rate.
    """

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
    max_kl: float | None = None
    within_thresholds: bool = True
    seconds: float = 0.0
    pareto: bool = False
    trial: int = 0
    state: str = "complete"
    budget_steps: int = 0
    pruned_at: int | None = None
    params: dict[str, Any] = field(default_factory=dict)

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

    def label(self) -> str:
        """``lr=0.0002`` plus the other searched keys, as the recommendation names a trial."""
        return ", ".join([f"lr={self.learning_rate:g}"] + [f"{key}={value}" for key, value in self.params.items()])


def recommend(results: list[RunResult]) -> tuple[RunResult | None, str]:
    """The best-adapting complete trial whose forgetting stayed within the thresholds, and a one-line reason."""
    results = [run for run in results if run.state == "complete"]
    if not results:
        return None, "no finished runs"
    adaptation = "task success" if results[0].success_rate is not None else "validation loss"
    within = [run for run in results if run.within_thresholds]
    if not within:
        least = min(results, key=lambda run: (run.forgetting(), run.learning_rate))
        return None, (f"no trial stayed within the forgetting thresholds; the least forgetting was at "
                      f"{least.label()} ({forgetting_text(least)}): try lower learning rates, replay "
                      "(data.replay_ratio) or a KL penalty (model.kl_beta)")
    best = max(within, key=lambda run: (run.adaptation(), -run.forgetting(), -run.learning_rate))
    shown = f"{best.success_rate:.1%}" if best.success_rate is not None else f"{best.val_loss:.4f}"
    return best, (f"{best.label()}: best {adaptation} ({shown}) of the {len(within)} of {len(results)} "
                  f"complete trials whose forgetting stayed within the thresholds ({forgetting_text(best)})")


def forgetting_text(run: RunResult) -> str:
    parts = []
    if run.acc_drop is not None:
        parts.append(f"accuracy drop {run.acc_drop:+.3f}")
    if run.kl_final is not None:
        parts.append(f"KL {run.kl_final:.3g}")
    return ", ".join(parts) or "no forgetting measured"


def write_tables(directory: Path, results: list[RunResult], recommended: RunResult | None, reason: str,
                 summary: dict[str, Any]) -> None:
    """``sweep.json`` (every field, the recommendation, the Pareto set, the study summary) and ``sweep.csv``."""
    rows = [asdict(run) for run in results]
    write_text_atomic(directory / "sweep.json", json.dumps({
        "runs": rows, "recommended_lr": recommended.learning_rate if recommended else None,
        "recommended_trial": recommended.trial if recommended else None, "reason": reason,
        "pareto_trials": [run.trial for run in results if run.pareto], **summary,
    }, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(RunResult)])
    writer.writeheader()
    writer.writerows({**row, "params": json.dumps(row["params"])} for row in rows)
    write_text_atomic(directory / "sweep.csv", buffer.getvalue())
