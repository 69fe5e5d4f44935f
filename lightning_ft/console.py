"""The ``lightning_ft`` console script: silence third-party noise first, then import the command-line interface.

What the command prints (noise filters, user errors as one line) lives in :mod:`lightning_ft.front_door`.
"""

from __future__ import annotations

# Kept importable from here, their former home.
from lightning_ft.front_door import (DEBUG_ENV, quiet_third_party, run_guarded, split_debug_flag,  # noqa: F401
                                     user_error_message)


def main(argv: list[str] | None = None) -> int:
    """The ``lightning_ft`` command (see :func:`lightning_ft.cli.console_main`).

    The order matters: importing the interface imports peft, which imports bitsandbytes, which logs at
    import time.
    """
    quiet_third_party()
    from lightning_ft.cli import console_main

    return console_main(argv)
