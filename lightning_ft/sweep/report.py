"""Everything a sweep reports, rebuilt from the study's trials at any time (also while workers run).

The table (``sweep.csv``, ``sweep.json``), the frontier plot (``sweep.png``), the Pareto set (Optuna's
``study.best_trials``: complete trials within the forgetting constraints that no other beats on both
objectives), the recommendation and the compute pruning saved.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning_ft.sweep.frontier import plot_frontier
from lightning_ft.sweep.results import RunResult, recommend, write_tables
from lightning_ft.sweep.space import LR_KEY
from lightning_ft.sweep.study import SweepSpec


def collect(study: Any) -> list[RunResult]:
    """One row per trial, latest attempt only: a failed trial that was retried gives way to its retry."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    pareto = {t.number for t in study.best_trials}
    rows = []
    for t in trials:
        if t.number in retried or t.state.name == "WAITING":
            continue
        params = {**t.system_attrs.get("fixed_params", {}), **t.params}
        if "result" in t.user_attrs:
            row = RunResult(**t.user_attrs["result"])
        else:  # running, or failed before it measured anything
            row = RunResult(learning_rate=params.get(LR_KEY, float("nan")), steps=0, val_loss=None,
                            within_thresholds=False)
        row.trial, row.state, row.pareto = t.number, t.state.name.lower(), t.number in pareto
        row.params = {key: value for key, value in params.items() if key != LR_KEY}
        rows.append(row)
    return sorted(rows, key=lambda row: (row.learning_rate, row.trial))


def summarize(study: Any, results: list[RunResult]) -> dict[str, Any]:
    """Trial counts by state, the study's wall time, and the optimizer steps pruning saved; the seconds saved
    are estimated as the mean fit time of the complete trials of the same budget minus each pruned one's."""
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    started = [t.datetime_start for t in study.get_trials(deepcopy=False) if t.datetime_start]
    ended = [t.datetime_complete for t in study.get_trials(deepcopy=False) if t.datetime_complete]
    measured = [run for run in results if run.state in ("complete", "pruned")]
    budget = sum(run.budget_steps for run in measured)
    saved = sum(run.budget_steps - run.steps for run in measured if run.state == "pruned")
    saved_s = sum(max(_mean_complete_seconds(measured, run.budget_steps) - run.seconds, 0.0)
                  for run in measured if run.state == "pruned")
    return {"trials": states,
            "wall_seconds": (max(ended) - min(started)).total_seconds() if started and ended else None,
            "steps_budget": budget, "steps_run": sum(run.steps for run in measured), "steps_saved": saved,
            "seconds_saved_estimate": round(saved_s, 1)}


def _mean_complete_seconds(runs: list[RunResult], budget: int) -> float:
    """What a trial of this budget costs when it runs to the end (its measured fit time; 0 if none did)."""
    seconds = [run.seconds for run in runs if run.state == "complete" and run.budget_steps == budget]
    return sum(seconds) / len(seconds) if seconds else 0.0


def report(study: Any, spec: SweepSpec, directory: Path, quiet: bool = False) -> tuple[RunResult | None, str]:
    """Write the table, JSON and plot into ``directory``, print them unless ``quiet``; returns the recommendation."""
    results = collect(study)
    recommended, reason = recommend(results)
    summary = summarize(study, results)
    write_tables(directory, results, recommended, reason, summary)
    plot = None
    if any(run.state in ("complete", "pruned") for run in results):
        try:
            plot = plot_frontier(results, directory / "sweep.png", recommended, spec.max_accuracy_drop)
        except ImportError as error:
            print(f"lightning_ft sweep: no plot ({error})", file=sys.stderr)
    if not quiet:
        _print(results, recommended, reason, summary, directory, plot)
    return recommended, reason


def _print(results: list[RunResult], recommended: RunResult | None, reason: str, summary: dict[str, Any],
           directory: Path, plot: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    extra = sorted({key for run in results for key in run.params})
    table = Table(title=f"Sweep ({directory})", caption=reason)
    for column in ("trial", "state", "lr", *extra, "steps", "val loss", "task success", "acc drop", "KL",
                   "within", "Pareto"):
        table.add_column(column, justify="right", no_wrap=True)
    for run in results:
        star = " *" if recommended is run else ""
        state = f"pruned@{run.pruned_at}" if run.state == "pruned" else run.state
        table.add_row(
            str(run.trial), state, f"{run.learning_rate:.2e}{star}", *(str(run.params.get(key, "-")) for key in extra),
            f"{run.steps}/{run.budget_steps}" if run.budget_steps else "-",
            "-" if run.val_loss is None else f"{run.val_loss:.4f}",
            "-" if run.success_rate is None else f"{run.success_rate:.1%}",
            "-" if run.acc_drop is None else f"{run.acc_drop:+.3f}",
            "-" if run.kl_final is None else f"{run.kl_final:.3g}",
            "yes" if run.within_thresholds else "[red]no[/red]", "yes" if run.pareto else "")
    # Not a terminal (a log file): wide enough that no column is cut to an ellipsis.
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    counts = ", ".join(f"{count} {state}" for state, count in sorted(summary["trials"].items()))
    wall = summary["wall_seconds"]
    print(f"Trials: {counts}; wall time {wall:.0f} s" if wall is not None else f"Trials: {counts}")
    if summary["steps_budget"]:
        print(f"Pruning saved {summary['steps_saved']} of {summary['steps_budget']} optimizer steps "
              f"({summary['steps_saved'] / summary['steps_budget']:.0%}, about {summary['seconds_saved_estimate']:.0f} s)")
    pareto = [run for run in results if run.pareto]
    print("Pareto set: " + ("; ".join(run.label() + f" (trial {run.trial})" for run in pareto) or "none yet"))
    print(f"Table: {directory / 'sweep.csv'}, {directory / 'sweep.json'}" + (f"; plot: {plot}" if plot else ""))
    print(f"Recommended: {reason}" if recommended else f"No recommendation: {reason}")
