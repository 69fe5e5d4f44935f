"""The issue's bar on the real embedded default (SmolLM2-135M-Instruct, LoRA), run as a user runs it: slow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pref_helpers import pair_record, write_pairs

from lightning_ft.cli import console_main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "preference_quickstart.yaml")


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_quickstart_bar_on_the_default_model(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lightning_ft.models import resolve_model

    lines = (ROOT / "examples" / "preference" / "train.jsonl").read_text().splitlines()
    train = write_pairs(tmp_path / "train.jsonl", lines[:12])
    val = write_pairs(tmp_path / "val.jsonl", (ROOT / "examples" / "preference" / "val.jsonl").read_text().splitlines()[:4])
    code = console_main(["preference", "fit", "--config", CONFIG, "--data.train_path", train, "--data.val_path", val,
                         "--trainer.max_steps", "3", "--trainer.val_check_interval", "1.0", "--trainer.callbacks=[]",
                         "--trainer.default_root_dir", str(tmp_path / "runs")])
    assert code == 0
    log_dir = next((tmp_path / "runs").glob("**/hf_model")).parent
    scalars = _scalars(log_dir)
    step, loss = scalars["train/loss"][0]
    assert step == 0 and loss == pytest.approx(math.log(2), abs=1e-3)
    accuracy = scalars["val/rewards/accuracy"]
    assert accuracy[0] == (0, 0.0) and accuracy[-1][0] > 0 and accuracy[-1][1] > accuracy[0][1]  # logged at step 2
    assert "loss 0.6931" in capsys.readouterr().out
    base = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m-instruct"))
    adapted = PeftModel.from_pretrained(base, log_dir / "hf_model")
    assert any("lora_B" in name and value.abs().sum() > 0 for name, value in adapted.state_dict().items())


def test_check_data_on_the_default_tokenizer_reports_identical_biased_and_malformed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)

    def check(records, *extra):
        path = write_pairs(tmp_path / "pairs.jsonl", records)
        code = console_main(["preference", "check-data", "--config", CONFIG, "--data.train_path", path,
                             "--data.val_path", "null", "--json", *extra])
        return code, json.loads(capsys.readouterr().out), path

    code, report, _ = check([{**pair_record(i), "rejected": pair_record(i)["chosen"]} for i in range(6)])
    assert [f["code"] for f in report["findings"]].count("identical-pair") == 6
    code, report, _ = check([{**pair_record(i), "rejected": "No."} for i in range(10)])
    assert report["stats"]["train"]["length_bias"] == 1.0
    assert any(f["code"] == "length-bias" and f["severity"] == "warning" for f in report["findings"])
    code, report, path = check([pair_record(0), "{\"prompt\": \"Hi\", \"chosen\": ", pair_record(1)])
    assert code == 1 and [f["location"] for f in report["findings"] if f["severity"] == "error"] == [f"{path}:2"]
