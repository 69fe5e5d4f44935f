"""Losses computed at selected positions in chunks, the KL penalty, and the probe that tells if packing is exact."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


def chunk_cross_entropy(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the head's logits at ``hidden`` (positions x features) against ``targets``."""
    return torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, chunk by chunk, with the gradients
    of ``hidden`` (and of ``weight`` when it trains) computed in the forward pass: no chunk's logits are kept
    for backward or computed a second time (see :func:`linear_cross_entropy`)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            chunk, wanted = hidden[start:start + chunk_size], targets[start:start + chunk_size]
            logits = torch.nn.functional.linear(chunk, weight)  # under autocast in its dtype, as the head runs
            scores = logits.float()
            normaliser = torch.logsumexp(scores, dim=-1, keepdim=True)
            total += (normaliser - scores.gather(1, wanted[:, None])).sum()
            # d(loss)/d(logits) = softmax - one-hot, in the logits' dtype as autograd would pass it on.
            softmax = scores.sub_(normaliser).exp_()
            softmax[torch.arange(len(wanted), device=wanted.device), wanted] -= 1
            grad_logits = softmax.to(logits.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_size] = grad_logits @ weight.to(logits.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ chunk.to(logits.dtype)
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


def linear_cross_entropy(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int) -> torch.Tensor | None:
    """Summed cross-entropy of ``head(hidden)`` (positions x features) against ``targets``, in chunks of
    ``chunk_size`` positions, or ``None`` when ``head`` is not a plain bias-free linear layer with its whole
    weight here (an adapter on the head, a sharded weight): then use :func:`chunked_sum`.

    Each chunk's gradient is computed while its logits exist (softmax minus one-hot, times the weight), so
    peak memory holds one chunk of logits and, unlike a checkpointed chunk, the head runs once instead of
    twice.
    """
    weight = getattr(head, "weight", None)
    if type(head) is not torch.nn.Linear or head.bias is not None or type(weight) not in (torch.Tensor,
                                                                                            torch.nn.Parameter):
        return None
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        return chunked_sum(chunk_cross_entropy, chunk_size, head, hidden, targets)
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size)


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
