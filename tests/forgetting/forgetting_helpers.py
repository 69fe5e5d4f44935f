"""Builders shared by the forgetting tests: a tiny benchmark file and a fit on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
from helpers import write_chat_file

from lightning_ft import ChatDataModule

#: Six items over two subjects, with two to four choices of different lengths (so acc_norm can differ).
TINY_ITEMS = [
    {"question": "What is the capital of France?", "choices": ["London", "Paris", "Rome"], "answer": 1, "subject": "geography"},
    {"question": "Which ocean is the largest?", "choices": ["Pacific Ocean", "Indian"], "answer": 0, "subject": "geography"},
    {"question": "Where is Mount Kilimanjaro?", "choices": ["Tanzania", "Peru", "Nepal", "Chile"], "answer": 0, "subject": "geography"},
    {"question": "What is 2 + 2?", "choices": ["3", "4", "22", "five"], "answer": 1, "subject": "arithmetic"},
    {"question": "What is 10 divided by 2?", "choices": ["5", "two and a half"], "answer": 0},
    {"question": "What is 3 times 3?", "choices": ["6", "9", "33"], "answer": 1, "subject": "arithmetic"},
]


def write_benchmark(path: Path, items: list[dict] | None = None) -> str:
    path.write_text("".join(json.dumps(item) + "\n" for item in (TINY_ITEMS if items is None else items)))
    return str(path)


def fit(module, tmp_path, callbacks, steps=3, ckpt_path=None, **trainer_kwargs) -> pl.Trainer:
    """Fit ``module`` on 16 tiny conversations (batch 4) for ``steps`` steps with validation on 4."""
    data = ChatDataModule(
        write_chat_file(tmp_path / "train.jsonl", 16), val_path=write_chat_file(tmp_path / "val.jsonl", 4, 100),
        tokenizer=module.hparams.model_name, batch_size=4,
    )
    settings = dict(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer = pl.Trainer(callbacks=callbacks, **{**settings, **trainer_kwargs})
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer
