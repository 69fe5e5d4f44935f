"""Real worker processes sharing one study: a four-trial grid run once each by two workers, and a worker
killed mid-trial whose trial a restarted worker retries. Slow: every trial process imports torch and
Lightning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import optuna
import pytest
from sweep_helpers import ROOT, sweep_fit_args

from lightning_ft.sweep.study import open_storage

pytestmark = pytest.mark.slow


def _worker(argv: list[str], log) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "lightning_ft", "sweep", *argv], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def _trials(sweep_dir):
    study = optuna.load_study(study_name=sweep_dir.name, storage=open_storage(sweep_dir))
    return study.get_trials()


def _finished_lrs(trials):
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return Counter(t.params["model.learning_rate"] for t in trials if t.state in done)


def test_two_workers_run_a_four_point_grid_each_trial_once(tiny_model_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    argv = [*sweep_fit_args(tiny_model_dir, tmp_path), "--dir", str(sweep_dir), "--lrs", "1e-6,1e-5,1e-4,0.05",
            "--max_steps", "2"]
    with open(tmp_path / "one.log", "w") as one, open(tmp_path / "two.log", "w") as two:
        workers = [_worker(argv, one), _worker(argv, two)]  # started at once: they race to create the study
        codes = [worker.wait(timeout=600) for worker in workers]
    logs = [(tmp_path / name).read_text() for name in ("one.log", "two.log")]
    assert codes == [0, 0], logs
    trials = _trials(sweep_dir)
    assert len(trials) == 4 and _finished_lrs(trials) == Counter({1e-6: 1, 1e-5: 1, 1e-4: 1, 0.05: 1})
    assert all(log.count("started by") >= 1 for log in logs)  # both workers took trials
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert sorted(row["learning_rate"] for row in summary["runs"]) == [1e-6, 1e-5, 1e-4, 0.05]
    forgetful = next(row for row in summary["runs"] if row["learning_rate"] == 0.05)
    assert forgetful["state"] == "pruned" and summary["recommended_lr"] in (1e-6, 1e-5, 1e-4)
    assert (sweep_dir / "sweep.png").stat().st_size > 0


def test_a_killed_workers_trial_is_retried_by_a_restarted_worker(tiny_model_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    argv = [*sweep_fit_args(tiny_model_dir, tmp_path), "--dir", str(sweep_dir), "--lrs", "1e-6,1e-5",
            "--max_steps", "2", "--heartbeat", "2"]
    with open(tmp_path / "killed.log", "w") as log:
        doomed = _worker(argv, log)
        deadline = time.monotonic() + 300
        while not list(sweep_dir.glob("trial_000/trial_000.log")):  # its first trial process has started
            assert time.monotonic() < deadline and doomed.poll() is None, (tmp_path / "killed.log").read_text()
            time.sleep(0.5)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
    assert [t.state for t in _trials(sweep_dir)][0] == optuna.trial.TrialState.RUNNING
    with open(tmp_path / "restarted.log", "w") as log:
        assert _worker(argv, log).wait(timeout=600) == 0, (tmp_path / "restarted.log").read_text()
    trials = _trials(sweep_dir)
    assert _finished_lrs(trials) == Counter({1e-6: 1, 1e-5: 1})
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert [t.number for t in failed] == [0] and "stopped while running it" in failed[0].user_attrs["failure"]
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 0)
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.user_attrs["run"] == "trial_000"
    assert len(json.loads((sweep_dir / "sweep.json").read_text())["runs"]) == 2
