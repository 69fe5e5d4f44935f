"""The command as a new user meets it: its plan, plain progress in a log file, no noise, TensorBoard's
dashboard, user errors as one message, and the two set-up commands of the README."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli import ROOT, tiny_args

from lightning_ft.cli import main

NOISE = ("gemm_4bit_forward", "Tip:", "LitLogger", "hp_metric", "FutureWarning", "LeafSpec", "GPU available",
         "Traceback", "DeprecationWarning", "is deprecated")


def _command(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m lightning_ft`` from the repository with stdout going to a file, as ``> log`` does."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    environment.pop("LIGHTNING_FT_DEBUG", None)
    environment.update(env or {})
    with open(log, "w") as stdout:
        return subprocess.run([sys.executable, "-m", "lightning_ft", *args], stdout=stdout, stderr=subprocess.PIPE,
                              text=True, timeout=600, cwd=ROOT, env=environment)


def _forgetting_config(tmp_path: Path) -> str:
    config = tmp_path / "forgetting.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: lightning_ft.ForgettingCheck\n"
                      "      init_args: {max_items: 12, max_prompts: 2, max_kl: 5.0, max_time_share: null}\n")
    return str(config)


def test_fit_logged_to_a_file_explains_itself_and_writes_the_dashboard(tiny_model_dir, tmp_path):
    log = tmp_path / "fit.log"
    args = tiny_args(tiny_model_dir, tmp_path, "--config", _forgetting_config(tmp_path),
                     "--trainer.log_every_n_steps", "1")
    result = _command(args, log)
    printed = log.read_text()
    assert result.returncode == 0, result.stderr[-3000:]
    # In order: the plan, progress lines during training, then where the model is and what to run next.
    plan = printed.index("Fine-tuning ")
    assert re.search(r"data: +12 train \+ 4 val conversations", printed)
    assert re.search(r"steps: +3 optimizer steps", printed) and "precision: 32-true on cpu" in printed
    assert re.search(r"outputs: +\S+version_0", printed)
    steps = [printed.index(f"step {n}/3") for n in (1, 2, 3)]
    assert re.search(r"step 2/3 \(67%\) \| loss [\d.]+ \| lr [\d.e+-]+ \| [\d,]+ tokens/s \| ETA \d+s", printed)
    assert "validation at step 2: " in printed and "val/loss" in printed
    end = printed.index("Fine-tuning done after 3 steps")
    assert plan < steps[0] < steps[1] < steps[2] < end
    assert re.search(r"chat: +\S*lightning_ft chat --adapter \S+hf_model", printed)
    assert re.search(r"TensorBoard: +\S*tensorboard\S* --logdir \S+runs", printed)
    for noise in NOISE:
        assert noise not in printed + result.stderr, noise

    events = EventAccumulator(str(next((tmp_path / "runs").rglob("events.out.tfevents.*")).parent),
                              size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert "hp_metric" not in scalars
    assert {"forgetting/acc_baseline", "forgetting/acc_alarm", "forgetting/kl_alarm"} <= scalars
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout.FromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts["loss: train and validation"] == ["^train/loss$", "^val/loss$"]
    assert charts["acc: now, base model, alarm"] == ["^forgetting/acc$", "^forgetting/acc_baseline$",
                                                     "^forgetting/acc_alarm$"]
    assert charts["KL from the base model, alarm"] == ["^forgetting/kl$", "^forgetting/kl_alarm$"]
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {"method", "rank", "learning_rate", "epochs"} <= {info.name for info in experiment.hparam_infos}
    assert {"val/loss", "forgetting/acc_delta", "forgetting/kl"} <= {m.name.tag for m in experiment.metric_infos}
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["method"].string_value == "LoRA" and start.hparams["rank"].number_value == 16


@pytest.mark.slow  # three CLI processes
def test_bad_data_prints_the_message_alone_and_debug_shows_the_traceback(tiny_model_dir, tmp_path):
    args = tiny_args(tiny_model_dir, tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    args[args.index("--data.train_path") + 1] = str(bad)
    result = _command(args, tmp_path / "out.log")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert re.match(r"error: 1 problem in the data:\n  \S+bad\.jsonl:1: .*no assistant message", result.stderr)
    debug = _command([*args, "--debug"], tmp_path / "debug.log")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "DataError" in debug.stderr
    by_env = _command(args, tmp_path / "env.log", env={"LIGHTNING_FT_DEBUG": "1"})
    assert "Traceback" in by_env.stderr


@pytest.mark.slow  # two CLI processes
def test_missing_model_and_bad_value_are_one_line(tmp_path):
    missing = _command(["fit", "--config", "configs/quickstart.yaml", "--model.model_name", "./no/such/model",
                        "--trainer.default_root_dir", str(tmp_path)], tmp_path / "out.log")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "error: Model path './no/such/model' does not exist.\n" in missing.stderr
    assert "Automatic Mixed Precision" not in missing.stderr
    bad_value = _command(["fit", "--config", "configs/quickstart.yaml", "--model.learning_rate", "-1",
                          "--trainer.default_root_dir", str(tmp_path)], tmp_path / "out.log")
    assert bad_value.returncode != 0 and "Traceback" not in bad_value.stderr
    assert "learning_rate=-1" in bad_value.stderr


def test_hub_id_that_cannot_be_fetched_is_one_line(monkeypatch):
    from lightning_ft.console import user_error_message
    from lightning_ft.models import ModelNotFoundError, load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"^Model 'nobody/no-such-model' not found: .*nor in the Hugging "
                                                 r"Face cache, and offline mode is set \(HF_HUB_OFFLINE\)\.$") as error:
        load_tokenizer("nobody/no-such-model")
    assert user_error_message(error.value) == str(error.value)


def test_hub_id_without_a_network_fails_at_once(monkeypatch):
    import lightning_ft.models as models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda: False)  # no retries against an unreachable hub
    with pytest.raises(models.ModelNotFoundError, match=r"no network access to huggingface\.co\.$"):
        models.load_tokenizer("nobody/no-such-model")


def test_a_bug_keeps_its_traceback():
    from lightning_ft.console import run_guarded

    def broken(argv):
        raise KeyError("internal")

    with pytest.raises(KeyError):
        run_guarded(broken, [])


def test_disabling_the_progress_bar_works(tiny_model_dir, tmp_path, capsys):
    cli = main(tiny_args(tiny_model_dir, tmp_path, "--trainer.enable_progress_bar", "false"))
    assert cli.trainer.progress_bar_callback is None and cli.trainer.global_step == 3
    assert "step 3/3" not in capsys.readouterr().out


def test_the_readme_leads_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"```(?:bash|sh|console)?\n(.*?)```", readme, re.S).group(1)
    assert [line for line in first.splitlines() if line.strip()] == ["make quickstart", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test\b", ci, re.M)


def _throwaway_venv(path: Path, see_this_environment: bool) -> Path:
    """A venv without pip that sees nothing installed outside it, or (``see_this_environment``) exactly the
    running environment's packages: never the base interpreter's, which a new user's machine has empty."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    if see_this_environment:
        site_packages = next(path.glob("lib/python*/site-packages"))
        dirs = [d for d in sys.path if d.endswith("site-packages") and Path(d).is_dir()]
        (site_packages / "running_environment.pth").write_text(
            "".join(f"import site; site.addsitedir({d!r})\n" for d in dirs))
    return path


