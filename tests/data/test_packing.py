"""Packed batches (several conversations per row) train exactly like padded ones; length-grouped sampling."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import pytorch_lightning as pl
import torch
from helpers import write_chat_file, write_varied_chat_file

from lightning_ft import ChatDataModule, FineTuneModule, LoRA
from lightning_ft.attention import PER_SEQUENCE_SDPA
from lightning_ft.data import encode as encode_module
from lightning_ft.data.collate import IGNORE_INDEX, collate, collate_packed, pack_rows
from lightning_ft.data.sampling import ResumableSampler
from lightning_ft.losses import packing_is_exact


def test_pack_rows_fills_rows_longest_first():
    assert pack_rows([5, 3, 2, 4], 8) == [[0, 1], [2, 3]]
    assert pack_rows([8, 8], 8) == [[0], [1]]  # exact fits
    assert pack_rows([1, 1, 1], 3) == [[0, 1, 2]]
    with pytest.raises(ValueError, match=r"examples \[1\] are longer than max_length=4"):
        pack_rows([2, 5], 4)


def test_collate_packed_restarts_positions_and_ignores_each_first_label():
    examples = [{"input_ids": [11, 12, 13], "labels": [-100, 12, 13]},
                {"input_ids": [21, 22], "labels": [21, 22]},
                {"input_ids": [31, 32, 33, 34], "labels": [-100, -100, 33, 34]}]
    batch = collate_packed(examples, pad_token_id=0, max_length=6)
    assert batch["input_ids"].tolist() == [[21, 22, 31, 32, 33, 34], [11, 12, 13, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 22, -100, -100, 33, 34], [-100, 12, 13, -100, -100, -100]]
    assert batch["token_mask"].sum().item() == 9 and "attention_mask" not in batch
    assert batch["token_mask"].tolist() == [[True] * 6, [True] * 3 + [False] * 3]
    assert collate_packed(examples, 0, 6, pad_to_multiple_of=4)["input_ids"].shape == (2, 8)


def _per_token_losses(model, batch, spans):
    """Per-token cross-entropy of each conversation, from ``spans``: (row, start, length) per conversation."""
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
    logits = model(**inputs).logits
    out = []
    for row, start, length in spans:
        targets = batch["labels"][row, start + 1:start + length]
        losses = torch.nn.functional.cross_entropy(logits[row, start:start + length - 1], targets,
                                                   ignore_index=IGNORE_INDEX, reduction="none")
        out.append(losses[targets != IGNORE_INDEX])
    return out


@pytest.mark.parametrize("per_sequence", [False, True], ids=["dense-mask", "per-sequence-sdpa"])
def test_packed_per_token_loss_equals_unpacked(tiny_model_dir, tmp_path, per_sequence):
    module = FineTuneModule(tiny_model_dir, adapter=LoRA(r=4, dropout=0.0))
    module.configure_model()
    assert module.packs_natively()
    data = ChatDataModule(write_chat_file(tmp_path / "t.jsonl", 6), tokenizer=tiny_model_dir, batch_size=6,
                          system_prompt="Be brief.")
    data.setup("fit")
    examples = data.train_examples[:6]
    examples[1] = {key: values[:-3] for key, values in examples[1].items()}  # varied lengths
    padded = collate(examples, pad_token_id=0)
    longest = max(len(e["input_ids"]) for e in examples)
    # per-sequence attention packs the whole batch into one row; the dense mask rows of twice the longest
    packed = collate_packed(examples, pad_token_id=0, max_length=6 * longest if per_sequence else 2 * longest)
    assert packed["input_ids"].shape[0] < len(examples)
    if per_sequence:  # else plain SDPA: a dense block-diagonal mask built from the position ids
        module.on_train_batch_start(packed, 0)
    assert module.model.get_base_model().config._attn_implementation == (PER_SEQUENCE_SDPA if per_sequence else "sdpa")
    module.model.eval()
    rows = pack_rows([len(e["input_ids"]) for e in examples], packed["input_ids"].shape[1])
    packed_spans = {}
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            packed_spans[i] = (r, offset, len(examples[i]["input_ids"]))
            offset += len(examples[i]["input_ids"])
    with torch.no_grad():
        unpacked_losses = _per_token_losses(module.model, padded, [(i, 0, len(e["input_ids"])) for i, e in enumerate(examples)])
        packed_losses = _per_token_losses(module.model, packed, [packed_spans[i] for i in range(len(examples))])
    for before, after in zip(unpacked_losses, packed_losses):
        assert before.numel() > 0 and torch.allclose(before, after, atol=1e-5, rtol=1e-5)
    # The module's loss and its gradients agree too (trained positions only, chunked head).
    module.model.train()
    grads = []
    for batch in (padded, packed):
        module.zero_grad()
        loss_sum, count, _ = module._loss_sum(batch)
        loss_sum.backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in module.named_parameters() if p.requires_grad]))
        grads[-1] = (loss_sum.item(), count.item(), grads[-1])
    assert grads[0][1] == grads[1][1]
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    assert torch.allclose(grads[0][2], grads[1][2], atol=1e-6, rtol=1e-4)


class _LeakyLM(torch.nn.Module):
    """Every position sees the running mean of all earlier tokens, whatever the position ids say."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(8, 50)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, position_ids=None, attention_mask=None):
        hidden = self.embed(input_ids).cumsum(1) / torch.arange(1, input_ids.shape[1] + 1)[None, :, None]
        return type("Out", (), {"logits": self.head(hidden)})()


