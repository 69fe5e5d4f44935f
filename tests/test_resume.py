"""Exact resume: a run interrupted mid-epoch continues with the same losses as an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
from checkpoint_signal import CHECKPOINTED
from helpers import write_chat_file, write_varied_chat_file

from lightning_ft import ChatDataModule, FineTuneModule, FullFineTune, LoRA

ROOT = Path(__file__).resolve().parents[1]


class LossRecorder(pl.Callback):
    """Records the loss of every step; optionally checkpoints and stops at ``interrupt_at`` (a crash)."""

    def __init__(self, interrupt_at=None, save_to=None):
        self.losses, self.interrupt_at, self.save_to = {}, interrupt_at, save_to

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(trainer.callback_metrics["train/loss"])
        if trainer.global_step == self.interrupt_at:
            trainer.save_checkpoint(self.save_to)  # where ModelCheckpoint(every_n_train_steps) saves
            trainer.should_stop = True


def run(model_dir, train, tmp_path, adapter, max_steps, ckpt_path=None, interrupt_at=None, save_to=None, **data_args):
    pl.seed_everything(7)
    recorder = LossRecorder(interrupt_at, save_to)
    module = FineTuneModule(model_dir, adapter=adapter(), learning_rate=1e-3)
    data = ChatDataModule(train, tokenizer=model_dir, batch_size=2, packs_natively=module.packs_natively(), **data_args)
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=[recorder])
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return recorder.losses, module


@pytest.mark.parametrize("adapter", [lambda: LoRA(r=4, dropout=0.1), lambda: FullFineTune()], ids=["lora", "full"])
def test_resume_mid_epoch_matches_uninterrupted_run(tiny_model_dir, tmp_path, adapter):
    train = write_chat_file(tmp_path / "train.jsonl", 20)  # 10 batches per epoch: step 7 is mid-epoch
    straight, _ = run(tiny_model_dir, train, tmp_path, adapter, max_steps=14)
    ckpt = tmp_path / "mid.ckpt"
    first, _ = run(tiny_model_dir, train, tmp_path, adapter, max_steps=14, interrupt_at=7, save_to=ckpt)
    resumed, module = run(tiny_model_dir, train, tmp_path, adapter, max_steps=14, ckpt_path=ckpt)
    assert sorted(resumed) == list(range(8, 15))  # continues at step 8, crosses into epoch 2
    assert sorted(first) == list(range(1, 8))
    for step in range(1, 8):
        assert first[step] == pytest.approx(straight[step], rel=1e-6)
    for step in resumed:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-4), step
    if module.adapter.method == "lora":  # the adapter is attached once, not twice
        assert sum("lora_A" in n for n, _ in module.named_parameters()) == 2 * 7  # 2 layers x 7 linear


@pytest.mark.parametrize("mode", ["packed", "grouped"])
def test_packed_and_grouped_runs_resume_exactly(tiny_model_dir, tmp_path, mode):
    train = write_varied_chat_file(tmp_path / "train.jsonl", 12)  # 6 batches per epoch: step 4 is mid-epoch
    settings = {"packing": False, "group_by_length": True} if mode == "grouped" else {}
    lora = lambda: LoRA(r=4, dropout=0.0)  # noqa: E731
    straight, _ = run(tiny_model_dir, train, tmp_path, lora, max_steps=8, **settings)
    ckpt = tmp_path / "mid.ckpt"
    run(tiny_model_dir, train, tmp_path, lora, max_steps=8, interrupt_at=4, save_to=ckpt, **settings)
    resumed, _ = run(tiny_model_dir, train, tmp_path, lora, max_steps=8, ckpt_path=ckpt, **settings)
    assert sorted(resumed) == list(range(5, 9))
    for step in resumed:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-4), step


@pytest.mark.slow  # two training processes, one after the other
def test_sigkilled_run_resumes_from_its_last_checkpoint(tiny_model_dir, tmp_path):
    root = tmp_path / "runs"
    args = [
        sys.executable, "-m", "lightning_ft", "fit", "--config", str(ROOT / "configs/quickstart.yaml"),
        "--model.model_name", tiny_model_dir, "--trainer.precision", "32-true",
        "--data.train_path", write_chat_file(tmp_path / "train.jsonl", 64), "--data.val_path", "null",
        "--data.batch_size", "2", "--trainer.max_steps", "400", "--trainer.default_root_dir", str(root),
        "--checkpoint.every_n_train_steps", "5", "--progress_bar.refresh_rate", "0",
    ]
    # The child announces each checkpoint on stdout (tests/checkpoint_signal.py): kill it right after one.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    announce = ["--trainer.callbacks+", "checkpoint_signal.AnnounceCheckpoint"]
    process = subprocess.Popen(args + announce, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=env)
    announced = next((line for line in process.stdout if line.startswith(CHECKPOINTED)), None)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stdout.close()
    assert announced is not None, "the run ended without announcing a checkpoint"
    last = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    import torch

    step = torch.load(last, weights_only=True)["global_step"]
    assert int(announced.split()[1]) <= step < 400  # (a later checkpoint may land before the kill)
    # kill -9 leaves no time to save: `--ckpt_path last` continues from the newest periodic checkpoint, in
    # the same run directory.
    resume = [a if a != "400" else str(step + 3) for a in args] + ["--ckpt_path", "last"]
    result = subprocess.run(resume, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Continuing the unfinished run" in result.stdout
    assert torch.load(last, weights_only=True)["global_step"] == step + 3
    assert not (root / "lightning_logs" / "version_1").exists()


def _logged_losses(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {event.step: event.value for event in events.Scalars("train/loss")}


def test_resume_from_model_checkpoint_through_the_cli_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    """The user's path: quickstart config (``max_epochs`` set, so Lightning builds the training loader before it
    restores its loop progress), a ``ModelCheckpoint(every_n_train_steps=2)`` file, ``fit --ckpt_path``."""
    import json

    from lightning_ft.cli import main

    train = tmp_path / "train.jsonl"  # answers of very different lengths: batches train different token counts
    train.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Count to {i}."},
        {"role": "assistant", "content": " ".join(str(k) for k in range(1 + 7 * (i % 5)))},
    ]}) + "\n" for i in range(25)))
    root = tmp_path / "runs"
    args = ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--model.model_name", tiny_model_dir,
            "--data.train_path", str(train), "--data.val_path", "null", "--data.batch_size", "4",
            "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0", "--seed_everything", "7",
            "--model.adapter.init_args.dropout", "0", "--model.learning_rate", "1e-3", "--trainer.max_steps", "5",
            "--checkpoint.every_n_train_steps", "2", "--checkpoint.save_top_k", "-1",
            "--progress_bar.refresh_rate", "0", "--trainer.default_root_dir", str(root)]
    main(args)
    ckpt = root / "lightning_logs" / "version_0" / "checkpoints" / "epoch=0-step=2.ckpt"
    main(args + ["--ckpt_path", str(ckpt)])
    straight = _logged_losses(root / "lightning_logs" / "version_0")
    resumed = _logged_losses(root / "lightning_logs" / "version_1")
    assert sorted(resumed) == [2, 3, 4]
    assert len({round(straight[step], 3) for step in straight}) == 5  # the steps really differ
    for step in resumed:
        assert resumed[step] == pytest.approx(straight[step], abs=1e-5), step


@pytest.mark.parametrize("mode", ["padded", "packed", "grouped"])
def test_streamed_runs_resume_exactly(tiny_model_dir, tmp_path, mode):
    """Streaming: a two-source mixture through a shuffle buffer; the checkpoint records the next batch's place
    in the stream, and the resumed run skips the consumed records (crossing into the next epoch too)."""
    write_varied_chat_file(tmp_path / "a.jsonl", 10)
    from helpers import write_chat_file as more

    more(tmp_path / "b.jsonl", 6, start=50)
    from lightning_ft.data.sources import Source

    sources = [Source(str(tmp_path / "a.jsonl"), weight=2), Source(str(tmp_path / "b.jsonl"), weight=1)]
    settings = {"packing": mode == "packed", "group_by_length": mode == "grouped", "streaming": True,
                "shuffle_buffer": 4, "sources": sources}
    lora = lambda: LoRA(r=4, dropout=0.0)  # noqa: E731
    straight, _ = run(tiny_model_dir, None, tmp_path, lora, max_steps=14, **settings)
    ckpt = tmp_path / "mid.ckpt"
    run(tiny_model_dir, None, tmp_path, lora, max_steps=14, interrupt_at=5, save_to=ckpt, **settings)
    import torch

    state = torch.load(ckpt, weights_only=True)["ChatDataModule"]
    assert state["stream_batch"] >= 1 and sum(state["examples_per_source"]) == 10  # 5 batches of 2 trained
    resumed, _ = run(tiny_model_dir, None, tmp_path, lora, max_steps=14, ckpt_path=ckpt, **settings)
    assert sorted(resumed) == list(range(6, 15))
    assert len({round(loss, 4) for loss in straight.values()}) > 5  # batches really differ
    for step in resumed:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-4), step
