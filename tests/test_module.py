"""FineTuneModule on a tiny in-process Llama: steps, optimizer groups, checkpoints and HF export."""

from __future__ import annotations

from unittest import mock

import pytest
import pytorch_lightning as pl
import torch
from helpers import write_chat_file
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import LlamaMLP

from lightning_ft import ChatDataModule, FineTuneModule, FullFineTune, LoRA


def fit(module, tmp_path, steps=3, **trainer_kwargs):
    data = ChatDataModule(
        write_chat_file(tmp_path / "train.jsonl", 16), val_path=write_chat_file(tmp_path / "val.jsonl", 4, 100),
        tokenizer=module.hparams.model_name, batch_size=4,
    )
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, **trainer_kwargs,
    )
    trainer.fit(module, data)
    return trainer, data


def logits(model, tokens=torch.tensor([[1, 5, 9, 30, 200, 2]])):
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_lora_trains_only_adapter_and_loss_drops(tiny_model_dir, tmp_path):
    module = FineTuneModule(tiny_model_dir, adapter=LoRA(r=4, alpha=8, dropout=0.0), learning_rate=5e-3)
    module.configure_model()
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    data = ChatDataModule(write_chat_file(tmp_path / "t.jsonl", 8), tokenizer=tiny_model_dir, batch_size=8)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))

    def mean_loss():
        with torch.no_grad():
            loss_sum, count, _ = module._loss_sum(batch)
        return (loss_sum / count).item()

    first = mean_loss()
    fit(module, tmp_path, steps=15, enable_checkpointing=False)
    module.eval()
    assert mean_loss() < first


