"""Sweeps on Optuna: short fine-tunes across a search space, adaptation against forgetting.

- :mod:`~lightning_ft.sweep.space`: the learning-rate grid and YAML search spaces;
- :mod:`~lightning_ft.sweep.study`: the study (storage, setup, claiming trials, heartbeats, stale trials);
- :mod:`~lightning_ft.sweep.worker`: the loop a worker runs, one child process per trial;
- :mod:`~lightning_ft.sweep.trial`: the child (a ``fit``, pruned when forgetting's alarm fires);
- :mod:`~lightning_ft.sweep.results`, :mod:`~lightning_ft.sweep.report`, :mod:`~lightning_ft.sweep.frontier`:
  the table, the recommendation, the Pareto set and the plot, rebuilt from the study.

``lightning_ft sweep`` (:mod:`lightning_ft.commands.sweep`) is the command line.
"""

from lightning_ft.sweep.results import RunResult, recommend
from lightning_ft.sweep.space import SearchSpace, log_grid, parse_lrs, read_space

__all__ = ["RunResult", "SearchSpace", "log_grid", "parse_lrs", "read_space", "recommend"]
