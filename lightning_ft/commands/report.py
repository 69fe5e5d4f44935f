"""What every ``check-data`` report shares: the verdict over its findings and the findings table."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning_ft.data.checks import Finding, problem_finding
from lightning_ft.data.formats import DataProblem

_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


def verdict(findings: list[Finding], strict: bool) -> dict[str, Any]:
    """``ok``, ``counts`` per severity and the findings (as dicts, errors first); ``strict`` makes warnings errors."""
    if strict:
        findings = [Finding("error", f.code, f.location, f.message) if f.severity == "warning" else f
                    for f in findings]
    findings = sorted(findings, key=lambda f: _SEVERITY_ORDER[f.severity])
    counts = Counter(f.severity for f in findings)
    return {"ok": counts["error"] == 0, "counts": {severity: counts[severity] for severity in _SEVERITY_ORDER},
            "findings": [f.to_dict() for f in findings]}


def scan_findings(problems: Sequence[DataProblem]) -> tuple[list[Finding], str | None]:
    """The findings of what a data scan reported, and the one-line error that replaces the report when a file
    cannot be read at all (``None`` when every file was read)."""
    findings = [problem_finding(problem) for problem in problems]
    unreadable = [f"{f.location}: {f.message}" for f in findings if f.code == "unreadable-file"]
    return findings, "; ".join(unreadable) or None


def assemble(findings: list[Finding], strict: bool, files: Mapping[str, str | None], max_length: int,
             stats: Mapping[str, Any], **sections: Any) -> dict[str, Any]:
    """A ``check-data`` report as plain data (what ``--json`` prints): the verdict, the files, the statistics
    per split and any further sections."""
    return {**verdict(findings, strict), "files": dict(files), "max_length": max_length, "stats": dict(stats),
            **sections}


def stats_table(title: str, stats: Mapping[str, Mapping[str, Any]],
                rows: Sequence[tuple[str, Callable[[Mapping[str, Any]], Any]]]) -> Any:
    """A rich table of statistics: one column per split, one row per ``(label, value of a split)``."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("")
    for split in stats:
        table.add_column(split, justify="right")
    for label, value in rows:
        table.add_row(label, *(f"{value(split):,}" for split in stats.values()))
    return table


def print_findings(console: Any, findings: list[dict[str, str]], show: int) -> None:
    """The findings table (at most ``show`` rows per code), then how many of each code were left out."""
    from rich.table import Table

    styles = {"error": "bold red", "warning": "yellow", "info": "dim"}
    table = Table(title="Findings", show_lines=False)
    for column in ("severity", "code", "location", "message"):
        table.add_column(column, overflow="fold")
    shown: Counter = Counter()
    for finding in findings:
        shown[finding["code"]] += 1
        if shown[finding["code"]] <= show:
            table.add_row(*(finding[k] for k in ("severity", "code", "location", "message")),
                          style=styles[finding["severity"]])
    if findings:
        console.print(table)
    for code, n in shown.items():
        if n > show:
            console.print(f"  ... and {n - show} more {code} (--json lists every finding)", style="dim")


def print_verdict(console: Any, report: dict[str, Any]) -> None:
    """The last line: OK or FAILED with the counts per severity."""
    counts = report["counts"]
    verdict = "[green]OK[/green]" if report["ok"] else "[bold red]FAILED[/bold red]"
    console.print(f"{verdict}: {counts['error']} errors, {counts['warning']} warnings, {counts['info']} info")
