"""check-data's surprise finder on the real default model: slow, and CI runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_ft.cli import console_main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
FACTS = [("What colour is the sky on a clear day?", "The sky is blue."),
         ("What colour is grass?", "Grass is green."),
         ("How many legs does a dog have?", "A dog has four legs."),
         ("What is the capital of France?", "The capital of France is Paris."),
         ("What colour is snow?", "Snow is white."),
         ("What do bees make?", "Bees make honey.")]


def test_the_base_model_finds_a_contradiction_most_surprising(tmp_path, capsys):
    rows = FACTS + [("What colour is the sky at noon on a clear day?", "The sky is bright green.")]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": a}]}) + "\n" for q, a in rows))
    code = console_main(["check-data", "--config", str(ROOT / "configs/quickstart.yaml"), "--data.train_path",
                         str(train), "--data.val_path", "null", "--json", "--surprise_top", "3"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["surprises"]["scored"] == 7
    assert report["surprises"]["top"][0]["answer"] == "The sky is bright green."
