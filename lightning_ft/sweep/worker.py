"""A sweep worker: take the next waiting trial, run it in a child process, tell the study, repeat;
when none is waiting, wait for the running ones (retrying any whose worker dies) and stop.

Each trial is ``python -m lightning_ft.sweep.trial`` (a normal fit) with its own TensorBoard version
under the sweep directory and its output in ``<run>/trial_<n>.log``. A child that exits with an error
(a crash, an out-of-memory kill) fails its trial only; the worker goes on with the next.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lightning_ft.sweep.report import report
from lightning_ft.sweep.results import RunResult
from lightning_ft.sweep.space import overrides
from lightning_ft.sweep.study import (
    SweepSpec,
    claim_next,
    fail_stale_trials,
    heartbeat,
    require_optuna,
    run_name,
    tell,
    trial_id_of,
    worker_id,
)


def trial_fit_args(spec: SweepSpec, params: dict[str, Any], run: str, directory: Path) -> list[str]:
    """The fit command line of one trial: the sweep's, its budget and logger, then the trial's values."""
    logger = {"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(directory), "name": "", "version": run, "default_hp_metric": False}}
    return [*spec.fit_args, f"--trainer.max_steps={spec.max_steps}", "--trainer.max_epochs=-1",
            f"--trainer.default_root_dir={directory}", f"--trainer.logger={json.dumps(logger)}", *overrides(params)]


def _die_with_parent() -> None:
    # Linux: the trial process gets SIGKILL when its worker dies, so a killed worker leaves no orphan
    # still training (its trial is then stale, failed and retried by the next worker).
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def run_child(spec: SweepSpec, params: dict[str, Any], run: str, directory: Path, number: int) -> tuple[int, Path]:
    """Run one trial's process; returns its exit code and the path of the result it wrote on success."""
    run_dir = directory / run
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path = run_dir / f"result_{number:03d}.json"
    command = [sys.executable, "-m", "lightning_ft.sweep.trial", str(result_path),
               *([] if spec.prune else ["--no-prune"]), "--", *trial_fit_args(spec, params, run, directory)]
    with open(run_dir / f"trial_{number:03d}.log", "w") as log:
        child = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               preexec_fn=_die_with_parent if sys.platform == "linux" else None, check=False)
    return child.returncode, result_path


def work(study: Any, storage: Any, spec: SweepSpec, directory: Path, heartbeat_s: float) -> int:
    """Run trials until none is waiting or running; returns how many this worker ran."""
    optuna = require_optuna()
    grace = 4 * heartbeat_s
    done = 0
    while True:
        for number in fail_stale_trials(study, storage, spec, grace):
            print(f"lightning_ft sweep: trial {number} lost its worker: marked failed (and retried if allowed)")
        trial = claim_next(study, storage, spec)
        if trial is None:
            # Nothing waiting: stay while others run trials, to retry any whose worker dies, so that
            # every worker's report at its end covers the whole study.
            if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                return done
            time.sleep(min(heartbeat_s, 5.0))
            continue
        params = spec.search_space().suggest(trial)
        run = trial.user_attrs.get("run", run_name(trial.number))
        trial.set_user_attr("run", run)
        shown = ", ".join(f"{key}={value}" for key, value in params.items())
        print(f"lightning_ft sweep: trial {trial.number} ({shown}) started by {worker_id()} in {directory / run}",
              flush=True)
        started = time.perf_counter()
        with heartbeat(storage, trial_id_of(study, storage, trial.number), heartbeat_s):
            code, result_path = run_child(spec, params, run, directory, trial.number)
        if code == 0:
            result = RunResult(**json.loads(result_path.read_text()))
            tell(study, trial, result, spec)
            outcome = f"{result.state} after {result.steps} steps"
        else:
            trial.set_user_attr("failure", f"the trial process exited with code {code}: see {directory / run}")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            outcome = f"FAILED (exit code {code}; log in {directory / run})"
        print(f"lightning_ft sweep: trial {trial.number} {outcome} in {time.perf_counter() - started:.0f} s",
              flush=True)
        report(study, spec, directory, quiet=True)  # the table is current whenever someone looks
        done += 1


def start_workers(argv: list[str], count: int) -> list[subprocess.Popen]:
    """``count`` local worker processes running ``lightning_ft sweep`` with ``argv``: one GPU each when
    there are several (round-robin over ``CUDA_VISIBLE_DEVICES`` or all visible devices), an equal share
    of the CPU threads when there is no GPU."""
    import torch

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = visible.split(",") if visible else [str(d) for d in devices]
    workers = []
    for index in range(count):
        env = dict(os.environ)
        if len(devices) > 1:
            env["CUDA_VISIBLE_DEVICES"] = names[index % len(names)]
        elif not devices and "OMP_NUM_THREADS" not in env:
            # On CPUs the workers share the cores: N workers with all cores each would oversubscribe them.
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // count))
        workers.append(subprocess.Popen([sys.executable, "-m", "lightning_ft", "sweep", *argv], env=env))
    return workers
