"""The optional lm-evaluation-harness backend, offline on a local-file task (skipped without the extra)."""

from __future__ import annotations

import pytest
from forgetting_helpers import write_benchmark
from transformers import AutoModelForCausalLM

from lightning_ft.forgetting.benchmark import choice_loglikelihoods, context_for, encode_items, read_benchmark
from lightning_ft.forgetting.lm_eval import run_lm_eval

lm_eval = pytest.importorskip("lm_eval")

#: The shipped benchmark's format as an lm-eval task: the same prompt, choices and target as ours.
TASK_YAML = """task: tiny_general
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_lm_eval_loglikelihoods_equal_ours(tiny_model_dir, tiny_tokenizer, tmp_path, offline):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    items = read_benchmark(write_benchmark(tmp_path / "b.jsonl"))
    ours = choice_loglikelihoods(model, encode_items(items, tiny_tokenizer), 4, tiny_tokenizer.pad_token_id)
    pairs = [(context_for(item), " " + choice) for item in items for choice in item.choices]
    instances = [Instance("loglikelihood", {}, pair, index) for index, pair in enumerate(pairs)]
    theirs = [loglikelihood for loglikelihood, _ in HFLM(pretrained=model, tokenizer=tiny_tokenizer,
                                                          batch_size=4).loglikelihood(instances)]
    assert [score for scores in ours for score in scores] == pytest.approx(theirs, abs=1e-4)


def test_local_file_task_runs_on_the_in_memory_model_and_agrees(tiny_model_dir, tiny_tokenizer, tmp_path, offline):
    from lightning_ft.forgetting import score_benchmark

    data = write_benchmark(tmp_path / "b.jsonl")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_general.yaml").write_text(TASK_YAML.format(path=data))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    metrics = run_lm_eval(model, tiny_tokenizer, ["tiny_general"], include_path=str(tasks))
    ours = score_benchmark(model, tiny_tokenizer, read_benchmark(data))
    assert metrics["lm_eval/tiny_general/acc"] == pytest.approx(ours["acc"])
    assert metrics["lm_eval/tiny_general/acc_norm"] == pytest.approx(ours["acc_norm"])


def test_callback_runs_lm_eval_tasks_during_fit(tiny_model_dir, tmp_path, offline):
    from forgetting_helpers import fit

    from lightning_ft import FineTuneModule, ForgettingCheck, LoRA

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_general.yaml").write_text(TASK_YAML.format(path=write_benchmark(tmp_path / "b.jsonl")))
    callback = ForgettingCheck(max_items=0, max_prompts=0, lm_eval_tasks=["tiny_general"],
                               lm_eval_include_path=str(tasks), every_n_steps=1)
    trainer = fit(FineTuneModule(tiny_model_dir, adapter=LoRA(r=4)), tmp_path, [callback], steps=1)
    assert [sorted(record.metrics) for record in callback.history] == [
        ["lm_eval/tiny_general/acc", "lm_eval/tiny_general/acc_norm"]] * 2
    assert "forgetting/lm_eval/tiny_general/acc_delta" in trainer.callback_metrics
