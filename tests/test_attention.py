"""Per-sequence SDPA: packed rows attend within each conversation; every other input matches plain SDPA."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_TOKENIZER_DIR

from lightning_ft.attention import (PER_SEQUENCE_SDPA, full_attention_only, native_packing_attention,
                                    packed_segments, register)


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(TINY_TOKENIZER_DIR)).eval()
    model.config.use_cache = False
    return model


def _logits(model, implementation, **inputs):
    model.set_attn_implementation(implementation)
    return model(**inputs).logits


def test_packed_segments():
    assert packed_segments(torch.tensor([[0, 1, 2, 0, 1, 0]])) == [[(0, 3), (3, 5), (5, 6)]]
    assert packed_segments(torch.tensor([[0, 1, 2], [0, 0, 1]])) == [[(0, 3)], [(0, 1), (1, 3)]]
    assert packed_segments(torch.arange(5)[None]) is None and packed_segments(None) is None


def test_packed_rows_equal_separate_sequences_with_gradients(model):
    generator = torch.Generator().manual_seed(1)
    parts = [torch.randint(1000, (1, n), generator=generator) for n in (7, 1, 5)]
    separate = torch.cat([_logits(model, "sdpa", input_ids=ids) for ids in parts], dim=1)
    positions = torch.tensor([[*range(7), 0, *range(5)]])
    packed = _logits(model, register(), input_ids=torch.cat(parts, dim=1), position_ids=positions)
    assert model.config._attn_implementation == PER_SEQUENCE_SDPA
    assert torch.allclose(packed, separate, atol=1e-5)
    grads = []
    for implementation in ("sdpa", register()):
        model.zero_grad()
        _logits(model, implementation, input_ids=torch.cat(parts, dim=1), position_ids=positions).sum().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    # plain SDPA builds the dense block-diagonal mask for the same packed row: same gradients, slower
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batches_and_generation_match_plain_sdpa(model, side):
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(1000, (2, 7), generator=generator)
    mask = torch.ones(2, 7, dtype=torch.long)
    if side == "right":
        mask[1, 5:] = 0
    else:
        mask[1, :2] = 0
    expected = _logits(model, "sdpa", input_ids=ids, attention_mask=mask)
    got = _logits(model, register(), input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-5)
    if side == "left":
        outputs = []
        for implementation in ("sdpa", register()):
            model.set_attn_implementation(implementation)
            outputs.append(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                          use_cache=True, pad_token_id=0))
        assert torch.equal(outputs[0], outputs[1])


def test_only_full_attention_models_qualify():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    assert full_attention_only(LlamaConfig())
    assert not full_attention_only(MistralConfig(sliding_window=64))
    assert full_attention_only(Qwen2Config(use_sliding_window=False))
    assert not full_attention_only(Qwen2Config(use_sliding_window=True, sliding_window=64, max_window_layers=0))


def test_native_packing_is_decided_from_the_config():
    from transformers import LlamaConfig, MistralConfig

    llama, windowed = LlamaConfig(), MistralConfig(sliding_window=64)
    assert native_packing_attention(llama) == native_packing_attention(llama, "sdpa") == PER_SEQUENCE_SDPA
    for requested in ("flash_attention_2", "kernels-community/flash-attn3", "flex_attention"):
        assert native_packing_attention(llama, requested) == native_packing_attention(windowed, requested) == requested
    assert native_packing_attention(llama, "eager") is None
    assert native_packing_attention(windowed) is None  # per-sequence SDPA rebuilds full attention only
    assert native_packing_attention(llama, compiled=True) is None  # the per-sequence loop would break the graph
    assert native_packing_attention(llama, "flash_attention_2", compiled=True) == "flash_attention_2"
    assert native_packing_attention(llama, "flash_attention_2", prompt_learning=True) is None
