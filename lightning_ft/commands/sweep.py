"""``lightning_ft sweep``: short fine-tunes across a search space, adaptation against forgetting, on Optuna.

Takes the same ``--config`` and override keys as ``fit``, plus the options below::

    lightning_ft sweep --config configs/quickstart.yaml --lrs 5e-5,2e-4,1e-3 --max_steps 30 --workers 2
    lightning_ft sweep --config configs/quickstart.yaml --space configs/sweep_space.yaml --trials 12
    lightning_ft sweep --dir runs/sweep --report      # the table, plot and recommendation, any time

The sweep is an Optuna study stored in ``--dir`` (a journal file) or ``--storage URL``. Every worker
started with the same command line, on this machine or another, joins it and takes the next trial;
each trial is a normal ``fit`` in its own process, logged to TensorBoard under ``--dir``. A trial whose
``ForgettingCheck`` alarm fires is pruned at that check. Exit code 0 with a recommendation, 1 on
errors or when no trial kept forgetting within the thresholds, 2 on a bad command line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from lightning_ft.sweep.space import LR_KEY, SearchSpace, log_grid, overrides, parse_lrs, read_space

PROG = "lightning_ft sweep"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False, description=__doc__.split("::")[0],
        epilog="Every other argument is a `lightning_ft fit` argument (--config FILE, --model.adapter, ...). "
               "The sweep sets trainer.max_steps, the TensorBoard logger and the searched keys of each trial.")
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--lrs", default=None, metavar="LR,LR,...", help="explicit learning rates, comma-separated")
    grid.add_argument("--points", type=int, default=None,
                      help="log-spaced learning rates from 1/10 to 10x the config's LR (default 5 without --space)")
    parser.add_argument("--space", default=None, metavar="YAML",
                        help="search space: fit keys -> list (grid/categorical) or {low, high, log, step}")
    parser.add_argument("--trials", type=int, default=12, help="trials of a sampled (non-grid) search space")
    parser.add_argument("--sampler", choices=("tpe", "nsga2", "random"), default="tpe",
                        help="multi-objective sampler of a non-grid space (a grid uses Optuna's GridSampler)")
    parser.add_argument("--max_steps", type=int, default=40, help="optimizer steps per trial")
    parser.add_argument("--dir", default="runs/sweep", help="the sweep directory (runs, study journal, tables, plot)")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="shared Optuna storage (postgresql://..., mysql://..., or a journal file path)")
    parser.add_argument("--study", default=None, help="study name in the storage (default: the --dir name)")
    parser.add_argument("--workers", type=int, default=1, help="local worker processes (one GPU each if several)")
    parser.add_argument("--no-prune", dest="prune", action="store_false",
                        help="run every trial to its last step even after a forgetting alarm")
    parser.add_argument("--max_retries", type=int, default=1, help="retries of a trial whose worker died")
    parser.add_argument("--heartbeat", type=float, default=30.0,
                        help="seconds between a worker's heartbeats; 4 missed ones mark its trial stale")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    parser.add_argument("--report", action="store_true", help="only print and write the study's current results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # started by --workers
    return parser


def check_config(fit_args: list[str], steps: int, directory: Path) -> dict[str, Any]:
    """Build the configuration once (no model is loaded) and fail before any run if it cannot be swept.

    Returns:
        The module's learning rate (the centre of the default grid), the adaptation objective and the
        forgetting thresholds.
    """
    from lightning_ft.sweep.trial import build_cli, sweep_callbacks

    cli = build_cli([*fit_args, f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={directory}"])
    data, (forgetting, task_evals) = cli.datamodule, sweep_callbacks(cli.trainer)
    has_val = data.val_path is not None or data.val_fraction > 0
    if not has_val and not task_evals:
        raise ValueError("the configuration measures no adaptation: give the data a validation set "
                         "(data.val_path or data.val_fraction) or add a TaskEval callback")
    max_drop, max_kl = (forgetting.max_accuracy_drop, forgetting.max_kl) if forgetting is not None else (0.05, None)
    return {"center": float(cli.model.learning_rate), "adaptation": "success_rate" if task_evals else "val_loss",
            "max_accuracy_drop": max_drop, "max_kl": max_kl}


def check_space_keys(fit_args: list[str], space: SearchSpace, source: str) -> None:
    """Every key of the search space must be a setting of the fit configuration (one point is parsed)."""
    from lightning_ft.sweep.trial import build_cli

    try:
        build_cli([*fit_args, *overrides(space.example())])
    except SystemExit as error:
        raise ValueError(f"{source}: the fit configuration refuses a key or value of the search space "
                         f"(see the error above): {', '.join(space.example())}") from error


def build_space(args: argparse.Namespace, center: float) -> SearchSpace:
    """The learning-rate grid (``--lrs``/``--points``) joined with the ``--space`` file's keys."""
    space = read_space(args.space) if args.space else SearchSpace()
    if LR_KEY in space.choices or LR_KEY in space.ranges:
        if args.lrs is not None or args.points is not None:
            raise ValueError(f"{args.space} sets {LR_KEY}: drop --lrs/--points, or the key from the file")
        return space
    if args.space and args.lrs is None and args.points is None:
        return space  # the learning rate stays the config's
    lrs = parse_lrs(args.lrs) if args.lrs is not None else log_grid(center, 5 if args.points is None else args.points)
    return SearchSpace({LR_KEY: lrs, **space.choices}, space.ranges)


