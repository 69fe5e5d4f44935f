"""``lightning_ft check-data``: lint the data of a ``fit`` configuration and rank what the base model finds odd.

Takes the same ``--config`` and override keys as ``fit``, plus the options below::

    lightning_ft check-data --config configs/quickstart.yaml --data.train_path my.jsonl
    lightning_ft check-data --config configs/quickstart.yaml --json --strict --surprise_top 0

Exit code 0 when there are no errors (and, with ``--strict``, no warnings), 1 otherwise; a file that
cannot be read at all (missing, a directory, not UTF-8) is a one-line error on stderr with exit code 1,
and a bad command line exits with 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning_ft.data.checks import (
    NEAR_DUPLICATE_THRESHOLD,
    Finding,
    answer_text,
    lint_conversations,
    prompt_text,
    shorten,
    token_checks,
)
from lightning_ft.commands import check_pairs as pairs
from lightning_ft.commands.report import assemble, print_findings, print_verdict, scan_findings, stats_table
from lightning_ft.data.formats import Conversation
from lightning_ft.data.lint import ArrowRows
from lightning_ft.data.padding import pad_token_id
from lightning_ft.data.sources import read_source

PROG = "lightning_ft check-data"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="Check every record of the train and validation files of a fit configuration: bad records, "
                    "token counts and truncation, duplicates, leakage, inconsistencies, and the examples the "
                    "base model finds most surprising.",
        epilog="Every other argument is a `lightning_ft fit` argument (--config FILE, --data.train_path, "
               "--data.max_length, --model.model_name, ...). Exit code: 0 clean, 1 errors (or warnings with "
               "--strict), 2 bad command line.")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    parser.add_argument("--strict", action="store_true", help="treat warnings as errors")
    parser.add_argument("--surprise_top", type=int, default=10, metavar="N",
                        help="list the N examples with the highest base-model loss (0 skips loading the model)")
    parser.add_argument("--surprise_max", type=int, default=2000, metavar="N",
                        help="score at most the first N conversations (bounds the cost)")
    parser.add_argument("--surprise_batch_size", type=int, default=4, metavar="N")
    parser.add_argument("--near_threshold", type=float, default=NEAR_DUPLICATE_THRESHOLD, metavar="T",
                        help="word 3-gram Jaccard similarity from which conversations count as near-duplicates")
    parser.add_argument("--show", type=int, default=20, metavar="N", help="table rows per finding code")
    return parser


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def _held_out_sets(trainer: Any) -> list[tuple[str, str, str | None]]:
    """``(name, path, system prompt)`` of every TaskEval data file configured: leaking into training inflates it."""
    from lightning_ft.callbacks.task_eval import TaskEval

    return [(f"TaskEval {cb.name}", cb.data_path, cb.system_prompt)
            for cb in getattr(trainer, "callbacks", []) if isinstance(cb, TaskEval)]


def surprise_scores(module: Any, model: Any, examples: list[dict[str, list[int]]], pad_token_id: int,
                    batch_size: int) -> list[float]:
    """Mean loss on trained tokens per example with ``module.predict_step`` on ``model`` (the bare base model)."""
    import torch

    from lightning_ft.data.collate import collate

    module.model = model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # less padding
    losses = [0.0] * len(examples)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = collate([examples[i] for i in chunk], pad_token_id)
            for i, loss in zip(chunk, module.predict_step(batch, start)["loss"].tolist()):
                losses[i] = loss
    return losses


def _surprises(cli: Any, scored: list[tuple[Conversation, dict]], tokenizer: Any, options: Any) -> dict[str, Any]:
    from lightning_ft.models import load_model

    pairs = scored[: options.surprise_max]
    model = load_model(cli.model.hparams.model_name, dtype=cli.model.hparams.dtype)
    losses = surprise_scores(cli.model, model, [example for _, example in pairs], pad_token_id(tokenizer),
                             options.surprise_batch_size)
    ranked = sorted(zip(losses, pairs), key=lambda item: -item[0])[: options.surprise_top]
    return {
        "scored": len(pairs), "median_loss": statistics.median(losses) if losses else None,
        "top": [{"location": c.source, "loss": round(loss, 4), "prompt": prompt_text(c), "answer": answer_text(c)}
                for loss, (c, _) in ranked],
    }


def label_findings(kept: list[tuple[Conversation, dict]], tokenizer: Any, chat_template: str | None,
                   labelling: dict[str, Any]) -> tuple[list[Finding], dict | None]:
    """Stop-marker warnings, and one example with its trained tokens marked ``[[...]]``, from the encoded data.

    Warns when the template writes no stop marker after a reply (an eos is appended after the final one),
    and when none of the model's stop tokens (its generation config's) is ever trained: generation would
    then not stop where the training data ends replies.
    """
    from lightning_ft.data.collate import IGNORE_INDEX, mark_trained, render_conversation

    findings = []
    if kept:
        first = kept[0][0]
        with warnings.catch_warnings():  # said here as findings instead
            warnings.simplefilter("ignore")
            rendered = render_conversation(first.messages, tokenizer, chat_template, labelling["stop_tokens"],
                                           labelling["train_reasoning"])
        if rendered.appended:
            findings.append(Finding("warning", "no-stop-marker", first.source, "the chat template writes no stop "
                                    f"marker after the final reply: {tokenizer.decode(list(rendered.appended))!r} "
                                    "is appended and trained"))
        if any(not span.stopped for span in rendered.spans[:-1]):
            findings.append(Finding("warning", "no-stop-marker", first.source, "the chat template writes no stop token "
                                    "after replies other than the last: they train without one (set data.stop_tokens "
                                    "to the model's stop tokens if its generation config lacks them)"))
    configured = [t for t in labelling["stop_tokens"] if isinstance(t, int)]
    trained = {label for _, example in kept for label in example["labels"] if label != IGNORE_INDEX}
    if configured and kept and not trained & set(configured):
        names = ", ".join(repr(tokenizer.decode([t])) for t in configured)
        findings.append(Finding("warning", "stop-token-untrained", "", f"none of the model's stop tokens ({names}, "
                                "from its generation config) is ever trained: generation will not stop where the "
                                "training replies end"))
    example = {"location": kept[0][0].source, "text": mark_trained(kept[0][1], tokenizer)} if kept else None
    return findings, example


def visible_edges(marked: str) -> str:
    """A marked example with the newlines and tabs inside each ``[[...]]`` written as ``\\n`` and ``\\t``, so the
    whitespace a reply is trained with shows at its edges: ``[[  \\n- item\\n\\n<|im_end|>]]``."""
    return re.sub(r"\[\[(.*?)\]\]", lambda m: "[[" + m[1].replace("\n", "\\n").replace("\t", "\\t") + "]]",
                  marked, flags=re.S)


def _too_deep(paths: list[str]) -> str:
    for path in paths:
        for number, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), start=1):
            try:
                json.loads(line)
            except RecursionError:
                return f"{path}:{number}: JSON nested too deeply to parse"
            except ValueError:
                continue
    return f"{', '.join(paths)}: JSON nested too deeply to parse"


def build_report(cli: Any, options: Any) -> dict[str, Any] | str:
    """The full report as plain data, or the one-line error when a file cannot be read at all."""
    from lightning_ft.models import load_tokenizer

    data_module = cli.datamodule
    held_out = _held_out_sets(cli.trainer)
    extra: dict[str, ArrowRows] = {}
    try:
        train, val, problems = data_module.scan_rows()
        for name, path, system_prompt in held_out:
            held = read_source(path, data_module.format, system_prompt)
            extra[name] = ArrowRows([(held, held.dataset)])
            problems += held.problems
    except RecursionError:  # json raises it, not JSONDecodeError, for absurdly nested values
        paths = [s.path for s in data_module.training_sources()] + [data_module.val_path] + [
            path for _, path, _ in held_out]
        return _too_deep([path for path in paths if path is not None])
    findings, unreadable = scan_findings(problems)
    if unreadable:
        return unreadable
    findings += lint_conversations({"train": train, "val": val, **extra}, options.near_threshold)
    tokenizer = load_tokenizer(data_module.tokenizer, data_module.chat_template)
    stats, scored, labelling = {}, [], data_module.labelling()
    for name, rows in (("train", train), ("val", val)):
        if name == "train" or len(rows):
            with warnings.catch_warnings():  # label_findings reports the template's stop markers
                warnings.simplefilter("ignore")
                # Streamed: only the examples the surprise ranking scores are kept.
                stats[name], found, kept = token_checks(rows.conversations(), tokenizer, data_module.max_length,
                                                        data_module.truncation, data_module.chat_template, labelling,
                                                        keep=max(0, options.surprise_max - len(scored)))
            findings += found
            scored += kept
    found, example = label_findings(scored, tokenizer, data_module.chat_template, labelling)
    findings += found
    surprises = _surprises(cli, scored, tokenizer, options) if options.surprise_top > 0 and scored else None
    files = {"train": ", ".join(s.label for s in data_module.training_sources()) or None, "val": data_module.val_path,
             **{name: path for name, path, _ in held_out}}
    return assemble(findings, options.strict, files, data_module.max_length, stats, surprises=surprises,
                    example=example)


def _print_report(report: dict[str, Any], show: int) -> None:
    from rich.console import Console
    from rich.rule import Rule
    from rich.table import Table
    from rich.text import Text

    console = Console()
    print_findings(console, report["findings"], show)
    rows = [("conversations", lambda s: s["conversations"])]
    rows += [(f"{role} turns", lambda s, r=role: s["turns"][r]) for role in ("system", "user", "assistant")]
    rows += [(f"{role} tokens", lambda s, r=role: s["tokens"][r]) for role in ("system", "user", "assistant")]
    rows += [(key.replace("_", " "), lambda s, k=key: s[k])
             for key in ("total_tokens", "trained_tokens", "truncated", "dropped", "assistant_tokens_lost")]
    console.print(stats_table(f"Data (max_length={report['max_length']})", report["stats"], rows))
    surprises = report["surprises"]
    if surprises and surprises["top"]:
        table = Table(title=f"Most surprising to the base model: mean loss on assistant tokens "
                            f"(median {surprises['median_loss']:.3f} over {surprises['scored']} conversations)")
        for column in ("loss", "location", "prompt", "answer"):
            table.add_column(column, overflow="fold")
        for item in surprises["top"]:
            table.add_row(f"{item['loss']:.3f}", item["location"], shorten(item["prompt"], 80), shorten(item["answer"], 120))
        console.print(table)
    if report["example"]:
        console.print(Rule(f"One example as trained ({report['example']['location']}): [[...]] is trained"))
        console.print(Text(visible_edges(report["example"]["text"])))
        console.print(Rule())
    print_verdict(console, report)


def run(argv: list[str], preference: bool | None = None) -> int:
    """Entry point of ``lightning_ft check-data``; returns the exit code.

    Args:
        argv: The arguments after ``check-data``.
        preference: Check preference pairs with the preference module and data (``None``: when the config
            sets a preference-only model key, see :func:`~lightning_ft.commands.preference.is_preference_config`).
    """
    parser = _parser()
    options, rest = parser.parse_known_args(argv)
    if options.surprise_top < 0 or options.surprise_max < 1 or options.surprise_batch_size < 1 or options.show < 0:
        parser.error("--surprise_top and --show must be >= 0, --surprise_max and --surprise_batch_size >= 1")
    if not 0.0 < options.near_threshold <= 1.0:
        parser.error(f"--near_threshold={options.near_threshold} must be in (0, 1]")
    from lightning_ft.cli import main

    if preference is None:
        preference = pairs.is_preference_config(rest)
    # With --json the report is the only thing on stdout: progress lines (converting the default model on a
    # first run, the checks' progress) go to stderr, so a script can parse what it reads.
    with contextlib.redirect_stdout(sys.stderr) if options.json else contextlib.nullcontext():
        try:
            cli = main(rest, run=False, **(pairs.classes() if preference else {}))
        except SystemExit as error:  # the config parser already printed what is wrong
            return 2 if error.code else 0
        try:
            report = (pairs.build_pair_report if preference else build_report)(cli, options)
        except (ValueError, OSError) as error:  # no data configured, a bad split, a model that cannot load
            return _fail(str(error).splitlines()[0])
    if isinstance(report, str):
        return _fail(report)
    if options.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        (pairs.print_pair_report if preference else _print_report)(report, options.show)
    return 0 if report["ok"] else 1
