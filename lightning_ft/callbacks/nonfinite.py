"""Skip optimizer steps whose loss or gradients are not finite, and stop a run that does not recover."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from typing_extensions import override


class NonFiniteTrainingError(RuntimeError):
    """Training produced non-finite losses or gradients for too many steps in a row."""


class NonFiniteGuard(pl.Callback):
    """Leave the weights untouched on a step whose loss or gradient norm is NaN or infinite.

    The check runs once the gradients of the whole accumulation window are in (unscaled under mixed
    precision), just before ``optimizer.step``. A bad step's gradients are dropped (set to ``None``), so the
    optimizer touches no weight: no update, no momentum, no weight decay. Skips are counted and logged as
    ``train/skipped_steps``. After ``max_consecutive_skips`` bad steps in a row, or when training ends in a
    run of bad steps, fit stops with :class:`NonFiniteTrainingError`, so nothing is exported from a run that
    did not recover. Under a ``GradScaler`` (``precision: 16-mixed``) an overflowing gradient is the scaler's
    normal way of finding its scale: it skips that step itself, and only a non-finite loss counts here.

    :class:`~lightning_ft.FineTuneModule` adds one with the defaults when the trainer has none; the CLI
    configures it under ``--nan_guard.*``.

    Example::

        trainer = pl.Trainer(callbacks=[NonFiniteGuard(max_consecutive_skips=3)])

    Args:
        max_consecutive_skips: Bad steps in a row after which training stops (at least 1).
    """

    def __init__(self, max_consecutive_skips: int = 5) -> None:
        if max_consecutive_skips < 1:
            raise ValueError(f"NonFiniteGuard max_consecutive_skips={max_consecutive_skips} must be >= 1")
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps = 0
        self.consecutive = 0
        self._loss_finite = True  # over the current accumulation window
        self._last_loss = float("nan")

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(max_consecutive_skips=self.max_consecutive_skips)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        self._loss_finite &= finite
        if not finite:
            self._last_loss = float(loss.detach().float().sum())

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        bad = not self._loss_finite or (scaler is None and not bool(torch.isfinite(norm)))
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)  # every rank skips together
        self._loss_finite = True
        if bad:
            optimizer.zero_grad(set_to_none=True)  # no gradient, no update: AdamW skips parameters without one
            self.skipped_steps += 1
            self.consecutive += 1
        else:
            self.consecutive = 0
        pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False,
                      reduce_fx="max")
        if bad:
            self._report(trainer, optimizer, float(norm))

    def _report(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, norm: float) -> None:
        step = trainer.global_step + 1  # the step being taken now
        lr = optimizer.param_groups[0]["lr"]
        if self.consecutive >= self.max_consecutive_skips:
            raise NonFiniteTrainingError(self._message(step, lr, norm))
        rank_zero_warn(f"Step {step}: non-finite loss or gradient norm (loss {self._last_loss:g}, gradient norm "
                       f"{norm:g}); skipped the optimizer step, weights unchanged ({self.consecutive} in a row).")

    def _message(self, step: int, lr: float, norm: float) -> str:
        first = step - self.consecutive + 1
        return (f"Training stopped at step {step}: the loss or gradient norm was not finite for {self.consecutive} "
                f"step(s) in a row (steps {first}-{step}; last gradient norm {norm:g}), so those steps were skipped "
                f"and nothing was saved from them. Lower the learning rate (now {lr:g}) or train in bfloat16 or "
                "float32 (model.dtype, trainer.precision) instead of float16.")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run whose last steps were all skipped did not recover: fail rather than export it as a success.
        if self.consecutive:
            lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
            raise NonFiniteTrainingError(self._message(trainer.global_step, lr, float("nan")))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
