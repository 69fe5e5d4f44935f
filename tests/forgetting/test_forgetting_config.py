"""configs/forgetting_quickstart.yaml layers ForgettingCheck and a forgetting-aware checkpoint on the quickstart."""

from __future__ import annotations

from pathlib import Path

import pytest
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_ft import ForgettingCheck
from lightning_ft.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_forgetting_overlay_builds_the_callback_and_checkpoint_monitor(monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = main(["--config", "configs/quickstart.yaml", "--config", "configs/forgetting_quickstart.yaml"], run=False)
    checks = [c for c in cli.trainer.callbacks if isinstance(c, ForgettingCheck)]
    assert len(checks) == 1 and checks[0].max_accuracy_drop == 0.05 and checks[0].action == "warn"
    assert len(checks[0].probe.items) == 100 and len(checks[0].probe.conversations) == 4
    checkpoint = next(c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint))
    assert checkpoint.monitor == "forgetting/score" and checkpoint.mode == "max"


def test_a_typo_in_the_callback_arguments_fails(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        main(["--config", "configs/quickstart.yaml", "--trainer.callbacks+=lightning_ft.ForgettingCheck",
              "--trainer.callbacks.max_item=5"], run=False)
    assert "Option 'max_item' is not accepted" in capsys.readouterr().err
