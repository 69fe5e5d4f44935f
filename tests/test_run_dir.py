"""Concurrent fits into one root get their own version_N; a fixed version held by another run is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import write_chat_file
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from lightning_ft.run_dir import CLAIM_FILE, RunDirectoryTaken, claim_run_directories

ROOT = Path(__file__).resolve().parents[1]


def _claim(logger):
    claim_run_directories(SimpleNamespace(loggers=[logger], callbacks=[]))
    return logger.version


def test_a_version_taken_between_listing_and_mkdir_moves_to_the_next(tmp_path):
    first, late = TensorBoardLogger(tmp_path), TensorBoardLogger(tmp_path)
    late._get_next_version = lambda: 0  # it listed the root before the other run made version_0
    claim_run_directories(SimpleNamespace(loggers=[first, late], callbacks=[]))
    assert not (tmp_path / "lightning_logs").exists()  # nothing is created before the run first writes
    assert first.version == 0
    assert late.version == 1
    assert _claim(CSVLogger(tmp_path, name="lightning_logs")) == 2
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0", "version_1", "version_2"]
    assert (tmp_path / "lightning_logs" / "version_1" / CLAIM_FILE).is_file()


def test_a_fixed_version_held_by_another_run_is_refused(tmp_path):
    assert _claim(TensorBoardLogger(tmp_path, version="mine")) == "mine"
    with pytest.raises(RunDirectoryTaken, match=r"lightning_logs/mine \(logger version 'mine'\) belongs to another "
                                                r"run \(pid \d+"):
        _claim(TensorBoardLogger(tmp_path, version="mine"))
    earlier = tmp_path / "lightning_logs" / "version_3"
    earlier.mkdir()
    (earlier / "hparams.yaml").write_text("{}")
    with pytest.raises(RunDirectoryTaken, match=r"already holds an earlier run \(hparams.yaml\)"):
        _claim(TensorBoardLogger(tmp_path, version=3))
    assert sorted(p.name for p in earlier.iterdir()) == ["hparams.yaml"]


def test_a_run_that_fails_before_writing_gives_its_directory_back(tmp_path):
    trainer = SimpleNamespace(loggers=[TensorBoardLogger(tmp_path / "runs")], callbacks=[])
    claim_run_directories(trainer)
    assert trainer.loggers[0].version == 0 and (tmp_path / "runs" / "lightning_logs" / "version_0").is_dir()
    trainer.callbacks[0].on_exception(trainer, None, ValueError("bad data"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow  # two CLI processes, each importing torch and Lightning
def test_two_concurrent_fits_in_one_root_get_distinct_versions(tiny_model_dir, tmp_path):
    root = tmp_path / "runs"
    args = [sys.executable, "-m", "lightning_ft", "fit", "--config", str(ROOT / "configs/quickstart.yaml"),
            "--model.model_name", tiny_model_dir, "--data.train_path", write_chat_file(tmp_path / "train.jsonl", 8),
            "--data.val_path", "null", "--data.batch_size", "2", "--trainer.max_steps", "2",
            "--trainer.default_root_dir", str(root), "--progress_bar.refresh_rate", "0"]
    runs = [subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read()[-2000:]
    versions = sorted(p.name for p in (root / "lightning_logs").iterdir())
    assert versions == ["version_0", "version_1"]
    for version in versions:
        run_dir = root / "lightning_logs" / version
        assert "last.ckpt" in {p.name for p in (run_dir / "checkpoints").iterdir()}
        assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
        assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
        assert (run_dir / "hf_model" / "adapter_model.safetensors").is_file()
