"""One way to reach the base model: ``base_model_of`` switches adapters off, or hands over a frozen copy."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_ft.adapters import FullFineTune, LoRA, QLoRA, adapter_from_dict, base_model_of, has_adapters


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapters_are_off_inside_the_block_and_back_on_after(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 5, 9, 13]])
    expected = _logits(base, ids)
    model = LoRA(r=4, dropout=0.0).attach(base).eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)  # a trained adapter: the model now differs from its base
    trained = _logits(model, ids)
    assert has_adapters(model) and not torch.allclose(trained, expected)
    with base_model_of(model) as reached:
        assert reached is model
        torch.testing.assert_close(_logits(reached, ids), expected)
    torch.testing.assert_close(_logits(model, ids), trained)


def test_a_frozen_copy_is_handed_over_and_a_plain_model_is_refused(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    copy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not has_adapters(model)
    with base_model_of(model, frozen_copy=copy) as reached:
        assert reached is copy
    with pytest.raises(TypeError, match="LlamaForCausalLM has no adapters to disable and no frozen copy"):
        with base_model_of(model):
            pass


def test_stored_adapter_dicts_come_back_as_specs_and_qlora_becomes_lora_for_merging():
    qlora = QLoRA(r=4, alpha=8.0, target_modules=["q_proj"], bits=8)
    rebuilt = adapter_from_dict(qlora.to_dict())
    assert isinstance(rebuilt, QLoRA) and rebuilt.to_dict() == qlora.to_dict()
    plain = rebuilt.as_lora()
    assert type(plain) is LoRA
    assert plain.to_dict() == {key: value for key, value in qlora.to_dict().items()
                               if key not in ("bits", "quant_type", "double_quant", "compute_dtype")} | {"class": "LoRA"}
    assert adapter_from_dict(FullFineTune(freeze=["embed"]).to_dict()).freeze == ["embed"]


def test_the_old_public_name_of_the_drift_monitor_still_works():
    from lightning_ft.forgetting import assistant_kl_sum, kl_sum

    assert kl_sum is assistant_kl_sum
