"""Typed adapter specs: what part of the model trains. Each turns into a ``peft`` config or a freeze plan.

The classes are plain typed constructors so LightningCLI shows their arguments in ``--help`` and YAML::

    model:
      adapter:
        class_path: lightning_ft.LoRA
        init_args: {r: 16, alpha: 32, target_modules: all-linear}
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn


def _check(problems: list[str], name: str) -> None:
    if problems:
        raise ValueError(f"Invalid {name} settings: " + "; ".join(problems))


class LoRA:
    """Low-rank adapters on the frozen base model (the practical default).

    Args:
        r: Rank of each low-rank update.
        alpha: Scaling numerator; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: Dropout on the adapter input.
        target_modules: ``"all-linear"`` (every linear layer except the output head), a list of module
            name suffixes such as ``["q_proj", "v_proj"]``, or a regular expression string.
        use_rslora: Rank-stabilised scaling, which keeps high ranks from learning too slowly.
        use_dora: Weight-decomposed LoRA (DoRA).
        modules_to_save: Extra modules trained in full and saved with the adapter (e.g. ``["lm_head"]``).
    """

    method = "lora"

    def __init__(
        self,
        r: int = 16,
        alpha: float = 32.0,
        dropout: float = 0.05,
        target_modules: str | list[str] = "all-linear",
        use_rslora: bool = False,
        use_dora: bool = False,
        modules_to_save: list[str] | None = None,
    ) -> None:
        problems = []
        if r < 1:
            problems.append(f"r={r} must be >= 1")
        if alpha <= 0:
            problems.append(f"alpha={alpha} must be > 0")
        if not 0.0 <= dropout < 1.0:
            problems.append(f"dropout={dropout} must be in [0, 1)")
        if not target_modules:
            problems.append("target_modules is empty: use 'all-linear' or name modules such as ['q_proj', 'v_proj']")
        _check(problems, "LoRA")
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules = target_modules
        self.use_rslora, self.use_dora = use_rslora, use_dora
        self.modules_to_save = modules_to_save

    def to_peft_config(self):
        from peft import LoraConfig, TaskType

        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
            modules_to_save=self.modules_to_save,
        )

    def attach(self, model: nn.Module) -> nn.Module:
        """Wrap ``model`` in a ``PeftModel`` with only the adapter weights trainable."""
        from peft import get_peft_model

        try:
            return get_peft_model(model, self.to_peft_config())
        except ValueError as err:
            if "not found in the base model" not in str(err) and "Target modules" not in str(err):
                raise
            names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(
                f"LoRA target_modules={self.target_modules!r} match no module of {type(model).__name__}. "
                f"Linear layers it has: {', '.join(names)}; or use target_modules: all-linear."
            ) from err

    def to_dict(self) -> dict[str, Any]:
        return {"class": "LoRA", **vars(self)}


class FullFineTune:
    """Train every weight of the model (optionally freezing some by name): needs ~10x lower LRs than LoRA.

    Args:
        freeze: Regular expressions; parameters whose name matches any of them stay frozen
            (partial fine-tuning, e.g. ``["embed_tokens", "layers\\.[0-9]\\."]``).
    """

    method = "full"

    def __init__(self, freeze: list[str] | None = None) -> None:
        problems = []
        for pattern in freeze or []:
            try:
                re.compile(pattern)
            except re.error as err:
                problems.append(f"freeze pattern {pattern!r} is not a regular expression ({err})")
        _check(problems, "FullFineTune")
        self.freeze = list(freeze or [])

    def attach(self, model: nn.Module) -> nn.Module:
        """Mark parameters trainable except those matching ``freeze``; fail if a pattern matches nothing."""
        names = [name for name, _ in model.named_parameters()]
        unmatched = [p for p in self.freeze if not any(re.search(p, n) for n in names)]
        if unmatched:
            raise ValueError(f"FullFineTune freeze patterns {unmatched} match no parameter of {type(model).__name__}.")
        for name, param in model.named_parameters():
            param.requires_grad_(not any(re.search(p, name) for p in self.freeze))
        return model

    def to_dict(self) -> dict[str, Any]:
        return {"class": "FullFineTune", **vars(self)}
