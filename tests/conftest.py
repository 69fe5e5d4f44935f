"""Shared fixtures: the committed tiny tokenizer and a tiny random Llama built from its config."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Byte-level BPE (1024 tokens) with SmolLM2's ChatML template and a weightless 2-layer LlamaConfig.
#: Regenerate with ``python tests/fixtures/make_tiny_tokenizer.py``.
TINY_TOKENIZER_DIR = str(Path(__file__).resolve().parent / "fixtures" / "tiny_tokenizer")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny ChatML tokenizer, loaded once per session (do not mutate it; copy it first)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A complete local model spec: random 2-layer Llama (seed 0, safetensors) plus the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(TINY_TOKENIZER_DIR))
    model.save_pretrained(target, safe_serialization=True)
    AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR).save_pretrained(target)
    return str(target)


@pytest.fixture(scope="session", autouse=True)
def fresh_data_cache(tmp_path_factory) -> Iterator[Path]:
    """A new ``$LIGHTNING_FT_CACHE`` for the session (subprocesses inherit it), so encoded data and read
    datasets left by an earlier run cannot hide a regression. Converted models (the embedded default is
    hundreds of MB) stay shared: ``models`` links to the real cache's."""
    from lightning_ft.models import cache_dir

    shared_models = cache_dir() / "models"
    shared_models.mkdir(parents=True, exist_ok=True)
    fresh = tmp_path_factory.mktemp("lightning_ft_cache")
    (fresh / "models").symlink_to(shared_models, target_is_directory=True)
    saved = os.environ.get("LIGHTNING_FT_CACHE")
    os.environ["LIGHTNING_FT_CACHE"] = str(fresh)
    yield fresh
    if saved is None:
        os.environ.pop("LIGHTNING_FT_CACHE", None)
    else:
        os.environ["LIGHTNING_FT_CACHE"] = saved
