"""``lightning_ft fit|validate|test|predict --config ...``: LightningCLI with fine-tuning defaults."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import warnings
from typing import Any, Literal, Optional, Union

from pytorch_lightning import Callback, Trainer
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning_fabric.connector import _PRECISION_INPUT
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities import rank_zero_info

from lightning_ft.callbacks.dashboard import TensorBoardDashboard, tensorboard_logger
from lightning_ft.callbacks.export import SaveHFModel
from lightning_ft.callbacks.nonfinite import NonFiniteGuard
from lightning_ft.callbacks.preemption import SaveOnPreemption
from lightning_ft.callbacks.run_report import RunReport
from lightning_ft.data.datamodule import ChatDataModule
from lightning_ft.front_door import quiet_third_party, run_guarded
from lightning_ft.module import FineTuneModule
from lightning_ft.run_dir import claim_run_directories, continue_last_run
from lightning_ft.precision import resolve_precision
from lightning_ft.progress import choose_progress_bar, stdout_is_terminal


class FineTuneCLI(LightningCLI):
    """LightningCLI whose model and tokenizer settings flow into the datamodule through links, with whether the
    model's attention packs natively (``model.packs_natively()`` into ``data.packs_natively``).

    Always-on callbacks are configurable under their own keys: ``--checkpoint.*`` (ModelCheckpoint,
    keeps ``last.ckpt``), ``--lr_monitor.*``, ``--progress_bar.*``, ``--export.*`` (the Hugging
    Face output written at the end of ``fit``) and ``--nan_guard.*`` (skips non-finite steps). ``fit``
    claims its ``version_N`` log directory exclusively before writing anything. The rich progress bar
    becomes plain lines when stdout is not a terminal and goes away with ``--trainer.enable_progress_bar
    false``. Every run also gets a :class:`RunReport` (its plan and, at the end, what to run next), a
    :class:`TensorBoardDashboard` and, unless ``trainer.logger`` is set, a TensorBoard logger without the
    placeholder ``hp_metric``.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model_name", "data.tokenizer")
        parser.link_arguments("model.chat_template", "data.chat_template")
        if _takes(self.datamodule_class, "packs_natively") and hasattr(self.model_class, "packs_natively"):
            # Decided from the model's configuration once the module is built, before any weights load.
            parser.link_arguments("model", "data.packs_natively", compute_fn=_packs_natively, apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(RichProgressBar, "progress_bar")
        parser.add_lightning_class_args(SaveHFModel, "export")
        parser.add_lightning_class_args(NonFiniteGuard, "nan_guard")
        _allow_auto_precision(parser)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # Our commands pass args on purpose (the console's without --debug, a subcommand's with its own options
        # removed, a sweep's trials): LightningCLI's warning that sys.argv holds others is noise for them.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter")
            super().parse_arguments(parser, args)

    def before_fit(self) -> None:
        config = self.config_init[self.subcommand]
        continuing = False
        if config.get("ckpt_path") == "last":  # the newest unfinished run under default_root_dir, in its version_N
            config["ckpt_path"] = continue_last_run(self.trainer)
            continuing = config["ckpt_path"] not in (None, "last")
        claim_run_directories(self.trainer, continuing)  # two fits started together must not share a version_N

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config["trainer"].get("precision") == "auto":
            choice = resolve_precision(str(config["trainer"].get("accelerator") or "auto"))
            config["trainer"]["precision"] = choice.precision
            rank_zero_info(str(choice))

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        callbacks = choose_progress_bar(callbacks, config.get("enable_progress_bar") is not False, stdout_is_terminal())
        callbacks += [RunReport(), TensorBoardDashboard(), SaveOnPreemption()]
        if config.get("logger") in (None, True):
            config = {**config, "logger": tensorboard_logger(config.get("default_root_dir") or os.getcwd())}
        return super()._instantiate_trainer(config, callbacks)


def _takes(cls: type | None, name: str) -> bool:
    return cls is not None and name in inspect.signature(cls).parameters


def _packs_natively(model: Any) -> bool | None:
    try:
        return model.packs_natively()
    except OSError:  # no such model: left to the data module, whose tokenizer reports it in one line
        return None


def _allow_auto_precision(parser: LightningArgumentParser) -> None:
    """Let ``trainer.precision`` take ``auto`` (the default), which :meth:`FineTuneCLI.before_instantiate_classes`
    resolves with :func:`~lightning_ft.precision.resolve_precision` before the Trainer is built."""
    action = next(a for a in parser._actions if a.dest == "trainer.precision")
    # jsonargparse validates against this hint; Lightning's Literal has no "auto", so it is widened in place.
    action._typehint = Optional[Union[Literal["auto"], _PRECISION_INPUT]]
    parser.set_defaults({"trainer.precision": "auto"})


#: Subcommands beyond Lightning's fit/validate/test/predict: name -> function(argv) -> exit code.
#: Each lives in its own module under ``lightning_ft/commands`` and is imported only when used.
EXTRA_COMMANDS: dict[str, str] = {
    "check-data": "lightning_ft.commands.check_data:run",
    "generate": "lightning_ft.commands.generate:run",
    "chat": "lightning_ft.commands.generate:chat",
    "export": "lightning_ft.commands.export:run",
    "plot": "lightning_ft.commands.plot:run",
    "sweep": "lightning_ft.commands.sweep:run",
    "preference": "lightning_ft.commands.preference:run",
}


def main(args: list[str] | dict | None = None, run: bool = True, model_class: type = FineTuneModule,
         datamodule_class: type = ChatDataModule) -> FineTuneCLI:
    """Build (and by default run) the LightningCLI; returns it so programs can reuse what it built.

    Args:
        args: Command-line arguments (``None`` reads ``sys.argv``), or a config dict.
        run: ``False`` only parses and instantiates the module, datamodule and trainer, without training.
        model_class: The LightningModule the config describes (``lightning_ft preference`` passes its own).
        datamodule_class: The LightningDataModule the config describes.
    """
    return FineTuneCLI(
        model_class,
        datamodule_class,
        args=args,
        run=run,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        # The run report states the trainable parameters: Lightning's model summary table would repeat it.
        trainer_defaults={"default_root_dir": "runs", "log_every_n_steps": 5, "enable_model_summary": False},
    )


def console_main(argv: list[str] | None = None) -> int:
    """The ``lightning_ft`` command: an extra subcommand by name, else LightningCLI. Returns the exit code.

    Known third-party noise is silenced, and a user error (bad data, a bad value, a missing file, a model
    that cannot be found) prints as its message alone with exit code 1; ``--debug`` or
    ``LIGHTNING_FT_DEBUG=1`` shows the traceback.
    """
    quiet_third_party()

    def dispatch(args: list[str]) -> int:
        if args and args[0] in EXTRA_COMMANDS:
            module_name, function = EXTRA_COMMANDS[args[0]].split(":")
            return int(getattr(importlib.import_module(module_name), function)(args[1:]) or 0)
        main(args)
        return 0

    return run_guarded(dispatch, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(console_main())
