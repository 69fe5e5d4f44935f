"""``lightning_ft preference fit|validate|test|check-data``: the LightningCLI with the preference module and data.

Same options and subcommands as ``lightning_ft fit`` (trainer, checkpoint, export, callbacks such as
ForgettingCheck), with :class:`~lightning_ft.preference.PreferenceModule` under ``model`` and
:class:`~lightning_ft.preference.PreferenceDataModule` under ``data``::

    lightning_ft preference fit --config configs/preference_quickstart.yaml
    lightning_ft preference check-data --config configs/preference_quickstart.yaml --data.train_path pairs.jsonl

``lightning_ft check-data`` recognises a preference config by itself (see :func:`~lightning_ft.commands.check_pairs.is_preference_config`).
"""

from __future__ import annotations



def run(argv: list[str]) -> int:
    """Entry point of ``lightning_ft preference``; returns the exit code."""
    if argv and argv[0] == "check-data":
        from lightning_ft.commands.check_data import run as check_data

        return check_data(argv[1:], preference=True)
    from lightning_ft.cli import main
    from lightning_ft.commands.check_pairs import classes

    main(argv, **classes())
    return 0
