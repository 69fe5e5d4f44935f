"""One sweep trial in its own process, so a crash or an out-of-memory error is that trial's failure only.

``python -m lightning_ft.sweep.trial RESULT.json [--no-prune] -- FIT_ARGS...`` fine-tunes exactly like
``lightning_ft fit FIT_ARGS`` (resuming the run's ``last.ckpt`` when an earlier attempt was cut short),
validates the final weights and writes the outcome to ``RESULT.json``. With pruning on (the default) the
run stops at the check where the ``ForgettingCheck`` alarm fires.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from typing_extensions import override

from lightning_ft.callbacks.dashboard import TensorBoardDashboard
from lightning_ft.callbacks.forgetting import ForgettingCheck
from lightning_ft.callbacks.task_eval import TaskEval
from lightning_ft.sweep.results import RunResult, write_atomic


class PruneOnForgetting(pl.Callback):
    """Stop training at the check where ``ForgettingCheck`` records a crossed threshold (Optuna then marks
    the trial pruned): the remaining steps of a learning rate that already forgot are compute saved.

    Must come after the ``ForgettingCheck`` in ``trainer.callbacks`` (hooks run in list order).

    Example::

        check = ForgettingCheck(max_accuracy_drop=0.05)
        trainer = pl.Trainer(callbacks=[check, PruneOnForgetting(check)])

    Args:
        check: The forgetting check whose alarm prunes the run.
    """

    def __init__(self, check: ForgettingCheck) -> None:
        self.check = check
        #: The optimizer step at which the alarm stopped the run (``None`` while it has not).
        self.pruned_at: int | None = None

    def _stop_if_alarmed(self, trainer: pl.Trainer) -> None:
        history = self.check.history
        alarmed = len(history) > 1 and not history[-1].ok and self.pruned_at is None
        if trainer.strategy.reduce_boolean_decision(alarmed, all=False):
            self.pruned_at = history[-1].step
            trainer.should_stop = True

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._stop_if_alarmed(trainer)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._stop_if_alarmed(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"pruned_at": self.pruned_at}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pruned_at = state_dict["pruned_at"]


def build_cli(fit_args: list[str]) -> Any:
    """The fit configuration built (module, datamodule, trainer) without training or loading the model."""
    from lightning_ft.cli import main

    # LightningCLI warns when given args while sys.argv holds others (here: the sweep's own command line).
    saved, sys.argv = sys.argv, sys.argv[:1]
    try:
        return main(fit_args, run=False)
    finally:
        sys.argv = saved


def sweep_callbacks(trainer: pl.Trainer) -> tuple[ForgettingCheck | None, list[TaskEval]]:
    """The configuration's ``ForgettingCheck`` (the first, if several) and its ``TaskEval`` callbacks."""
    forgetting = [cb for cb in trainer.callbacks if isinstance(cb, ForgettingCheck)]
    return (forgetting[0] if forgetting else None), [cb for cb in trainer.callbacks if isinstance(cb, TaskEval)]


def run_trial(fit_args: list[str], prune: bool = True) -> RunResult:
    """Fine-tune one configuration and measure it (see the module docstring)."""
    cli = build_cli(fit_args)
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    forgetting, task_evals = sweep_callbacks(trainer)
    if forgetting is None:
        forgetting = ForgettingCheck()
        at = next((i for i, cb in enumerate(trainer.callbacks) if isinstance(cb, ModelCheckpoint)),
                  len(trainer.callbacks))
        trainer.callbacks.insert(at, forgetting)  # before checkpointing, which may monitor forgetting/score
    for callback in trainer.callbacks:
        if isinstance(callback, TensorBoardDashboard):
            callback.hparams = False  # _log_hparams writes the run's HParams entry, with its outcome
    pruner = PruneOnForgetting(forgetting)
    if prune:
        trainer.callbacks.insert(trainer.callbacks.index(forgetting) + 1, pruner)
    last = Path(trainer.logger.log_dir) / "checkpoints" / "last.ckpt"
    started = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if last.is_file() else None)
    val_loss = None
    if data.val_examples:
        # The final weights' loss, whatever the validation schedule of the config.
        val_loss = float(trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"])
    history, metric = forgetting.history, forgetting.metric
    base, final = history[0].metrics, history[-1].metrics
    kls = [record.metrics["kl"] for record in history if "kl" in record.metrics]
    result = RunResult(
        learning_rate=float(module.learning_rate), steps=trainer.global_step, val_loss=val_loss,
        acc_baseline=base.get(metric), acc_final=final.get(metric),
        acc_drop=base[metric] - final[metric] if metric in final else None,
        max_acc_drop=max(base[metric] - record.metrics[metric] for record in history) if metric in final else None,
        kl_final=final.get("kl"), max_kl=max(kls) if kls else None,
        within_thresholds=all(record.ok for record in history), seconds=time.perf_counter() - started,
        state="pruned" if pruner.pruned_at is not None else "complete", budget_steps=trainer.max_steps,
        pruned_at=pruner.pruned_at,
    )
    if task_evals:
        result.success_rate, result.success_baseline = task_evals[0].history[-1].success_rate, task_evals[0].baseline
    _log_hparams(trainer, result)
    return result


def _log_hparams(trainer: pl.Trainer, result: RunResult) -> None:
    """The trial's settings and outcome in TensorBoard's HParams view."""
    metrics = {f"sweep/{key}": value for key, value in (
        ("val_loss", result.val_loss), ("success_rate", result.success_rate), ("acc_drop", result.acc_drop),
        ("kl", result.kl_final), ("within_thresholds", float(result.within_thresholds)),
        ("pruned", float(result.pruned_at is not None))) if value is not None}
    trainer.logger.log_hyperparams({"learning_rate": result.learning_rate, "max_steps": result.budget_steps}, metrics)
    trainer.logger.finalize("success")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_ft.sweep.trial", description=__doc__.split("\n")[0])
    parser.add_argument("result", help="where the trial's outcome (JSON) is written")
    parser.add_argument("--no-prune", dest="prune", action="store_false", help="run on after a forgetting alarm")
    parser.add_argument("fit_args", nargs=argparse.REMAINDER, help="-- then the fit arguments")
    args = parser.parse_args(argv)
    fit_args = args.fit_args[1:] if args.fit_args[:1] == ["--"] else args.fit_args
    result = run_trial(fit_args, prune=args.prune)
    write_atomic(Path(args.result), json.dumps(asdict(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
