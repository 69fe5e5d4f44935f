"""Learning-rate multipliers for fine-tuning: linear warmup, then cosine / linear / constant decay to a floor.

Each factory returns a pure ``step -> multiplier`` function for ``torch.optim.lr_scheduler.LambdaLR``,
so the arithmetic is testable without an optimizer.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

DecayName = Literal["cosine", "linear", "constant"]


def warmup_steps_for(total_steps: int, warmup_steps: int | None, warmup_ratio: float) -> int:
    """Warmup length: explicit steps win over the ratio, and warmup never exceeds the run."""
    steps = warmup_steps if warmup_steps is not None else int(round(warmup_ratio * total_steps))
    return max(0, min(steps, total_steps))


def lr_lambda(
    total_steps: int, warmup_steps: int = 0, decay: DecayName = "cosine", min_lr_ratio: float = 0.1
) -> Callable[[int], float]:
    """Build the multiplier applied to the peak learning rate at each optimizer step.

    Args:
        total_steps: Optimizer steps in the whole run (``trainer.estimated_stepping_batches``).
        warmup_steps: Steps of linear warmup from ``1/(warmup_steps+1)`` of the peak up to the peak.
            Zero means training starts at the peak.
        decay: Shape after warmup: ``cosine`` and ``linear`` fall to ``min_lr_ratio`` at the last step,
            ``constant`` stays at the peak.
        min_lr_ratio: The floor as a fraction of the peak; decay never goes below it, even past
            ``total_steps`` (e.g. when a resumed run trains longer than first planned).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if decay not in ("cosine", "linear", "constant"):
        raise ValueError(f"decay must be one of cosine, linear, constant; got {decay!r}")
    warmup = max(0, min(warmup_steps, total_steps))
    decay_steps = max(1, total_steps - warmup)

    def multiplier(step: int) -> float:
        if step < warmup:
            # Start above zero: a zero LR on the first step wastes the step and confuses LR monitors.
            return (step + 1) / (warmup + 1)
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / decay_steps)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
        return min_lr_ratio + (1.0 - min_lr_ratio) * shape

    return multiplier
