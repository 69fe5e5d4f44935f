"""``python -m lightning_ft`` runs the command-line interface."""

from lightning_ft.cli import main

main()
