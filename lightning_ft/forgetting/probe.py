"""One measurement of a model: benchmark accuracy, KL drift from the base and lm-eval tasks, sharded over ranks.

:class:`ForgettingProbe` knows nothing of Lightning: the callback hands it the model and two
collectives. Every rank calls the same collectives in the same order whatever its shard holds (an
empty shard still sums zeros), so no rank can wait on a collective another rank skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from lightning_ft.adapters import has_adapters
from lightning_ft.data.formats import Conversation
from lightning_ft.data.padding import pad_token_id
from lightning_ft.forgetting.benchmark import MCItem, choice_loglikelihoods, encode_items, item_outcomes, summarize
from lightning_ft.forgetting.drift import assistant_kl_sum, build_reference, encode_prompts

Reduce = Callable[[torch.Tensor], torch.Tensor]
Broadcast = Callable[[Any], Any]


def _identity(value: Any) -> Any:
    return value


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd inside; every submodule's own train/eval flag restored after."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in flags:
            module.training = training


class ForgettingProbe:
    """Measure a model on a fixed benchmark subset, prompt set and lm-eval tasks.

    Args:
        items: Multiple-choice items (already subsampled); empty skips the benchmark.
        conversations: KL prompts; empty skips the drift measurement.
        batch_size: Benchmark items (each with all its choices) or KL prompts per forward pass.
        top_k: Base log-probabilities kept per position when the base must be cached (full fine-tuning).
        max_length: Prompts are cut to this many tokens.
        lm_eval_tasks: lm-eval task names (run on rank 0, results broadcast).
        lm_eval_limit: Documents per lm-eval task.
        lm_eval_include_path: A directory of extra lm-eval task YAML files.
    """

    def __init__(self, items: Sequence[MCItem], conversations: Sequence[Conversation], batch_size: int = 16,
                 top_k: int = 64, max_length: int | None = 512, lm_eval_tasks: Sequence[str] = (),
                 lm_eval_limit: int | float | None = None, lm_eval_include_path: str | None = None) -> None:
        self.items, self.conversations = list(items), list(conversations)
        self.batch_size, self.top_k, self.max_length = batch_size, top_k, max_length
        self.lm_eval_tasks, self.lm_eval_limit = list(lm_eval_tasks), lm_eval_limit
        self.lm_eval_include_path = lm_eval_include_path
        self.tokenizer: Any = None
        self.encoded: list = []
        self.batches: list = []
        #: The base model's top-k cache, per prompt batch; ``None`` while unset or when adapters give the base.
        self.reference: list[dict[str, torch.Tensor]] | None = None

    @property
    def fingerprint(self) -> str:
        """Identifies what is measured, so a checkpoint's baseline is not compared with other data."""
        content = json.dumps([
            [[item.question, list(item.choices), item.answer] for item in self.items],
            [[dict(message) for message in conv.messages] for conv in self.conversations],
            self.top_k, self.lm_eval_tasks, self.lm_eval_limit,
        ])
        return hashlib.sha256(content.encode()).hexdigest()[:16]

    def prepare(self, tokenizer: Any) -> None:
        """Tokenise the benchmark and the prompts (once; later calls with the same tokenizer do nothing)."""
        if self.tokenizer is tokenizer:
            return
        self.tokenizer = tokenizer
        self.encoded = encode_items(self.items, tokenizer)
        self.batches = encode_prompts(self.conversations, tokenizer, self.batch_size, self.max_length)

    def needs_reference(self, model: Any) -> bool:
        """Whether KL needs a cached base (no adapters to switch off) that is not there yet."""
        return bool(self.batches) and not has_adapters(model) and self.reference is None

    def cache_reference(self, model: Any) -> None:
        """Keep the (untouched) model's top-k next-token log-probabilities on every prompt batch.

        Every rank caches every batch, so the cache in a checkpoint (saved by rank 0) serves all ranks.
        """
        with evaluation_mode(model):
            self.reference = build_reference(model, self.batches, self.top_k)

    def measure(self, model: Any, rank: int = 0, world_size: int = 1, reduce: Reduce = _identity,
                broadcast: Broadcast = _identity) -> dict[str, float]:
        """Score ``model`` in eval mode; each rank takes every ``world_size``-th item and prompt batch.

        Args:
            model: The model as it is now.
            rank: This process's global rank.
            world_size: How many processes measure together.
            reduce: Sums a tensor over all ranks (e.g. ``trainer.strategy.reduce(t, reduce_op="sum")``).
            broadcast: Sends rank 0's object to every rank.

        Returns:
            Flat metrics: ``acc``, ``acc_norm``, ``subject/<s>/acc``, ``subject/<s>/acc_norm``, ``kl`` and
            ``lm_eval/<task>/<metric>``, the same on every rank.
        """
        metrics: dict[str, float] = {}
        device = next(model.parameters()).device
        pad = pad_token_id(self.tokenizer)
        with evaluation_mode(model):
            if self.items:
                mine = list(range(rank, len(self.items), world_size))
                scores = choice_loglikelihoods(model, [self.encoded[i] for i in mine], self.batch_size, pad)
                outcomes = item_outcomes(self.items, dict(zip(mine, scores)))
                metrics.update(summarize(self.items, reduce(outcomes.to(device)).cpu()))
            if self.batches and (self.reference is not None or has_adapters(model)):
                total, count = assistant_kl_sum(model, self.batches, self.reference, range(rank, len(self.batches), world_size))
                sums = reduce(torch.tensor([total, count], dtype=torch.float64, device=device)).cpu()
                metrics["kl"] = (sums[0] / sums[1].clamp(min=1)).item()
            if self.lm_eval_tasks:
                from lightning_ft.forgetting.lm_eval import run_lm_eval

                results: dict[str, float] | str = {}
                if rank == 0:
                    try:
                        results = run_lm_eval(model, self.tokenizer, self.lm_eval_tasks, self.lm_eval_limit,
                                              self.batch_size, self.lm_eval_include_path)
                    except Exception as error:
                        broadcast(f"{type(error).__name__}: {error}")  # release the other ranks, then fail
                        raise
                results = broadcast(results)
                if isinstance(results, str):
                    raise RuntimeError(f"lm-eval failed on rank 0: {results}")
                metrics.update(results)
        return metrics
