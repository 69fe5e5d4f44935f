"""Losses computed at selected positions in chunks, the KL penalty, and the probe that tells if packing is exact."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


def chunk_cross_entropy(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the head's logits at ``hidden`` (positions x features) against ``targets``."""
    return torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _head_chunks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
    """Per chunk of ``chunk_size`` positions: its slice, the targets' log-probabilities under ``hidden @ weight.T``
    (at least fp32), and ``softmax - one-hot``, the cross-entropy's gradient in the logits (in their dtype, as
    autograd would pass it on). One chunk of logits exists at a time."""
    for start in range(0, hidden.shape[0], chunk_size):
        chunk, wanted = slice(start, start + chunk_size), targets[start:start + chunk_size]
        logits = torch.nn.functional.linear(hidden[chunk], weight)  # under autocast in its dtype, as the head runs
        scores = logits.to(torch.promote_types(logits.dtype, torch.float32))
        normaliser = torch.logsumexp(scores, dim=-1, keepdim=True)
        logps = (scores.gather(1, wanted[:, None]) - normaliser).squeeze(1)
        softmax = scores.sub_(normaliser).exp_()
        softmax[torch.arange(len(wanted), device=wanted.device), wanted] -= 1
        yield chunk, logps, softmax.to(logits.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, with the gradients of ``hidden`` (and
    of ``weight`` when it trains) computed in the forward pass (see :func:`linear_cross_entropy`)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        for chunk, logps, grad_logits in _head_chunks(hidden, weight, targets, chunk_size):
            total -= logps.sum()
            if grad_hidden is not None:
                grad_hidden[chunk] = grad_logits @ weight.to(grad_logits.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ hidden[chunk].to(grad_logits.dtype)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


class _LinearTokenLogps(torch.autograd.Function):
    """Log-probability of each target under ``hidden @ weight.T`` with ``weight`` frozen: each position's
    gradient row ``d log p / d hidden`` is computed in the forward pass (see :func:`linear_token_logps`)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        values = hidden.new_empty(hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32))
        minus_rows = torch.empty_like(hidden)  # -(d log p / d hidden), one row per position
        for chunk, logps, grad_logits in _head_chunks(hidden, weight, targets, chunk_size):
            values[chunk] = logps
            minus_rows[chunk] = grad_logits @ weight.to(grad_logits.dtype)
        ctx.save_for_backward(minus_rows)
        return values

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor):
        (minus_rows,) = ctx.saved_tensors
        return -grad_values[:, None].to(minus_rows.dtype) * minus_rows, None, None, None


def _fusable(head: torch.nn.Module) -> bool:
    """A plain bias-free linear head whose whole weight is here (no adapter on it, not sharded)."""
    weight = getattr(head, "weight", None)
    return (type(head) is torch.nn.Linear and head.bias is None and type(weight) in (torch.Tensor, torch.nn.Parameter)
            and tuple(weight.shape) == (head.out_features, head.in_features))  # FSDP1 and ZeRO-3 leave a shard


def linear_cross_entropy(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` (positions x features) against ``targets``, in chunks of
    ``chunk_size`` positions.

    When gradients are needed and ``head`` is a plain bias-free linear layer with its whole weight here, each
    chunk's gradient is computed while its logits exist (softmax minus one-hot, times the weight), so peak
    memory holds one chunk of logits and, unlike a checkpointed chunk, the head runs once instead of twice.
    Other heads (an adapter on the head, a sharded weight) run in checkpointed chunks (:func:`chunked_sum`).
    """
    if _fusable(head) and torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, head.weight, targets, chunk_size)
    return chunked_sum(chunk_cross_entropy, chunk_size, head, hidden, targets)


def linear_token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                       chunk_size: int) -> torch.Tensor | None:
    """Log-probability of each of ``targets`` under ``head(hidden)``, for a frozen head (LoRA and other adapters),
    with gradients flowing into ``hidden``; ``None`` where this does not apply (no gradient needed, a head that
    trains or that :func:`linear_cross_entropy` would not fuse): then run the head in checkpointed chunks.

    As in :func:`linear_cross_entropy`, one chunk of logits exists at a time and the head runs once: since the
    head is frozen, ``d log p / d hidden`` of each position is known in the forward pass and is kept instead
    of the logits (one ``hidden``-sized row per position).
    """
    if not _fusable(head) or head.weight.requires_grad or not (torch.is_grad_enabled() and hidden.requires_grad):
        return None
    return _LinearTokenLogps.apply(hidden, head.weight, targets, chunk_size)


def kl_penalty_sum(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Summed KL(base || current) over rows of ``(positions, vocab)`` logits (gradient flows into ``logits``).

    The training penalty (``kl_beta``) passes every real (non-pad) position, prompts included; the
    forgetting monitor's :func:`~lightning_ft.forgetting.drift.assistant_kl_sum` measures assistant
    positions only.
    """
    base_logp = torch.log_softmax(base_logits.float(), dim=-1)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return torch.nn.functional.kl_div(logp, base_logp, log_target=True, reduction="sum")


def chunk_kl(head: torch.nn.Module, hidden: torch.Tensor, base_head: torch.nn.Module,
              base_hidden: torch.Tensor) -> torch.Tensor:
    """Summed KL(base || current) at these positions; the base head runs without gradients."""
    with torch.no_grad():
        base_logits = base_head(base_hidden)
    return kl_penalty_sum(base_logits, head(hidden))


@torch.no_grad()
def packing_is_exact(model: torch.nn.Module, tolerance: float = 1e-3) -> bool:
    """Whether ``model`` keeps two conversations packed in one row apart, given restarting position ids.

    Runs two short random sequences separately and packed (no attention mask), in eval mode, and compares
    the logits: Hugging Face models whose masks come from ``transformers.masking_utils`` (Llama, Qwen, Mistral,
    Gemma, ...) pass; a model that lets packed conversations attend to each other fails.
    """
    embeddings = model.get_input_embeddings()
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(embeddings.num_embeddings, (1, n), generator=generator) for n in (6, 5))
    device = embeddings.weight.device
    positions = torch.tensor([[*range(6), *range(5)]], device=device)
    was_training = model.training
    model.eval()
    try:
        apart = torch.cat([model(input_ids=ids.to(device)).logits for ids in (first, second)], dim=1)
        packed = model(input_ids=torch.cat([first, second], dim=1).to(device), position_ids=positions).logits
    finally:
        model.train(was_training)
    return packed.shape == apart.shape and torch.allclose(packed.float(), apart.float(), rtol=tolerance, atol=tolerance)


def chunked_sum(function: Callable[..., torch.Tensor], chunk_size: int, head: torch.nn.Module, hidden: torch.Tensor,
                *per_position: Any) -> torch.Tensor:
    """Sum ``function(head, hidden[chunk], ...)`` over chunks of ``chunk_size`` positions.

    Tensor arguments after ``hidden`` are chunked alike, anything else (modules) passed as is. With gradients
    enabled each chunk's logits are recomputed in backward rather than kept alive, so peak memory holds
    one chunk of ``vocab``-wide logits.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        args = [arg[chunk] if isinstance(arg, torch.Tensor) else arg for arg in per_position]
        if torch.is_grad_enabled():
            total = total + checkpoint(function, head, hidden[chunk], *args, use_reentrant=False)
        else:
            total = total + function(head, hidden[chunk], *args)
    return total
