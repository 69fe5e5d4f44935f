"""lightning_ft: fine-tune Hugging Face causal language models as PyTorch Lightning jobs."""

from lightning_ft.adapters import FullFineTune, LoRA, QLoRA
from lightning_ft.callbacks import SaveHFModel
from lightning_ft.data.collate import encode_conversation
from lightning_ft.data.datamodule import ChatDataModule
from lightning_ft.models import DEFAULT_MODEL, load_model, load_tokenizer
from lightning_ft.module import FineTuneModule

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "ChatDataModule",
    "FineTuneModule",
    "FullFineTune",
    "LoRA",
    "QLoRA",
    "SaveHFModel",
    "encode_conversation",
    "load_model",
    "load_tokenizer",
]
