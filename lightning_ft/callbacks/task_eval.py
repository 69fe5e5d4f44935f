"""Task success of greedy generations on held-out prompts: the base model first, then at each validation."""

from __future__ import annotations

import json
import re
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info
from typing_extensions import override

from lightning_ft.callbacks.cost import CostMeter
from lightning_ft.callbacks.model_access import hf_model, hf_tokenizer
from lightning_ft.data.sources import read_conversations_from
from lightning_ft.generation import generate
from lightning_ft.json_schema import schema_checker
from lightning_ft.task_metrics import Metric, score


@dataclass(frozen=True)
class TaskItem:
    """A held-out prompt (every message before the last assistant turn) and its reference answer."""

    messages: tuple[dict[str, str], ...]
    reference: str
    source: str


@dataclass(frozen=True)
class TaskRecord:
    """One measurement of the model being trained.

    Attributes:
        step: The trainer's global step.
        success_rate: Fraction of the held-out prompts whose generation succeeded (summed over ranks).
    """

    step: int
    success_rate: float


def _cell(text: str, width: int = 200) -> str:
    flat = text if len(text) <= width else text[: width - 1] + "…"
    return flat.replace("|", "\\|").replace("\n", "<br>") or " "


class TaskEval(pl.Callback):
    """Greedy generations on held-out prompts scored for task success: base model first, then while training.

    At the start of ``fit`` the base model (adapter disabled; optionally with ``baseline_system_prompt``,
    for the prompt-only success rate) answers every held-out prompt; after each ``every_n_validations``-th
    validation the model being trained does. Logs ``<name>/success_rate`` and ``<name>/success_delta``
    (versus the base model), ``<name>/success_baseline`` (the base model's rate, a line for charts),
    ``<name>/seconds`` and ``<name>/time_share`` (of the wall time since fit started), a markdown table of sample generations to TensorBoard as text, and prints the base model
    versus the final model at the end. Cost is bounded by ``max_items`` x ``max_new_tokens``.

    Example::

        schema = {"type": "object", "required": ["category"], "properties": {"category": {"enum": ["a", "b"]}}}
        trainer = pl.Trainer(callbacks=[TaskEval("test.jsonl", metric="json", json_schema=schema)])

    Args:
        data_path: Held-out conversations (any format ``fit`` reads): the prompt is every message before
            the last assistant turn, the reference the last assistant message.
        metric: ``exact``, ``regex``, ``json`` or ``contains`` (see :func:`lightning_ft.task_metrics.score`).
        pattern: Regular expression for ``regex``; with groups, the groups of output and reference must agree.
        json_schema: For ``json``: a schema (dict, or path to a ``.json`` file) the output must satisfy.
        match_keys: For ``json``: keys whose values must equal the reference's (e.g. the labels).
        system_prompt: Inserted where a conversation has no system message (keep it equal to
            ``data.system_prompt``).
        baseline_system_prompt: Replaces the system message for the base-model measurement only, to compare
            fine-tuning with the best prompt you could write instead.
        max_items: Use the first this many conversations (``None``: all).
        max_new_tokens: Longest answer generated.
        batch_size: Prompts generated together.
        every_n_validations: Measure after every n-th validation (the final model is always measured).
        num_samples: Generations shown in the TensorBoard table.
        name: Prefix of the logged keys and the checkpoint state's key; give each TaskEval of a run its own.
        model_attr: Attribute of the LightningModule holding the Hugging Face model (``""``: the module itself).
        tokenizer: Model spec to load the tokenizer from; ``None`` uses ``pl_module.tokenizer``.
    """

    def __init__(
        self,
        data_path: str,
        metric: Metric = "exact",
        pattern: str | None = None,
        json_schema: str | dict | None = None,
        match_keys: list[str] | None = None,
        system_prompt: str | None = None,
        baseline_system_prompt: str | None = None,
        max_items: int | None = 100,
        max_new_tokens: int = 128,
        batch_size: int = 8,
        every_n_validations: int = 1,
        num_samples: int = 8,
        name: str = "task",
        model_attr: str = "model",
        tokenizer: str | None = None,
    ) -> None:
        problems = []
        if metric not in ("exact", "regex", "json", "contains"):
            problems.append(f"metric={metric!r}: must be one of exact, regex, json, contains")
        if (metric == "regex") != (pattern is not None):
            problems.append(f"pattern={pattern!r}: set it exactly when metric='regex'")
        if metric != "json" and (json_schema is not None or match_keys):
            problems.append("json_schema and match_keys apply only to metric='json'")
        for key, value, low in (("max_new_tokens", max_new_tokens, 1), ("batch_size", batch_size, 1),
                                ("every_n_validations", every_n_validations, 1), ("num_samples", num_samples, 0),
                                ("max_items", 1 if max_items is None else max_items, 1)):
            if not isinstance(value, int) or value < low:
                problems.append(f"{key}={value!r}: must be an integer >= {low}")
        self.pattern = self._compile(pattern, problems) if metric == "regex" and pattern is not None else None
        self.schema = self._load_schema(json_schema, problems) if metric == "json" and json_schema else None
        self.schema_errors = None
        if self.schema is not None:
            try:
                self.schema_errors = schema_checker(self.schema)
            except ValueError as error:
                problems.append(str(error))
        if problems:
            raise ValueError("Invalid TaskEval arguments:\n  " + "\n  ".join(problems))
        self.data_path, self.metric, self.match_keys = data_path, metric, tuple(match_keys or ())
        self.system_prompt, self.baseline_system_prompt = system_prompt, baseline_system_prompt
        self.max_items, self.max_new_tokens, self.batch_size = max_items, max_new_tokens, batch_size
        self.every_n_validations, self.num_samples, self.name = every_n_validations, num_samples, name
        self.model_attr, self.tokenizer = model_attr, tokenizer
        # Read now, not in setup: a bad file must stop fit before the logger creates the run directory.
        self.items = self._read_items()
        #: Success rate of the base model, then one record per measurement of the model being trained.
        self.baseline: float | None = None
        self.history: list[TaskRecord] = []
        self._validations = 0
        self._cost, self._seconds = CostMeter(), 0.0

    @staticmethod
    def _compile(pattern: str, problems: list[str]) -> re.Pattern | None:
        try:
            return re.compile(pattern)
        except re.error as error:
            problems.append(f"pattern={pattern!r}: not a regular expression ({error})")
            return None

    @staticmethod
    def _load_schema(schema: str | dict, problems: list[str]) -> dict | None:
        if isinstance(schema, dict):
            return schema
        try:
            loaded = json.loads(Path(schema).expanduser().read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            problems.append(f"json_schema={schema!r}: cannot read a JSON schema from it ({error})")
            return None
        if not isinstance(loaded, dict):
            problems.append(f"json_schema={schema!r}: must hold a JSON object")
            return None
        return loaded

    def _read_items(self) -> list[TaskItem]:
        conversations = read_conversations_from(self.data_path, system_prompt=self.system_prompt)
        items, problems = [], []
        for conversation in conversations[: self.max_items]:
            last = max(i for i, m in enumerate(conversation.messages) if m["role"] == "assistant")
            item = TaskItem(tuple(dict(m) for m in conversation.messages[:last]),
                            conversation.messages[last]["content"], conversation.source)
            reason = self._reference_problem(item.reference)
            if reason:
                problems.append(f"{item.source}: reference answer {reason}")
            items.append(item)
        if problems:
            raise ValueError(f"TaskEval cannot score against {self.data_path} with metric={self.metric!r}:\n  "
                             + "\n  ".join(problems[:20]))
        return items

    def _reference_problem(self, reference: str) -> str | None:
        """Why a reference could never be matched (then the metric or schema is wrong, not the model)."""
        if self.metric == "regex" and self.pattern.groups and self.pattern.search(reference) is None:
            return f"does not match pattern {self.pattern.pattern!r}"
        if self.metric == "json":
            ok, reason = score(reference, reference, "json", schema_errors=self.schema_errors)
            if not ok:
                return f"fails the json metric itself ({reason})"
            missing = [key for key in self.match_keys if key not in (json.loads(reference) or {})]
            if missing:
                return f"has no key {', '.join(missing)} from match_keys"
        return None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    # -- measuring ----------------------------------------------------------------------------------
    def _prompt(self, item: TaskItem, baseline: bool) -> list[dict[str, str]]:
        messages = list(item.messages)
        if baseline and self.baseline_system_prompt is not None:
            if messages and messages[0]["role"] == "system":
                messages = messages[1:]
            messages.insert(0, {"role": "system", "content": self.baseline_system_prompt})
        return messages

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, baseline: bool = False) -> float:
        """Generate for this rank's share of the items, score, sum over ranks; log samples; return the rate."""
        model = hf_model(pl_module, self.model_attr, "TaskEval")
        tokenizer = hf_tokenizer(pl_module, self.tokenizer, "TaskEval")
        chat_template = getattr(pl_module, "hparams", {}).get("chat_template")
        mine = self.items[trainer.global_rank::trainer.world_size]
        # LoRA & co.: the base model is the model with its adapter switched off.
        off = model.disable_adapter() if baseline and hasattr(model, "disable_adapter") else nullcontext()
        with self._cost.timing() as timed, off:
            outputs = generate(model, tokenizer, [self._prompt(item, baseline) for item in mine],
                               self.max_new_tokens, self.batch_size, chat_template)
            results = [score(out, item.reference, self.metric, self.pattern, self.schema_errors, self.match_keys)
                       for out, item in zip(outputs, mine)]
        self._seconds = timed["seconds"]
        totals = torch.tensor([sum(ok for ok, _ in results), len(mine)], dtype=torch.float64, device=pl_module.device)
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
        rate = float(totals[0] / totals[1].clamp(min=1))
        self._log_samples(trainer, mine, outputs, results, rate, int(totals[1]), baseline)
        return rate

    def _log_samples(self, trainer: pl.Trainer, items: list[TaskItem], outputs: list[str],
                     results: list[tuple[bool, str]], rate: float, total: int, baseline: bool) -> None:
        if trainer.global_rank != 0:
            return
        from pytorch_lightning.loggers import TensorBoardLogger

        who = "base model" + (" with baseline_system_prompt" if baseline and self.baseline_system_prompt else "")
        who = who if baseline else "fine-tuned"
        lines = [f"**{who}**: success {rate:.1%} of {total} at step {trainer.global_step}",
                 "", "| ok | prompt | reference | output |", "|---|---|---|---|"]
        for item, output, (ok, why) in list(zip(items, outputs, results))[: self.num_samples]:
            prompt = item.messages[-1]["content"] if item.messages else ""
            mark = "yes" if ok else f"no: {why}"
            lines.append(f"| {_cell(mark)} | {_cell(prompt)} | {_cell(item.reference)} | {_cell(output)} |")
        tag = f"{self.name}/samples" + ("_baseline" if baseline else "")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(tag, "\n".join(lines), trainer.global_step)

    def _metrics(self, rate: float) -> dict[str, float]:
        metrics = {f"{self.name}/success_rate": rate, f"{self.name}/success_delta": rate - (self.baseline or 0.0),
                   f"{self.name}/seconds": self._seconds}
        if self.baseline is not None:  # a constant line beside success_rate in charts
            metrics[f"{self.name}/success_baseline"] = self.baseline
        share = self._cost.share()
        if self.history and share is not None:  # not at the baseline, which is all of the time so far
            metrics[f"{self.name}/time_share"] = share
        return metrics

    def _log_outside_loop(self, trainer: pl.Trainer, rate: float) -> None:
        # on_fit_start/on_fit_end cannot use LightningModule.log: write to the loggers and callback_metrics directly.
        metrics = self._metrics(rate)
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in metrics.items()})
        if trainer.global_rank == 0:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    # -- hooks --------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._cost.start()
        if self.baseline is not None:  # restored from a checkpoint
            return
        self.baseline = self.measure(trainer, pl_module, baseline=True)
        self._log_outside_loop(trainer, self.baseline)
        rank_zero_info(f"TaskEval {self.name}: base model success rate {self.baseline:.1%} "
                       f"on {len(self.items)} items of {self.data_path}")

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            rate = self._record(trainer, pl_module)
            for key, value in self._metrics(rate).items():  # already summed over ranks
                pl_module.log(key, value, on_epoch=True, sync_dist=False)

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        rate = self.measure(trainer, pl_module)
        self.history.append(TaskRecord(trainer.global_step, rate))
        return rate

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.history or self.history[-1].step != trainer.global_step:
            # The final weights, whatever the validation schedule.
            self._log_outside_loop(trainer, self._record(trainer, pl_module))
        if trainer.global_rank == 0:
            self.print_summary()

    def print_summary(self) -> None:
        """A rich table: the base model's success rate against the final model's."""
        from rich.console import Console
        from rich.table import Table

        total = len(self.items)
        share = self._cost.share()
        caption = f"metric={self.metric}, {total} items of {self.data_path}" + (
            f"; generating took {share:.1%} of the run's wall time" if share is not None else "")
        table = Table(title=f"TaskEval {self.name}", caption=caption)
        for column, justify in (("model", "left"), ("success", "right"), ("solved", "right")):
            table.add_column(column, justify=justify)
        prompt = " + baseline_system_prompt" if self.baseline_system_prompt else ""
        if self.baseline is not None:
            table.add_row(f"base model{prompt}", f"{self.baseline:.1%}", f"{round(self.baseline * total)}/{total}")
        if self.history:
            final = self.history[-1].success_rate
            table.add_row(f"fine-tuned (step {self.history[-1].step})", f"{final:.1%}",
                          f"{round(final * total)}/{total}")
            if self.baseline is not None:
                table.add_row("change", f"{100 * (final - self.baseline):+.1f} points", "")
        Console().print(table)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "history": [asdict(record) for record in self.history],
                "validations": self._validations}

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks") or {}
        legacy = f"TaskEval[{self.name}]"  # the key of checkpoints written before state keys held the settings
        if self.state_key not in states and legacy in states:
            states[self.state_key] = states[legacy]  # Lightning calls load_state_dict with it next

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baseline = state_dict["baseline"]
        self.history = [TaskRecord(int(record["step"]), float(record["success_rate"]))
                        for record in state_dict["history"]]
        self._validations = state_dict["validations"]
