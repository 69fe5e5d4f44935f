"""Training mixtures: per-epoch draws by weight and count, source shares in logs, YAML configs, check-data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pandas as pd
import pytest
from helpers import chat_record, write_chat_file

from lightning_ft.cli import console_main, main
from lightning_ft.data.datamodule import ChatDataModule
from lightning_ft.data.mixture import per_epoch
from lightning_ft.data.sampling import ResumableSampler
from lightning_ft.data.sources import Source

ROOT = Path(__file__).resolve().parents[2]


def test_per_epoch_shares_by_weight_and_count():
    sources = [Source("a", weight=3), Source("b", weight=1), Source("c", count=2), Source("d")]
    assert per_epoch(sources, [12, 4, 6, 5]) == [12, 4, 2, None]
    assert per_epoch([Source("a", weight=1), Source("b", weight=1)], [100, 10]) == [55, 55]  # b repeats


def test_pools_are_drawn_without_repeats_until_used_up():
    sampler = ResumableSampler(3, seed=0, pools=[(4, 3), (2, 5)])
    assert len(sampler) == 3 + 3 + 5
    first_pool = [i for epoch in range(4) for i in sampler.replay_indices(epoch) if 3 <= i < 7]
    assert sorted(first_pool[:4]) == [3, 4, 5, 6] and sorted(first_pool[4:8]) == [3, 4, 5, 6]
    second = [i for i in sampler.replay_indices(0) if i >= 7]
    assert Counter(second) == {7: 3, 8: 2} or Counter(second) == {7: 2, 8: 3}  # a small pool repeats


@pytest.fixture
def mixture_files(tmp_path):
    write_chat_file(tmp_path / "a.jsonl", 12)
    rows = [chat_record(i) for i in range(100, 104)]
    pd.DataFrame({"conversation": [json.dumps(r["messages"]) for r in rows]}).to_csv(tmp_path / "b.csv", index=False)
    datasets.Dataset.from_list([chat_record(i) for i in range(200, 206)]).save_to_disk(str(tmp_path / "c"))
    config = tmp_path / "mix.yaml"
    config.write_text(f"""
data:
  train_path: null
  val_path: null
  sources:
    - path: {tmp_path / 'a.jsonl'}
      weight: 3
    - path: {tmp_path / 'b.csv'}
      weight: 1
      name: csvdata
      columns: {{conversation: messages}}
    - path: {tmp_path / 'c'}
      count: 2
""")
    return tmp_path, config


def test_mixture_epoch_holds_each_source_share(mixture_files, tiny_model_dir):
    tmp_path, _ = mixture_files
    data = ChatDataModule(sources=[Source(str(tmp_path / "a.jsonl"), weight=3),
                                   Source(str(tmp_path / "b.csv"), weight=1, columns={"conversation": "messages"}),
                                   Source(str(tmp_path / "c"), count=2)], tokenizer=tiny_model_dir, batch_size=4)
    data.setup("fit")
    assert data.stats["train_conversations"] == 12 + 4 + 6
    epochs = [Counter(int(s) for batch in data.train_dataloader() for s in batch["source_ids"]) for _ in range(2)]
    assert epochs[0] == epochs[1] == {0: 12, 1: 4, 2: 2}


def test_mixture_from_yaml_trains_logs_shares_and_is_checked(mixture_files, tiny_model_dir, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp_path, config = mixture_files
    base = ["--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(config),
            "--model.model_name", tiny_model_dir]
    cli = main(["fit", *base, "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1",
                "--trainer.precision", "32-true", "--trainer.default_root_dir", str(tmp_path / "runs"),
                "--progress_bar.refresh_rate", "0"])
    events = EventAccumulator(cli.trainer.log_dir)
    events.Reload()
    assert {"train/source_share/a", "train/source_share/csvdata", "train/source_share/c"} <= set(
        events.Tags()["scalars"])
    bad = pd.read_csv(tmp_path / "b.csv")
    bad.loc[1, "conversation"] = json.dumps([{"role": "user", "content": "only a question"}])
    bad.to_csv(tmp_path / "b.csv", index=False)
    capsys.readouterr()  # the fit's own output
    code = console_main(["check-data", *base, "--json", "--surprise_top", "0"])
    out, err = capsys.readouterr()
    assert out, err
    report = json.loads(out)
    assert code == 1 and any(f["location"] == f"{tmp_path / 'b.csv'}:row 1" for f in report["findings"])
