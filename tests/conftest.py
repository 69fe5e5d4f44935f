"""Shared fixtures: the committed tiny tokenizer and a tiny random Llama built from its config."""

from __future__ import annotations

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
