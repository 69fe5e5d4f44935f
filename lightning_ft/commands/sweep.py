"""``lightning_ft sweep``: short fine-tunes at several learning rates, then adaptation against forgetting.

Takes the same ``--config`` and override keys as ``fit``, plus the options below::

    lightning_ft sweep --config configs/quickstart.yaml --lrs 5e-5,2e-4,1e-3 --max_steps 30
    lightning_ft sweep --config configs/quickstart.yaml --points 5 --dir runs/sweep   # 0.1x .. 10x the LR

Every learning rate is a normal ``fit`` of the configuration for ``--max_steps`` steps, one after another,
logged to TensorBoard under ``--dir`` (``tensorboard --logdir <dir>``; the HParams tab compares them). The
configuration's ``ForgettingCheck`` measures forgetting (a default one is added when it has none) and its
validation data and ``TaskEval``, if any, adaptation. Restarting the same sweep skips finished runs and
resumes an interrupted one. Exit code 0 with a recommendation, 1 on errors or when no learning rate kept
forgetting within the thresholds, 2 on a bad command line.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

from lightning_ft.sweep import (
    RunResult,
    fingerprint,
    log_grid,
    mark_pareto,
    parse_lrs,
    plot_frontier,
    recommend,
    run_name,
    write_atomic,
    write_tables,
)

PROG = "lightning_ft sweep"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False, description=__doc__.split("::")[0],
        epilog="Every other argument is a `lightning_ft fit` argument (--config FILE, --model.adapter, ...). "
               "The sweep sets model.learning_rate, trainer.max_steps and the TensorBoard logger of each run.")
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--lrs", default=None, metavar="LR,LR,...", help="explicit learning rates, comma-separated")
    grid.add_argument("--points", type=int, default=5,
                      help="log-spaced learning rates from 1/10 to 10x the config's (or the method's default) LR")
    parser.add_argument("--max_steps", type=int, default=40, help="optimizer steps per learning rate")
    parser.add_argument("--dir", default="runs/sweep", help="the sweep directory (runs, tables, plot)")
    return parser


def _fit_args(fit_args: list[str], lr: float | None, steps: int, directory: Path) -> list[str]:
    args = [*fit_args, f"--trainer.max_steps={steps}", "--trainer.max_epochs=-1",
            f"--trainer.default_root_dir={directory}"]
    if lr is None:
        return args
    logger = {"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(directory), "name": "", "version": run_name(lr),
                            "default_hp_metric": False}}
    return args + [f"--model.learning_rate={lr!r}", f"--trainer.logger={json.dumps(logger)}"]


def _build(fit_args: list[str], lr: float | None, steps: int, directory: Path) -> Any:
    from lightning_ft.cli import main

    # LightningCLI warns when given args while sys.argv holds others (here: the sweep's own command line).
    saved, sys.argv = sys.argv, sys.argv[:1]
    try:
        return main(_fit_args(fit_args, lr, steps, directory), run=False)
    finally:
        sys.argv = saved


def _callbacks(trainer: Any) -> tuple[Any, list[Any]]:
    from lightning_ft.callbacks.forgetting import ForgettingCheck
    from lightning_ft.callbacks.task_eval import TaskEval

    forgetting = [cb for cb in trainer.callbacks if isinstance(cb, ForgettingCheck)]
    return (forgetting[0] if forgetting else None), [cb for cb in trainer.callbacks if isinstance(cb, TaskEval)]


def check_config(fit_args: list[str], steps: int, directory: Path) -> tuple[float, float | None]:
    """Build the configuration once (no model is loaded) and fail before any run if it cannot be swept.

    Returns:
        The module's learning rate (the centre of the default grid) and the accuracy-drop threshold.
    """
    cli = _build(fit_args, None, steps, directory)
    data, (forgetting, task_evals) = cli.datamodule, _callbacks(cli.trainer)
    has_val = data.val_path is not None or data.val_fraction > 0
    if not has_val and not task_evals:
        raise ValueError("the configuration measures no adaptation: give the data a validation set "
                         "(data.val_path or data.val_fraction) or add a TaskEval callback")
    return float(cli.model.learning_rate), forgetting.max_accuracy_drop if forgetting is not None else 0.05


def run_one(fit_args: list[str], lr: float, steps: int, directory: Path) -> RunResult:
    """Fine-tune at one learning rate (resuming its ``last.ckpt`` if a previous attempt was cut short)."""
    from lightning_ft.callbacks.forgetting import ForgettingCheck
    from pytorch_lightning.callbacks import ModelCheckpoint

    from lightning_ft.callbacks.dashboard import TensorBoardDashboard

    cli = _build(fit_args, lr, steps, directory)
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    forgetting, task_evals = _callbacks(trainer)
    if forgetting is None:
        forgetting = ForgettingCheck()
        at = next((i for i, cb in enumerate(trainer.callbacks) if isinstance(cb, ModelCheckpoint)), len(trainer.callbacks))
        trainer.callbacks.insert(at, forgetting)  # before checkpointing, which may monitor forgetting/score
    for callback in trainer.callbacks:
        if isinstance(callback, TensorBoardDashboard):
            callback.hparams = False  # _log_hparams writes the run's HParams entry, with its outcome
    last = directory / run_name(lr) / "checkpoints" / "last.ckpt"
    started = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if last.is_file() else None)
    val_loss = None
    if data.val_examples:
        # The final weights' loss, whatever the validation schedule of the config.
        val_loss = float(trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"])
    history = forgetting.history
    base, final = history[0]["metrics"], history[-1]["metrics"]
    metric = forgetting.metric
    result = RunResult(
        learning_rate=lr, steps=trainer.global_step, val_loss=val_loss,
        acc_baseline=base.get(metric), acc_final=final.get(metric),
        acc_drop=base[metric] - final[metric] if metric in final else None,
        max_acc_drop=max(base[metric] - record["metrics"][metric] for record in history) if metric in final else None,
        kl_final=final.get("kl"), within_thresholds=all(record["ok"] for record in history),
        seconds=time.perf_counter() - started,
    )
    if task_evals:
        result.success_rate, result.success_baseline = task_evals[0].history[-1]["success_rate"], task_evals[0].baseline
    _log_hparams(trainer, result)
    del cli, trainer, module, data
    gc.collect()
    return result


def _log_hparams(trainer: Any, result: RunResult) -> None:
    """The run's learning rate and outcome in TensorBoard's HParams view."""
    metrics = {f"sweep/{key}": value for key, value in (
        ("val_loss", result.val_loss), ("success_rate", result.success_rate), ("acc_drop", result.acc_drop),
        ("kl", result.kl_final), ("within_thresholds", float(result.within_thresholds))) if value is not None}
    trainer.logger.log_hyperparams({"learning_rate": result.learning_rate, "max_steps": result.steps}, metrics)
    trainer.logger.finalize("success")


def _print_table(results: list[RunResult], recommended: RunResult | None, reason: str, directory: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Learning-rate sweep ({directory})", caption=reason)
    for column in ("lr", "steps", "val loss", "task success", "acc drop", "KL", "within", "Pareto"):
        table.add_column(column, justify="right", no_wrap=True)
    for run in results:
        star = " *" if recommended is run else ""
        table.add_row(
            f"{run.learning_rate:.2e}{star}", str(run.steps),
            "-" if run.val_loss is None else f"{run.val_loss:.4f}",
            "-" if run.success_rate is None else f"{run.success_rate:.1%}",
            "-" if run.acc_drop is None else f"{run.acc_drop:+.3f}",
            "-" if run.kl_final is None else f"{run.kl_final:.3g}",
            "yes" if run.within_thresholds else "[red]no[/red]", "yes" if run.pareto else "")
    Console().print(table)


def run(argv: list[str]) -> int:
    args, fit_args = _parser().parse_known_args(argv)
    directory = Path(args.dir)
    try:
        if args.max_steps < 1:
            raise ValueError(f"--max_steps {args.max_steps}: each run needs a budget of at least one step")
        center, max_drop = check_config(fit_args, args.max_steps, directory)
        lrs = parse_lrs(args.lrs) if args.lrs is not None else log_grid(center, args.points)
        spec = {"fingerprint": fingerprint(fit_args, args.max_steps), "fit_args": fit_args, "max_steps": args.max_steps}
        spec_file = directory / "sweep_spec.json"
        if spec_file.is_file() and json.loads(spec_file.read_text())["fingerprint"] != spec["fingerprint"]:
            raise ValueError(f"{directory} holds a sweep of another configuration or step budget: "
                             "use another --dir, or remove that directory")
        write_atomic(spec_file, json.dumps(spec, indent=2) + "\n")
    except (OSError, ValueError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    results = []
    for lr in lrs:
        done = directory / run_name(lr) / "result.json"
        if done.is_file():
            print(f"{PROG}: lr={lr:g} already finished ({done}), skipping")
            results.append(RunResult(**json.loads(done.read_text())))
            continue
        print(f"{PROG}: run {len(results) + 1}/{len(lrs)}, lr={lr:g}, {args.max_steps} steps")
        result = run_one(fit_args, lr, args.max_steps, directory)
        write_atomic(done, json.dumps(result.__dict__, indent=2) + "\n")
        results.append(result)
    mark_pareto(results)
    recommended, reason = recommend(results)
    write_tables(directory, results, recommended, reason)
    _print_table(results, recommended, reason, directory)
    try:
        print(f"Plot: {plot_frontier(results, directory / 'sweep.png', recommended, max_drop)}")
    except ImportError as error:
        print(f"{PROG}: no plot ({error})", file=sys.stderr)
    print(f"Recommended: {reason}" if recommended else f"No recommendation: {reason}")
    return 0 if recommended else 1