def fingerprint(fit_args: list[str], settings: dict[str, Any]) -> str:
    """Identifies a sweep: joining a study of other settings is refused (config files count by content)."""
    texts = []
    for arg in fit_args:
        path = Path(arg)
        texts.append(path.read_text() if arg.endswith((".yaml", ".yml", ".json")) and path.is_file() else arg)
    return hashlib.sha256(json.dumps([texts, settings], sort_keys=True).encode()).hexdigest()[:16]


def _make_spec(args: argparse.Namespace, fit_args: list[str], directory: Path) -> Any:
    from lightning_ft.sweep.study import SweepSpec

    problems = [f"--{name} {value}: {rule}" for name, value, ok, rule in (
        ("max_steps", args.max_steps, args.max_steps >= 1, "each run needs a budget of at least one step"),
        ("trials", args.trials, args.trials >= 1, "a sampled search needs at least one trial"),
        ("workers", args.workers, args.workers >= 1, "at least one worker"),
        ("max_retries", args.max_retries, args.max_retries >= 0, "must be >= 0"),
        ("heartbeat", args.heartbeat, args.heartbeat > 0, "must be > 0 seconds")) if not ok]
    if problems:
        raise ValueError("; ".join(problems))
    checked = check_config(fit_args, args.max_steps, directory)
    space = build_space(args, checked["center"])
    if not space.choices and not space.ranges:
        raise ValueError(f"{args.space}: the search space is empty")
    if args.space:
        check_space_keys(fit_args, space, args.space)
    settings = {"max_steps": args.max_steps, "space": space.to_json(), "n_trials": args.trials,
                "sampler": args.sampler, "seed": args.seed, "prune": args.prune, "max_retries": args.max_retries}
    return SweepSpec(fingerprint=fingerprint(fit_args, settings), fit_args=fit_args,
                     adaptation=checked["adaptation"], max_accuracy_drop=checked["max_accuracy_drop"],
                     max_kl=checked["max_kl"], **settings)


def run(argv: list[str]) -> int:
    args, fit_args = _parser().parse_known_args(argv)
    directory = Path(args.dir)
    name = args.study or directory.resolve().name
    try:
        from lightning_ft.sweep.report import report
        from lightning_ft.sweep.study import open_storage, open_study
        from lightning_ft.sweep.worker import start_workers, work

        if args.report:
            study, spec = open_study(open_storage(directory, args.storage, create=False), name, None)
        else:
            spec = _make_spec(args, fit_args, directory)  # every check before anything is written
            storage = open_storage(directory, args.storage)
            study, spec = open_study(storage, name, spec)
            if args.workers > 1:
                children = start_workers([*without_workers(argv), "--worker"], args.workers)
                failed = [child.args for child in children if child.wait() != 0]
                if failed:
                    print(f"{PROG}: {len(failed)} worker(s) exited with an error", file=sys.stderr)
            else:
                work(study, storage, spec, directory, args.heartbeat)
            if args.worker:
                return 0
        recommended, _ = report(study, spec, directory)
    except (OSError, ValueError, ImportError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    return 0 if recommended else 1


def without_workers(argv: list[str]) -> list[str]:
    """The command line minus ``--workers N`` (each started worker is one worker)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out
