"""A preempted run (SIGTERM, kill -9) continues with ``--ckpt_path last`` exactly where it stopped, in its own run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from checkpoint_signal import PAUSED
from helpers import write_varied_chat_file
from safetensors.torch import load_file

from lightning_ft.run_dir import FINISHED_FILE, unfinished_runs

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def fit_args(model_dir: str, train: str, root: Path, steps: int = 10) -> list[str]:
    return [sys.executable, "-m", "lightning_ft", "fit", "--config", str(ROOT / "configs/quickstart.yaml"),
            "--model.model_name", model_dir, "--trainer.precision", "32-true", "--data.train_path", train,
            "--data.val_path", "null", "--data.batch_size", "2", "--trainer.max_steps", str(steps),
            "--trainer.max_epochs", "-1", "--trainer.log_every_n_steps", "1", "--seed_everything", "7",
            "--model.learning_rate", "1e-3", "--checkpoint.every_n_train_steps", "100",
            "--progress_bar.refresh_rate", "0", "--trainer.default_root_dir", str(root)]


def stopped_after(args: list[str], step: int, signum: int = signal.SIGTERM) -> tuple[int, str]:
    """Run ``args``, send ``signum`` right after optimizer step ``step``; the exit status and stdout."""
    process = subprocess.Popen([*args, "--trainer.callbacks+", "checkpoint_signal.PauseAtStep",
                                "--trainer.callbacks.step", str(step)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(PAUSED):
            process.send_signal(signum)
    _, err = process.communicate(timeout=300)
    assert any(line.startswith(PAUSED) for line in lines), err[-3000:]
    return process.returncode, "".join(lines)


def run(args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def losses(run_dir: Path) -> dict[int, float]:
    return scalars(run_dir, "train/loss")


def adapter(root: Path) -> dict[str, torch.Tensor]:
    return load_file(next(root.rglob("adapter_model.safetensors")))


def event_dirs(root: Path) -> list[str]:
    return sorted({p.parent.relative_to(root).as_posix() for p in root.rglob("events.out.tfevents.*")})


@pytest.mark.slow  # three CLI processes
def test_sigterm_saves_the_step_and_ckpt_path_last_continues_it_exactly(tiny_model_dir, tmp_path):
    train = write_varied_chat_file(tmp_path / "train.jsonl", 24)  # 12 batches: steps train different lengths
    straight_root, root = tmp_path / "straight", tmp_path / "runs"
    forgetting = tmp_path / "forgetting.yaml"  # a check every 3 steps: its baseline and history must come back
    forgetting.write_text("trainer:\n  callbacks:\n    - class_path: lightning_ft.ForgettingCheck\n"
                          "      init_args: {max_items: 8, max_prompts: 2, every_n_steps: 3, max_time_share: null}\n")
    checks = ["--config", str(forgetting)]
    first = run(fit_args(tiny_model_dir, train, straight_root) + checks)
    assert "Forgetting baseline at step 0" in first.stdout + first.stderr
    code, printed = stopped_after(fit_args(tiny_model_dir, train, root) + checks, step=4)
    assert code == 143  # 128 + SIGTERM, as shells report it: no scheduler takes it for finished
    run_dir = root / "lightning_logs" / "version_0"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert f"Stopped by SIGTERM at step 4: saved {last}" in printed
    assert "--ckpt_path last" in printed.split("Continue with:")[1] and not (run_dir / FINISHED_FILE).exists()
    assert not list(root.rglob("adapter_model.safetensors"))  # no export of an unfinished run

    resumed = run(fit_args(tiny_model_dir, train, root) + checks + ["--ckpt_path", "last"])
    assert f"Continuing the unfinished run {run_dir} from last.ckpt" in resumed.stdout
    # The baseline came back from the checkpoint: neither measured nor read from the baseline cache.
    assert "Forgetting baseline" not in resumed.stdout + resumed.stderr
    assert event_dirs(root) == ["lightning_logs/version_0"]  # one TensorBoard run, continued
    straight, continued = losses(straight_root / "lightning_logs" / "version_0"), losses(run_dir)
    assert sorted(continued) == list(range(10)) and len({round(v, 4) for v in straight.values()}) > 5
    checked, straight_checks = scalars(run_dir, "forgetting/acc"), scalars(straight_root / "lightning_logs" /
                                                                        "version_0", "forgetting/acc")
    assert sorted(checked) == sorted(straight_checks) and 0 in checked and 6 in checked  # before and after
    assert checked == pytest.approx(straight_checks, abs=1e-6)
    for step in range(4, 10):  # the steps after the restart (logged at global steps 4..9)
        assert continued[step] == pytest.approx(straight[step], abs=1e-3), step
    expected, got = adapter(straight_root), adapter(root)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-4, rtol=0)
    assert (run_dir / FINISHED_FILE).exists() and unfinished_runs(root / "lightning_logs") == []
    again = run(fit_args(tiny_model_dir, train, root, steps=2) + ["--ckpt_path", "last"])
    assert "No unfinished run under" in again.stdout  # a finished run is never continued
    assert (root / "lightning_logs" / "version_1" / FINISHED_FILE).exists()


@pytest.mark.slow  # two CLI processes
def test_sigint_saves_too_and_exits_non_zero(tiny_model_dir, tmp_path):
    train = write_varied_chat_file(tmp_path / "train.jsonl", 24)
    code, printed = stopped_after(fit_args(tiny_model_dir, train, tmp_path), step=2, signum=signal.SIGINT)
    assert code == 130 and "Stopped by SIGINT at step 2" in printed
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2


def test_the_newest_unfinished_run_is_the_one_continued(tmp_path):
    def make(version: int, finished: bool, mtime: int) -> Path:
        checkpoint = tmp_path / f"version_{version}" / "checkpoints" / "last.ckpt"
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(b"x")
        os.utime(checkpoint, (mtime, mtime))
        if finished:
            (tmp_path / f"version_{version}" / FINISHED_FILE).write_text("step 10\n")
        return checkpoint

    older, newer = make(0, False, 1_000), make(1, False, 2_000)
    make(2, True, 3_000)  # finished later: never a candidate
    (tmp_path / "version_3").mkdir()  # nothing saved yet
    assert unfinished_runs(tmp_path) == [(newer.parents[1], newer), (older.parents[1], older)]
    step = tmp_path / "version_1" / "checkpoints" / "epoch=0-step=30.ckpt"
    step.write_bytes(b"x")
    os.utime(step, (2_500, 2_500))
    assert unfinished_runs(tmp_path)[0] == (newer.parents[1], step)  # its newest checkpoint


class SignalAt(pl.Callback):
    """Send this process ``signum`` during optimizer step ``step`` (as SLURM or a scheduler would)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_the_requeue_signal_saves_the_step_in_a_plain_trainer(tiny_model_dir, tmp_path):
    """SLURM's requeue signal (SIGUSR1 unless the SLURM environment names another) stops after the step in
    flight and saves it, from a user's own Trainer too; the exit status says which signal."""
    from lightning_ft import ChatDataModule, FineTuneModule, LoRA, SaveOnPreemption

    module = FineTuneModule(tiny_model_dir, adapter=LoRA(r=4), learning_rate=1e-3)
    data = ChatDataModule(write_varied_chat_file(tmp_path / "train.jsonl", 12), tokenizer=tiny_model_dir,
                          batch_size=2, packs_natively=module.packs_natively())
    saving = SaveOnPreemption()
    trainer = pl.Trainer(max_steps=6, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[saving, SignalAt(2, signal.SIGUSR1)])
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(SystemExit) as stopped:
        trainer.fit(module, data)
    assert stopped.value.code == 128 + signal.SIGUSR1 and trainer.global_step == 2
    assert torch.load(saving.saved, weights_only=True)["global_step"] == 2
    assert Path(saving.saved).name == "last.ckpt" and signal.getsignal(signal.SIGUSR1) == before