def test_packing_probe_accepts_llama_and_refuses_a_model_that_mixes_rows(tiny_model_dir):
    module = FineTuneModule(tiny_model_dir)
    module.configure_model()
    assert packing_is_exact(module.model) and module.packing_is_exact()
    assert module.model.training  # the probe restores train mode
    assert not packing_is_exact(_LeakyLM())


def test_packs_natively_is_known_before_loading_and_packed_batches_get_that_attention(tiny_model_dir):
    padded = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4)}
    packed = {"input_ids": torch.ones(1, 5, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 0, 1]])}
    module = FineTuneModule(tiny_model_dir)
    assert module.packs_natively() and module.model is None  # from config.json alone, no weights
    module.configure_model()
    config = module.model.get_base_model().config
    module.on_train_batch_start(padded, 0)
    assert config._attn_implementation == "sdpa"  # padded batches keep transformers' SDPA
    module.on_train_batch_start(packed, 0)
    assert config._attn_implementation == PER_SEQUENCE_SDPA and module._packing_exact is True
    for settings, attention in (({"attn_implementation": "eager"}, "eager"), ({"compile": True}, "sdpa")):
        other = FineTuneModule(tiny_model_dir, **settings)
        assert not other.packs_natively()
        other.configure_model()
        other.on_train_batch_start(packed, 0)  # packing: true on a dense mask: measured, left on its attention
        assert other.model.get_base_model().config._attn_implementation == attention and other._packing_exact


def test_sliding_window_models_do_not_pack_natively(tmp_path):
    from transformers import MistralConfig

    MistralConfig(sliding_window=64, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    assert not FineTuneModule(str(tmp_path)).packs_natively()
    assert FineTuneModule(str(tmp_path), attn_implementation="flash_attention_2").packs_natively()


def test_packed_batches_on_a_model_that_mixes_them_stop_the_run(tiny_model_dir):
    module = FineTuneModule(tiny_model_dir)
    module.configure_model()
    padded = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4)}
    packed = {"input_ids": torch.ones(1, 5, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 0, 1]])}
    with mock.patch("lightning_ft.module.packing_is_exact", return_value=False) as probe:
        module.on_train_batch_start(padded, 0)
        assert not probe.called  # padded batches are not measured
        with pytest.raises(ValueError, match=r"^The batches are packed, but LlamaForCausalLM lets packed "
                                             r"conversations attend to each other: set data.packing=false.$"):
            module.on_validation_batch_start(packed, 0)


def test_fit_chooses_batching_from_the_data(tiny_model_dir, tmp_path):
    seen = {}

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault(name, []).append(batch)

    varied = write_varied_chat_file(tmp_path / "v.jsonl", 16)
    uniform = write_chat_file(tmp_path / "u.jsonl", 16)
    cases = {"varied": (varied, {}), "uniform": (uniform, {}), "eager": (varied, {}),
             "off": (varied, {"packing": False, "group_by_length": False}), "told": (uniform, {"packing": True})}
    for name, (path, settings) in cases.items():
        module = FineTuneModule(tiny_model_dir, adapter=LoRA(r=4), attn_implementation="eager" if name == "eager" else None)
        data = ChatDataModule(path, tokenizer=tiny_model_dir, batch_size=4, packs_natively=module.packs_natively(),
                              **settings)
        pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=[Spy()]).fit(module, data)
        seen[name + "_mode"] = data.batching().mode
        seen[name + "_attention"] = module.model.get_base_model().config._attn_implementation
    assert seen["varied_mode"] == seen["told_mode"] == "packed"
    assert (seen["uniform_mode"], seen["eager_mode"], seen["off_mode"]) == ("padded", "grouped", "padded")
    assert seen["varied_attention"] == seen["told_attention"] == PER_SEQUENCE_SDPA
    assert (seen["uniform_attention"], seen["eager_attention"]) == ("sdpa", "eager")
    for name in ("varied", "told"):  # per-sequence attention: the whole batch in one row, no padding at all
        assert all("attention_mask" not in b and b["input_ids"].shape[0] == 1 and b["token_mask"].all()
                   for b in seen[name])
    assert all("attention_mask" in b and b["input_ids"].shape[0] == 4 for b in seen["uniform"] + seen["eager"])


