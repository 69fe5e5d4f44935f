"""``sweep.png``: adaptation against forgetting, one labelled point per trial, the Pareto set joined."""

from __future__ import annotations

from pathlib import Path

from lightning_ft.sweep.results import RunResult


def plot_frontier(results: list[RunResult], out: Path, recommended: RunResult | None,
                  max_drop: float | None = None) -> Path:
    """Complete trials as dots (green within the thresholds, red not), pruned ones as red crosses."""
    from lightning_ft.plotting import require_matplotlib, save_figure

    plt = require_matplotlib()
    shown = [run for run in results if run.state in ("complete", "pruned") and (run.val_loss is not None
                                                                                 or run.success_rate is not None)]
    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    success = bool(shown) and shown[0].success_rate is not None

    def y(run: RunResult) -> float:
        return run.success_rate if success else run.val_loss

    for state, marker in (("complete", "o"), ("pruned", "x")):
        runs = [run for run in shown if run.state == state]
        if runs:
            axis.scatter([run.forgetting() for run in runs], [y(run) for run in runs], marker=marker, zorder=3,
                         c=["tab:green" if run.within_thresholds else "tab:red" for run in runs],
                         label="pruned (forgetting alarm)" if state == "pruned" else None)
    for run in shown:
        axis.annotate(f"{run.learning_rate:.0e}", (run.forgetting(), y(run)), textcoords="offset points",
                      xytext=(5, 5), fontsize=8)
    frontier = sorted((run.forgetting(), y(run)) for run in shown if run.pareto)
    if len(frontier) > 1:
        axis.plot(*zip(*frontier), color="tab:blue", linewidth=1, label="Pareto set", zorder=2)
    if recommended is not None:
        axis.scatter([recommended.forgetting()], [y(recommended)], s=220, facecolors="none", edgecolors="black",
                     label="recommended", zorder=4)
    uses_accuracy = any(run.acc_drop is not None for run in shown)
    if max_drop is not None and uses_accuracy:
        axis.axvline(max_drop, color="red", linestyle="--", linewidth=1, label="max_accuracy_drop")
    axis.set_xlabel("forgetting: benchmark accuracy drop" if uses_accuracy else "forgetting: KL from the base model")
    axis.set_ylabel("task success rate (higher is better)" if success else "validation loss (lower is better)")
    axis.set_title("Sweep: adaptation vs forgetting (green: within thresholds)")
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)
    try:
        return save_figure(figure, out)
    finally:
        plt.close(figure)
