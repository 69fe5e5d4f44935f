"""Forgetting checks: score a model on a general benchmark and measure its drift from the base model.

The pieces are plain functions on a Hugging Face model and tokenizer, usable without Lightning;
:class:`lightning_ft.ForgettingCheck` runs them during training.
"""

from lightning_ft.forgetting.benchmark import (
    DEFAULT_BENCHMARK,
    BenchmarkError,
    MCItem,
    read_benchmark,
    score_benchmark,
    stratified_sample,
)
from lightning_ft.forgetting.drift import DEFAULT_PROMPTS, build_reference, encode_prompts, kl_sum, read_prompts
from lightning_ft.forgetting.history import CheckRecord
from lightning_ft.forgetting.probe import ForgettingProbe

__all__ = [
    "DEFAULT_BENCHMARK",
    "DEFAULT_PROMPTS",
    "BenchmarkError",
    "CheckRecord",
    "ForgettingProbe",
    "MCItem",
    "build_reference",
    "encode_prompts",
    "kl_sum",
    "read_benchmark",
    "read_prompts",
    "score_benchmark",
    "stratified_sample",
]
