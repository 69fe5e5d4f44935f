"""lightning_ft: fine-tune Hugging Face causal language models as PyTorch Lightning jobs."""

from lightning_ft.adapters import FullFineTune, LoRA, QLoRA
from lightning_ft.callbacks import ForgettingCheck, SaveHFModel, TaskEval
from lightning_ft.data.collate import encode_conversation
from lightning_ft.data.datamodule import ChatDataModule
from lightning_ft.generation import generate, load_for_generation
from lightning_ft.models import DEFAULT_MODEL, load_model, load_tokenizer
from lightning_ft.module import FineTuneModule
from lightning_ft.precision import resolve_precision

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "ChatDataModule",
    "FineTuneModule",
    "ForgettingCheck",
    "FullFineTune",
    "LoRA",
    "QLoRA",
    "SaveHFModel",
    "TaskEval",
    "encode_conversation",
    "generate",
    "load_for_generation",
    "load_model",
    "load_tokenizer",
    "resolve_precision",
]
