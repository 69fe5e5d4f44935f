"""The command line: every shipped config parses, and `fit` runs end to end on the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_chat_file

from lightning_ft import ChatDataModule, FineTuneModule
from lightning_ft.cli import main
from lightning_ft.commands.check_pairs import classes, is_preference_config
from lightning_ft.data.formats import DataError
from lightning_ft.preference import PreferenceDataModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
GPU_CONFIGS = [c for c in CONFIGS if c.stem.endswith("_gpu")]  # FSDP/DeepSpeed: refuse to build on a CPU


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name example data relative to the repository


@pytest.mark.parametrize("config", GPU_CONFIGS, ids=[c.name for c in GPU_CONFIGS])
def test_gpu_strategy_configs_parse(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "strategy:" in printed and "accelerator: gpu" in printed


@pytest.mark.parametrize("config", [c for c in CONFIGS if c not in GPU_CONFIGS],
                         ids=[c.name for c in CONFIGS if c not in GPU_CONFIGS])
def test_every_config_builds_module_datamodule_and_trainer(config):
    preference = is_preference_config(["--config", str(config)])  # built by `lightning_ft preference`
    cli = main(["--config", str(config)], run=False, **(classes() if preference else {}))
    assert isinstance(cli.model, FineTuneModule)
    assert isinstance(cli.datamodule, PreferenceDataModule if preference else ChatDataModule)
    assert cli.datamodule.tokenizer == cli.model.hparams.model_name  # linked, not set twice
    if not preference:
        assert cli.datamodule.packs_natively is cli.model.packs_natively()
    for key in ("train_path", "val_path"):
        path = getattr(cli.datamodule, key)
        assert path is None or Path(path).is_file(), f"{config.name}: data.{key}={path} does not exist"


def test_print_config_shows_linked_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "model_name: smollm2-135m-instruct" in printed and "class_path: lightning_ft.LoRA" in printed


def tiny_args(tiny_model_dir, tmp_path, *extra):
    return [
        "fit", "--config", str(ROOT / "configs/quickstart.yaml"),
        "--model.model_name", tiny_model_dir,
        "--data.train_path", write_chat_file(tmp_path / "train.jsonl", 12),
        "--data.val_path", write_chat_file(tmp_path / "val.jsonl", 4, 50),
        "--trainer.max_steps", "3", "--trainer.precision", "32-true", "--trainer.val_check_interval", "2",
        "--trainer.default_root_dir", str(tmp_path / "runs"), "--progress_bar.refresh_rate", "0", *extra,
    ]


def test_fit_writes_checkpoint_tensorboard_and_hf_adapter(tiny_model_dir, tmp_path):
    cli = main(tiny_args(tiny_model_dir, tmp_path))
    log_dir = Path(cli.trainer.log_dir)
    assert log_dir.is_relative_to(tmp_path / "runs")
    assert (log_dir / "config.yaml").is_file()
    assert list(log_dir.glob("events.out.tfevents.*"))
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in (log_dir / "hf_model").iterdir()
    }
    logged = cli.trainer.logged_metrics
    for key in ("train/loss", "val/loss", "val/perplexity", "train/tokens_per_sec"):
        assert key in logged, key


def test_the_model_tells_the_data_module_whether_it_packs_natively(tiny_model_dir, tmp_path):
    build = ["--trainer.default_root_dir", str(tmp_path / "runs")]
    cli = main([*tiny_args(tiny_model_dir, tmp_path)[1:], *build], run=False)
    assert cli.datamodule.packs_natively is True and cli.model.model is None  # from the config, before loading
    eager = main([*tiny_args(tiny_model_dir, tmp_path, "--model.attn_implementation", "eager")[1:], *build], run=False)
    assert eager.datamodule.packs_natively is False
    with pytest.raises(SystemExit):  # a linked value is the model's to give
        main([*tiny_args(tiny_model_dir, tmp_path, "--data.packs_natively", "false")[1:], *build], run=False)


def test_bad_data_stops_fit_before_anything_is_written(tiny_model_dir, tmp_path):
    args = tiny_args(tiny_model_dir, tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    args[args.index("--data.train_path") + 1] = str(bad)
    with pytest.raises(DataError, match=r"bad.jsonl:1: .*no assistant message[\s\S]*bad.jsonl:2: "):
        main(args)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # two processes, each importing torch and Lightning
def test_console_script_and_module_entry_point_answer_help():
    for command in (["lightning_ft"], [sys.executable, "-m", "lightning_ft"]):
        result = subprocess.run([*command, "fit", "--help"], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "COLUMNS": "200"})
        assert result.returncode == 0, result.stderr
        assert "--model.model_name" in result.stdout and "--data.train_path" in result.stdout


@pytest.mark.slow  # two training processes
def test_ddp_on_two_cpu_processes_trains_and_exports_once(tiny_model_dir, tmp_path):
    root = tmp_path / "runs"
    command = [
        sys.executable, "-m", "lightning_ft", "fit", "--config", str(ROOT / "configs/ddp_cpu.yaml"),
        "--model.model_name", tiny_model_dir,
        "--data.train_path", write_chat_file(tmp_path / "train.jsonl", 16),
        "--data.val_path", write_chat_file(tmp_path / "val.jsonl", 4, 50),
        "--data.batch_size", "2", "--trainer.max_steps", "3", "--trainer.default_root_dir", str(root),
        "--progress_bar.refresh_rate", "0",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    versions = list((root / "lightning_logs").iterdir())
    assert [v.name for v in versions] == ["version_0"]  # rank 0 alone logs
    assert (versions[0] / "hf_model" / "adapter_model.safetensors").is_file()
    import torch

    assert torch.load(versions[0] / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_compile_overlay_sets_compile_and_half_checkpointing():
    cli = main(["--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(ROOT / "configs/compile.yaml")],
               run=False)
    assert cli.model.hparams.compile is True and cli.model.hparams.gradient_checkpointing == 0.5
    assert cli.datamodule.train_path.endswith("examples/triage/train.jsonl")  # the rest comes from quickstart
