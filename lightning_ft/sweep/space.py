"""What a sweep searches: a grid of learning rates, plus any other fit-config keys from a YAML file.

A search-space file maps dotted keys of the ``fit`` configuration to either a list (a grid axis, or a
categorical choice when other keys are sampled) or a range::

    model.learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}   # log-uniform float
    model.adapter.init_args.r: [8, 16, 32]                          # categorical LoRA rank
    trainer.max_steps: {low: 10, high: 40, step: 10}                # integers (both bounds are ints)
    data.replay_ratio: {low: 0.0, high: 0.5}                        # uniform float
    model.kl_beta: {low: 0.0, high: 0.2}

A space of lists only is a grid (every combination runs once); a range makes it a sampled search.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: How far the default grid reaches either side of the centre learning rate (a factor of 10).
DEFAULT_SPAN = 10.0
#: The fit key ``--lrs`` and ``--points`` sweep.
LR_KEY = "model.learning_rate"


def log_grid(center: float, points: int, span: float = DEFAULT_SPAN) -> list[float]:
    """``points`` learning rates log-spaced from ``center / span`` to ``center * span`` (3 significant digits)."""
    if points < 2:
        raise ValueError(f"points={points}: a sweep needs at least two learning rates")
    if center <= 0 or span <= 1:
        raise ValueError(f"the grid needs center > 0 and span > 1 (got center={center}, span={span})")
    low = math.log10(center / span)
    step = 2 * math.log10(span) / (points - 1)
    return [float(f"{10 ** (low + i * step):.3g}") for i in range(points)]


def parse_lrs(text: str) -> list[float]:
    """``"1e-5,1e-4,1e-3"`` -> sorted unique floats; every problem is an error naming the value."""
    values, problems = [], []
    for part in (piece.strip() for piece in text.split(",")):
        try:
            value = float(part)
        except ValueError:
            problems.append(f"{part!r} is not a number")
            continue
        if not value > 0 or math.isinf(value):
            problems.append(f"{part} is not a positive learning rate")
        values.append(value)
    if problems:
        raise ValueError(f"--lrs {text!r}: " + "; ".join(problems))
    values = sorted(set(values))
    if len(values) < 2:
        raise ValueError(f"--lrs {text!r}: a sweep needs at least two different learning rates")
    return values


@dataclass(frozen=True)
class Range:
    """A sampled numeric key: ``int`` when both bounds are integers, else ``float``."""

    low: float
    high: float
    log: bool = False
    step: float | None = None
    kind: str = "float"


@dataclass
class SearchSpace:
    """Grid axes (``key -> values``) and sampled ranges (``key -> Range``) over fit-config keys."""

    choices: dict[str, list[Any]] = field(default_factory=dict)
    ranges: dict[str, Range] = field(default_factory=dict)

    @property
    def is_grid(self) -> bool:
        """Lists only: every combination runs exactly once."""
        return not self.ranges

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the grid axes (the last key varies fastest)."""
        keys = list(self.choices)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.choices[k] for k in keys))]

    def suggest(self, trial: Any) -> dict[str, Any]:
        """The trial's value for every key (an enqueued grid point's fixed values, or the sampler's)."""
        params = {key: trial.suggest_categorical(key, values) for key, values in self.choices.items()}
        for key, spec in self.ranges.items():
            if spec.kind == "int":
                params[key] = trial.suggest_int(key, int(spec.low), int(spec.high), step=int(spec.step or 1),
                                                log=spec.log)
            else:
                params[key] = trial.suggest_float(key, spec.low, spec.high, step=spec.step, log=spec.log)
        return params

    def example(self) -> dict[str, Any]:
        """One valid point (first choices, lower bounds): enough to check every key parses as fit config."""
        point = {key: values[0] for key, values in self.choices.items()}
        point.update({key: int(spec.low) if spec.kind == "int" else spec.low for key, spec in self.ranges.items()})
        return point

    def to_json(self) -> dict[str, Any]:
        return {"choices": self.choices, "ranges": {key: vars(spec) for key, spec in self.ranges.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SearchSpace:
        return cls(dict(data["choices"]), {key: Range(**spec) for key, spec in data["ranges"].items()})


def overrides(params: dict[str, Any]) -> list[str]:
    """Fit command-line overrides setting each key (values as JSON, which jsonargparse reads)."""
    return [f"--{key}={json.dumps(value)}" for key, value in params.items()]


def read_space(path: str | Path) -> SearchSpace:
    """Parse a search-space YAML file; every problem is reported at once with its line and key."""
    import yaml

    path = Path(path)
    try:
        root = yaml.compose(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot read the search space ({error})") from error
    if not isinstance(root, yaml.MappingNode) or not root.value:
        raise ValueError(f"{path}: a search space is a mapping of fit keys to a list or a range {{low, high}}")
    space, problems = SearchSpace(), []
    for key_node, value_node in root.value:
        key, where = key_node.value, f"{path}:{key_node.start_mark.line + 1}: {key_node.value}"
        value = yaml.safe_load(yaml.serialize(value_node))
        try:
            if isinstance(value, list):
                space.choices[key] = _choices(value)
            elif isinstance(value, dict):
                space.ranges[key] = _range(value)
            else:
                raise ValueError(f"{value!r} is neither a list nor a range {{low, high}}")
        except ValueError as error:
            problems.append(f"{where}: {error}")
    if problems:
        raise ValueError("Invalid search space: " + "; ".join(problems))
    return space


def _choices(values: list[Any]) -> list[Any]:
    if len(values) < 2:
        raise ValueError(f"{values!r}: a list needs at least two values")
    values = [_number(v) if isinstance(v, str) else v for v in values]
    if len({json.dumps(v) for v in values}) != len(values):
        raise ValueError(f"{values!r} repeats a value")
    if not all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
        raise ValueError(f"{values!r}: choices must be numbers, strings, booleans or null")
    return values


def _number(text: str) -> Any:
    # YAML 1.1 reads 1e-5 (no dot) as a string: accept it as the number it plainly is.
    try:
        return float(text)
    except ValueError:
        return text


def _range(spec: dict[str, Any]) -> Range:
    unknown = sorted(set(spec) - {"low", "high", "log", "step", "type"})
    if unknown or "low" not in spec or "high" not in spec:
        raise ValueError(f"a range takes low, high and optionally log, step, type (got {sorted(spec)})")
    low, high, step = (_number(v) if isinstance(v, str) else v for v in (spec["low"], spec["high"], spec.get("step")))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise ValueError(f"low={low!r} and high={high!r} must be numbers")
    kind = spec.get("type") or ("int" if all(isinstance(v, int) for v in (low, high, step or 1)) else "float")
    if kind not in ("int", "float"):
        raise ValueError(f"type={kind!r} must be int or float")
    log = bool(spec.get("log", False))
    if not low < high:
        raise ValueError(f"low={low} must be below high={high}")
    if log and (low <= 0 or step is not None):
        raise ValueError("log=true needs low > 0 and no step")
    if step is not None and not step > 0:
        raise ValueError(f"step={step} must be > 0")
    return Range(float(low), float(high), log, None if step is None else float(step), kind)
