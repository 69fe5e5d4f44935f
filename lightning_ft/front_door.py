"""What the ``lightning_ft`` command prints: third-party noise silenced, user errors as one message.

Both apply at the command's entry point only (:func:`lightning_ft.cli.console_main`, which the console
script :func:`lightning_ft.console.main` calls): a program that imports lightning_ft keeps every warning,
log record and traceback of its libraries.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable

#: ``LIGHTNING_FT_DEBUG=1`` (or ``--debug`` on the command line) shows the full traceback of a user error.
DEBUG_ENV = "LIGHTNING_FT_DEBUG"

#: Log records that tell a user of this command nothing they can act on, by logger and message start.
_NOISE_RECORDS = (
    ("lightning", "💡 Tip:"),  # LitLogger / litmodels advertising
    ("lightning", "GPU available:"),
    ("lightning", "TPU available:"),
    ("lightning", "HPU available:"),
    ("lightning", "Seed set to"),
    ("lightning", "Loading `train_dataloader` to estimate"),
    ("lightning", "Using bfloat16 Automatic Mixed Precision"),  # the run plan states the precision
    ("lightning", "Using 16bit Automatic Mixed Precision"),
    ("lightning", "`Trainer.fit` stopped:"),  # the run report says how the run ended
    ("lightning", "Saved the fine-tuned model in Hugging Face format"),  # the run report names it
    ("transformers", "`past_key_values`/`cache_params` are deprecated"),  # peft calls the old name
)
#: Warnings of libraries we call correctly, by message pattern (``warnings.filterwarnings`` syntax).
_NOISE_WARNINGS = (
    r".*`?isinstance\(treespec, LeafSpec\)`? is deprecated",  # Lightning's pytree helper on torch >= 2.10
    r".*is deprecated and will be removed in v\d",  # transformers FutureWarnings about its own internals
    r".*`torch_dtype` is deprecated",
    r".*`past_key_values` is deprecated",  # issued from torch's module call, so no module filter catches it
)


class _NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(record.name.replace("pytorch_lightning", "lightning").startswith(prefix)
                       and message.startswith(start) for prefix, start in _NOISE_RECORDS)


_NOISE = _NoiseFilter()


def quiet_third_party() -> None:
    """Silence the known third-party noise for this process (called by the command, never on import)."""
    # Both install the handlers the filter goes on.
    import pytorch_lightning  # noqa: F401
    from transformers.utils import logging as transformers_logging

    noise = _NOISE
    for name in ("pytorch_lightning", "lightning", "lightning_fabric", "lightning.pytorch",
                 "lightning.fabric", "transformers"):
        logger = logging.getLogger(name)
        logger.addFilter(noise)
        for handler in logger.handlers:
            handler.addFilter(noise)
    # Records of child loggers skip their parents' logger filters but pass the parents' handlers and the root's.
    for handler in logging.getLogger().handlers:
        handler.addFilter(noise)
    # bitsandbytes logs at import through a logger without handlers: its level is the only switch.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # The hub client's retry warnings for a model it cannot reach: the command says it in one line instead.
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    for pattern in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    transformers_logging.disable_progress_bar()  # "Loading weights" bars: the run report covers loading


def split_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """Remove ``--debug`` from the arguments; return them and whether tracebacks are wanted."""
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return [arg for arg in argv if arg != "--debug"], debug


def user_error_message(error: BaseException) -> str | None:
    """The one-line (or one-block) message for an error a user caused and can fix; ``None`` for a bug."""
    from lightning_ft.callbacks.nonfinite import NonFiniteTrainingError

    if isinstance(error, (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                          PermissionError, NonFiniteTrainingError)):
        return str(error) or type(error).__name__
    return None


def run_guarded(command: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run ``command(argv)``; a user error prints as its message alone on stderr and exits 1.

    ``--debug`` or ``LIGHTNING_FT_DEBUG=1`` re-raises it with the full traceback instead.
    """
    argv, debug = split_debug_flag(argv)
    try:
        return command(argv)
    except Exception as error:  # noqa: BLE001 - sorted into user errors and bugs just below
        message = user_error_message(error)
        if debug or message is None:
            raise
        sys.stdout.flush()
        print(f"error: {message}", file=sys.stderr)
        print(f"(--debug or {DEBUG_ENV}=1 shows the traceback)", file=sys.stderr)
        return 1
