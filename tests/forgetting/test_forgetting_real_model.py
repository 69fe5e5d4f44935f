"""ForgettingCheck's default measurement on the real embedded model (SmolLM2-135M-Instruct): slow, CI runs it."""

from __future__ import annotations

import pytest

from lightning_ft import FineTuneModule, ForgettingCheck

pytestmark = pytest.mark.slow


def test_default_check_on_the_base_model_is_far_above_chance_with_zero_kl():
    module = FineTuneModule("smollm2-135m-instruct")
    module.configure_model()
    check = ForgettingCheck()  # shipped benchmark (100 of 359 items, 4 choices: chance is 0.25), 4 prompts
    check.probe.prepare(module.tokenizer)
    metrics = check.probe.measure(module.model)
    assert metrics["acc"] > 0.5 and metrics["acc_norm"] > 0.5
    assert len([key for key in metrics if key.startswith("subject/") and key.endswith("/acc")]) == 12
    assert metrics["kl"] == 0.0  # LoRA at initialisation is the base model
