"""lightning_ft: fine-tune Hugging Face causal language models as PyTorch Lightning jobs."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module defining it. Imported on first use (PEP 562), so that `lightning_ft.console.main`
# can silence third-party import-time noise (peft pulls in bitsandbytes) before anything heavy is imported.
_EXPORTS = {
    "DEFAULT_MODEL": "lightning_ft.models",
    "ChatDataModule": "lightning_ft.data.datamodule",
    "FineTuneModule": "lightning_ft.module",
    "ForgettingCheck": "lightning_ft.callbacks.forgetting",
    "FullFineTune": "lightning_ft.adapters",
    "LoRA": "lightning_ft.adapters",
    "PlainProgressBar": "lightning_ft.progress",
    "QLoRA": "lightning_ft.adapters",
    "RunReport": "lightning_ft.callbacks.run_report",
    "SaveHFModel": "lightning_ft.callbacks.export",
    "SaveOnPreemption": "lightning_ft.callbacks.preemption",
    "Source": "lightning_ft.data.sources",
    "TaskEval": "lightning_ft.callbacks.task_eval",
    "TensorBoardDashboard": "lightning_ft.callbacks.dashboard",
    "ValidateAtStart": "lightning_ft.callbacks.validate_at_start",
    "encode_conversation": "lightning_ft.data.collate",
    "generate": "lightning_ft.generation",
    "load_for_generation": "lightning_ft.loading",
    "load_model": "lightning_ft.models",
    "load_tokenizer": "lightning_ft.models",
    "resolve_precision": "lightning_ft.precision",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from lightning_ft.adapters import FullFineTune, LoRA, QLoRA
    from lightning_ft.callbacks import ForgettingCheck, SaveHFModel, TaskEval
    from lightning_ft.callbacks.dashboard import TensorBoardDashboard
    from lightning_ft.callbacks.preemption import SaveOnPreemption
    from lightning_ft.callbacks.run_report import RunReport
    from lightning_ft.callbacks.validate_at_start import ValidateAtStart
    from lightning_ft.data.collate import encode_conversation
    from lightning_ft.data.datamodule import ChatDataModule
    from lightning_ft.data.sources import Source
    from lightning_ft.generation import generate
    from lightning_ft.loading import load_for_generation
    from lightning_ft.models import DEFAULT_MODEL, load_model, load_tokenizer
    from lightning_ft.module import FineTuneModule
    from lightning_ft.precision import resolve_precision
    from lightning_ft.progress import PlainProgressBar


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_ft' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
