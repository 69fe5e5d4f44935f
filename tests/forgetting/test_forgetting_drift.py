"""KL drift from the base model: adapters switched off for LoRA, a top-k cache for full fine-tuning."""

from __future__ import annotations

import pytest
import torch
from forgetting_helpers import write_benchmark
from transformers import AutoModelForCausalLM

from lightning_ft import FineTuneModule, FullFineTune, LoRA
from lightning_ft.forgetting import ForgettingProbe, read_benchmark, read_prompts
from lightning_ft.forgetting.drift import (
    assistant_kl_sum,
    build_reference,
    encode_prompts,
    exact_kl,
    scored_logprobs,
    top_k_kl,
    top_k_reference,
)


@pytest.fixture(scope="module")
def prompts():
    return read_prompts(["default"])[:3]


def test_prompt_batches_score_only_positions_before_assistant_tokens(prompts, tiny_tokenizer):
    batches = encode_prompts(prompts, tiny_tokenizer, batch_size=2)
    assert [len(batch.input_ids) for batch in batches] == [2, 1]
    batch = batches[0]
    row = batch.input_ids[0]
    predicted = row[1:][batch.scored[0, :-1]]
    reply = prompts[0].messages[-1]["content"] + "<|im_end|>"
    assert tiny_tokenizer.decode(predicted) == reply
    assert not batch.scored[batch.attention_mask == 0].any()


@pytest.mark.parametrize("adapter", [LoRA(r=4), FullFineTune()], ids=["lora", "full"])
def test_kl_is_exactly_zero_before_training(tiny_model_dir, prompts, adapter):
    module = FineTuneModule(tiny_model_dir, adapter=adapter)
    module.configure_model()
    probe = ForgettingProbe([], prompts, batch_size=2, top_k=16)
    probe.prepare(module.tokenizer)
    assert probe.needs_reference(module.model) == isinstance(adapter, FullFineTune)
    if probe.needs_reference(module.model):
        probe.cache_reference(module.model)
    assert probe.measure(module.model) == {"kl": 0.0}
    assert module.model.training  # eval mode was only for the measurement


def perturbed(model_dir, scale=0.05):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model


def test_top_k_cache_equals_exact_kl_when_k_is_the_vocabulary(tiny_model_dir, tiny_tokenizer, prompts):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    current = perturbed(tiny_model_dir)
    batches = encode_prompts(prompts, tiny_tokenizer, batch_size=2)
    with torch.no_grad():
        exact = torch.cat([exact_kl(scored_logprobs(base, b), scored_logprobs(current, b)) for b in batches])
    vocab = base.config.vocab_size
    total, count = assistant_kl_sum(current, batches, build_reference(base, batches, k=vocab))
    assert count == exact.numel() and exact.mean().item() > 1e-3
    assert total / count == pytest.approx(exact.mean().item(), rel=1e-5)
    # Fewer buckets: still a divergence, a lower bound of the exact KL that grows with k (finer buckets).
    coarse = [assistant_kl_sum(current, batches, build_reference(base, batches, k=k))[0] / count for k in (1, 8, 64, 512)]
    assert 0.0 < coarse[0] <= coarse[1] <= coarse[2] <= coarse[3] <= exact.mean().item() + 1e-6


def test_top_k_kl_other_bucket_by_hand():
    base = torch.tensor([[0.5, 0.3, 0.2]]).log()
    current = torch.tensor([[0.4, 0.4, 0.2]]).log()
    reference = top_k_reference(base, k=1)  # buckets: {0}, other
    assert reference["indices"].tolist() == [[0]]
    expected = 0.5 * torch.log(torch.tensor(0.5 / 0.4)) + 0.5 * torch.log(torch.tensor(0.5 / 0.6))
    assert top_k_kl(reference, current).item() == pytest.approx(expected.item(), abs=1e-6)
    assert top_k_kl(top_k_reference(base, k=3), base).item() == 0.0


def test_sharded_measurement_adds_up_to_the_single_process_one(tiny_model_dir, tiny_tokenizer, tmp_path, prompts):
    model = perturbed(tiny_model_dir)
    items = read_benchmark(write_benchmark(tmp_path / "b.jsonl"))
    probe = ForgettingProbe(items, prompts, batch_size=2, top_k=32)
    probe.prepare(tiny_tokenizer)
    probe.cache_reference(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    whole = probe.measure(model)
    # Simulate two ranks: rank 1 runs first and records what it contributes to each collective; rank 0's
    # collectives then add it in. Both call the same collectives in the same order.
    sent = []
    probe.measure(model, rank=1, world_size=2, reduce=lambda t: sent.append(t.clone()) or t)
    received = iter(sent)
    sharded = probe.measure(model, rank=0, world_size=2, reduce=lambda t: t + next(received))
    assert sharded.keys() == whole.keys() and len(sent) == 2
    for key, value in whole.items():
        assert sharded[key] == pytest.approx(value, abs=1e-6), key
