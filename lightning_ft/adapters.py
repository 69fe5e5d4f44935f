"""Typed adapter specs: what part of the model trains. Each turns into a ``peft`` config or a freeze plan.

The classes are plain typed constructors so LightningCLI shows their arguments in ``--help`` and YAML::

    model:
      adapter:
        class_path: lightning_ft.LoRA
        init_args: {r: 16, alpha: 32, target_modules: all-linear}
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from torch import nn

from lightning_ft.models import base_record, same_base


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

    def load_kwargs(self) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments the base model needs for this adapter (none for LoRA)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"class": type(self).__name__, **vars(self)}


class QLoRA(LoRA):
    """LoRA on a base model quantised by bitsandbytes to 4-bit NF4 (or 8-bit): the least memory.

    Needs the ``qlora`` extra (``pip install "lightning_ft[qlora]"``). The base stays frozen and
    quantised; adapters train in full precision, with matmuls in ``compute_dtype``.

    Args:
        r: Rank of each low-rank update.
        alpha: Scaling numerator (``alpha / r``).
        dropout: Dropout on the adapter input.
        target_modules: As for :class:`LoRA`.
        use_rslora: Rank-stabilised scaling.
        use_dora: Weight-decomposed LoRA (DoRA).
        modules_to_save: Extra modules trained in full and saved with the adapter.
        bits: 4 (NF4 or FP4) or 8 (LLM.int8).
        quant_type: 4-bit data type: ``nf4`` (QLoRA paper) or ``fp4``.
        double_quant: Quantise the quantisation constants too (saves ~0.4 bit per weight).
        compute_dtype: Dtype of the de-quantised matmuls: ``bfloat16`` where supported, else ``float32``.
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
        bits: Literal[4, 8] = 4,
        quant_type: Literal["nf4", "fp4"] = "nf4",
        double_quant: bool = True,
        compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
    ) -> None:
        super().__init__(r, alpha, dropout, target_modules, use_rslora, use_dora, modules_to_save)
        problems = []
        if bits not in (4, 8):
            problems.append(f"bits={bits} must be 4 or 8")
        if quant_type not in ("nf4", "fp4"):
            problems.append(f"quant_type={quant_type!r} must be nf4 or fp4")
        _check(problems, "QLoRA")
        self.bits, self.quant_type, self.double_quant, self.compute_dtype = bits, quant_type, double_quant, compute_dtype

    def load_kwargs(self) -> dict[str, Any]:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise ImportError(
                'QLoRA needs bitsandbytes: pip install "lightning_ft[qlora]" (or pip install bitsandbytes).'
            ) from err
        import torch
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
        return {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=self.quant_type,
                bnb_4bit_use_double_quant=self.double_quant,
                bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
            )
        }

    def as_lora(self) -> LoRA:
        """The same adapter as plain :class:`LoRA` on a full-precision base: merging into 4-bit weights would
        round the update away, so a QLoRA run is merged (and exported) as LoRA."""
        return LoRA(self.r, self.alpha, self.dropout, self.target_modules, self.use_rslora, self.use_dora,
                    self.modules_to_save)

    def attach(self, model: nn.Module) -> nn.Module:
        from peft import prepare_model_for_kbit_training

        # Casts norms to fp32 and makes inputs require grads so the frozen quantised base passes gradients.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return super().attach(model)


