"""``streaming: true``: the same examples as the map-style path, packing, mixtures, ranks, workers, errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from helpers import chat_record, write_chat_file, write_varied_chat_file

from lightning_ft import ChatDataModule, FineTuneModule, LoRA
from lightning_ft.data.collate import IGNORE_INDEX
from lightning_ft.data.formats import DataError
from lightning_ft.data.sources import Source

ROOT = Path(__file__).resolve().parents[2]


def _streamed(path, tokenizer, **settings):
    data = ChatDataModule(path, tokenizer=tokenizer, streaming=True, **settings)
    data.setup("fit")
    return data


def _examples(batch):
    """The (input_ids, labels) of each example of a padded batch."""
    sizes = batch["attention_mask"].sum(1).tolist()
    return [(batch["input_ids"][r, :n].tolist(), batch["labels"][r, :n].tolist()) for r, n in enumerate(sizes)]


@pytest.mark.parametrize("suffix", ["jsonl", "parquet", "saved"])
def test_stream_yields_the_map_style_examples(tiny_model_dir, tmp_path, suffix):
    records = [chat_record(i) for i in range(9)]
    path = tmp_path / f"train.{suffix}"
    if suffix == "jsonl":
        write_chat_file(path, 9)
    elif suffix == "parquet":
        pd.DataFrame({"messages": [r["messages"] for r in records]}).to_parquet(path)
    else:
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    mapped = ChatDataModule(str(path), tokenizer=tiny_model_dir, system_prompt="Be brief.")
    mapped.setup("fit")
    expected = [(e["input_ids"], e["labels"]) for e in mapped.train_examples]
    data = _streamed(str(path), tiny_model_dir, system_prompt="Be brief.", batch_size=2, packing=False,
                     group_by_length=False, shuffle_buffer=1)
    assert [e for batch in data.train_dataloader() for e in _examples(batch)] == expected


@pytest.mark.parametrize("grouped", [False, True], ids=["padded", "grouped"])
def test_shuffle_buffer_is_seeded_and_workers_split_without_duplicates(tiny_model_dir, tmp_path, grouped):
    path = write_varied_chat_file(tmp_path / "train.jsonl", 30)
    settings = {"batch_size": 2, "packing": False, "group_by_length": grouped, "shuffle_buffer": 8}
    first = [e for b in _streamed(path, tiny_model_dir, **settings).train_dataloader() for e in _examples(b)]
    again = [e for b in _streamed(path, tiny_model_dir, num_workers=2, **settings).train_dataloader()
             for e in _examples(b)]
    assert again == first  # two workers: every example once, in the same order
    assert len({tuple(ids) for ids, _ in first}) == 30
    in_order = [e for b in _streamed(path, tiny_model_dir, **{**settings, "shuffle_buffer": 1}).train_dataloader()
                for e in _examples(b)]
    assert sorted(first) == sorted(in_order) and first != in_order
    reseeded = [e for b in _streamed(path, tiny_model_dir, seed=1, **settings).train_dataloader() for e in _examples(b)]
    assert reseeded != first


def test_an_unreachable_hub_stream_is_one_line(monkeypatch):
    from lightning_ft.data import streaming

    monkeypatch.setattr(streaming, "hub_reachable", lambda: False)
    with pytest.raises(DataError, match=r"org/chats\[train\]: cannot stream the Hub dataset: this machine has no "
                                        r"network access to huggingface.co"):
        streaming.open_stream(Source("org/chats", split="train"))


@pytest.mark.parametrize("records", [20, 23])
def test_ranks_split_the_stream_into_equal_shares(tiny_model_dir, tmp_path, records):
    path = write_varied_chat_file(tmp_path / "train.jsonl", records)
    seen = []
    for rank in (0, 1):
        data = _streamed(path, tiny_model_dir, batch_size=2, packing=False, group_by_length=False)
        loader = data.train_dataloader()
        loader.dataset.rank, loader.dataset.world_size = rank, 2
        seen.append([tuple(ids) for b in loader for ids, _ in _examples(b)])
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) == len(seen[1]) == 10  # 23: the last incomplete round (3 records) is left out


def _loss_sums(model, batch):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                               reduction="none")
    return losses[labels != IGNORE_INDEX].sort().values


def test_streamed_packing_keeps_per_token_loss(tiny_model_dir, tmp_path):
    path = write_varied_chat_file(tmp_path / "train.jsonl", 12)
    module = FineTuneModule(tiny_model_dir, adapter=LoRA(r=4, dropout=0.0))
    module.configure_model()
    module.model.eval()
    padded = list(_streamed(path, tiny_model_dir, batch_size=4, packing=False, group_by_length=False).train_dataloader())
    packed = list(_streamed(path, tiny_model_dir, batch_size=4, packing=True).train_dataloader())
    assert len(packed) == len(padded) == 3 and "position_ids" in packed[0]
    assert any(len(p["input_ids"]) < 4 for p in packed)  # conversations really share rows
    with torch.no_grad():
        for one, other in zip(padded, packed):
            assert torch.allclose(_loss_sums(module.model, one), _loss_sums(module.model, other), atol=1e-5)


def test_mixture_and_replay_shares_follow_the_weights(tiny_model_dir, tmp_path):
    write_chat_file(tmp_path / "a.jsonl", 300)
    pd.DataFrame({"messages": [chat_record(i)["messages"] for i in range(1000, 1300)]}).to_parquet(tmp_path / "b.parquet")
    data = ChatDataModule(sources=[Source(str(tmp_path / "a.jsonl"), weight=3), Source(str(tmp_path / "b.parquet"))],
                          tokenizer=tiny_model_dir, streaming=True, batch_size=8, packing=False, replay_ratio=0.2)
    data.setup("fit")
    counts = Counter(int(s) for batch in data.train_dataloader() for s in batch["source_ids"])
    total = sum(counts.values())
    assert total >= 600  # the epoch ends once every source was used up
    shares = [counts[i] / total for i in range(3)]
    assert shares == pytest.approx([0.6, 0.2, 0.2], abs=0.04)


def test_stream_needs_max_steps_and_refuses_what_it_cannot_honour(tiny_model_dir, tmp_path):
    path = write_chat_file(tmp_path / "train.jsonl", 4)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"streaming: true needs trainer.max_steps"):
        trainer.fit(FineTuneModule(tiny_model_dir, adapter=LoRA(r=4)),
                    ChatDataModule(path, tokenizer=tiny_model_dir, streaming=True))
    with pytest.raises(ValueError, match=r"val_fraction=0.1: a stream has no size.*\n.*count needs the source's size"):
        ChatDataModule(sources=[Source(path, count=3)], val_fraction=0.1, streaming=True)


def test_a_bad_streamed_record_names_its_source_and_row(tiny_model_dir, tmp_path):
    lines = [json.dumps(chat_record(i)) for i in range(70)]
    lines[59] = json.dumps({"messages": [{"role": "user", "content": "a question only"}]})
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    data = _streamed(str(tmp_path / "train.jsonl"), tiny_model_dir, batch_size=1, shuffle_buffer=1)  # 50 sampled
    with pytest.raises(DataError, match=r"train.jsonl:60: messages: no assistant message"):
        list(data.train_dataloader())  # past the sample: found when reached
    rows = [chat_record(i)["messages"] for i in range(4)]
    rows[2] = [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]
    pd.DataFrame({"messages": rows}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet:row 2"):
        _streamed(str(tmp_path / "bad.parquet"), tiny_model_dir)  # within the sample: found before training


def test_streamed_mixture_from_yaml_trains_and_logs_source_shares(tiny_model_dir, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_ft.cli import console_main, main

    write_chat_file(tmp_path / "a.jsonl", 20)
    pd.DataFrame({"messages": [chat_record(i)["messages"] for i in range(100, 110)]}).to_parquet(tmp_path / "b.parquet")
    config = tmp_path / "stream.yaml"
    config.write_text(f"""
data:
  streaming: true
  shuffle_buffer: 16
  train_path: null
  val_path: null
  sources:
    - path: {tmp_path / 'a.jsonl'}
      weight: 3
    - path: {tmp_path / 'b.parquet'}
      weight: 1
      name: pq
""")
    base = ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(config),
            "--model.model_name", tiny_model_dir, "--trainer.precision", "32-true", "--progress_bar.refresh_rate", "0",
            "--trainer.default_root_dir", str(tmp_path / "runs")]
    capsys.readouterr()
    assert console_main(base) == 1  # the quickstart sets max_epochs only
    assert "data.streaming: true needs trainer.max_steps" in capsys.readouterr().err
    assert console_main([*base, "--trainer.max_steps", "3"]) == 1  # the quickstart validates at half epochs
    assert "needs trainer.val_check_interval as a number of batches" in capsys.readouterr().err
    cli = main([*base, "--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "2"])
    assert cli.trainer.global_step == 3
    events = EventAccumulator(cli.trainer.log_dir)
    events.Reload()
    assert {"train/source_share/a", "train/source_share/pq"} <= set(events.Tags()["scalars"])
