"""`lightning_ft sweep`: the grid and search space, bad input before any run, the study's bookkeeping
(claims, stale trials, retries) and a sweep on the tiny model whose forgetful trial is pruned."""

from __future__ import annotations

import json
import os
from pathlib import Path

import optuna
import pytest
from sweep_helpers import ROOT, sweep_fit_args

from lightning_ft.commands.sweep import without_workers, check_space_keys, run
from lightning_ft.plotting import read_scalars
from lightning_ft.sweep import RunResult, SearchSpace, log_grid, parse_lrs, read_space, recommend, worker
from lightning_ft.sweep import trial as trial_process
from lightning_ft.sweep.report import collect, summarize
from lightning_ft.sweep.space import Range
from lightning_ft.sweep.study import (
    HEARTBEAT_ATTR,
    SweepSpec,
    claim_next,
    fail_stale_trials,
    open_storage,
    open_study,
    tell,
)
from lightning_ft.sweep.worker import trial_fit_args


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


def test_search_space_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("model.learning_rate: {low: 1e-5, high: 1.0e-3, log: true}\n"
                    "model.adapter.init_args.r: [8, 16, 32]\ntrainer.max_steps: {low: 10, high: 40, step: 10}\n"
                    "data.replay_ratio: {low: 0.0, high: 0.5}\nmodel.kl_beta: {low: 0, high: 0.2}\n")
    space = read_space(path)
    assert not space.is_grid and space.choices == {"model.adapter.init_args.r": [8, 16, 32]}
    kinds = {key: (spec.kind, spec.log) for key, spec in space.ranges.items()}
    assert kinds == {"model.learning_rate": ("float", True), "trainer.max_steps": ("int", False),
                     "data.replay_ratio": ("float", False), "model.kl_beta": ("float", False)}
    trial = optuna.create_study(directions=["minimize", "minimize"]).ask()
    params = space.suggest(trial)
    assert 1e-5 <= params["model.learning_rate"] <= 1e-3 and params["trainer.max_steps"] in (10, 20, 30, 40)
    assert SearchSpace.from_json(json.loads(json.dumps(space.to_json()))) == space
    grid = tmp_path / "grid.yaml"
    grid.write_text("model.adapter.init_args.r: [8, 16]\nmodel.kl_beta: [0.0, 0.1]\n")
    assert read_space(grid).grid_points()[1] == {"model.adapter.init_args.r": 8, "model.kl_beta": 0.1}


