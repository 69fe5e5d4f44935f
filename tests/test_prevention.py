"""Preventing forgetting: replay of general conversations and the KL(base || current) penalty."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import pytorch_lightning as pl
import torch
from helpers import write_chat_file
from transformers import AutoModelForCausalLM

from lightning_ft import ChatDataModule, FineTuneModule, FullFineTune, LoRA
from lightning_ft.data.datamodule import DEFAULT_REPLAY
from lightning_ft.data.formats import DataError
from lightning_ft.data.sampling import ResumableSampler
from lightning_ft.losses import kl_sum


def test_sampler_without_replay_keeps_its_order():
    sampler = ResumableSampler(10, seed=3)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(3 + 2)).tolist()
    assert sampler.order(2) == expected and len(sampler) == 10


def test_sampler_replay_draws_the_whole_pool_before_repeating():
    sampler = ResumableSampler(6, seed=1, replay_size=5, replay_per_epoch=2)
    assert len(sampler) == 8
    epochs = [sampler.order(epoch) for epoch in range(5)]
    for order in epochs:
        assert sorted(i for i in order if i < 6) == list(range(6))  # every task example, every epoch
        assert len([i for i in order if i >= 6]) == 2
    drawn = [i for epoch in range(5) for i in sampler.replay_indices(epoch)]
    assert sorted(drawn[:5]) == list(range(6, 11))  # the first pass covers the pool exactly once
    assert sorted(drawn[5:10]) == list(range(6, 11))
    assert sampler.order(3) == ResumableSampler(6, seed=1, replay_size=5, replay_per_epoch=2).order(3)
    assert drawn[:5] != drawn[5:10]  # reshuffled on the second pass


def _replay_data(tmp_path, tokenizer_dir, **kwargs):
    return ChatDataModule(write_chat_file(tmp_path / "train.jsonl", 12), tokenizer=tokenizer_dir, batch_size=4,
                          **kwargs)


def test_datamodule_mixes_replay_into_training_only(tmp_path, tiny_model_dir):
    data = _replay_data(tmp_path, tiny_model_dir, val_fraction=0.25, replay_ratio=0.25)
    data.setup("fit")
    assert data.stats["replay_conversations"] == 200  # the shipped default pool
    assert data.stats["replay_per_epoch"] == 3  # 9 task conversations : 3 replay = 25% replay
    batches = list(data.train_dataloader())
    flags = torch.cat([batch["replay_tokens"][:, 0] for batch in batches])
    assert Counter(flags.tolist()) == {False: 9, True: 3}
    assert all("replay_tokens" not in batch for batch in data.val_dataloader())


def test_replay_file_and_ratio_are_checked(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match=r"replay_ratio=0 would mix none of it in"):
        _replay_data(tmp_path, tiny_model_dir, replay_path=DEFAULT_REPLAY)
    with pytest.raises(ValueError, match=r"replay_ratio=1\.0: must be a number in \[0, 1\)"):
        _replay_data(tmp_path, tiny_model_dir, replay_ratio=1.0)
    bad = tmp_path / "replay.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n{not json\n")
    data = _replay_data(tmp_path, tiny_model_dir, replay_path=str(bad), replay_ratio=0.2)
    with pytest.raises(DataError, match=r"replay\.jsonl:2"):
        data.setup("fit")


def _batch(tiny_model_dir, tmp_path):
    data = ChatDataModule(write_chat_file(tmp_path / "kl.jsonl", 4), tokenizer=tiny_model_dir, batch_size=4)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def _perturb_adapter(module):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)


@pytest.mark.parametrize("trained_logits_only", [True, False])
def test_kl_penalty_is_zero_for_the_base_and_equals_a_naive_mean_over_real_positions(tiny_model_dir, tmp_path, trained_logits_only):
    module = FineTuneModule(tiny_model_dir, adapter=LoRA(r=4, dropout=0.0), kl_beta=0.5,
                            trained_logits_only=trained_logits_only, logits_chunk_size=7)
    module.configure_model()
    batch = _batch(tiny_model_dir, tmp_path)
    _, _, kl = module._loss_sum(batch, with_kl=True)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)  # a fresh LoRA (B = 0) is the base model
    _perturb_adapter(module)
    loss_sum, count, kl = module._loss_sum(batch, with_kl=True)
    real = batch["attention_mask"][:, :-1].bool()  # every real position, prompts included
    current = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][real]
    with module.model.disable_adapter():
        base = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][real]
    reference = sum((base[i].softmax(-1) * (base[i].log_softmax(-1) - current[i].log_softmax(-1))).sum()
                    for i in range(len(base))) / len(base)
    assert kl.item() > 1e-3
    assert kl.item() == pytest.approx(reference.item(), rel=1e-4)
    (loss_sum + kl).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in module.named_parameters() if "lora_" in n)


def test_full_fine_tuning_keeps_a_frozen_base_outside_the_state_dict(tiny_model_dir, tmp_path):
    module = FineTuneModule(tiny_model_dir, adapter=FullFineTune(), kl_beta=1.0)
    module.configure_model()
    n_params = sum(p.numel() for p in module.parameters())
    assert n_params == sum(p.numel() for p in module.model.parameters())  # the copy is not a submodule
    assert not any(key.startswith("_reference") for key in module.state_dict())
    batch = _batch(tiny_model_dir, tmp_path)
    assert module._loss_sum(batch, with_kl=True)[2].item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        module.model.get_output_embeddings().weight.mul_(1.5)
    assert module._loss_sum(batch, with_kl=True)[2].item() > 1e-3


def test_kl_beta_is_validated(tiny_model_dir):
    with pytest.raises(ValueError, match=r"kl_beta=-1\.0 must be >= 0"):
        FineTuneModule(tiny_model_dir, kl_beta=-1.0)


def _drift_after_training(tiny_model_dir, tmp_path, kl_beta):
    pl.seed_everything(0)
    module = FineTuneModule(tiny_model_dir, adapter=FullFineTune(), learning_rate=3e-3, kl_beta=kl_beta,
                            warmup_steps=0, decay="constant")
    data = ChatDataModule(write_chat_file(tmp_path / "train.jsonl", 16), tokenizer=tiny_model_dir, batch_size=4)
    trainer = pl.Trainer(max_steps=12, accelerator="cpu", devices=1, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         logger=pl.loggers.CSVLogger(tmp_path, name=f"kl{kl_beta}"),
                         log_every_n_steps=1)
    trainer.fit(module, data)
    batch = _batch(tiny_model_dir, tmp_path)
    trained = batch["labels"][:, 1:] != -100
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        current = module.model.eval()(**inputs).logits[:, :-1][trained]
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(**inputs).logits[:, :-1][trained]
    return (kl_sum(base, current) / trained.sum()).item(), trainer.callback_metrics


def test_the_kl_penalty_holds_the_model_nearer_the_base(tiny_model_dir, tmp_path):
    free, _ = _drift_after_training(tiny_model_dir, tmp_path, kl_beta=0.0)
    held, metrics = _drift_after_training(tiny_model_dir, tmp_path, kl_beta=10.0)
    assert "train/kl" in metrics
    assert held < 0.5 * free


def test_replay_share_is_the_ratio_of_conversations_and_logged_per_trained_token(tiny_model_dir, tmp_path):
    data = ChatDataModule(write_chat_file(tmp_path / "train.jsonl", 16), tokenizer=tiny_model_dir, batch_size=4,
                          replay_ratio=0.5, packing=False, group_by_length=False)
    data.setup("fit")
    batches = list(data.train_dataloader())
    replayed = [bool(row.any()) for batch in batches for row in batch["replay_tokens"]]
    assert len(replayed) == 32 and sum(replayed) == data.replay_per_epoch() == 16  # ratio 0.5: one per task one
    module = FineTuneModule(tiny_model_dir, adapter=LoRA(r=4))
    module.configure_model()
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    batch = next(b for b in batches if 0 < int(b["replay_tokens"].any(dim=1).sum()) < len(b["input_ids"]))
    trained = batch["labels"][:, 1:] != -100
    expected = (trained & batch["replay_tokens"][:, 1:]).sum().item() / trained.sum().item()
    module.training_step(batch, 0)
    assert 0.0 < expected < 1.0 and logged["train/replay_share"] == pytest.approx(expected)


def test_kl_sum_matches_kl_div_definition():
    base, current = torch.randn(3, 11), torch.randn(3, 11)
    expected = (base.softmax(-1) * (base.log_softmax(-1) - current.log_softmax(-1))).sum()
    assert kl_sum(base, current).item() == pytest.approx(expected.item(), rel=1e-5)
