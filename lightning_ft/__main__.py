"""``python -m lightning_ft`` runs the command-line interface."""

import sys

from lightning_ft.cli import console_main

sys.exit(console_main())
