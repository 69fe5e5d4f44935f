"""Packed batches (several conversations per row) train exactly like padded ones; length-grouped sampling."""

from __future__ import annotations

from unittest import mock

import pytest
import pytorch_lightning as pl
import torch
from helpers import write_chat_file, write_varied_chat_file

from lightning_ft import ChatDataModule, FineTuneModule, LoRA
from lightning_ft.attention import PER_SEQUENCE_SDPA
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
    assert module.supports_packing() if per_sequence else not module.packs_natively()
    module.model.eval()
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


def test_sdpa_switches_to_per_sequence_attention_to_pack(tiny_model_dir):
    module = FineTuneModule(tiny_model_dir)
    module.configure_model()
    config = module.model.get_base_model().config
    assert config._attn_implementation == "sdpa" and not module.packs_natively()
    assert module.supports_packing() and config._attn_implementation == PER_SEQUENCE_SDPA and module.packs_natively()
    for implementation, native in (("flash_attention_2", True), ("kernels-community/flash-attn3", True),
                                   ("flex_attention", True), ("eager", False)):
        with mock.patch.object(type(config), "_attn_implementation", new_callable=mock.PropertyMock,
                               return_value=implementation):
            assert module.packs_natively() == module.supports_packing() == native
    eager = FineTuneModule(tiny_model_dir, attn_implementation="eager")
    eager.configure_model()
    assert not eager.supports_packing() and eager.model.get_base_model().config._attn_implementation == "eager"
    compiled = FineTuneModule(tiny_model_dir, compile=True)
    compiled.configure_model()
    assert not compiled.supports_packing()  # a compiled layer would break its graph on the per-sequence loop


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
        data = ChatDataModule(path, tokenizer=tiny_model_dir, batch_size=4, **settings)
        pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=[Spy()]).fit(module, data)
        seen[name + "_mode"] = data.batching().mode
    assert seen["varied_mode"] == seen["told_mode"] == "packed"
    assert (seen["uniform_mode"], seen["eager_mode"], seen["off_mode"]) == ("padded", "grouped", "padded")
    for name in ("varied", "told"):  # per-sequence attention: the whole batch in one row, no padding at all
        assert all("attention_mask" not in b and b["input_ids"].shape[0] == 1 and b["token_mask"].all()
                   for b in seen[name])
    assert all("attention_mask" in b and b["input_ids"].shape[0] == 4 for b in seen["uniform"] + seen["eager"])


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


def test_encoded_data_is_cached_by_content_tokenizer_and_settings(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_FT_CACHE", str(tmp_path / "cache"))
    path = write_chat_file(tmp_path / "e.jsonl", 6)

    def encode(**kwargs):
        data = ChatDataModule(path, tokenizer=tiny_model_dir, batch_size=2, **kwargs)
        data.setup("fit")
        return data

    first = encode()
    entries = list((tmp_path / "cache" / "encoded").glob("*.pt"))
    assert len(entries) == 1
    calls = []
    monkeypatch.setattr(ChatDataModule, "_encode_uncached", lambda self, *a: calls.append(1) or [])
    second = encode()
    assert not calls  # served from the cache, identical
    assert second.train_examples == first.train_examples and second.stats == first.stats
    with pytest.raises(ValueError):  # a different max_length is a different key: it encodes (here: nothing)
        encode(max_length=20)
    assert calls
    entries[0].write_bytes(b"corrupt")
    monkeypatch.undo()
    monkeypatch.setenv("LIGHTNING_FT_CACHE", str(tmp_path / "cache"))
    assert encode().train_examples == first.train_examples  # a corrupt entry is a miss, then rewritten
