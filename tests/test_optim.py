"""The optimizer and scheduler as config choices: another class from YAML, no decay on norms and biases kept,
and settings that would be ignored refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import write_chat_file

from lightning_ft import FineTuneModule, FullFineTune
from lightning_ft.cli import main
from lightning_ft.preference import PreferenceModule

ROOT = Path(__file__).resolve().parents[1]

SGD_YAML = """\
model:
  weight_decay: 0.1
  learning_rate: 5.0e-5
  optimizer:
    class_path: torch.optim.SGD
    init_args: {momentum: 0.9, nesterov: true}
  lr_scheduler:
    class_path: torch.optim.lr_scheduler.ConstantLR
    init_args: {factor: 0.5, total_iters: 2}
"""


def test_yaml_picks_another_optimizer_and_scheduler_with_no_decay_on_norms_and_biases(tiny_model_dir, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.chdir(ROOT)
    (tmp_path / "sgd.yaml").write_text(SGD_YAML)
    cli = main(["--config", "configs/quickstart.yaml", "--config", str(tmp_path / "sgd.yaml"),
                "--model.model_name", tiny_model_dir, "--model.adapter", "lightning_ft.FullFineTune",
                "--data.train_path", write_chat_file(tmp_path / "train.jsonl", 4),
                "--trainer.default_root_dir", str(tmp_path / "runs")], run=False)
    module = cli.model
    module.configure_model()
    module.trainer = cli.trainer
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0.9
    assert optimizer.defaults["nesterov"] and config["lr_scheduler"]["interval"] == "step"
    assert isinstance(scheduler, torch.optim.lr_scheduler.ConstantLR)
    names = {id(p): n for n, p in module.named_parameters()}
    decayed, plain = ({names[id(p)] for p in group["params"]} for group in optimizer.param_groups)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]
    assert any("q_proj.weight" in n for n in decayed) and not any("norm" in n for n in decayed)
    assert any("norm" in n for n in plain) and len(decayed) + len(plain) == len(names)
    assert [group["lr"] for group in optimizer.param_groups] == [pytest.approx(2.5e-5)] * 2  # 5e-5 x factor 0.5
    assert "optimizer" not in module.hparams  # callables stay out of checkpoints; config.yaml records them


def test_default_is_adamw_with_the_warmup_schedule(tiny_model_dir):
    module = FineTuneModule(tiny_model_dir, adapter=FullFineTune(), learning_rate=1e-4, warmup_steps=4,
                            decay="constant")
    module.configure_model()
    module.trainer = pl.Trainer(max_steps=10, logger=False)
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["betas"] == (0.9, 0.999)
    assert [group["lr"] for group in optimizer.param_groups] == [pytest.approx(1e-4 / 5)] * 2  # warmup step 0
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.0, 0.0]


@pytest.mark.parametrize("cls", [FineTuneModule, PreferenceModule])
def test_settings_an_optimizer_or_scheduler_would_ignore_are_refused(tiny_model_dir, cls):
    from functools import partial

    with pytest.raises(ValueError, match=rf"Invalid {cls.__name__} settings: optimizer sets lr=0.1: set "
                                         r"model.learning_rate instead .*; betas=\(0.8, 0.9\) applies to the "
                                         r"default AdamW only"):
        cls(tiny_model_dir, optimizer=partial(torch.optim.SGD, lr=0.1), betas=(0.8, 0.9))
    with pytest.raises(ValueError, match=r"warmup_steps=3, decay=linear shape the default schedule only"):
        cls(tiny_model_dir, lr_scheduler=torch.optim.lr_scheduler.ConstantLR, warmup_steps=3, decay="linear")
    module = cls(tiny_model_dir, optimizer=partial(torch.optim.SGD, momentum=0.5))  # lr left to learning_rate
    assert module.optimizer.keywords == {"momentum": 0.5}
