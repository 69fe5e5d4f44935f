"""Plain progress lines: long set-up stages, and the progress bar chosen for the command."""

from __future__ import annotations

import re

import pytest
from pytorch_lightning.callbacks import RichProgressBar

from lightning_ft.callbacks.export import SaveHFModel
from lightning_ft.progress import PlainProgressBar, StageProgress, choose_progress_bar, format_duration, stage


def test_a_short_stage_says_nothing(capsys):
    progress = StageProgress("Tokenising", total=3, unit="conversations")
    for _ in range(3):
        progress.advance()
    progress.close()
    assert capsys.readouterr().out == ""


def test_a_long_stage_says_where_it_is_and_when_it_is_done(capsys):
    progress = StageProgress("Tokenising", total=4, unit="conversations", quiet_for=0.0, every=0.0)
    for _ in range(4):
        progress.advance()
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"Tokenising: 1/4 conversations \(25%, ETA \d+s\)", lines[0])
    assert re.fullmatch(r"Tokenising: done, 4 conversations in \d+s", lines[-1])
    with stage("Converting model.gguf"):
        pass
    assert re.fullmatch(r"Converting model.gguf \.\.\.\nConverting model.gguf: done in 0s\n", capsys.readouterr().out)


def test_durations_read_like_a_clock():
    assert [format_duration(s) for s in (4.4, 185, 3720)] == ["4s", "3m 05s", "1h 02m"]


def test_the_progress_bar_fits_the_terminal_and_the_setting():
    export = SaveHFModel()
    assert choose_progress_bar([RichProgressBar(), export], enabled=False, interactive=True) == [export]
    plain = choose_progress_bar([RichProgressBar(), export], enabled=True, interactive=False)
    assert isinstance(plain[0], PlainProgressBar) and plain[1] is export
    assert isinstance(choose_progress_bar([RichProgressBar()], enabled=True, interactive=True)[0], RichProgressBar)
    with pytest.raises(ValueError, match="every_n_steps=0 must be >= 1"):
        PlainProgressBar(every_n_steps=0)
