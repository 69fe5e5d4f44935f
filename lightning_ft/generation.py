"""Greedy, batched generation with the chat template applied: inference only, nothing from training.

Load a fine-tuned model with :func:`lightning_ft.loading.load_for_generation`, then::

    print(generate(model, tokenizer, [[{"role": "user", "content": "My parcel never arrived."}]])[0])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_ft.data.labels import render_text
from lightning_ft.data.padding import pad, pad_token_id

Messages = Sequence[Mapping[str, str]]


def encode_prompt(tokenizer: Any, messages: Messages, chat_template: str | None = None) -> list[int]:
    """Token ids of a conversation rendered with the chat template, ending with the assistant header."""
    text = render_text(tokenizer, messages, chat_template, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def generate(model: Any, tokenizer: Any, conversations: Sequence[Messages], max_new_tokens: int = 256,
             batch_size: int = 8, chat_template: str | None = None) -> list[str]:
    """Greedy answers to conversations (each ending with a user turn), batched with left padding.

    Prompts are sorted by length so batches waste little padding; answers come back in input order, cut at
    the first end-of-sequence token. The model's train/eval mode is restored afterwards.

    Args:
        model: A causal LM (a ``PeftModel`` works).
        tokenizer: Its tokenizer, with a chat template.
        conversations: Message lists; the model answers after the last one.
        max_new_tokens: Upper bound on each answer's length (and so on the cost).
        batch_size: Prompts generated together.
        chat_template: A Jinja template overriding the tokenizer's.
    """
    from transformers import GenerationConfig

    prompts = [encode_prompt(tokenizer, messages, chat_template) for messages in conversations]
    stop = _stop_ids(model, tokenizer)
    pad_id = pad_token_id(tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                              pad_token_id=pad_id, use_cache=True)  # training sets config.use_cache=False
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                # Left padding: every prompt ends where generation starts.
                input_ids, attention_mask = pad([prompts[i] for i in chunk], pad_id, side="left")
                width = input_ids.shape[1]
                output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                        generation_config=config)
                for row, i in enumerate(chunk):
                    new = output[row, width:].tolist()
                    cut = next((k for k, token in enumerate(new) if token in stop), len(new))
                    answers[i] = tokenizer.decode(new[:cut], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return answers
