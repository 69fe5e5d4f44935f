"""Drift from the base model: mean per-token KL(base || current) on general chat prompts.

The prompts are conversations (any format :mod:`lightning_ft.data.formats` reads) rendered with the
chat template; KL is measured at every position that predicts an assistant token, i.e. on the model's
own replies to ordinary requests, teacher-forced on the reference reply.

Two ways to know the base model's next-token distribution without a second copy of the model:

- **Adapters** (LoRA and other PEFT adapters): run the same model with the adapters disabled
  (:func:`lightning_ft.adapters.base_model_of`). Exact, costs a second forward pass.
- **Top-k cache** (full fine-tuning): before training, keep each scored position's top-``k`` base
  log-probabilities and the log of the remaining mass as one "other" bucket. KL is then computed
  between the two ``k + 1``-bucket distributions, which is a proper divergence (0 for equal models,
  never negative) and a lower bound of the full KL that becomes exact when ``k`` is the vocabulary size.
  8 prompts (about 300 assistant tokens for SmolLM2) with ``k=64`` keep about 0.2 MB.

Prompts are cut into fixed batches once, so the base and every later measurement see identical
inputs and padding: an untouched model measures exactly 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_ft.adapters import base_model_of
from lightning_ft.data.collate import IGNORE_INDEX, collate, encode_conversation
from lightning_ft.data.formats import Conversation
from lightning_ft.data.padding import pad_token_id
from lightning_ft.data.sources import read_conversations_from

#: The general chat prompts shipped with the package (64 one-turn conversations).
DEFAULT_PROMPTS = str(Path(__file__).resolve().parents[1] / "benchmarks" / "general_prompts.jsonl")


def read_prompts(paths: Sequence[str]) -> list[Conversation]:
    """Conversations of every file in ``paths``; ``"default"`` names :data:`DEFAULT_PROMPTS`.

    Raises:
        DataError: Every bad record of every file, with file, line and field.
    """
    return [conv for path in paths for conv in read_conversations_from(DEFAULT_PROMPTS if path == "default" else path)]


@dataclass(frozen=True)
class PromptBatch:
    """Right-padded token ids and the ``(batch, length)`` mask of positions whose next token is an assistant token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    scored: torch.Tensor


def encode_prompts(conversations: Sequence[Conversation], tokenizer: Any, batch_size: int = 8,
                   max_length: int | None = 512) -> list[PromptBatch]:
    """Tokenise conversations with the chat template and cut them into fixed batches (done once)."""
    pad = pad_token_id(tokenizer)
    examples = [encode_conversation(list(conv.messages), tokenizer, max_length) for conv in conversations]
    batches = []
    for start in range(0, len(examples), batch_size):
        padded = collate(examples[start:start + batch_size], pad)
        scored = torch.zeros_like(padded["labels"], dtype=torch.bool)
        scored[:, :-1] = padded["labels"][:, 1:] != IGNORE_INDEX
        batches.append(PromptBatch(padded["input_ids"], padded["attention_mask"], scored))
    return batches


def scored_logprobs(model: Any, batch: PromptBatch) -> torch.Tensor:
    """``(positions, vocab)`` float32 next-token log-probabilities at the batch's scored positions."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                   use_cache=False).logits
    return logits[batch.scored.to(device)].float().log_softmax(dim=-1)


def exact_kl(base_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """Per-position KL(base || current) over the full vocabulary."""
    return torch.nn.functional.kl_div(logprobs, base_logprobs, log_target=True, reduction="none").sum(-1)


def top_k_reference(base_logprobs: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """What the top-k cache keeps of one batch: ``values``/``indices`` ``(positions, k)`` and ``other``
    ``(positions,)``, the log of the base probability outside the top ``k`` (``-inf`` when ``k`` covers all)."""
    values, indices = base_logprobs.topk(min(k, base_logprobs.size(-1)), dim=-1)
    rest = base_logprobs.scatter(-1, indices, float("-inf"))
    return {"values": values, "indices": indices, "other": rest.logsumexp(dim=-1)}


def top_k_kl(reference: dict[str, torch.Tensor], logprobs: torch.Tensor) -> torch.Tensor:
    """Per-position KL between the base and the current model, both coarsened to the base's top-k + "other"."""
    indices = reference["indices"].long()
    current = logprobs.gather(-1, indices).double()
    current_other = logprobs.scatter(-1, indices, float("-inf")).logsumexp(dim=-1).double()
    base, base_other = reference["values"].double(), reference["other"].double()
    kl = (base.exp() * (base - current)).sum(-1)
    # 0 * log(0 / q) = 0: the "other" bucket adds nothing when the top-k holds all the base mass.
    other = torch.where(base_other > float("-inf"), base_other.exp() * (base_other - current_other), 0.0)
    return (kl + other).clamp(min=0.0)


@torch.no_grad()
def build_reference(model: Any, batches: Sequence[PromptBatch], k: int) -> list[dict[str, torch.Tensor]]:
    """The top-k cache of every batch, on the CPU (small: see the module docstring)."""
    references = []
    for batch in batches:
        reference = top_k_reference(scored_logprobs(model, batch), k)
        reference["indices"] = reference["indices"].int()  # vocabularies fit in int32: half the memory
        references.append({key: value.cpu() for key, value in reference.items()})
    return references


@torch.no_grad()
def assistant_kl_sum(model: Any, batches: Sequence[PromptBatch], reference: Sequence[dict[str, torch.Tensor]] | None,
                     shard: Sequence[int] | None = None) -> tuple[float, int]:
    """The drift monitor: summed per-token KL(base || current) at assistant positions and the number of those
    positions, over the batches in ``shard`` (default: all). (The training penalty, over every real position,
    is :func:`~lightning_ft.losses.kl_penalty_sum`.)

    Args:
        model: The current model (in eval mode).
        batches: From :func:`encode_prompts`.
        reference: From :func:`build_reference`, or ``None`` to compare against ``model`` with its
            adapters disabled.
        shard: Indices of the batches this process measures; sums of all shards add up to the whole.
    """
    total, count = 0.0, 0
    for index in range(len(batches)) if shard is None else shard:
        logprobs = scored_logprobs(model, batches[index])
        if reference is None:
            with base_model_of(model) as base:
                per_position = exact_kl(scored_logprobs(base, batches[index]), logprobs)
        else:
            cached = {key: value.to(logprobs.device) for key, value in reference[index].items()}
            per_position = top_k_kl(cached, logprobs)
        total += per_position.sum().item()
        count += per_position.numel()
    return total, count
