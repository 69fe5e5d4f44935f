"""Open TensorBoard on what matters: a custom-scalars layout and an HParams entry written with every run."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_ft.callbacks.forgetting import ForgettingCheck
from lightning_ft.callbacks.task_eval import TaskEval


def tensorboard_logger(save_dir: str) -> TensorBoardLogger:
    """The Trainer's default TensorBoard logger, without the placeholder ``hp_metric`` (-1) it would log."""
    return TensorBoardLogger(save_dir=save_dir, version=SLURMEnvironment.job_id(), default_hp_metric=False)


def _exact(*tags: str) -> list[str]:
    # Multiline charts take regular expressions: anchor them so train/loss does not also catch train/loss_x.
    return [f"^{tag}$" for tag in tags]


def dashboard_layout(callbacks: list[pl.Callback]) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout for a run with these callbacks: ``{category: {title: ["Multiline", tags]}}``."""
    layout: dict[str, dict[str, list[Any]]] = {
        "1 training": {
            "loss: train and validation": ["Multiline", _exact("train/loss", "val/loss")],
            "tokens per second": ["Multiline", _exact("train/tokens_per_sec")],
            "learning rate": ["Multiline", ["^lr-.*"]],
        }
    }
    for check in (cb for cb in callbacks if isinstance(cb, ForgettingCheck)):
        charts = layout.setdefault("2 forgetting", {})
        if check.probe.items:
            title = f"{check.metric}: now, base model" + (", alarm" if check.max_accuracy_drop is not None else "")
            charts[title] = ["Multiline", _exact(
                f"forgetting/{check.metric}", f"forgetting/{check.metric}_baseline", f"forgetting/{check.metric}_alarm")]
        if check.probe.conversations:
            title = "KL from the base model" + (", alarm" if check.max_kl is not None else "")
            charts[title] = ["Multiline", _exact("forgetting/kl", "forgetting/kl_alarm")]
    for task in (cb for cb in callbacks if isinstance(cb, TaskEval)):
        layout.setdefault("3 task", {})[f"{task.name}: success, base model"] = ["Multiline", _exact(
            f"{task.name}/success_rate", f"{task.name}/success_baseline")]
    return layout


def _key_settings(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    """What tells runs apart in the HParams table: method, rank, learning rate, epochs, steps.

    Five on purpose: the table shows the first five settings (alphabetically) before its metric columns;
    everything else is in the run's ``hparams.yaml`` and ``config.yaml``.
    """
    hparams = getattr(pl_module, "hparams", {})
    adapter = getattr(pl_module, "adapter", None)
    return {
        "method": type(getattr(adapter, "config", adapter)).__name__ if adapter is not None else "custom",
        "rank": int(getattr(adapter, "r", 0) or 0),
        "learning_rate": float(hparams.get("learning_rate", getattr(pl_module, "learning_rate", 0.0)) or 0.0),
        "epochs": int(trainer.max_epochs or 0),
        "max_steps": int(trainer.max_steps),
    }


def _result_tags(callbacks: list[pl.Callback]) -> list[str]:
    tags = ["train/loss", "val/loss"]
    for check in (cb for cb in callbacks if isinstance(cb, ForgettingCheck)):
        if check.probe.items:
            tags += [f"forgetting/{check.metric}", f"forgetting/{check.metric}_delta"]
        if check.probe.conversations:
            tags.append("forgetting/kl")
    for task in (cb for cb in callbacks if isinstance(cb, TaskEval)):
        tags += [f"{task.name}/success_rate", f"{task.name}/success_delta"]
    return tags


class TensorBoardDashboard(pl.Callback):
    """Write a custom-scalars layout and an HParams entry to every TensorBoard logger when ``fit`` starts.

    The CUSTOM SCALARS tab then opens on training and validation loss in one chart, tokens/s, the
    learning rate, forgetting accuracy against its baseline and alarm line and KL against its alarm
    (with a :class:`ForgettingCheck`), and task success against the base model's (with a
    :class:`TaskEval`). The HPARAMS tab lists method, LoRA rank, learning rate, epochs and steps next
    to the last logged loss, forgetting and task metrics, one row per run.
    Pair it with ``TensorBoardLogger(default_hp_metric=False)`` (the ``lightning_ft`` command does), so
    the table has no placeholder ``hp_metric``.

    Example::

        logger = TensorBoardLogger("runs", default_hp_metric=False)
        trainer = pl.Trainer(logger=logger, callbacks=[ForgettingCheck(), TensorBoardDashboard()])

    Args:
        hparams: Write the HParams entry. TensorBoard shows a run's first entry only: turn this off when
            something else writes one (``lightning_ft sweep`` does, with each run's outcome).
    """

    def __init__(self, hparams: bool = True) -> None:
        self.hparams = hparams

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        boards = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if trainer.global_rank != 0 or not boards:
            return
        from torch.utils.tensorboard.summary import hparams

        layout = dashboard_layout(trainer.callbacks)
        # The plugin reads each metric's value from the run's scalars of that tag: these zeros are never shown.
        experiment, start, end = hparams(_key_settings(trainer, pl_module), dict.fromkeys(_result_tags(trainer.callbacks), 0.0))
        for board in boards:
            board.experiment.add_custom_scalars(layout)
            if self.hparams:
                writer = board.experiment._get_file_writer()  # as Lightning's own log_hyperparams does
                for summary in (experiment, start, end):
                    writer.add_summary(summary)
            board.experiment.flush()
