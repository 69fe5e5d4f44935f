"""The Optuna study behind a sweep: storage, one-time setup, claiming trials, heartbeats and stale trials.

Every worker runs the same code. The first to create the study enqueues the whole budget as waiting
trials (each grid point once, or ``n_trials`` empty trials a sampler fills in when they start) and then
records the sweep's settings; the others wait for those settings and check they run the same sweep.
Workers take waiting trials through the storage's atomic WAITING -> RUNNING transition, so no trial runs
twice. While a trial runs its worker beats (a user attribute with host, pid and time); a RUNNING trial
whose worker stopped beating (or, on this host, whose worker process is gone) is marked failed and
enqueued again with the same parameters, up to ``max_retries`` times.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from lightning_ft.sweep.results import RunResult
from lightning_ft.sweep.space import SearchSpace

#: The journal file that is the default storage, in the sweep directory.
JOURNAL = "study.journal"
#: Study user attribute holding the sweep's settings (written last by the creator: "set up").
SPEC_ATTR = "lightning_ft.sweep"
HEARTBEAT_ATTR = "heartbeat"
#: How long a joining worker waits for the creator to finish setting the study up.
SETUP_TIMEOUT_S = 120.0


def require_optuna() -> Any:
    """Import Optuna, or say which extra installs it."""
    try:
        import optuna
    except ImportError as error:
        raise ImportError("Sweeps need Optuna: pip install 'lightning_ft[sweep]'") from error
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_storage(directory: Path, url: str | None = None, create: bool = True) -> Any:
    """Optuna's journal file in ``directory`` by default, else ``url``: a database URL or a journal file path.

    The journal file takes Optuna's symlink lock, which is safe for many processes on one machine and
    over NFS (SQLite is not safe on NFS); a database URL (``postgresql://``, ``mysql://``) serves workers
    on several machines. ``create=False`` (reading a report) refuses a directory holding no journal.
    """
    optuna = require_optuna()
    from optuna.storages.journal import JournalFileBackend

    if url is None and not (directory / JOURNAL).is_file() and not create:
        raise ValueError(f"{directory}: no sweep here ({JOURNAL} is missing); pass --storage if it uses a database")
    if url is None or "://" not in url:
        path = Path(url) if url else directory / JOURNAL
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    return optuna.storages.RDBStorage(url)


@dataclass
class SweepSpec:
    """Everything every worker must agree on; stored in the study so ``--report`` needs no command line."""

    fingerprint: str
    fit_args: list[str]
    max_steps: int
    space: dict[str, Any]
    n_trials: int
    adaptation: str  # "val_loss" (minimised) or "success_rate" (maximised)
    max_accuracy_drop: float | None
    max_kl: float | None
    sampler: str
    seed: int
    prune: bool
    max_retries: int

    def search_space(self) -> SearchSpace:
        return SearchSpace.from_json(self.space)

    def directions(self) -> list[str]:
        return ["maximize" if self.adaptation == "success_rate" else "minimize", "minimize"]


def make_sampler(spec: SweepSpec, trial_number: int = 0) -> Any:
    """``GridSampler`` for a grid; else TPE or NSGA-II (both multi-objective and read ``trial.set_constraint``).

    Seeded per trial so that workers sampling at the same moment do not draw the same point.
    """
    optuna = require_optuna()
    space = spec.search_space()
    if space.is_grid:
        return optuna.samplers.GridSampler(space.choices, seed=spec.seed)
    seed = spec.seed * 100_003 + trial_number
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def open_study(storage: Any, name: str, spec: SweepSpec | None) -> tuple[Any, SweepSpec]:
    """Create the study (and enqueue its budget) or join it; ``spec=None`` only reads an existing one."""
    optuna = require_optuna()
    if spec is None:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError as error:
            raise ValueError(f"no sweep study named {name!r} in this storage") from error
        return study, _wait_for_spec(study, name)
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=spec.directions(),
                                    sampler=make_sampler(spec))
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(spec))
        stored = _wait_for_spec(study, name)
        if stored.fingerprint != spec.fingerprint:
            raise ValueError(f"the study {name!r} holds a sweep of another configuration, search space or step "
                             "budget: use another --dir (or --study), or remove that study") from None
        return study, stored
    space = spec.search_space()
    for point in space.grid_points() if space.is_grid else [{}] * spec.n_trials:
        study.enqueue_trial(point)
    study.set_user_attr(SPEC_ATTR, asdict(spec))
    return study, spec


def _wait_for_spec(study: Any, name: str) -> SweepSpec:
    deadline = time.monotonic() + SETUP_TIMEOUT_S
    while SPEC_ATTR not in study.user_attrs:
        if time.monotonic() > deadline:
            raise ValueError(f"the study {name!r} was never set up as a sweep (its creator stopped before "
                             "enqueueing the trials, or another program made it): remove it")
        time.sleep(0.5)
    return SweepSpec(**study.user_attrs[SPEC_ATTR])


def trial_id_of(study: Any, storage: Any, number: int) -> int:
    """The storage's id of the study's trial ``number`` (through the storage's public API)."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_next(study: Any, storage: Any, spec: SweepSpec) -> Any | None:
    """Take a waiting trial (atomically: exactly one worker wins each); ``None`` when none is left."""
    optuna = require_optuna()
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        trial_id = trial_id_of(study, storage, frozen.number)
        try:
            won = storage.set_trial_state_values(trial_id, optuna.trial.TrialState.RUNNING)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if won:
            storage.set_trial_user_attr(trial_id, HEARTBEAT_ATTR, {"worker": worker_id(), "time": time.time()})
            study.sampler = make_sampler(spec, frozen.number)
            study.sampler.before_trial(study, storage.get_trial(trial_id))
            return optuna.trial.Trial(study, trial_id)
    return None


@contextmanager
def heartbeat(storage: Any, trial_id: int, interval: float) -> Iterator[None]:
    """Record ``{"worker", "time"}`` on the trial every ``interval`` seconds while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            storage.set_trial_user_attr(trial_id, HEARTBEAT_ATTR, {"worker": worker_id(), "time": time.time()})

    thread = threading.Thread(target=beat, name="sweep-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _is_stale(trial: Any, grace: float) -> bool:
    beat = trial.user_attrs.get(HEARTBEAT_ATTR)
    if beat is None:  # its claimant writes the first beat right after winning it, unless it died between
        started = trial.datetime_start  # naive local time, as Optuna stores it
        return started is not None and (datetime.now() - started).total_seconds() > grace
    host, _, pid = beat["worker"].rpartition(":")
    if host == socket.gethostname() and not _process_alive(int(pid)):
        return True
    return time.time() - beat["time"] > grace


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_stale_trials(study: Any, storage: Any, spec: SweepSpec, grace: float) -> list[int]:
    """Mark RUNNING trials whose worker is gone as failed and enqueue their retries; returns their numbers."""
    optuna = require_optuna()
    failed = []
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not _is_stale(frozen, grace):
            continue
        trial_id = trial_id_of(study, storage, frozen.number)
        try:
            storage.set_trial_user_attr(trial_id, "failure", f"worker {frozen.user_attrs[HEARTBEAT_ATTR]['worker']} "
                                                             "stopped while running it")
            storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first (and enqueued the retry)
        failed.append(frozen.number)
        attempt = frozen.user_attrs.get("attempt", 1)
        if attempt <= spec.max_retries:
            params = {**frozen.system_attrs.get("fixed_params", {}), **frozen.params}
            study.enqueue_trial(params, user_attrs={"retry_of": frozen.number, "attempt": attempt + 1,
                                                    "run": frozen.user_attrs.get("run", run_name(frozen.number))})
    return failed


def run_name(number: int) -> str:
    """A trial's directory and TensorBoard version under the sweep directory (retries keep the first's)."""
    return f"trial_{number:03d}"


def tell(study: Any, trial: Any, result: RunResult, spec: SweepSpec) -> None:
    """Record the outcome: the two objectives, the forgetting thresholds as constraints, pruned or complete."""
    optuna = require_optuna()
    trial.set_user_attr("result", asdict(result))
    for key, value, limit in (("max_accuracy_drop", result.max_acc_drop, spec.max_accuracy_drop),
                              ("max_kl", result.max_kl, spec.max_kl)):
        if value is not None and limit is not None:
            excess = value - limit
            # ForgettingCheck allows 1e-9 of float noise: so does the constraint.
            trial.set_constraint(key, min(excess, 0.0) if excess <= 1e-9 else excess)
    if result.state == "pruned":
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return
    adaptation = result.success_rate if spec.adaptation == "success_rate" else result.val_loss
    study.tell(trial, values=[adaptation, result.forgetting()])
