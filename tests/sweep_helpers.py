"""The sweep tests' fit command line on the tiny model: chat data, a small benchmark, a KL threshold."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import write_chat_file

ROOT = Path(__file__).resolve().parents[1]


def sweep_fit_args(tiny_model_dir: str, tmp_path: Path, max_kl: float = 0.01) -> list[str]:
    """Fit arguments validating (and checking forgetting) every 2 steps; ``max_kl`` is the alarm's threshold."""
    benchmark = tmp_path / "bench.jsonl"
    benchmark.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(i)],
                                             "answer": 0}) + "\n" for i in range(8)))
    callbacks = [{"class_path": "lightning_ft.ForgettingCheck",
                  "init_args": {"benchmark_path": str(benchmark), "max_prompts": 2, "max_accuracy_drop": 0.5,
                                "max_kl": max_kl, "max_time_share": None}}]
    return ["--config", str(ROOT / "configs/quickstart.yaml"), "--model.model_name", tiny_model_dir,
            "--data.train_path", write_chat_file(tmp_path / "train.jsonl", 8),
            "--data.val_path", write_chat_file(tmp_path / "val.jsonl", 4, 50), "--data.batch_size", "4",
            "--trainer.val_check_interval", "2", "--progress_bar.refresh_rate", "0",
            f"--trainer.callbacks={json.dumps(callbacks)}"]
