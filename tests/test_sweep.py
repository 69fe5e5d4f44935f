"""`lightning_ft sweep`: the grid, bad input before any run, the frontier, and a resumable sweep on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import write_chat_file

from lightning_ft.commands.sweep import run
from lightning_ft.plotting import read_scalars
from lightning_ft.sweep import RunResult, log_grid, mark_pareto, parse_lrs, recommend

ROOT = Path(__file__).resolve().parents[1]


def test_log_grid_is_log_spaced_around_the_centre():
    assert log_grid(2e-4, 5) == [2e-5, 6.32e-5, 2e-4, 6.32e-4, 2e-3]
    with pytest.raises(ValueError, match="at least two learning rates"):
        log_grid(2e-4, 1)


@pytest.mark.parametrize("text, message", [
    ("", r"'' is not a number"),
    ("1e-4,0,-1e-3", r"0 is not a positive learning rate; -1e-3 is not a positive"),
    ("1e-4", r"at least two different learning rates"),
    ("1e-4,1e-4", r"at least two different learning rates"),
    ("1e-4,abc", r"'abc' is not a number"),
])
def test_bad_learning_rate_lists_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_lrs(text)


def _result(lr, val_loss, drop, ok=True):
    return RunResult(learning_rate=lr, steps=10, val_loss=val_loss, acc_drop=drop, within_thresholds=ok)


def test_pareto_and_recommendation():
    runs = mark_pareto([_result(1e-5, 1.2, 0.00), _result(1e-4, 0.9, 0.01), _result(3e-4, 0.95, 0.03),
                        _result(1e-3, 0.7, 0.09, ok=False)])
    assert [run.pareto for run in runs] == [True, True, False, True]
    best, reason = recommend(runs)
    assert best.learning_rate == 1e-4
    assert reason.startswith("lr=0.0001: best validation loss (0.9000) of the 3 of 4 learning rates")
    none, reason = recommend([_result(1e-3, 0.7, 0.09, ok=False), _result(3e-3, 0.6, 0.2, ok=False)])
    assert none is None and "least forgetting was at lr=0.001" in reason


def _fit_args(tiny_model_dir, tmp_path, *extra):
    benchmark = tmp_path / "bench.jsonl"
    benchmark.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(i)],
                                             "answer": 0}) + "\n" for i in range(8)))
    callbacks = [{"class_path": "lightning_ft.ForgettingCheck",
                  "init_args": {"benchmark_path": str(benchmark), "max_prompts": 2, "max_accuracy_drop": 0.5}}]
    return ["--config", str(ROOT / "configs/quickstart.yaml"), "--model.model_name", tiny_model_dir,
            "--data.train_path", write_chat_file(tmp_path / "train.jsonl", 8),
            "--data.val_path", write_chat_file(tmp_path / "val.jsonl", 4, 50), "--data.batch_size", "4",
            "--trainer.val_check_interval", "2", "--progress_bar.refresh_rate", "0",
            f"--trainer.callbacks={json.dumps(callbacks)}", *extra]


@pytest.mark.parametrize("options, message", [
    (["--lrs", "1e-4"], "at least two different learning rates"),
    (["--lrs", "0,1e-4"], "0 is not a positive learning rate"),
    (["--points", "1"], "at least two learning rates"),
    (["--max_steps", "0"], "a budget of at least one step"),
    (["--data.val_path", "null"], "measures no adaptation"),
])
def test_bad_sweeps_fail_before_any_run(tiny_model_dir, tmp_path, capsys, monkeypatch, options, message):
    monkeypatch.chdir(ROOT)
    sweep_dir = tmp_path / "sweep"
    assert run([*_fit_args(tiny_model_dir, tmp_path), "--dir", str(sweep_dir), *options]) == 1
    assert message in capsys.readouterr().err
    assert not list(sweep_dir.glob("lr_*"))


def test_sweep_runs_each_lr_once_and_writes_table_plot_and_hparams(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    sweep_dir = tmp_path / "sweep"
    argv = [*_fit_args(tiny_model_dir, tmp_path), "--dir", str(sweep_dir), "--lrs", "1e-4,3e-2", "--max_steps", "3"]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "Recommended: lr=" in out
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert [row["learning_rate"] for row in summary["runs"]] == [1e-4, 3e-2]
    assert all(row["steps"] == 3 and row["val_loss"] > 0 and row["acc_baseline"] is not None for row in summary["runs"])
    assert summary["recommended_lr"] in (1e-4, 3e-2)
    assert (sweep_dir / "sweep.csv").read_text().splitlines()[0].startswith("learning_rate,steps,val_loss")
    assert (sweep_dir / "sweep.png").stat().st_size > 0
    run_dir = sweep_dir / "lr_1.00e-04"
    assert (run_dir / "hf_model" / "adapter_config.json").is_file()
    scalars = read_scalars(run_dir)
    assert "sweep/val_loss" in scalars and "forgetting/acc" in scalars
    # A restart repeats nothing and rebuilds the same table.
    assert run(argv) == 0
    assert out.count("run 1/2") == 1 and "already finished" in capsys.readouterr().out
    assert json.loads((sweep_dir / "sweep.json").read_text()) == summary
    # Another configuration in the same directory is refused.
    assert run([*argv[:-2], "--max_steps", "4"]) == 1
    assert "holds a sweep of another configuration" in capsys.readouterr().err
