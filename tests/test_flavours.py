"""Fine-tuning flavours and their guarantees: accumulation, QLoRA, other peft methods, base mismatch."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from peft import IA3Config
from test_module import fit, logits

from lightning_ft import ChatDataModule, FineTuneModule, LoRA
from lightning_ft.adapters import QLoRA


class GradRecorder(FineTuneModule):
    """Keeps the gradients the optimizer is about to use (after token normalisation)."""

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        self.recorded = {n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}


def uneven_file(path) -> str:
    # Very different assistant lengths: a mean of per-micro-batch means would weigh tokens unequally.
    answers = ["Yes.", "It is a long answer " * 6, "No.", "Another fairly long answer with many words " * 3]
    path.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": a}]}) + "\n"
        for i, a in enumerate(answers)
    ))
    return str(path)


@pytest.mark.parametrize("micro_batch,accumulate", [(2, 2), (1, 4)])
def test_accumulated_gradients_equal_full_batch_gradients(tiny_model_dir, tmp_path, micro_batch, accumulate):
    train = uneven_file(tmp_path / "train.jsonl")
    grads = []
    for batch_size, accumulate_grad_batches in ((4, 1), (micro_batch, accumulate)):
        torch.manual_seed(0)
        module = GradRecorder(tiny_model_dir, adapter=LoRA(r=4, dropout=0.0))
        data = ChatDataModule(train, tokenizer=tiny_model_dir, batch_size=batch_size)
        pl.Trainer(max_steps=1, accumulate_grad_batches=accumulate_grad_batches, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=tmp_path).fit(module, data)
        grads.append(module.recorded)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-7)


def test_other_peft_methods_pass_through(tiny_model_dir, tmp_path):
    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    module = FineTuneModule(tiny_model_dir, adapter=config)
    fit(module, tmp_path, steps=2, enable_checkpointing=False)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("ia3_l" in n for n in trainable)
    out = module.save_pretrained(tmp_path / "ia3")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "IA3"


def test_dora_and_rslora_configs_reach_peft():
    config = LoRA(r=8, use_dora=True, use_rslora=True).to_peft_config()
    assert config.use_dora and config.use_rslora and config.r == 8


def test_qlora_trains_adapters_on_a_4bit_base(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    module = FineTuneModule(tiny_model_dir, adapter=QLoRA(r=4, compute_dtype="float32"), learning_rate=1e-3)
    fit(module, tmp_path, steps=2, enable_checkpointing=False)
    quantized = [m for m in module.model.modules() if type(m).__name__ == "Linear4bit"]
    assert quantized, "the base linear layers should be 4-bit"
    assert all("lora_" in n for n, p in module.named_parameters() if p.requires_grad)
    assert torch.isfinite(logits(module.model)).all()


def test_qlora_without_bitsandbytes_says_which_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("no bitsandbytes")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ImportError, match=r'pip install "lightning_ft\[qlora\]"'):
        QLoRA().load_kwargs()


def test_checkpoint_from_another_base_is_refused(tiny_model_dir, tmp_path):
    module = FineTuneModule(tiny_model_dir, adapter=LoRA(r=4))
    trainer, data = fit(module, tmp_path, steps=1)
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    # Same architecture, different weights: another seed.
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    other_dir = tmp_path / "other_base"
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig.from_pretrained(tiny_model_dir)).save_pretrained(other_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other_dir)
    other = FineTuneModule(str(other_dir), adapter=LoRA(r=4))
    with pytest.raises(ValueError, match=r"trained on base model .* differs from this module's base"):
        pl.Trainer(logger=False, enable_progress_bar=False).validate(other, data, ckpt_path=ckpt, verbose=False)
