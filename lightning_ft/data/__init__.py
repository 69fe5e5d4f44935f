"""Chat data: file formats -> typed messages, tokenisation with assistant-only labels, the DataModule."""

from lightning_ft.data.batching import BatchingChoice, choose_batching
from lightning_ft.data.collate import (
    IGNORE_INDEX,
    ChatCollator,
    EmptyLabelsError,
    collate,
    count_trained,
    encode_conversation,
    mark_trained,
    truncate_example,
)
from lightning_ft.data.datamodule import ChatDataModule
from lightning_ft.data.formats import (
    FORMATS,
    ROLES,
    Conversation,
    DataError,
    DataProblem,
    Message,
    check_conversation,
    read_conversations,
    scan_file,
)
from lightning_ft.data.labels import TemplateRefusedError

__all__ = [
    "BatchingChoice",
    "FORMATS",
    "IGNORE_INDEX",
    "ROLES",
    "ChatCollator",
    "ChatDataModule",
    "Conversation",
    "DataError",
    "DataProblem",
    "EmptyLabelsError",
    "Message",
    "TemplateRefusedError",
    "check_conversation",
    "choose_batching",
    "collate",
    "count_trained",
    "encode_conversation",
    "mark_trained",
    "read_conversations",
    "scan_file",
    "truncate_example",
]