class PeftAdapter:
    """Any other ``peft`` method, given as its config (IA3, LoHa, prefix tuning, ...), passed through unchanged.

    In YAML, give the peft config class itself as the adapter; the module wraps it::

        adapter:
          class_path: peft.IA3Config
          init_args: {target_modules: [k_proj, v_proj, down_proj], feedforward_modules: [down_proj]}
    """

    method = "peft"

    def __init__(self, config: Any) -> None:
        self.config = config

    def load_kwargs(self) -> dict[str, Any]:
        return {}

    def attach(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        if self.config.task_type is None:
            self.config.task_type = "CAUSAL_LM"
        return get_peft_model(model, self.config)

    def to_dict(self) -> dict[str, Any]:
        return {"class": type(self.config).__name__, **self.config.to_dict()}


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

    def load_kwargs(self) -> dict[str, Any]:
        return {}

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
        return {"class": type(self).__name__, **vars(self)}


_SPECS = {"LoRA": LoRA, "QLoRA": QLoRA, "FullFineTune": FullFineTune}


def adapter_from_dict(spec: dict[str, Any]) -> Any:
    """Rebuild an adapter from its ``to_dict()`` (as a checkpoint stores it under ``lightning_ft.adapter``).

    Returns:
        A :class:`LoRA`, :class:`QLoRA` or :class:`FullFineTune`; for any other peft method (whose dict is its
        config's, naming its ``peft_type``) the ``peft`` config itself, as ``FineTuneModule(adapter=...)`` takes it.
    """
    fields = dict(spec)
    name = fields.pop("class", None)
    if name in _SPECS:
        return _SPECS[name](**fields)
    from peft import PeftConfig

    return PeftConfig.from_peft_type(**fields)


def has_adapters(model: nn.Module) -> bool:
    """Whether :func:`base_model_of` can recover the base model from ``model`` by switching its adapters off:
    a peft model, or a transformers model with peft adapters loaded into it."""
    return (hasattr(model, "disable_adapter") and hasattr(model, "peft_config")) or bool(
        getattr(model, "_hf_peft_config_loaded", False))


@contextlib.contextmanager
def base_model_of(model: nn.Module, frozen_copy: nn.Module | None = None) -> Iterator[nn.Module]:
    """The base model, for a forward pass inside the block: the one way lightning_ft reaches it.

    Used for the KL penalty, the preference reference, the drift monitor and task success before training.

    Args:
        model: The model being fine-tuned. With adapters (peft's ``disable_adapter()`` or transformers'
            ``disable_adapters()``), it is yielded with them switched off for the block: exact, no copy, one
            more forward pass.
        frozen_copy: A frozen copy of the base (what full fine-tuning keeps), yielded as is when given.

    Raises:
        TypeError: ``model`` has no adapters and no ``frozen_copy`` is given.
    """
    if frozen_copy is not None:
        yield frozen_copy
    elif hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        with model.disable_adapter():
            yield model
    elif getattr(model, "_hf_peft_config_loaded", False):
        model.disable_adapters()
        try:
            yield model
        finally:
            model.enable_adapters()
    else:
        raise TypeError(f"{type(model).__name__} has no adapters to disable and no frozen copy of its base was given")


#: Written beside every adapter lightning_ft saves (``hf_model/``, exports): the base it was trained on.
BASE_RECORD = "lightning_ft_base.json"


def write_base_record(directory: str | os.PathLike, model: nn.Module, spec: str) -> None:
    """Record in ``directory`` which base model an adapter belongs to (checked by :func:`check_base_record`)."""
    Path(directory, BASE_RECORD).write_text(json.dumps(base_record(model, spec), indent=2))


def check_base_record(directory: str | os.PathLike, base: nn.Module, spec: str) -> None:
    """Refuse to put the adapter in ``directory`` onto ``base`` (loaded from ``spec``) when it was trained on another.

    An adapter without the record (written by another tool) only gets a warning: it cannot be verified.
    """
    path = Path(directory, BASE_RECORD)
    if not path.is_file():
        warnings.warn(f"Adapter {directory} has no {BASE_RECORD} (not written by lightning_ft?): cannot check that "
                      f"it was trained on base {spec!r}.", stacklevel=2)
        return
    record = json.loads(path.read_text())
    if not same_base(record, base):
        raise ValueError(f"Adapter {directory} was trained on base model {record.get('base_model')!r}, which differs "
                         f"from the base {spec!r} it would be loaded onto (architecture or weights). Pass --model "
                         "with the adapter's base.")
