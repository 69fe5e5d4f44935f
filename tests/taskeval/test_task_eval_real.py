"""TaskEval on the real default model (SmolLM2-135M-Instruct) and the triage example: slow, and CI runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl

from lightning_ft import FineTuneModule, TaskEval

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TRIAGE_SCHEMA = {
    "type": "object", "required": ["category", "urgency", "summary"], "additionalProperties": False,
    "properties": {"category": {"enum": ["billing", "shipping", "technical", "account", "other"]},
                   "urgency": {"enum": ["low", "medium", "high"]}, "summary": {"type": "string", "minLength": 1}},
}


def test_baseline_on_triage_test_items_runs(capsys):
    callback = TaskEval(str(ROOT / "examples/triage/test.jsonl"), metric="json", json_schema=TRIAGE_SCHEMA,
                        match_keys=["category", "urgency"], max_items=4, max_new_tokens=24, batch_size=4)
    module = FineTuneModule("smollm2-135m-instruct")
    module.configure_model()
    trainer = pl.Trainer(logger=False, accelerator="cpu", devices=1, enable_progress_bar=False)
    callback.on_fit_start(trainer, module)
    assert callback.baseline is not None and 0.0 <= callback.baseline <= 1.0
    assert float(trainer.callback_metrics["task/success_rate"]) == callback.baseline
    assert module.model.training  # generation restored train mode
    callback.print_summary()
    assert "base model" in capsys.readouterr().out
