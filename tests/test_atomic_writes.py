"""Checkpoints and exports land complete or not at all: full disks, kills and the debris they leave."""

from __future__ import annotations

import errno
import os
import time

import pytest
import pytorch_lightning as pl
import torch
from helpers import write_chat_file
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_ft import ChatDataModule, FineTuneModule, LoRA
from lightning_ft.atomic import STAGING_PREFIX, clean_stale_staging
from lightning_ft.checkpoint_io import AtomicCheckpointIO


def _write_half_then_fill_the_disk(obj, path, *args, **kwargs):
    with open(path, "wb") as handle:
        handle.write(b"PK\x03\x04 half a checkpoint")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_leaves_no_file_under_the_final_name_and_keeps_the_earlier_one(tmp_path, monkeypatch):
    earlier = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, earlier)
    monkeypatch.setattr(torch, "save", _write_half_then_fill_the_disk)
    io = AtomicCheckpointIO()
    for name in ("last.ckpt", "epoch=0-step=4.ckpt"):
        with pytest.raises(OSError, match=rf"Could not write checkpoint .*{name} \(\[Errno 28\] No space left.*"
                                          "nothing was written under that name"):
            io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no staging debris, no truncated file
    assert torch.equal(torch.load(earlier, weights_only=True)["state_dict"]["w"], torch.ones(2))


def test_a_fit_that_runs_out_of_disk_fails_with_only_complete_checkpoints(tiny_model_dir, tmp_path, monkeypatch):
    real_save, saves = torch.save, []

    def save_until_full(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) > 2:
            return _write_half_then_fill_the_disk(obj, path)
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    module = FineTuneModule(tiny_model_dir, adapter=LoRA(r=4))
    data = ChatDataModule(write_chat_file(tmp_path / "train.jsonl", 16), tokenizer=tiny_model_dir, batch_size=2)
    checkpoints = tmp_path / "ckpt"
    trainer = pl.Trainer(max_steps=6, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path,
                         callbacks=[ModelCheckpoint(checkpoints, every_n_train_steps=1, save_top_k=-1)])
    with pytest.raises(OSError, match="No space left on device"):
        trainer.fit(module, data)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # installed by the module
    assert all(os.path.dirname(path) == str(checkpoints) for path in saves)  # staged beside, never in $TMPDIR
    files = sorted(p.name for p in checkpoints.iterdir())
    assert files == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"]
    for name in files:
        assert torch.load(checkpoints / name, weights_only=True)["global_step"] in (1, 2)


def test_stale_staging_of_dead_writers_is_removed_and_live_writers_are_kept(tmp_path):
    dead = tmp_path / f"{STAGING_PREFIX}999999999-SmolLM2.abc"  # no such process
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "model.safetensors").write_bytes(b"x" * 100)
    dead_file = tmp_path / f"{STAGING_PREFIX}999999999-last.ckpt.xyz.ckpt"
    dead_file.write_bytes(b"half")
    live = tmp_path / f"{STAGING_PREFIX}{os.getppid()}-last.ckpt.live.ckpt"  # the parent process is alive
    live.write_bytes(b"writing")
    old = time.time() - 3600
    for path in (dead, dead_file, live):
        os.utime(path, (old, old))
    fresh = tmp_path / f"{STAGING_PREFIX}999999998-new.ckpt"  # newer than this process: maybe a writer starting
    fresh.write_bytes(b"")
    other = tmp_path / "user-file.txt"
    other.write_text("mine")
    removed = clean_stale_staging(tmp_path)
    assert sorted(removed) == sorted([dead, dead_file])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, fresh.name, other.name])
