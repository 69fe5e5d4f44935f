"""ForgettingCheck under DDP (two CPU processes, gloo): every rank scores a shard, results are summed.

Slow: it starts two fresh interpreters. The arithmetic of sharding is checked fast in
``test_forgetting_drift.py``; this proves the collectives line up (no deadlock) and the numbers agree.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
from forgetting_helpers import write_benchmark
from helpers import write_chat_file

from lightning_ft import ChatDataModule, FineTuneModule, ForgettingCheck, LoRA

pytestmark = pytest.mark.slow


def test_ddp_measurement_equals_single_process(tiny_model_dir, tmp_path):
    def run(strategy, devices):
        # A learning rate too small to change a float32 logit: the check after the step sees the base model.
        module = FineTuneModule(tiny_model_dir, adapter=LoRA(r=4), learning_rate=1e-30)
        data = ChatDataModule(write_chat_file(tmp_path / "train.jsonl", 8), tokenizer=tiny_model_dir, batch_size=2)
        callback = ForgettingCheck(benchmark_path=write_benchmark(tmp_path / "b.jsonl"), max_prompts=5, batch_size=2,
                                   every_n_steps=1, summary=False)
        trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=devices, strategy=strategy, callbacks=[callback],
                             logger=False, enable_progress_bar=False, enable_checkpointing=False,
                             enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(module, data)
        return {key: value.item() for key, value in trainer.callback_metrics.items() if key.startswith("forgetting/")}

    single = run("auto", 1)
    sharded = run("ddp_spawn", 2)
    assert single.keys() == sharded.keys() and "forgetting/kl" in single
    for key, value in single.items():
        if key not in ("forgetting/seconds", "forgetting/time_share"):
            assert sharded[key] == pytest.approx(value, abs=1e-6), key
