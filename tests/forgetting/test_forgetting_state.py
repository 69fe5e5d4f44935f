"""ForgettingCheck's checkpoint state behaves like a Lightning callback's: one key per check, typed history,
an old checkpoint's key still read, and stop decisions taken by all ranks together."""

from __future__ import annotations

import sys

import pytest
import torch
from forgetting_helpers import fit, write_benchmark

from lightning_ft import FineTuneModule, LoRA
from lightning_ft.callbacks import ForgettingCheck
from lightning_ft.forgetting import CheckRecord


def lora_module(model_dir):
    return FineTuneModule(model_dir, adapter=LoRA(r=4, alpha=16, dropout=0.0), learning_rate=5e-2,
                          warmup_ratio=0.0, decay="constant")


def two_checks(tmp_path) -> tuple[ForgettingCheck, ForgettingCheck]:
    bench = write_benchmark(tmp_path / "bench.jsonl")
    return (ForgettingCheck(benchmark_path=bench, max_items=3, max_prompts=1, every_n_steps=1, batch_size=8,
                            max_time_share=None),
            ForgettingCheck(benchmark_path=bench, max_items=None, max_prompts=2, every_n_steps=2, batch_size=8,
                            max_time_share=None))


def test_two_checks_keep_their_own_state_through_a_checkpoint(tiny_model_dir, tmp_path):
    first, second = two_checks(tmp_path)
    assert first.state_key != second.state_key and first.state_key.startswith("ForgettingCheck{")
    trainer = fit(lora_module(tiny_model_dir), tmp_path, [first, second], steps=2, limit_val_batches=0)
    assert [r.step for r in first.history] == [0, 1, 2] and [r.step for r in second.history] == [0, 2]
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    saved = torch.load(tmp_path / "two.ckpt", weights_only=True)["callbacks"]
    assert saved[first.state_key]["history"] == [record.to_dict() for record in first.history]
    again_first, again_second = two_checks(tmp_path)
    fit(lora_module(tiny_model_dir), tmp_path, [again_first, again_second], steps=2, ckpt_path=tmp_path / "two.ckpt",
        limit_val_batches=0)
    assert again_first.history == first.history and again_second.history == second.history
    assert all(isinstance(record, CheckRecord) for record in again_first.history)


@pytest.fixture(scope="module")
def one_check_run(tiny_model_dir, tmp_path_factory):
    """A check after one step of a fit, and that fit's checkpoint."""
    tmp_path = tmp_path_factory.mktemp("one_check")
    first, _ = two_checks(tmp_path)
    trainer = fit(lora_module(tiny_model_dir), tmp_path, [first], steps=1)
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    return first, tmp_path


def test_checkpoint_from_before_state_keys_still_resumes(tiny_model_dir, one_check_run, tmp_path):
    first, saved = one_check_run
    checkpoint = torch.load(saved / "one.ckpt", weights_only=True)
    checkpoint["callbacks"] = {"ForgettingCheck": checkpoint["callbacks"].pop(first.state_key)}  # the old key
    torch.save(checkpoint, tmp_path / "old.ckpt")
    resumed, _ = two_checks(saved)
    fit(lora_module(tiny_model_dir), tmp_path, [resumed], steps=1, ckpt_path=tmp_path / "old.ckpt")
    assert resumed.history == first.history


def test_stop_is_decided_by_all_ranks(tiny_model_dir, tmp_path, monkeypatch):
    """Another rank's check crossed a threshold: this rank, within its own, stops at the same step."""
    from pytorch_lightning.strategies import SingleDeviceStrategy

    original = SingleDeviceStrategy.reduce_boolean_decision

    def other_rank_votes_stop(self, decision, all=True):
        if sys._getframe(1).f_code.co_name == "_record" and not all:
            return True
        return original(self, decision, all)

    monkeypatch.setattr(SingleDeviceStrategy, "reduce_boolean_decision", other_rank_votes_stop)
    callback = ForgettingCheck(benchmark_path=write_benchmark(tmp_path / "bench.jsonl"), max_prompts=1,
                               every_n_steps=1, max_accuracy_drop=None, action="stop", batch_size=8)
    trainer = fit(lora_module(tiny_model_dir), tmp_path, [callback], steps=5)
    assert callback.history[-1].ok and trainer.global_step == 0  # stopped by the vote at the baseline itself
    assert trainer.should_stop


def test_changed_settings_on_resume_are_refused_not_silently_remeasured(tiny_model_dir, one_check_run, tmp_path):
    _, saved = one_check_run
    changed = ForgettingCheck(benchmark_path=str(saved / "bench.jsonl"), max_prompts=1, batch_size=8, max_items=2)
    with pytest.raises(ValueError, match="baseline was measured on other benchmark items, prompts"):
        fit(lora_module(tiny_model_dir), tmp_path, [changed], steps=2, ckpt_path=saved / "one.ckpt")
