"""Measure the base model before training, then watch what fine-tuning destroys.

Logged under ``forgetting/`` (TensorBoard and every other logger, at the trainer's global step):

- ``acc``, ``acc_norm`` and their ``_delta`` from the baseline, and ``subject/<name>/acc[_norm]``: the
  multiple-choice benchmark (see :mod:`lightning_ft.forgetting.benchmark` for the prompt format);
- ``kl``: mean per-token KL(base || current) on general chat prompts (0 at the baseline);
- ``lm_eval/<task>/<metric>`` and its ``_delta``: optional lm-evaluation-harness tasks;
- ``ok``: 1.0 while within the thresholds, else 0.0;
- ``score``, for ``ModelCheckpoint(monitor="forgetting/score", mode="max")``: the chosen accuracy when
  within the thresholds, accuracy - 2 when not (so every checkpoint that forgot ranks below every
  one that did not, and the finite value still plots); ``-kl`` when the benchmark is off;
- ``time_share``: the fraction of wall time since training started spent scoring; ``seconds``; ``skipped``:
  scheduled checks left out to stay within ``max_time_share``;
- ``<metric>_baseline``, ``<metric>_alarm`` (baseline - ``max_accuracy_drop``) and ``kl_alarm`` (``max_kl``):
  constant lines for charts (:class:`~lightning_ft.callbacks.dashboard.TensorBoardDashboard` draws them).
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_ft.adapters import has_adapters
from lightning_ft.callbacks.cost import CostMeter
from lightning_ft.callbacks.model_access import hf_model, hf_tokenizer
from lightning_ft.forgetting.baseline_cache import BaselineCache, baseline_key
from lightning_ft.forgetting.benchmark import read_benchmark, stratified_sample
from lightning_ft.forgetting.drift import read_prompts
from lightning_ft.forgetting.history import CheckRecord
from lightning_ft.forgetting.lm_eval import require_lm_eval
from lightning_ft.forgetting.probe import ForgettingProbe
from lightning_ft.forgetting.report import print_summary
from lightning_ft.models import cache_dir
from lightning_ft.progress import say

Action = Literal["warn", "stop", "both"]


class ForgettingCheck(pl.Callback):
    """Score the untouched model before the first optimizer step, then score again during training
    and report (and act on) how far it has fallen from that baseline.

    Works with any LightningModule holding a Hugging Face causal LM (plain or ``PeftModel``) as
    ``pl_module.<model_attr>``. Each rank scores a shard and the results are summed, so DDP costs no
    extra time per rank. The baseline, history and (for full fine-tuning) the base model's cached
    top-k log-probabilities are in ``state_dict``: a resumed run compares against the original baseline.
    Its :attr:`state_key` names what it measures, so several checks in one Trainer keep their own state.

    A check costs one forward pass per answer choice of the ``max_items`` questions and one per prompt
    (``max_prompts``), on each rank's shard; the share of wall time it took is logged as
    ``forgetting/time_share`` and printed at the end. Measured timings are in the README (Forgetting checks).

    Example::

        checkpoint = ModelCheckpoint(monitor="forgetting/score", mode="max")
        trainer = pl.Trainer(callbacks=[ForgettingCheck(max_accuracy_drop=0.05, max_kl=0.5, action="both"), checkpoint])

    or in YAML::

        trainer:
          callbacks:
            - class_path: lightning_ft.ForgettingCheck
              init_args: {max_accuracy_drop: 0.05, action: both}

    Args:
        benchmark_path: Multiple-choice JSONL (``question``, ``choices``, ``answer``, optional ``subject``);
            ``None`` uses the general benchmark shipped with the package. Checked here, before training.
        max_items: Items scored, drawn once with ``seed`` and stratified by subject; ``None`` scores all;
            ``0`` turns the benchmark off.
        prompts_path: Chat data file(s) for the KL drift, in any format the data module reads; ``None``
            or ``"default"`` is the shipped ``general_prompts.jsonl``; a list can mix ``"default"`` and files.
        max_prompts: Prompts used, drawn once with ``seed``; ``None`` uses all; ``0`` turns KL off.
        every_n_steps: Also score every this many optimizer steps; ``None`` scores only at validation.
        at_validation: Score at the end of every validation run during ``fit``.
        metric: The accuracy thresholds and ``forgetting/score`` use: ``acc`` or ``acc_norm``.
        max_accuracy_drop: Largest allowed fall of ``metric`` below the baseline (0.05 = 5 points);
            ``None`` never alerts on accuracy.
        max_kl: Largest allowed mean per-token KL from the base model; ``None`` never alerts on KL.
        action: When a threshold is crossed: ``warn`` (warning, progress bar and TensorBoard text),
            ``stop`` (``trainer.should_stop``), or ``both``.
        top_k: Base log-probabilities cached per prompt token for full fine-tuning (LoRA needs no cache).
        batch_size: Sequences per forward pass while scoring.
        max_length: Prompts are cut to this many tokens.
        seed: Seed of the item and prompt subsampling.
        model_attr: Attribute of the LightningModule holding the Hugging Face model.
        tokenizer: Model spec to load the tokenizer from; ``None`` uses ``pl_module.tokenizer``.
        lm_eval_tasks: lm-evaluation-harness task names run at each check (needs the ``lm-eval`` extra).
        lm_eval_limit: Documents per lm-eval task.
        lm_eval_include_path: Directory of extra lm-eval task YAML files (e.g. over a local JSONL file).
        summary: Print the baseline-vs-final table when ``fit`` ends.
        baseline_cache: Keep the base model's baseline in the cache (``$LIGHTNING_FT_CACHE/baselines``) and read
            it from there when the same base model, items, prompts, tokenizer, precision and device come again:
            a rerun or a sweep trial does not measure the base model again (see
            :mod:`lightning_ft.forgetting.baseline_cache`). ``False`` always measures.
        max_time_share: Skip a check scheduled by ``every_n_steps`` or a validation while scoring would take more
            than this share of the wall time since training started, counting this check and the final one at
            the last check's cost; the skips are counted (``forgetting/skipped``) and said once. The check at the
            end of training always runs, and a threshold crossed stops (``action``) at the first check that
            sees it. ``None`` runs every scheduled check.
    """

    def __init__(
        self,
        benchmark_path: str | None = None,
        max_items: int | None = 100,
        prompts_path: str | list[str] | None = None,
        max_prompts: int | None = 4,
        every_n_steps: int | None = None,
        at_validation: bool = True,
        metric: Literal["acc", "acc_norm"] = "acc",
        max_accuracy_drop: float | None = 0.05,
        max_kl: float | None = None,
        action: Action = "warn",
        top_k: int = 64,
        batch_size: int = 16,
        max_length: int = 512,
        seed: int = 0,
        model_attr: str = "model",
        tokenizer: str | None = None,
        lm_eval_tasks: list[str] | None = None,
        lm_eval_limit: int | None = 100,
        lm_eval_include_path: str | None = None,
        summary: bool = True,
        baseline_cache: bool = True,
        max_time_share: float | None = 0.1,
    ) -> None:
        problems = []
        if max_time_share is not None and not 0 < max_time_share <= 1:
            problems.append(f"max_time_share={max_time_share} must be in (0, 1] or None")
        for name, value, low in (("max_items", max_items, 0), ("max_prompts", max_prompts, 0),
                                 ("every_n_steps", every_n_steps, 1), ("lm_eval_limit", lm_eval_limit, 1)):
            if value is not None and value < low:
                problems.append(f"{name}={value} must be >= {low} or None")
        for name, value in (("max_accuracy_drop", max_accuracy_drop), ("max_kl", max_kl)):
            if value is not None and value < 0:
                problems.append(f"{name}={value} must be >= 0 or None")
        for name, value, low in (("top_k", top_k, 1), ("batch_size", batch_size, 1), ("max_length", max_length, 2)):
            if value < low:
                problems.append(f"{name}={value} must be >= {low}")
        if action not in ("warn", "stop", "both"):
            problems.append(f"action={action!r} must be one of warn, stop, both")
        if metric not in ("acc", "acc_norm"):
            problems.append(f"metric={metric!r} must be one of acc, acc_norm")
        if max_items == 0 and max_prompts == 0 and not lm_eval_tasks:
            problems.append("max_items=0 and max_prompts=0 with no lm_eval_tasks leave nothing to measure")
        if problems:
            raise ValueError("Invalid ForgettingCheck settings: " + "; ".join(problems))
        if lm_eval_tasks:
            require_lm_eval()
        items = read_benchmark(benchmark_path) if max_items != 0 else []
        items = [items[i] for i in stratified_sample([item.subject for item in items], max_items, seed)]
        paths = [prompts_path or "default"] if prompts_path is None or isinstance(prompts_path, str) else prompts_path
        prompts = read_prompts(paths) if max_prompts != 0 else []
        if max_prompts is not None and max_prompts < len(prompts):
            prompts = [prompts[i] for i in sorted(random.Random(seed).sample(range(len(prompts)), max_prompts))]
        self.probe = ForgettingProbe(items, prompts, batch_size, top_k, max_length, lm_eval_tasks or [],
                                     lm_eval_limit, lm_eval_include_path)
        self.every_n_steps, self.at_validation, self.metric = every_n_steps, at_validation, metric
        self.max_accuracy_drop, self.max_kl, self.action = max_accuracy_drop, max_kl, action
        self.model_attr, self.tokenizer, self.summary = model_attr, tokenizer, summary
        self.baseline_cache, self.max_time_share = baseline_cache, max_time_share
        #: Scheduled checks skipped to stay within ``max_time_share``.
        self.skipped = 0
        self._key = self._generate_state_key(
            benchmark_path=benchmark_path, max_items=max_items, prompts_path=prompts_path, max_prompts=max_prompts,
            seed=seed, lm_eval_tasks=lm_eval_tasks, every_n_steps=every_n_steps, at_validation=at_validation)
        #: Every check, the baseline first.
        self.history: list[CheckRecord] = []
        self._cost = CostMeter()

    @property
    @override
    def state_key(self) -> str:
        return self._key

    @property
    def baseline(self) -> dict[str, float] | None:
        """The untouched model's metrics (``None`` before training starts)."""
        return self.history[0].metrics if self.history else None

    # -- hooks ---------------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._cost.start()
        model = self._model(pl_module)
        self.probe.prepare(self._tokenizer(pl_module))
        if self.history:  # resumed: the baseline came from the checkpoint and must not be re-measured
            if self.probe.needs_reference(model):
                rank_zero_warn("ForgettingCheck: the checkpoint holds no cached base-model log-probabilities, "
                               "so KL drift cannot be measured for this full fine-tuning run.")
            return
        if trainer.global_step > 0:
            rank_zero_warn(f"ForgettingCheck: no baseline in the checkpoint; measuring it now, at step "
                           f"{trainer.global_step}, so changes are relative to this model, not the base model.")
        cache = BaselineCache(cache_dir() / "baselines") if self.baseline_cache and trainer.global_step == 0 else None
        key = baseline_key(model, has_adapters(model), self.probe, self.probe.tokenizer,
                           trainer.precision) if cache else ""
        # Rank zero looks the entry up and, on a miss, holds the lock until it is stored: sweep workers that
        # start together measure the base model once.
        with cache.lock(key) if cache and trainer.is_global_zero else contextlib.nullcontext():
            entry = cache.load(key) if cache and trainer.is_global_zero else None
            entry = trainer.strategy.broadcast(entry, src=0) if trainer.world_size > 1 else entry
            if entry is not None:
                self.probe.reference = entry["reference"]
                self._record(trainer, CheckRecord(trainer.global_step, entry["metrics"], ok=True, seconds=0.0),
                             source=f"from the cache ({cache.path(key)})")
                return
            # The baseline can take a while; its result line (from _report) says how long it took.
            say(f"Measuring the base model for the forgetting checks ({len(self.probe.items)} questions, "
                f"{len(self.probe.conversations)} prompts) ...")
            if self.probe.needs_reference(model):
                self.probe.cache_reference(model)
            self._check(trainer, pl_module)
            if cache and trainer.is_global_zero:
                cache.store(key, self.history[0].metrics, self.probe.reference)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self.history[-1].step:
            self._scheduled_check(trainer, pl_module)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (not self.at_validation or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING
                or not self.history):
            return
        if self.history[-1].step == trainer.global_step:
            self._publish(trainer, self.history[-1])  # already measured at this step: make it visible again
        else:
            self._scheduled_check(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.history and self.history[-1].step != trainer.global_step:
            self._check(trainer, pl_module)  # the summary's "final" is the model as training left it

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.summary and self.history and trainer.is_global_zero:
            print_summary(self.history, self.metric, self._cost.share(), self.skipped)

    # -- checking ------------------------------------------------------------------------------------
    def _model(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        return hf_model(pl_module, self.model_attr, "ForgettingCheck")

    def _tokenizer(self, pl_module: pl.LightningModule) -> Any:
        return hf_tokenizer(pl_module, self.tokenizer, "ForgettingCheck")

    def _scheduled_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A check the schedule asks for, unless it would push scoring past ``max_time_share`` of the wall time."""
        if self.max_time_share is not None:
            # The last measured check's cost estimates this one's, and as much is kept for the final check,
            # which always runs: a run stays within its budget to the end.
            measured = [record.seconds for record in self.history if record.seconds > 0]
            over = bool(measured) and self._cost.share(extra=2 * measured[-1]) > self.max_time_share
            if trainer.strategy.broadcast(over, src=0) if trainer.world_size > 1 else over:
                if not self.skipped:
                    rank_zero_info(f"ForgettingCheck: skipping scheduled checks while one would take scoring past "
                                   f"{self.max_time_share:.0%} of the wall time (max_time_share); the check at the "
                                   "end of training always runs")
                self.skipped += 1
                for logger in trainer.loggers:
                    logger.log_metrics({"forgetting/skipped": float(self.skipped)}, step=trainer.global_step)
                for key in self._shown():  # no stale numbers on the progress line, as if measured now
                    trainer.progress_bar_metrics.pop(key, None)
                return
        self._check(trainer, pl_module)

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure, record, publish and act: on every rank, which all enter the same collectives."""
        with self._cost.timing() as timed, trainer.precision_plugin.forward_context():
            metrics = self.probe.measure(
                self._model(pl_module), trainer.global_rank, trainer.world_size,
                reduce=lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum"),
                broadcast=lambda obj: trainer.strategy.broadcast(obj, src=0),
            )
        failures = self._failures(metrics) if self.history else []
        self._record(trainer, CheckRecord(trainer.global_step, metrics, ok=not failures, seconds=timed["seconds"]),
                     failures=failures)

    def _record(self, trainer: pl.Trainer, record: CheckRecord, failures: list[str] | None = None,
                source: str = "") -> None:
        """Keep, publish, report and act on a check (the baseline too, measured or from the cache)."""
        failures = failures or []
        self.history.append(record)
        self._publish(trainer, record)
        self._report(record, source)
        if failures:
            self._warn(trainer, record, failures)
        # Every rank decides together (the metrics are already reduced, but a rank's stop must be all ranks').
        stop = bool(failures) and self.action in ("stop", "both")
        if trainer.strategy.reduce_boolean_decision(stop, all=False):
            trainer.should_stop = True
            rank_zero_info(f"Stopping training at step {record.step}: a forgetting threshold was crossed "
                           f"(ForgettingCheck action={self.action!r}).")

    def _failures(self, metrics: dict[str, float]) -> list[str]:
        failures, baseline = [], self.baseline
        if self.max_accuracy_drop is not None and self.metric in metrics:
            before, now = baseline[self.metric], metrics[self.metric]
            if before - now > self.max_accuracy_drop + 1e-9:
                failures.append(f"{self.metric} fell {before - now:.3f} below the baseline ({before:.3f} -> "
                                f"{now:.3f}), more than max_accuracy_drop={self.max_accuracy_drop}")
        if self.max_kl is not None and metrics.get("kl", 0.0) > self.max_kl:
            failures.append(f"KL from the base model is {metrics['kl']:.4g}, above max_kl={self.max_kl}")
        return failures

    def _score(self, record: CheckRecord) -> float:
        metrics = record.metrics
        if self.metric in metrics:
            return metrics[self.metric] - (0.0 if record.ok else 2.0)
        return -metrics.get("kl", 0.0) - (0.0 if record.ok else 1.0)

    def _publish(self, trainer: pl.Trainer, record: CheckRecord) -> None:
        """To every logger at the global step, and to ``callback_metrics`` for ModelCheckpoint/EarlyStopping."""
        values = {f"forgetting/{key}": value for key, value in record.metrics.items()}
        for key, value in record.metrics.items():
            if key != "kl" and not key.startswith("subject/"):
                values[f"forgetting/{key}_delta"] = value - self.baseline.get(key, value)
        values.update({"forgetting/ok": float(record.ok), "forgetting/score": self._score(record),
                       "forgetting/seconds": record.seconds})
        values.update(self._reference_lines())
        if len(self.history) > 1:
            values["forgetting/time_share"] = self._cost.share()
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in values.items()})
        trainer.progress_bar_metrics.update({key: values[key] for key in self._shown() if key in values})

    def _shown(self) -> tuple[str, ...]:
        """The metrics a check puts on the progress bar."""
        return f"forgetting/{self.metric}", "forgetting/kl", "forgetting/ok"

    def _reference_lines(self) -> dict[str, float]:
        """The baseline and the alarm levels as scalars, so a chart draws them beside the measured values."""
        lines, baseline = {}, self.baseline
        if self.metric in baseline:
            lines[f"forgetting/{self.metric}_baseline"] = baseline[self.metric]
            if self.max_accuracy_drop is not None:
                lines[f"forgetting/{self.metric}_alarm"] = baseline[self.metric] - self.max_accuracy_drop
        if "kl" in baseline and self.max_kl is not None:
            lines["forgetting/kl_alarm"] = self.max_kl
        return lines

    def _report(self, record: CheckRecord, source: str = "") -> None:
        metrics, parts = record.metrics, []
        for key in [self.metric] + sorted(key for key in metrics if key.startswith("lm_eval/")):
            if key in metrics:
                parts.append(f"{key} {metrics[key]:.3f} ({metrics[key] - self.baseline[key]:+.3f})")
        if "kl" in metrics:
            parts.append(f"KL {metrics['kl']:.4g}")
        share = f", {self._cost.share():.1%} of wall time so far" if len(self.history) > 1 else ""
        label = "baseline" if len(self.history) == 1 else "check"
        took = source or f"{record.seconds:.1f} s{share}"
        rank_zero_info(f"Forgetting {label} at step {record.step}: {', '.join(parts)}; {took}")

    def _warn(self, trainer: pl.Trainer, record: CheckRecord, failures: list[str]) -> None:
        message = f"FORGETTING at step {record.step}: " + "; ".join(failures)
        if self.action in ("warn", "both"):
            rank_zero_warn(message)
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    if isinstance(logger, TensorBoardLogger):
                        logger.experiment.add_text("forgetting/alert", message, record.step)
        else:
            rank_zero_info(message)

    # -- state ---------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.probe.fingerprint, "history": [record.to_dict() for record in self.history],
                "reference": self.probe.reference, "skipped": self.skipped}

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """One check then and one now, under another key (a checkpoint from before state keys, or changed
        settings): hand that state to :meth:`load_state_dict`, which refuses it if it measured other data."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        saved = [key for key in states if isinstance(key, str) and key.startswith(type(self).__qualname__)]
        if len(saved) == 1 and sum(isinstance(cb, ForgettingCheck) for cb in trainer.callbacks) == 1:
            states[self.state_key] = states[saved[0]]  # Lightning calls load_state_dict with it next

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("fingerprint") != self.probe.fingerprint:
            raise ValueError(
                "ForgettingCheck: the checkpoint's baseline was measured on other benchmark items, prompts or "
                "lm-eval tasks than this callback's. Resume with the same benchmark_path, max_items, prompts_path, "
                "max_prompts, seed, top_k and lm_eval settings, or start a new run."
            )
        self.history = [CheckRecord.from_dict(record) for record in state_dict["history"]]
        self.probe.reference = state_dict.get("reference")
        self.skipped = int(state_dict.get("skipped", 0))
