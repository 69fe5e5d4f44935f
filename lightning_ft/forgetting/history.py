"""What one forgetting check found, as a typed record; a dict only at the checkpoint boundary."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CheckRecord:
    """One measurement of :class:`~lightning_ft.ForgettingCheck`; the first of its ``history`` is the baseline.

    Attributes:
        step: The trainer's global step when the model was scored.
        metrics: ``acc``, ``acc_norm``, ``kl``, ``subject/<name>/acc[_norm]`` and ``lm_eval/<task>/<metric>``,
            whichever the check measures.
        ok: Whether the model was within the check's thresholds (the baseline always is).
        seconds: Wall time the scoring took.
    """

    step: int
    metrics: dict[str, float]
    ok: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, for the checkpoint (``torch.load(weights_only=True)`` reads it back)."""
        return {"step": self.step, "metrics": dict(self.metrics), "ok": self.ok, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> CheckRecord:
        """The inverse of :meth:`to_dict`."""
        return cls(step=int(state["step"]), metrics={key: float(value) for key, value in state["metrics"].items()},
                   ok=bool(state["ok"]), seconds=float(state["seconds"]))
