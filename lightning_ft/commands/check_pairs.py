"""``check-data`` for preference runs: recognise a preference config, report on its pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lightning_ft.commands.report import print_findings, print_verdict, verdict

#: Keys that only PreferenceModule has: a config setting one of them describes a preference run.
PREFERENCE_MODEL_KEYS = ("loss", "beta", "label_smoothing", "simpo_gamma", "sft_weight", "reference")


def classes() -> dict[str, type]:
    """The ``model_class`` and ``datamodule_class`` arguments of :func:`lightning_ft.cli.main` for preference runs."""
    from lightning_ft.preference import PreferenceDataModule, PreferenceModule

    return {"model_class": PreferenceModule, "datamodule_class": PreferenceDataModule}


def is_preference_config(argv: list[str]) -> bool:
    """Whether command-line arguments describe a preference run: a ``--config`` file or an override setting a
    :data:`PREFERENCE_MODEL_KEYS` key under ``model``."""
    overrides = {f"--model.{key}" for key in PREFERENCE_MODEL_KEYS}
    for index, arg in enumerate(argv):
        if arg.split("=", 1)[0] in overrides:
            return True
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else (
            argv[index + 1] if arg == "--config" and index + 1 < len(argv) else None)
        if path is not None and Path(path).is_file():
            try:
                model = (yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).get("model")
            except (yaml.YAMLError, AttributeError, UnicodeDecodeError):
                continue  # the CLI reports the unreadable config itself
            if isinstance(model, dict) and any(key in model for key in PREFERENCE_MODEL_KEYS):
                return True
    return False


def build_pair_report(cli: Any, options: Any) -> dict[str, Any] | str:
    """``check-data``'s report for preference data, or the one-line error when a file cannot be read at all."""
    from lightning_ft.data.checks import Finding, problem_finding
    from lightning_ft.preference.checks import length_bias, lint_pairs
    from lightning_ft.preference.data import encode_side

    data_module = cli.datamodule
    data, problems = data_module.scan()
    findings = [problem_finding(problem) for problem in problems]
    unreadable = [f"{f.location}: {f.message}" for f in findings if f.code == "unreadable-file"]
    if unreadable:
        return "; ".join(unreadable)
    train, val = data_module.split(data)
    findings += lint_pairs({"train": train, "val": val}, options.near_threshold)
    tokenizer = data_module._load_tokenizer()
    stats = {}
    for name, pairs in (("train", train), ("val", val)):
        if name == "val" and not pairs:
            continue
        split = {"pairs": len(pairs), "tokens": 0, "scored_tokens": 0, "truncated": 0,
                 "length_bias": round(length_bias(pairs)[0], 4)}
        for pair in pairs:
            for side in ("chosen", "rejected"):
                try:
                    example = encode_side(pair, side, tokenizer, 10**9, data_module.chat_template,
                                          data_module.stop_tokens())
                except ValueError as error:
                    findings.append(Finding("error", "unencodable", pair.source, f"{side}: {error}"))
                    continue
                length = len(example["input_ids"])
                split["tokens"] += min(length, data_module.max_length)
                split["scored_tokens"] += sum(label != -100 for label in example["labels"][:data_module.max_length])
                if length > data_module.max_length:
                    split["truncated"] += 1
                    findings.append(Finding("warning", "truncated", pair.source,
                                            f"{side} side has {length} tokens, cut to max_length={data_module.max_length}"))
        stats[name] = split
    files = {"train": data_module.train_path, "val": data_module.val_path}
    return {**verdict(findings, options.strict), "max_length": data_module.max_length, "stats": stats,
            "files": {split: getattr(spec, "label", spec) for split, spec in files.items()}}


def print_pair_report(report: dict[str, Any], show: int) -> None:
    """Findings, then pairs and tokens per split, then the verdict."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    print_findings(console, report["findings"], show)
    table = Table(title=f"Preference data (max_length={report['max_length']})")
    table.add_column("")
    for split in report["stats"]:
        table.add_column(split, justify="right")
    for key in ("pairs", "tokens", "scored_tokens", "truncated", "length_bias"):
        table.add_row(key.replace("_", " "), *(f"{s[key]:,}" for s in report["stats"].values()))
    console.print(table)
    print_verdict(console, report)