def test_the_data_module_decides_packing_without_asking_the_lightning_module(tiny_model_dir, tmp_path):
    trainer = mock.MagicMock(current_epoch=0, global_rank=0, world_size=1)
    trainer.fit_loop.epoch_loop.batch_progress.current.processed = 0
    type(trainer).lightning_module = mock.PropertyMock(side_effect=AssertionError("asked the LightningModule"))
    path = write_varied_chat_file(tmp_path / "v.jsonl", 16)
    for told, mode in ((True, "packed"), (None, "grouped")):
        data = ChatDataModule(path, tokenizer=tiny_model_dir, batch_size=4, packs_natively=told)
        data.trainer = trainer
        data.setup("fit")
        assert data.batching().mode == mode
        batch = next(iter(data.train_dataloader()))
        assert batch["input_ids"].shape[0] == (1 if told else 4)  # told: the whole batch in one row
    assert "not packed: packs_natively is not set" in data.batching().reason


def test_grouped_epoch_has_the_same_token_loss_as_a_padded_one(tiny_model_dir, tmp_path):
    module = FineTuneModule(tiny_model_dir, adapter=LoRA(r=4, dropout=0.0))
    module.configure_model()
    module.model.eval()
    path = write_varied_chat_file(tmp_path / "g.jsonl", 12)
    totals = []
    for group in (False, True):
        data = ChatDataModule(path, tokenizer=tiny_model_dir, batch_size=4, packing=False, group_by_length=group)
        data.setup("fit")
        batches = list(data.train_dataloader())
        with torch.no_grad():
            sums = [module._loss_sum(batch)[:2] for batch in batches]
        totals.append((sum(float(s) for s, _ in sums), sum(int(n) for _, n in sums),
                       sum(b["input_ids"].numel() for b in batches)))
    assert totals[0][1] == totals[1][1] and totals[0][0] == pytest.approx(totals[1][0], rel=1e-5)
    assert totals[1][2] < totals[0][2]  # grouped batches carry less padding


def test_length_grouped_batches_hold_similar_lengths():
    lengths = [((i * 37) % 100) + 1 for i in range(64)]
    sampler = ResumableSampler(64, seed=0, lengths=lengths, batch_size=8)
    order = sampler.order(0)
    assert sorted(order) == list(range(64))
    batches = [order[i:i + 8] for i in range(0, 64, 8)]
    padded = sum(8 * max(lengths[i] for i in b) for b in batches)
    shuffled = ResumableSampler(64, seed=0).order(0)
    padded_shuffled = sum(8 * max(lengths[i] for i in shuffled[j:j + 8]) for j in range(0, 64, 8))
    assert padded < 0.75 * padded_shuffled
    assert sampler.order(1) != order and sampler.order(1) == ResumableSampler(64, 0, lengths=lengths, batch_size=8).order(1)


def _tamper(entry, change):
    """Rewrite the cached Arrow shard of ``entry`` with ``change`` applied to every row (keeping entry.json)."""
    import datasets

    [shard] = list(entry.glob("*.arrow"))
    tampered = datasets.Dataset.from_file(str(shard)).map(change, cache_file_name=str(entry / "tampered.arrow"))
    del tampered
    os.replace(entry / "tampered.arrow", shard)


def test_encoded_data_is_cached_and_checked_before_use(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_FT_CACHE", str(tmp_path / "cache"))
    path = write_chat_file(tmp_path / "e.jsonl", 6)
    calls = []
    real = encode_module.encode_batch
    monkeypatch.setattr(encode_module, "encode_batch", lambda *a, **k: calls.append(1) or real(*a, **k))

    def encode(**kwargs):
        calls.clear()
        data = ChatDataModule(path, tokenizer=tiny_model_dir, batch_size=2, **kwargs)
        data.setup("fit")
        return data

    first = encode()
    entries = [p.parent for p in (tmp_path / "cache" / "encoded").glob("*/entry.json")]
    assert len(entries) == 1 and calls
    second = encode()
    assert not calls  # served from the cache, identical
    assert second.train_examples == first.train_examples and second.stats == first.stats
    encode(max_length=500)
    assert calls  # a different max_length is a different key
    # Issue 13.8: an entry whose token ids or lengths differ from what it recorded is rebuilt, not trusted.
    for change in (lambda row: {"input_ids": [t + 1 for t in row["input_ids"]]},
                   lambda row: {"input_ids": row["input_ids"][:3], "labels": row["labels"][:3], "length": 3}):
        _tamper(entries[0], change)
        with pytest.warns(UserWarning, match=r"does not match what it recorded .* re-encoding"):
            again = encode()
        assert calls and again.train_examples == first.train_examples
    next(entries[0].glob("*.arrow")).write_bytes(b"corrupt")
    with pytest.warns(UserWarning, match=r"is unreadable .* re-encoding"):
        assert encode().train_examples == first.train_examples  # a corrupt entry is rebuilt
