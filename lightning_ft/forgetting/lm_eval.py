"""Optional backend: named lm-evaluation-harness tasks on the in-memory model (``pip install lightning_ft[lm-eval]``).

``lm_eval`` is imported only here and only when tasks are requested. The model is wrapped as
``HFLM(pretrained=model, tokenizer=tokenizer)``: no copy, no reload, adapters included. lm-eval seeds
Python's, NumPy's and torch's global generators by default; that would reset the training run's data
order and dropout mid-fit, so those seeds are left alone here.

Example::

    metrics = run_lm_eval(model, tokenizer, ["arc_easy"], limit=100)
    metrics["lm_eval/arc_easy/acc"]
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

INSTALL_HINT = "pip install 'lightning_ft[lm-eval]'  (or: pip install lm-eval)"


def require_lm_eval() -> None:
    """Fail early, naming the extra to install, when ``lm_eval`` is not importable."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"lm_eval_tasks need lm-evaluation-harness, which is not installed: {INSTALL_HINT}") from error


@lru_cache(maxsize=4)
def _task_manager(include_path: str | None) -> Any:
    # Indexing lm-eval's thousands of task files takes seconds: do it once per process, not per check.
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def run_lm_eval(model: Any, tokenizer: Any, tasks: Sequence[str], limit: int | float | None = None,
                batch_size: int = 16, include_path: str | None = None) -> dict[str, float]:
    """Run lm-eval ``tasks`` zero-shot on ``model`` and return their numeric metrics.

    Args:
        model: A Hugging Face causal LM or a ``PeftModel``, already on its device and in eval mode.
        tokenizer: Its tokenizer.
        tasks: lm-eval task names, e.g. ``["arc_easy", "hellaswag"]`` or tasks defined under ``include_path``.
        limit: Documents per task (an int) or a fraction of each task; ``None`` runs them all.
        batch_size: lm-eval's batch size.
        include_path: A directory of extra task YAML files (e.g. a task over a local JSONL file).

    Returns:
        ``{"lm_eval/<task>/<metric>": value}`` for every metric lm-eval reports (``acc``, ``acc_norm`` ...),
        with lm-eval's ``",none"`` filter suffix removed. Standard errors are skipped (no bootstrapping).
    """
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = simple_evaluate(
        model=lm, tasks=list(tasks), limit=limit, task_manager=_task_manager(include_path),
        log_samples=False, random_seed=None, numpy_random_seed=None, torch_random_seed=None,
        bootstrap_iters=0, verbosity="WARNING",
    )
    metrics = {}
    for task, values in (output or {}).get("results", {}).items():
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "sample_len":
                metric, _, filter_name = key.partition(",")
                name = metric if filter_name in ("", "none") else f"{metric}_{filter_name}"
                metrics[f"lm_eval/{task}/{name}"] = float(value)
    return metrics
