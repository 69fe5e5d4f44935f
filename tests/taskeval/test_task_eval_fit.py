"""TaskEval, generation and the generate/chat commands end to end on one tiny LoRA fit (module-scoped)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import write_chat_file
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_ft import ChatDataModule, FineTuneModule, LoRA, SaveHFModel, TaskEval
from lightning_ft.cli import console_main
from lightning_ft.generation import generate, load_for_generation
from lightning_ft.models import load_model, load_tokenizer

PATTERN = r"It is (\d+)"


class RecordingTaskEval(TaskEval):
    """Remembers every measurement: (baseline?, global step, outputs)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def _log_samples(self, trainer, items, outputs, results, rate, total, baseline):
        self.calls.append((baseline, trainer.global_step, list(outputs)))
        super()._log_samples(trainer, items, outputs, results, rate, total, baseline)


def make_trainer(root: Path, callback: TaskEval, max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps, val_check_interval=2, limit_val_batches=1, precision="32-true", accelerator="cpu",
        devices=1, logger=TensorBoardLogger(root, name="", version=0), enable_progress_bar=False,
        callbacks=[callback, ModelCheckpoint(save_last=True), SaveHFModel()], enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def make_parts(tiny_model_dir: str, data_dir: Path):
    module = FineTuneModule(tiny_model_dir, adapter=LoRA(r=4, alpha=8, dropout=0.0), learning_rate=1e-3)
    # 16 conversations in batches of 4 with val_check_interval=2: validation at steps 2, 4 (epoch end), 6, ...
    data = ChatDataModule(write_chat_file(data_dir / "train.jsonl", 16), val_path=write_chat_file(
        data_dir / "val.jsonl", 4, 50), tokenizer=tiny_model_dir, batch_size=4)
    return module, data


@pytest.fixture(scope="module")
def fitted(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("taskeval_fit")
    test_path = write_chat_file(root / "test.jsonl", 6, 100)
    callback = RecordingTaskEval(test_path, metric="regex", pattern=PATTERN, max_new_tokens=6, batch_size=4,
                                 baseline_system_prompt="Answer with a number.")
    module, data = make_parts(tiny_model_dir, root)
    trainer = make_trainer(root / "runs", callback, max_steps=4)
    trainer.fit(module, data)
    return {"root": root, "test_path": test_path, "callback": callback, "trainer": trainer, "module": module,
            "log_dir": Path(trainer.log_dir)}


def test_baseline_is_the_base_model_measured_before_training(fitted, tiny_model_dir):
    callback = fitted["callback"]
    assert [(baseline, step) for baseline, step, _ in callback.calls] == [(True, 0), (False, 2), (False, 4)]
    base = load_model(tiny_model_dir)
    tokenizer = load_tokenizer(tiny_model_dir)
    prompts = [callback._prompt(item, baseline=True) for item in callback.items]
    assert prompts[0][0] == {"role": "system", "content": "Answer with a number."}
    assert callback.calls[0][2] == generate(base, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    assert callback.baseline is not None and [h.step for h in callback.history] == [2, 4]


def test_rates_are_logged_and_samples_go_to_tensorboard(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, callback = fitted["trainer"], fitted["callback"]
    assert float(trainer.callback_metrics["task/success_rate"]) == callback.history[-1].success_rate
    assert "task/success_delta" in trainer.callback_metrics
    assert 0.0 < float(trainer.callback_metrics["task/time_share"]) < 1.0  # the cost, against the run's wall time
    assert float(trainer.callback_metrics["task/seconds"]) > 0.0
    events = EventAccumulator(str(fitted["log_dir"])).Reload()
    steps = [event.step for event in events.Scalars("task/success_rate")]
    assert steps[0] == 0 and len(steps) == 3
    assert [event.step for event in events.Scalars("task/time_share")] == steps[1:]  # no share at the baseline
    assert {"task/samples/text_summary", "task/samples_baseline/text_summary"} <= set(events.Tags()["tensors"])
    text = events.Tensors("task/samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| ok | prompt | reference | output |" in text and "What is 100 plus one?" in text


def test_summary_table_prints_baseline_and_final(fitted, capsys):
    fitted["callback"].print_summary()
    out = capsys.readouterr().out
    assert "base model + baseline_system_prompt" in out and "fine-tuned (step 4)" in out and "points" in out
    assert "of the run's wall time" in out


def test_checkpoint_holds_state_and_resume_does_not_remeasure_the_baseline(fitted, tiny_model_dir, tmp_path):
    ckpt = fitted["log_dir"] / "checkpoints" / "last.ckpt"
    callback = fitted["callback"]
    state = torch.load(ckpt, weights_only=True)["callbacks"][callback.state_key]
    assert callback.state_key == "RecordingTaskEval{'name': 'task'}"  # Lightning's format: class and settings
    assert state == {"baseline": callback.baseline, "validations": 2,
                     "history": [{"step": h.step, "success_rate": h.success_rate} for h in callback.history]}
    resumed = RecordingTaskEval(fitted["test_path"], metric="regex", pattern=PATTERN, max_new_tokens=6, batch_size=4)
    module, data = make_parts(tiny_model_dir, tmp_path)
    make_trainer(tmp_path / "runs", resumed, max_steps=6).fit(module, data, ckpt_path=str(ckpt))
    assert [(baseline, step) for baseline, step, _ in resumed.calls] == [(False, 6)]
    assert resumed.baseline == callback.baseline and [h.step for h in resumed.history] == [2, 4, 6]


def test_adapter_dir_and_checkpoint_generate_like_the_trained_model(fitted):
    conversations = [[{"role": "user", "content": "What is 7 plus one?"}], [{"role": "user", "content": "Hi"}]]
    module = fitted["module"]
    expected = generate(module.model, module.tokenizer, conversations, max_new_tokens=6)
    for kwargs in ({"adapter": str(fitted["log_dir"] / "hf_model")},
                   {"checkpoint": str(fitted["log_dir"] / "checkpoints" / "last.ckpt")}):
        model, tokenizer = load_for_generation(**kwargs)
        assert not model.training
        assert generate(model, tokenizer, conversations, max_new_tokens=6) == expected, kwargs


def test_batched_generation_equals_one_at_a_time(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    conversations = [[{"role": "user", "content": "Hi"}],
                     [{"role": "user", "content": "A much longer question about the number forty two?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]]
    batched = generate(model, tokenizer, conversations, max_new_tokens=5, batch_size=3)
    assert batched == [generate(model, tokenizer, [c], max_new_tokens=5)[0] for c in conversations]
    assert not model.training


def test_generate_command_prints_answers(fitted, capsys, tmp_path):
    adapter = str(fitted["log_dir"] / "hf_model")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('Second question\n\n"Third\\nwith a newline"\n')
    code = console_main(["generate", "--adapter", adapter, "--prompt", "First", "--prompts_file", str(prompts),
                         "--max_new_tokens", "4", "--system", "Be brief.", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and [item["prompt"] for item in printed] == ["First", "Second question", "Third\nwith a newline"]
    model, tokenizer = load_for_generation(adapter=adapter)
    expected = generate(model, tokenizer, [[{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "First"}]], max_new_tokens=4)
    assert printed[0]["output"] == expected[0]
    assert console_main(["generate", "--adapter", adapter, "--prompt", "First", "--max_new_tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == expected_plain(model, tokenizer)


def expected_plain(model, tokenizer) -> str:
    return generate(model, tokenizer, [[{"role": "user", "content": "First"}]], max_new_tokens=4)[0].strip()


def test_generate_command_errors(capsys, tmp_path):
    assert console_main(["generate", "--adapter", str(tmp_path / "nope"), "--prompt", "x"]) == 1
    assert capsys.readouterr().err.strip() == f"lightning_ft generate: error: {tmp_path / 'nope'}: does not exist"
    assert console_main(["generate", "--prompts_file", str(tmp_path), "--prompt", "x"]) == 1
    assert "is a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        console_main(["generate", "--merged", "a", "--adapter", "b", "--prompt", "x"])
    assert exit_info.value.code == 2


def test_chat_keeps_history_until_reset_and_stops_at_exit(fitted, capsys, monkeypatch):
    import lightning_ft.generation as generation

    seen = []

    def recording_generate(model, tokenizer, conversations, *args, **kwargs):
        seen.append([m["role"] for m in conversations[0]])
        return generation_generate(model, tokenizer, conversations, *args, **kwargs)

    generation_generate = generation.generate
    monkeypatch.setattr(generation, "generate", recording_generate)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2 plus one?\n\nAnd 3?\n/reset\nHi\nexit\nnever read\n"))
    code = console_main(["chat", "--adapter", str(fitted["log_dir"] / "hf_model"), "--system", "Be brief.",
                         "--max_new_tokens", "4"])
    assert code == 0 and "error" not in capsys.readouterr().err
    assert seen == [["system", "user"], ["system", "user", "assistant", "user"], ["system", "user"]]
