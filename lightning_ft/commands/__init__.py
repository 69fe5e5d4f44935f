"""Subcommands beyond Lightning's fit/validate/test/predict, registered in ``lightning_ft.cli.EXTRA_COMMANDS``.

Each module exposes ``run(argv) -> exit code`` (``generate`` also ``chat``) and is imported only when used.
"""
