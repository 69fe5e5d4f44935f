"""The optimizer and learning-rate schedule of a fine-tuning run.

By default AdamW over two parameter groups (weight matrices decayed, norms and biases not) and a step-wise
warmup then cosine/linear/constant decay to a floor (:mod:`lightning_ft.schedules`). Either can be replaced
from the config by any optimizer or scheduler class (LightningCLI's ``OptimizerCallable`` and
``LRSchedulerCallable``); the parameter groups, the peak learning rate and the weight decay stay ours.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch.optim.lr_scheduler import LambdaLR

from lightning_ft.schedules import DecayName, lr_lambda, warmup_steps_for

#: The settings that shape only the default optimizer or the default schedule.
ADAMW_SETTINGS = ("betas",)
SCHEDULE_SETTINGS = ("warmup_ratio", "warmup_steps", "decay", "min_lr_ratio")


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Whether a parameter is exempt from weight decay: norms' gains and biases (and any vector)."""
    # Weight decay pulls weights to zero: right for matrices, wrong for norms' gains and biases.
    return param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")


def param_groups(named_parameters: Iterable[tuple[str, torch.nn.Parameter]], learning_rate: float,
                 weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters in two groups, both at ``learning_rate``: weight matrices with
    ``weight_decay``, then norms and biases with none."""
    decay, exempt = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            (exempt if no_decay(name, param) else decay).append(param)
    if not decay and not exempt:
        raise ValueError("No trainable parameters: the adapter froze the whole model.")
    return [{"params": decay, "lr": learning_rate, "weight_decay": weight_decay},
            {"params": exempt, "lr": learning_rate, "weight_decay": 0.0}]


def _fixed_arguments(optimizer: OptimizerCallable) -> dict[str, Any]:
    """The keyword arguments a partial (as jsonargparse builds from ``class_path``/``init_args``) fixes away
    from its optimizer class's defaults."""
    if not isinstance(optimizer, functools.partial):
        return {}
    cls = next((part for part in (optimizer.func, *optimizer.args) if isinstance(part, type)), None)
    if cls is None:
        return {}
    defaults = {name: p.default for name, p in inspect.signature(cls).parameters.items()
                if p.default is not inspect.Parameter.empty}  # a required lr is the user's to give
    return {key: value for key, value in optimizer.keywords.items()
            if key in defaults and value != defaults[key]}


def settings_problems(optimizer: OptimizerCallable | None, lr_scheduler: LRSchedulerCallable | None,
                      settings: Mapping[str, Any], defaults: Mapping[str, Any]) -> list[str]:
    """What a configuration sets that would be silently ignored, one problem each.

    Args:
        optimizer: The configured optimizer, or ``None`` for AdamW.
        lr_scheduler: The configured scheduler, or ``None`` for the warmup and decay schedule.
        settings: The module's values of :data:`ADAMW_SETTINGS` and :data:`SCHEDULE_SETTINGS`.
        defaults: Their defaults in the module's signature.
    """
    problems = []
    if optimizer is not None:
        fixed = _fixed_arguments(optimizer)
        for key, setting in (("lr", "learning_rate"), ("weight_decay", "weight_decay")):
            if key in fixed:
                problems.append(f"optimizer sets {key}={fixed[key]}: set model.{setting} instead (the parameter "
                                "groups carry it, so norms and biases keep no weight decay)")
        problems += [f"{key}={settings[key]} applies to the default AdamW only: give it in the optimizer's init_args"
                     for key in ADAMW_SETTINGS if _differs(settings[key], defaults[key])]
    if lr_scheduler is not None:
        changed = [f"{key}={settings[key]}" for key in SCHEDULE_SETTINGS if _differs(settings[key], defaults[key])]
        if changed:
            problems.append(f"{', '.join(changed)} shape the default schedule only, which lr_scheduler replaces")
    return problems


def _differs(value: Any, default: Any) -> bool:
    return (tuple(value) if isinstance(value, list) else value) != default


def build_optimizer(groups: list[dict[str, Any]], optimizer: OptimizerCallable | None,
                    betas: tuple[float, float]) -> torch.optim.Optimizer:
    """``optimizer(groups)``, or AdamW with ``betas`` when none is configured."""
    if optimizer is None:
        return torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=tuple(betas))
    return optimizer(groups)


def build_scheduler(optimizer: torch.optim.Optimizer, lr_scheduler: LRSchedulerCallable | None, total_steps: int,
                    warmup_steps: int | None, warmup_ratio: float, decay: DecayName,
                    min_lr_ratio: float) -> dict[str, Any]:
    """Lightning's scheduler config, stepped every optimizer step: ``lr_scheduler(optimizer)``, or linear
    warmup then ``decay`` to ``min_lr_ratio`` of the peak over ``total_steps``."""
    if lr_scheduler is not None:
        return {"scheduler": lr_scheduler(optimizer), "interval": "step"}
    warmup = warmup_steps_for(total_steps, warmup_steps, warmup_ratio)
    return {"scheduler": LambdaLR(optimizer, lr_lambda(total_steps, warmup, decay, min_lr_ratio)), "interval": "step"}