def test_loss_is_token_mean_over_trained_positions_only(tiny_model_dir):
    module = FineTuneModule(tiny_model_dir)
    module.configure_model()
    ids = torch.tensor([[1, 10, 11, 12, 13, 2]])
    labels = torch.tensor([[-100, -100, -100, 12, 13, 2]])
    loss_sum, count, _ = module._loss_sum({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    reference = module.model(input_ids=ids, labels=labels).loss
    assert count.item() == 3
    assert torch.allclose(loss_sum / count, reference, atol=1e-6)


def test_weight_decay_skips_norms_and_biases(tiny_model_dir, tmp_path):
    module = FineTuneModule(tiny_model_dir, adapter=FullFineTune(), weight_decay=0.1)
    module.configure_model()
    module.trainer = pl.Trainer(max_steps=10, logger=False)
    optimizer = module.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in module.named_parameters()}
    decayed = {names[id(p)] for p in optimizer.param_groups[0]["params"]}
    plain = {names[id(p)] for p in optimizer.param_groups[1]["params"]}
    assert optimizer.param_groups[0]["weight_decay"] == 0.1 and optimizer.param_groups[1]["weight_decay"] == 0.0
    assert any("q_proj" in n for n in decayed) and not any("norm" in n for n in decayed)
    assert any("norm" in n for n in plain)


def test_method_default_learning_rates_and_destructive_warning(tiny_model_dir):
    assert FineTuneModule(tiny_model_dir).learning_rate == 2e-4
    assert FineTuneModule(tiny_model_dir, adapter=FullFineTune()).learning_rate == 1e-5
    with pytest.warns(UserWarning, match="high for full fine-tuning .*catastrophic forgetting"):
        FineTuneModule(tiny_model_dir, adapter=FullFineTune(), learning_rate=1e-3)
    with pytest.warns(UserWarning, match="high for lora fine-tuning"):
        FineTuneModule(tiny_model_dir, learning_rate=5e-3)


def test_invalid_settings_are_reported_together(tiny_model_dir):
    with pytest.raises(ValueError, match=r"learning_rate=-1 must be > 0; weight_decay=-0.1 must be >= 0; "
                                         r"warmup_ratio=1.5 must be in \[0, 1\); gradient_checkpointing=2.0 "
                                         r"must be true, false, 'auto' or a fraction of layers in \[0, 1\]"):
        FineTuneModule(tiny_model_dir, learning_rate=-1, weight_decay=-0.1, warmup_ratio=1.5, gradient_checkpointing=2.0)
    with pytest.raises(ValueError, match=r"gradient_checkpointing=fast must be true, false, 'auto'"):
        FineTuneModule(tiny_model_dir, gradient_checkpointing="fast")
    with pytest.raises(ValueError, match=r"Invalid LoRA settings: r=0 must be >= 1; dropout=1.0 must be in \[0, 1\)"):
        LoRA(r=0, dropout=1.0)


def test_target_modules_that_match_nothing_name_the_alternatives(tiny_model_dir):
    module = FineTuneModule(tiny_model_dir, adapter=LoRA(target_modules=["qkv"]))
    with pytest.raises(ValueError, match=r"match no module of LlamaForCausalLM. Linear layers it has: .*q_proj"):
        module.configure_model()


def test_lora_checkpoint_holds_only_adapter_and_restores(tiny_model_dir, tmp_path):
    module = FineTuneModule(tiny_model_dir, adapter=LoRA(r=4), learning_rate=5e-3)
    trainer, data = fit(module, tmp_path, steps=4)
    ckpt = tmp_path / "manual.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert state["state_dict"] and all("lora_" in k for k in state["state_dict"])
    assert "optimizer_states" in state and state["lightning_ft"]["model"] == tiny_model_dir

    restored = FineTuneModule(tiny_model_dir, adapter=LoRA(r=4), learning_rate=5e-3)
    trainer2 = pl.Trainer(max_steps=4, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer2.validate(restored, data, ckpt_path=ckpt, verbose=False)
    assert torch.equal(logits(restored.model), logits(module.model))
    assert restored.seen_tokens == module.seen_tokens and module.seen_tokens["trained_tokens"] > 0

    other = FineTuneModule(tiny_model_dir, adapter=LoRA(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="Checkpoint does not match this module's adapter"):
        pl.Trainer(logger=False, enable_progress_bar=False).validate(other, data, ckpt_path=ckpt, verbose=False)


def test_lora_export_reloads_with_peft_to_identical_logits(tiny_model_dir, tmp_path):
    module = FineTuneModule(tiny_model_dir, adapter=LoRA(r=4), learning_rate=5e-3)
    fit(module, tmp_path, steps=3, enable_checkpointing=False)
    out = module.save_pretrained(tmp_path / "hf")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert AutoTokenizer.from_pretrained(out).chat_template == module.tokenizer.chat_template
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert torch.equal(logits(reloaded), logits(module.model))


def test_full_export_is_plain_safetensors_model(tiny_model_dir, tmp_path):
    module = FineTuneModule(tiny_model_dir, adapter=FullFineTune(freeze=["embed_tokens"]), learning_rate=1e-4)
    fit(module, tmp_path, steps=2, enable_checkpointing=False)
    assert not module.model.model.embed_tokens.weight.requires_grad
    out = module.save_pretrained(tmp_path / "hf_full")
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(reloaded), logits(module.model))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(logits(base), logits(module.model))  # training changed the weights


def test_save_pretrained_replaces_existing_directory_atomically(tiny_model_dir, tmp_path):
    module = FineTuneModule(tiny_model_dir, adapter=LoRA(r=4))
    module.configure_model()
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    module.save_pretrained(target)
    assert not (target / "stale.txt").exists() and (target / "adapter_config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or backup left behind


@pytest.mark.parametrize("adapter", [lambda: LoRA(r=4, dropout=0.0), lambda: FullFineTune()], ids=["lora", "full"])
def test_trained_positions_only_loss_equals_full_logits_loss_and_gradients(tiny_model_dir, adapter):
    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (3, 17))
    labels = ids.clone()
    labels[:, :9] = -100
    labels[1, 12:] = -100
    mask = torch.ones_like(ids)
    mask[2, 14:] = 0
    labels[2, 14:] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    results = []
    for trained_only, chunk in ((False, 1024), (True, 1024), (True, 5)):
        torch.manual_seed(1)
        module = FineTuneModule(tiny_model_dir, adapter=adapter(), trained_logits_only=trained_only,
                                logits_chunk_size=chunk)
        module.configure_model()
        if module.adapter.method == "lora":  # non-zero B so adapter gradients are informative
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(param, std=0.02)
        loss_sum, count, _ = module._loss_sum(batch)
        loss_sum.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        results.append((loss_sum.detach(), count, grads))
    reference = results[0]
    for loss_sum, count, grads in results[1:]:
        assert count == reference[1] == 8 + 3 + 5
        torch.testing.assert_close(loss_sum, reference[0], rtol=1e-5, atol=1e-5)
        assert grads.keys() == reference[2].keys() and grads
        for name in grads:
            torch.testing.assert_close(grads[name], reference[2][name], rtol=1e-4, atol=5e-6)


@pytest.mark.slow  # torch.compile
def test_compiled_layers_give_the_same_loss_and_state_dict_keys(tiny_model_dir, tmp_path):
    data = ChatDataModule(write_chat_file(tmp_path / "c.jsonl", 4), tokenizer=tiny_model_dir, batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    losses, keys = [], []
    for compile in (False, True):
        module = FineTuneModule(tiny_model_dir, adapter=LoRA(r=4, dropout=0.0), compile=compile)
        module.configure_model()
        with torch.no_grad():
            loss_sum, count, _ = module._loss_sum(batch)
        losses.append((loss_sum / count).item())
        keys.append(sorted(module.state_dict()))
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert keys[0] == keys[1]


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_checkpointing_a_fraction_of_layers_recomputes_only_those_with_equal_gradients(tiny_model_dir, tmp_path, fraction):
    data = ChatDataModule(write_chat_file(tmp_path / "c.jsonl", 4), tokenizer=tiny_model_dir, batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    results = []
    for checkpointing in (False, fraction):
        torch.manual_seed(0)  # the same LoRA initialisation both times
        module = FineTuneModule(tiny_model_dir, adapter=LoRA(r=4, dropout=0.0), gradient_checkpointing=checkpointing)
        module.configure_model()
        for name, param in module.named_parameters():
            if "lora_B" in name:  # non-zero B so every adapter gets a gradient
                torch.nn.init.normal_(param, std=0.02)
        calls = []
        index_of = {id(layer.mlp): i for i, layer in enumerate(module.model.get_base_model().model.layers)}
        mlp_forward = LlamaMLP.forward

        def counting_forward(mlp, x):  # module hooks do not run in the recompute, so count the forward itself
            calls.append(index_of[id(mlp)])
            return mlp_forward(mlp, x)

        with mock.patch.object(LlamaMLP, "forward", counting_forward):
            loss_sum, count, _ = module._loss_sum(batch)
            (loss_sum / count).backward()
        grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        results.append((loss_sum.detach(), grads, sorted(calls)))
    (plain_loss, plain_grads, plain_calls), (loss, grads, calls) = results
    assert plain_calls == [0, 1]
    assert calls == ([0, 0, 1, 1] if fraction == 1 else [0, 0, 1])  # a checkpointed layer runs again in backward
    torch.testing.assert_close(loss, plain_loss)
    assert grads.keys() == plain_grads.keys() and len(grads) == 2 * 7 * 2  # A and B of 7 linears in 2 layers
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-7)


def test_checkpointed_layers_spread_evenly():
    from lightning_ft.models import checkpointed_layers

    assert checkpointed_layers(30, 0.5) == list(range(0, 30, 2))
    assert checkpointed_layers(30, 1 / 3) == list(range(0, 30, 3))
    assert len(checkpointed_layers(30, 0.8)) == 24 and checkpointed_layers(4, 1.0) == [0, 1, 2, 3]
    assert checkpointed_layers(2, 0.01) == [0]
    with pytest.raises(ValueError, match="fraction of layers in \\(0, 1\\], got 1.5"):
        checkpointed_layers(2, 1.5)


def test_auto_checkpointing_follows_the_trainer_precision(tiny_model_dir):
    from types import SimpleNamespace

    module = FineTuneModule(tiny_model_dir, adapter=LoRA(r=4), gradient_checkpointing="auto")
    assert module._checkpointed_fraction() == 0.6  # no Trainer: full precision
    for precision, fraction in (("bf16-mixed", 0.9), ("16-mixed", 0.9), ("32-true", 0.6)):
        module._trainer = SimpleNamespace(precision=precision)
        assert module._checkpointed_fraction() == fraction
    assert FineTuneModule(tiny_model_dir, gradient_checkpointing=0.5)._checkpointed_fraction() == 0.5
