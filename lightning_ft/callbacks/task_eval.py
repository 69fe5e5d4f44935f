"""Task success of greedy generations on held-out prompts: the base model first, then at each validation."""

from __future__ import annotations

import json
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from lightning_ft.adapters import base_model_of, has_adapters
from lightning_ft.callbacks.cost import CostMeter
from lightning_ft.data.checks import shorten
from lightning_ft.data.sources import read_conversations_from
from lightning_ft.generation import generate

Metric = Literal["exact", "regex", "json", "contains"]
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
_BUILTIN_KEYWORDS = {"type", "enum", "const", "required", "properties", "additionalProperties", "items",
                     "minLength", "maxLength", "minimum", "maximum", "pattern", "$schema", "$id", "title",
                     "description"}


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def builtin_schema_errors(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """A small JSON Schema subset (type, enum, const, required, properties, additionalProperties, items,
    string lengths, numeric bounds, pattern), used when the ``jsonschema`` package is not installed."""
    errors = []
    types = schema.get("type")
    if types is not None and not any(_is_type(value, t) for t in ([types] if isinstance(types, str) else types)):
        return [f"{where} is not of type {types}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}={json.dumps(value)} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where} is not {json.dumps(schema['const'])}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", float("inf")):
            errors.append(f"{where} has a length outside [{schema.get('minLength', 0)}, {schema.get('maxLength')}]")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where} does not match {schema['pattern']!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", float("-inf")) or value > schema.get("maximum", float("inf")):
            errors.append(f"{where} is out of range")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [f"{where} misses key {key!r}" for key in schema.get("required", []) if key not in value]
        for key, item in value.items():
            if key in properties:
                errors += builtin_schema_errors(item, properties[key], f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where} has unexpected key {key!r}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += builtin_schema_errors(item, schema["additionalProperties"], f"{where}.{key}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            errors += builtin_schema_errors(item, schema["items"], f"{where}[{index}]")
    return errors


def _unsupported_keywords(schema: Any) -> set[str]:
    """Keywords (and ``type`` values) of a schema that :func:`builtin_schema_errors` cannot check."""
    if not isinstance(schema, dict):
        return set()
    found = set(schema) - _BUILTIN_KEYWORDS
    types = schema.get("type", [])
    found |= {f"type={t!r}" for t in ([types] if not isinstance(types, list) else types)
              if t not in (*_TYPES, "integer", "number")}
    for child in schema.get("properties", {}).values():
        found |= _unsupported_keywords(child)
    for key in ("items", "additionalProperties"):
        found |= _unsupported_keywords(schema.get(key))
    return found


def schema_checker(schema: dict[str, Any]):
    """``value -> list of errors`` for a JSON schema: ``jsonschema`` when installed, else the built-in subset."""
    try:
        import jsonschema
    except ImportError:
        unsupported = _unsupported_keywords(schema)
        if unsupported:
            raise ValueError(f"json_schema uses {sorted(unsupported)}, which the built-in checker does not support: "
                             "pip install jsonschema") from None
        return lambda value: builtin_schema_errors(value, schema)
    validator_class = jsonschema.validators.validator_for(schema)
    try:
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as error:
        raise ValueError(f"json_schema is not a valid JSON schema: {error.message}") from None
    validator = validator_class(schema)
    return lambda value: [error.message for error in validator.iter_errors(value)]


def score(output: str, reference: str, metric: Metric, pattern: re.Pattern | None = None,
          schema_errors: Any = None, match_keys: tuple[str, ...] = ()) -> tuple[bool, str]:
    """Whether a generation succeeds, and why not.

    Args:
        output: The generated answer.
        reference: The held-out answer.
        metric: ``exact``: equal after stripping whitespace. ``contains``: the reference appears in the output
            (case-insensitive). ``regex``: ``pattern`` matches the output (``re.search``); when it has groups,
            they must equal the reference's groups. ``json``: the output is one JSON value, passes
            ``schema_errors`` if given, and agrees with the reference on ``match_keys``.
        pattern: Compiled regular expression for ``regex``.
        schema_errors: ``value -> list of errors`` (see :func:`schema_checker`).
        match_keys: For ``json``: keys whose values must equal the reference's.
    """
    output = output.strip()
    if metric == "exact":
        return output == reference.strip(), "" if output == reference.strip() else "differs"
    if metric == "contains":
        found = reference.strip().casefold() in output.casefold()
        return found, "" if found else "reference not found"
    if metric == "regex":
        match = pattern.search(output)
        if match is None:
            return False, "no match"
        if pattern.groups and match.groups() != pattern.search(reference).groups():
            return False, f"groups {match.groups()} differ"
        return True, ""
    try:
        value = json.loads(output)
    except json.JSONDecodeError as error:
        return False, f"invalid JSON: {error.msg}"
    errors = schema_errors(value) if schema_errors is not None else []
    if errors:
        return False, errors[0]
    expected = json.loads(reference)
    wrong = [key for key in match_keys if not isinstance(value, dict) or value.get(key) != expected[key]]
    return (False, f"wrong {', '.join(wrong)}") if wrong else (True, "")


@dataclass(frozen=True)
class TaskItem:
    """A held-out prompt (every message before the last assistant turn) and its reference answer."""

    messages: tuple[dict[str, str], ...]
    reference: str
    source: str


def _cell(text: str, width: int = 200) -> str:
    return shorten(text, width, flatten=False).replace("|", "\\|").replace("\n", "<br>") or " "


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
        metric: ``exact``, ``regex``, ``json`` or ``contains`` (see :func:`score`).
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
        name: Prefix of the logged keys; give each TaskEval of a run its own.
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
        # Read now, not in setup: a bad file must stop fit before the logger creates the run directory.
        self.items = self._read_items()
        #: Success rate of the base model, then ``{"step", "success_rate"}`` per measurement of the model.
        self.baseline: float | None = None
        self.history: list[dict[str, float]] = []
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
    def state_key(self) -> str:
        return f"TaskEval[{self.name}]"

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
        model = pl_module.model if getattr(pl_module, "model", None) is not None else pl_module
        tokenizer = getattr(pl_module, "tokenizer", None)
        tokenizer = tokenizer if tokenizer is not None else trainer.datamodule.tokenizer_obj
        chat_template = getattr(pl_module, "hparams", {}).get("chat_template")
        mine = self.items[trainer.global_rank::trainer.world_size]
        # LoRA & co.: the base model is the model with its adapter switched off.
        base = base_model_of(model) if baseline and has_adapters(model) else nullcontext(model)
        with self._cost.timing() as timed, base as model:
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
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._cost.start()
        if self.baseline is not None:  # restored from a checkpoint
            return
        self.baseline = self.measure(trainer, pl_module, baseline=True)
        self._log_outside_loop(trainer, self.baseline)
        rank_zero_info(f"TaskEval {self.name}: base model success rate {self.baseline:.1%} "
                       f"on {len(self.items)} items of {self.data_path}")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            rate = self._record(trainer, pl_module)
            for key, value in self._metrics(rate).items():  # already summed over ranks
                pl_module.log(key, value, on_epoch=True, sync_dist=False)

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        rate = self.measure(trainer, pl_module)
        self.history.append({"step": trainer.global_step, "success_rate": rate})
        return rate

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.history or self.history[-1]["step"] != trainer.global_step:
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
            final = self.history[-1]["success_rate"]
            table.add_row(f"fine-tuned (step {self.history[-1]['step']})", f"{final:.1%}",
                          f"{round(final * total)}/{total}")
            if self.baseline is not None:
                table.add_row("change", f"{100 * (final - self.baseline):+.1f} points", "")
        Console().print(table)

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "history": list(self.history), "validations": self._validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baseline = state_dict["baseline"]
        self.history = list(state_dict["history"])
        self._validations = state_dict["validations"]
