"""``python -m lightning_ft`` runs the command-line interface."""

import sys

from lightning_ft.console import main

sys.exit(main())
