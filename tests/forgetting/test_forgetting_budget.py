"""The checks' cost: the base model measured once across runs (the baseline cache), a time budget for the
scheduled checks, and one conversion of the default model at a time."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from forgetting_helpers import fit, write_benchmark

from lightning_ft import FineTuneModule, LoRA
from lightning_ft.atomic import file_lock
from lightning_ft.callbacks import ForgettingCheck
from lightning_ft.forgetting.baseline_cache import BaselineCache, baseline_key, weights_fingerprint
from lightning_ft.forgetting.probe import ForgettingProbe
from lightning_ft.models import cache_dir


def lora(model_dir, r=4):
    return FineTuneModule(model_dir, adapter=LoRA(r=r, alpha=16, dropout=0.0), learning_rate=5e-2,
                          warmup_ratio=0.0, decay="constant")


def counting(monkeypatch) -> list[int]:
    """Count the probe's measurements (the baseline's among them)."""
    calls, measure = [], ForgettingProbe.measure

    def counted(self, *args, **kwargs):
        calls.append(1)
        return measure(self, *args, **kwargs)

    monkeypatch.setattr(ForgettingProbe, "measure", counted)
    return calls


def check(bench: str, **kwargs) -> ForgettingCheck:
    return ForgettingCheck(benchmark_path=bench, max_prompts=2, batch_size=8, max_time_share=None, **kwargs)


def test_a_second_run_reads_the_baseline_from_the_cache(tiny_model_dir, tmp_path, monkeypatch, caplog):
    bench = write_benchmark(tmp_path / "bench.jsonl", None)
    calls = counting(monkeypatch)
    first = check(bench, seed=11)  # a seed no other test uses: its entry is this test's
    fit(lora(tiny_model_dir), tmp_path, [first], steps=1)
    assert len(calls) == 2  # baseline, final
    calls.clear()
    second = check(bench, seed=11)
    with caplog.at_level("INFO"):
        fit(lora(tiny_model_dir, r=8), tmp_path, [second], steps=1)  # another rank: the same base model
    assert len(calls) == 1  # the final check only
    assert second.history[0].metrics == first.history[0].metrics and second.history[0].seconds == 0.0
    assert "Forgetting baseline at step 0" in caplog.text and "from the cache (" in caplog.text
    calls.clear()
    fit(lora(tiny_model_dir), tmp_path, [check(bench, seed=11, baseline_cache=False)], steps=1)
    assert len(calls) == 2  # turned off: measured


def test_a_corrupt_or_foreign_entry_is_measured_afresh(tmp_path):
    cache = BaselineCache(tmp_path)
    path = cache.store("abc", {"acc": 0.5}, None)
    assert cache.load("abc") == {"metrics": {"acc": 0.5}, "reference": None}
    path.write_bytes(b"not a checkpoint")
    assert cache.load("abc") is None
    cache.store("abc", {"acc": 0.5}, None).rename(cache.path("other"))  # an entry under another key's name
    assert cache.load("other") is None and cache.load("missing") is None
    reference = [{"values": torch.ones(2, 3), "indices": torch.zeros(2, 3, dtype=torch.int32)}]
    cache.store("full", {"kl": 0.0}, reference)
    assert torch.equal(cache.load("full")["reference"][0]["values"], reference[0]["values"])


def test_the_key_follows_the_base_weights_precision_and_probe_not_the_fresh_adapter(tiny_model_dir, tiny_tokenizer):
    from lightning_ft.models import load_model

    model = load_model(tiny_model_dir)
    probe = ForgettingProbe([], [], batch_size=8)
    key = baseline_key(model, False, probe, tiny_tokenizer, "32-true")
    assert key == baseline_key(model, False, probe, tiny_tokenizer, "32-true")
    assert key != baseline_key(model, False, probe, tiny_tokenizer, "bf16-mixed")
    assert key != baseline_key(model, False, ForgettingProbe([], [], batch_size=4), tiny_tokenizer, "32-true")
    base = weights_fingerprint(model, base_only=False)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert weights_fingerprint(model, base_only=False) != base
    from peft import LoraConfig, get_peft_model

    one, other = (get_peft_model(load_model(tiny_model_dir), LoraConfig(r=r, target_modules="all-linear"))
                  for r in (4, 16))
    assert weights_fingerprint(one, base_only=True) == weights_fingerprint(other, base_only=True)


def test_scheduled_checks_beyond_the_time_share_are_skipped_and_the_final_check_runs(tiny_model_dir, tmp_path):
    bench = write_benchmark(tmp_path / "bench.jsonl")
    budgeted = ForgettingCheck(benchmark_path=bench, max_prompts=2, batch_size=8, every_n_steps=1,
                               max_time_share=0.001, baseline_cache=False)
    trainer = fit(lora(tiny_model_dir), tmp_path, [budgeted], steps=4)
    assert [record.step for record in budgeted.history] == [0, 4]  # baseline, then the final check only
    assert budgeted.skipped == 5 and trainer.global_step == 4  # steps 1-4, and the validation at step 4
    unbudgeted = ForgettingCheck(benchmark_path=bench, max_prompts=2, batch_size=8, every_n_steps=1,
                                 max_time_share=None, baseline_cache=False)
    fit(lora(tiny_model_dir), tmp_path, [unbudgeted], steps=4)
    assert [record.step for record in unbudgeted.history] == [0, 1, 2, 3, 4] and unbudgeted.skipped == 0


def test_a_bad_time_share_is_refused():
    with pytest.raises(ValueError, match=r"max_time_share=0 must be in \(0, 1\] or None"):
        ForgettingCheck(max_time_share=0)


def test_a_second_holder_of_the_lock_waits_for_the_first(tmp_path):
    """Two sweep workers converting the default model at once: the second waits, then finds it done."""
    order, held = [], threading.Event()

    def first():
        with file_lock(tmp_path / ".model.lock"):
            held.set()
            time.sleep(0.2)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    held.wait()
    with file_lock(tmp_path / ".model.lock"):
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]


def test_baselines_live_in_the_cache_directory():
    assert BaselineCache(cache_dir() / "baselines").path("k") == cache_dir() / "baselines" / "k.pt"