def _stamped_setup(venv: Path) -> subprocess.CompletedProcess:
    script = ROOT / "scripts" / "setup.sh"
    digest = subprocess.run("cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16", shell=True, cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.strip()
    (venv / ".lightning_ft-setup").write_text(f"{digest} {ROOT}\n")
    environment = {**os.environ, "VENV": str(venv), "PYTHONPATH": str(ROOT)}
    for name in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONHOME"):
        environment.pop(name, None)
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60, env=environment)


def test_setup_is_fast_and_quiet_once_done(tmp_path):
    """The stamp of an environment set up for this pyproject.toml skips every install."""
    venv = _throwaway_venv(tmp_path / "env", see_this_environment=True)
    result = _stamped_setup(venv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{venv}/bin/python" and result.stderr == ""


def test_setup_with_a_stale_stamp_and_no_pip_says_so_in_one_line_each(tmp_path):
    """A current stamp over an environment without torch installs again, and a venv without pip is an error
    naming the command that fixes it, at once rather than after minutes of downloading."""
    venv = _throwaway_venv(tmp_path / "env", see_this_environment=False)
    result = _stamped_setup(venv)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"The set-up stamp of {venv} is current but {venv}/bin/python cannot find torch or lightning_ft: "
        "installing again",
        f"error: {venv} has no pip of its own: run '{venv}/bin/python -m ensurepip --upgrade' "
        f"(or remove {venv} to recreate it)"]
