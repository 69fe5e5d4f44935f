"""Integration on the real embedded default model (SmolLM2-135M-Instruct): slow, and CI runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_chat_file
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lightning_ft import encode_conversation, load_tokenizer
from lightning_ft.cli import main
from lightning_ft.export import export
from lightning_ft.models import resolve_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_smollm2_masks_train_only_assistant_content_and_end_of_turn():
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    messages = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green."},
    ]
    example = encode_conversation(messages, tokenizer)
    ids = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert example["input_ids"] == list(ids)
    trained = [t if l != -100 else None for t, l in zip(example["input_ids"], example["labels"])]
    spans, current = [], []
    for token in trained:
        if token is None and current:
            spans.append(tokenizer.decode(current))
            current = []
        elif token is not None:
            current.append(token)
    spans.append(tokenizer.decode(current)) if current else None
    assert spans == ["Blue.<|im_end|>", "Green.<|im_end|>"]


def test_cli_fit_on_default_model_exports_adapter_with_identical_logits(tmp_path):
    cli = main([
        "fit", "--config", str(ROOT / "configs/quickstart.yaml"),
        "--data.train_path", write_chat_file(tmp_path / "train.jsonl", 4),
        "--data.val_path", write_chat_file(tmp_path / "val.jsonl", 2, 50),
        "--data.batch_size", "2", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
        "--trainer.val_check_interval", "2", "--model.learning_rate", "1e-3",
        "--trainer.default_root_dir", str(tmp_path / "runs"), "--progress_bar.refresh_rate", "0",
    ])
    out = Path(cli.trainer.log_dir) / "hf_model"
    base = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m-instruct"))
    reloaded = PeftModel.from_pretrained(base, out).eval()
    trained = cli.model.model.eval()
    tokens = torch.tensor([[1, 9690, 198, 67, 2, 198, 1, 4093, 198, 1780, 314]])
    with torch.no_grad():
        expected = trained(input_ids=tokens).logits
        assert torch.equal(reloaded(input_ids=tokens).logits, expected)
        with reloaded.disable_adapter():
            assert not torch.allclose(reloaded(input_ids=tokens).logits, expected)  # the adapter did learn

    # The base came from a GGUF file, which transformers refuses to save: the merged export still works.
    result = export(out, tmp_path / "merged", merge_adapter=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert result["kind"] == "merged"
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=tokens).logits, expected, atol=1e-3, rtol=1e-3)
