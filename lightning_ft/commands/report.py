"""What every ``check-data`` report shares: the verdict over its findings and the findings table."""

from __future__ import annotations

from collections import Counter
from typing import Any

from lightning_ft.data.checks import Finding

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
