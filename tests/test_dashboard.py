"""The TensorBoard layout follows the run's callbacks."""

from __future__ import annotations

from helpers import write_chat_file

from lightning_ft.callbacks.dashboard import dashboard_layout
from lightning_ft.callbacks.forgetting import ForgettingCheck
from lightning_ft.callbacks.task_eval import TaskEval


def test_layout_draws_only_what_the_run_measures(tmp_path):
    assert list(dashboard_layout([])) == ["1 training"]
    check = ForgettingCheck(max_items=4, max_prompts=2, max_kl=None, max_accuracy_drop=0.1, metric="acc_norm")
    task = TaskEval(write_chat_file(tmp_path / "task.jsonl", 3), name="triage")
    layout = dashboard_layout([check, task])
    assert layout["2 forgetting"] == {
        "acc_norm: now, base model, alarm": ["Multiline", ["^forgetting/acc_norm$", "^forgetting/acc_norm_baseline$",
                                                           "^forgetting/acc_norm_alarm$"]],
        "KL from the base model": ["Multiline", ["^forgetting/kl$", "^forgetting/kl_alarm$"]],
    }
    assert layout["3 task"] == {"triage: success, base model": ["Multiline", ["^triage/success_rate$",
                                                                             "^triage/success_baseline$"]]}
    only_kl = dashboard_layout([ForgettingCheck(max_items=0, max_prompts=2, max_kl=0.5)])
    assert list(only_kl["2 forgetting"]) == ["KL from the base model, alarm"]
