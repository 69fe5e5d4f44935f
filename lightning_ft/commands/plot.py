"""``lightning_ft plot``: a PNG of TensorBoard curves, one panel per tag and one line per run.

::

    lightning_ft plot full=runs/forgetting_demo/full lora=runs/forgetting_demo/lora \\
        --tags forgetting/acc forgetting/kl val/loss --out docs/forgetting_demo.png

A run is a directory holding one run's event files (a ``version_N`` directory, or a ``default_root_dir``
with a single version), optionally prefixed by ``LABEL=``. Exit code 1 on any error, with nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning_ft.plotting import DEFAULT_TAGS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning_ft plot", allow_abbrev=False, description=__doc__.split("::")[0])
    parser.add_argument("runs", nargs="+", metavar="[LABEL=]RUN_DIR", help="runs to draw, each a line")
    parser.add_argument("--out", required=True, help="the PNG file written")
    parser.add_argument("--tags", nargs="+", default=list(DEFAULT_TAGS), help="scalar tags, one panel each")
    parser.add_argument("--hline", action="append", default=[], metavar="TAG=VALUE",
                        help="a dashed reference line (e.g. an alarm threshold) on a tag's panel")
    parser.add_argument("--title", default=None)
    return parser


def _pairs(values: list[str], what: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key or not rest:
            raise ValueError(f"{what} {value!r} must look like NAME=VALUE")
        pairs[key] = rest
    return pairs


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from lightning_ft.plotting import plot_runs

    try:
        runs = {}
        for spec in args.runs:
            label, sep, path = spec.partition("=")
            label, path = (label, path) if sep else (Path(spec).name or spec, spec)
            if label in runs:
                raise ValueError(f"two runs are labelled {label!r}: name them with LABEL=RUN_DIR")
            runs[label] = path
        hlines = {tag: float(value) for tag, value in _pairs(args.hline, "--hline").items()}
        out = plot_runs(runs, args.out, tags=args.tags, hlines=hlines, title=args.title)
    except (OSError, ValueError, ImportError) as error:
        print(f"lightning_ft plot: {error}", file=sys.stderr)
        return 1
    print(out)
    return 0
