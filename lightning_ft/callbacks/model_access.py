"""How a measuring callback finds the Hugging Face model and tokenizer of any LightningModule."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch


def hf_model(pl_module: pl.LightningModule, model_attr: str, owner: str) -> torch.nn.Module:
    """``pl_module.<model_attr>`` (the module itself when ``model_attr`` is empty), checked to be loaded.

    Args:
        pl_module: The module being trained.
        model_attr: Attribute holding the Hugging Face model.
        owner: The callback asking, named in the error.
    """
    model = getattr(pl_module, model_attr, None) if model_attr else pl_module
    if not isinstance(model, torch.nn.Module):
        raise ValueError(
            f"{owner} needs the Hugging Face model at `pl_module.{model_attr}`, but {type(pl_module).__name__} has "
            f"{type(model).__name__} there: set `model_attr` to the attribute holding it (it must be loaded by the "
            "time training starts)."
        )
    return model


def hf_tokenizer(pl_module: pl.LightningModule, spec: str | None, owner: str) -> Any:
    """The tokenizer loaded from model spec ``spec``, or ``pl_module.tokenizer`` when ``spec`` is ``None``."""
    if spec is not None:
        from lightning_ft.models import load_tokenizer

        return load_tokenizer(spec)
    tokenizer = getattr(pl_module, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"{owner} found no `tokenizer` on {type(pl_module).__name__}: pass `tokenizer=` a model "
                         "spec (hub id or local directory) to load it from.")
    return tokenizer