def test_bad_search_space_names_line_and_key(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("model.kl_beta: {low: 0.5, high: 0.1}\nmodel.adapter.init_args.r: [8]\n"
                    "model.learning_rate: {low: 0, high: 1e-3, log: true}\ndata.replay_ratio: 0.2\n")
    with pytest.raises(ValueError, match=r"space.yaml:1: model.kl_beta: low=0.5 must be below high=0.1; .*"
                                         r"space.yaml:2: model.adapter.init_args.r: \[8\]: a list needs at least two.*"
                                         r"space.yaml:3: model.learning_rate: log=true needs low > 0.*"
                                         r"space.yaml:4: data.replay_ratio: 0.2 is neither a list nor a range"):
        read_space(path)


def _result(lr, val_loss, drop, ok=True, state="complete"):
    return RunResult(learning_rate=lr, steps=10, val_loss=val_loss, acc_drop=drop, within_thresholds=ok, state=state)


def test_recommendation_skips_forgetful_and_pruned_trials():
    runs = [_result(1e-5, 1.2, 0.00), _result(1e-4, 0.9, 0.01), _result(3e-4, 0.95, 0.03),
            _result(1e-3, 0.7, 0.09, ok=False), _result(3e-3, 0.5, 0.2, ok=False, state="pruned")]
    best, reason = recommend(runs)
    assert best.learning_rate == 1e-4
    assert reason.startswith("lr=0.0001: best validation loss (0.9000) of the 3 of 4 complete trials")
    none, reason = recommend([_result(1e-3, 0.7, 0.09, ok=False), _result(3e-3, 0.6, 0.2, ok=False)])
    assert none is None and "least forgetting was at lr=0.001" in reason


def _spec(grid=(1e-4, 2e-4, 3e-4, 4e-4), max_retries=1):
    space = SearchSpace({"model.learning_rate": list(grid)})
    return SweepSpec(fingerprint="f", fit_args=[], max_steps=3, space=space.to_json(), n_trials=4,
                     adaptation="val_loss", max_accuracy_drop=0.05, max_kl=None, sampler="tpe", seed=0, prune=True,
                     max_retries=max_retries)


def test_workers_sharing_a_journal_claim_each_grid_point_once(tmp_path):
    # Two storages on one journal file behave as two worker processes (each replays the log itself).
    one, two = open_storage(tmp_path), open_storage(tmp_path)
    study_one, _ = open_study(one, "s", _spec())
    study_two, _ = open_study(two, "s", _spec())
    claimed = []
    for study, storage in [(study_one, one), (study_two, two)] * 3:
        trial = claim_next(study, storage, _spec())
        if trial is not None:
            claimed.append(trial.suggest_categorical("model.learning_rate", [1e-4, 2e-4, 3e-4, 4e-4]))
    assert sorted(claimed) == [1e-4, 2e-4, 3e-4, 4e-4]
    with pytest.raises(ValueError, match="holds a sweep of another configuration"):
        open_study(open_storage(tmp_path), "s", SweepSpec(**{**vars(_spec()), "fingerprint": "other"}))


def test_a_trial_whose_worker_died_is_failed_and_retried_once(tmp_path):
    storage = open_storage(tmp_path)
    study, spec = open_study(storage, "s", _spec(grid=(1e-4, 2e-4), max_retries=1))
    trial = claim_next(study, storage, spec)
    trial.suggest_categorical("model.learning_rate", [1e-4, 2e-4])
    trial.set_user_attr("run", "trial_000")
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    trial.set_user_attr(HEARTBEAT_ATTR, {"worker": f"{os.uname().nodename}:{dead}", "time": 0.0})
    assert fail_stale_trials(study, storage, spec, grace=3600) == [0]
    assert fail_stale_trials(study, open_storage(tmp_path), spec, grace=3600) == []  # failed (and retried) once
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    retry = next(t for t in waiting if t.user_attrs.get("retry_of") == 0)
    assert retry.system_attrs["fixed_params"] == {"model.learning_rate": 1e-4} and retry.user_attrs["run"] == "trial_000"
    assert study.trials[0].state == optuna.trial.TrialState.FAIL


def test_a_sampled_space_fills_enqueued_trials_and_records_constraints(tmp_path):
    space = SearchSpace({"model.adapter.init_args.r": [8, 16]}, {"model.kl_beta": Range(0.0, 0.2)})
    spec = SweepSpec(**{**vars(_spec()), "space": space.to_json(), "n_trials": 3})
    storage = open_storage(tmp_path)
    study, _ = open_study(storage, "s", spec)
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 3
    outcomes = [(1.0, 0.01, "complete"), (0.8, 0.30, "complete"), (0.5, 0.40, "pruned")]
    for val_loss, drop, state in outcomes:
        trial = claim_next(study, storage, spec)
        params = space.suggest(trial)
        assert params["model.adapter.init_args.r"] in (8, 16) and 0.0 <= params["model.kl_beta"] <= 0.2
        tell(study, trial, RunResult(learning_rate=2e-4, steps=4 if state == "pruned" else 10, val_loss=val_loss,
                                     acc_drop=drop, max_acc_drop=drop, within_thresholds=drop <= 0.05,
                                     state=state, budget_steps=10, seconds=4.0 if state == "pruned" else 10.0), spec)
    assert claim_next(study, storage, spec) is None
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert study.trials[1].constraints == {"max_accuracy_drop": pytest.approx(0.25)}
    assert [t.number for t in study.best_trials] == [0]  # trial 1 adapts better but breaks the constraint
    rows = collect(study)
    assert [(row.trial, row.state, row.pareto) for row in rows] == [(0, "complete", True), (1, "complete", False),
                                                                    (2, "pruned", False)]
    summary = summarize(study, rows)
    assert summary["steps_saved"] == 6 and summary["steps_budget"] == 30 and summary["seconds_saved_estimate"] == 6.0


def test_report_of_a_directory_without_a_sweep_is_an_error(tmp_path, capsys):
    assert run(["--dir", str(tmp_path / "nothing"), "--report"]) == 1
    assert "nothing: no sweep here (study.journal is missing)" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


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
    assert run([*sweep_fit_args(tiny_model_dir, tmp_path), "--dir", str(sweep_dir), *options]) == 1
    assert message in capsys.readouterr().err
    assert not sweep_dir.exists()


def _run_child_here(spec, params, run, directory, number):
    """The worker's child process, run in this process (a subprocess costs ~20 s of imports here)."""
    result = directory / run / f"result_{number:03d}.json"
    trial_process.main([str(result), *([] if spec.prune else ["--no-prune"]), "--", *trial_fit_args(spec, params, run, directory)])
    return 0, result


def test_sweep_prunes_the_forgetful_trial_and_reports(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The whole sweep with each trial run in-process; tests/test_sweep_workers.py runs real worker processes."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(worker, "run_child", _run_child_here)
    monkeypatch.setenv("LIGHTNING_FT_CACHE", str(tmp_path / "cache"))  # no baseline of an earlier test
    sweep_dir = tmp_path / "sweep"
    argv = [*sweep_fit_args(tiny_model_dir, tmp_path), "--dir", str(sweep_dir), "--lrs", "1e-6,0.05",
            "--max_steps", "4"]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "Recommended: lr=1e-06" in out and "Pruning saved 2 of 8 optimizer steps" in out
    assert out.count("Measuring the base model") == 1  # the study measures its base model once
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    rows = {row["learning_rate"]: row for row in summary["runs"]}
    assert rows[1e-6]["state"] == "complete" and rows[1e-6]["steps"] == 4 and rows[1e-6]["within_thresholds"]
    assert rows[0.05]["state"] == "pruned" and rows[0.05]["pruned_at"] == 2 and rows[0.05]["steps"] == 2
    assert summary["recommended_lr"] == 1e-6 and summary["pareto_trials"] == [rows[1e-6]["trial"]]
    assert summary["steps_saved"] == 2
    assert (sweep_dir / "sweep.csv").read_text().splitlines()[0].startswith("learning_rate,steps,val_loss")
    assert (sweep_dir / "sweep.png").stat().st_size > 0
    run_dir = sweep_dir / f"trial_{rows[1e-6]['trial']:03d}"
    assert (run_dir / "hf_model" / "adapter_config.json").is_file()
    assert "sweep/val_loss" in read_scalars(run_dir) and "forgetting/kl" in read_scalars(run_dir)
    # A restart runs nothing again; --report rebuilds the same table; other settings are refused.
    assert run(argv) == 0 and "started by" not in capsys.readouterr().out
    assert run(["--dir", str(sweep_dir), "--report"]) == 0
    assert "Pareto set: lr=1e-06" in capsys.readouterr().out
    assert json.loads((sweep_dir / "sweep.json").read_text())["runs"] == summary["runs"]
    assert run([*argv[:-2], "--max_steps", "5"]) == 1
    assert "holds a sweep of another configuration" in capsys.readouterr().err


def test_the_example_search_space_is_a_valid_fit_setting(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    space = read_space(ROOT / "examples/sweep/space.yaml")
    assert not space.is_grid and len(space.choices) + len(space.ranges) == 5
    check_space_keys(sweep_fit_args(tiny_model_dir, tmp_path), space, "space.yaml")
    bad = SearchSpace({"model.no_such_key": [1, 2]})
    with pytest.raises(ValueError, match="space.yaml: the fit configuration refuses a key or value of the search"):
        check_space_keys(sweep_fit_args(tiny_model_dir, tmp_path), bad, "space.yaml")


def test_local_workers_get_one_gpu_each_or_a_share_of_the_cpu(monkeypatch):
    import torch

    started = []
    monkeypatch.setattr(worker.subprocess, "Popen", lambda command, env: started.append((command, env)))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    worker.start_workers(["--dir", "d", "--worker"], 3)
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["0", "1", "0"]
    assert started[0][0][-5:] == ["lightning_ft", "sweep", "--dir", "d", "--worker"]
    started.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(worker.os, "cpu_count", lambda: 16)
    worker.start_workers([], 4)
    assert [env["OMP_NUM_THREADS"] for _, env in started] == ["4"] * 4
    assert without_workers(["--workers", "2", "--lrs", "1,2", "--workers=3"]) == ["--lrs", "1,2"]
