"""How training batches are formed: padded, length-grouped or packed, chosen from the data's lengths.

Padding costs compute in proportion to how unequal the lengths in a batch are. :func:`choose_batching`
estimates that share from the data (the batches an epoch of shuffled order would form) and picks:

- ``padded`` when padding is at most :data:`MAX_PADDING` of the batch (uniform data): plain batches;
- ``packed`` otherwise, when the model's attention keeps packed conversations apart without a dense mask
  (flash attention's varlen kernel, flex attention, or :mod:`lightning_ft.attention`'s per-sequence SDPA):
  no padding at all, and the same shuffled conversations per step as padded batches;
- ``grouped`` otherwise: conversations of similar length batched together (less padding, a coarser shuffle).

The rule and its threshold come from ``benchmarks/sft_throughput.py`` (README "Speed").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from lightning_ft.data.sampling import ResumableSampler

BatchingMode = Literal["padded", "grouped", "packed"]
#: Padding share up to which plain padded batches are kept: below it neither packing's per-sequence attention
#: calls nor grouping's coarser shuffle pays for itself (measured on the uniform triage data).
MAX_PADDING = 0.10


@dataclass(frozen=True)
class BatchingChoice:
    """The batching mode, the padding share of shuffled padded batches it was chosen from, and why."""

    mode: BatchingMode
    padding: float
    reason: str

    def __str__(self) -> str:
        return f"Batches: {self.mode} ({self.reason})"


def padding_share(lengths: Sequence[int], batch_size: int, grouped: bool = False, seed: int = 0) -> float:
    """Share of padding in the padded batches of one shuffled epoch (``grouped``: length-grouped batches)."""
    if not lengths:
        return 0.0
    sampler = ResumableSampler(len(lengths), seed=seed, lengths=list(lengths) if grouped else None,
                               batch_size=batch_size)
    order = sampler.order(0)
    padded = sum(len(batch) * max(lengths[i] for i in batch)
                 for batch in (order[start:start + batch_size] for start in range(0, len(order), batch_size)))
    return 1.0 - sum(lengths) / padded


def choose_batching(lengths: Sequence[int], batch_size: int, packing: bool | Literal["auto"] = "auto",
                    group_by_length: bool | Literal["auto"] = "auto",
                    packs_natively: bool | None = False,
                    max_padding: float = MAX_PADDING) -> BatchingChoice:
    """Pick padded, grouped or packed batches for examples of these token ``lengths``.

    Args:
        lengths: Token count of every training example.
        batch_size: Examples per batch.
        packing: ``True`` always packs, ``False`` never does, ``auto`` packs by the rule above.
        group_by_length: ``True`` groups whenever batches are not packed, ``False`` never does, ``auto`` by the rule.
        packs_natively: Whether the model's attention keeps packed conversations apart without a dense mask
            (see :func:`~lightning_ft.attention.native_packing_attention`); ``None`` (not known) counts as false,
            and the reason says so when it kept batches unpacked.
        max_padding: Padding share up to which padded batches are kept.

    Example:
        >>> choose_batching([100] * 64, 8).mode
        'padded'
        >>> choose_batching([30, 900, 60, 200] * 16, 8, packs_natively=True).mode
        'packed'
    """
    if packs_natively not in (True, False, None):
        raise TypeError(f"packs_natively={packs_natively!r} must be true, false or None (not a callable)")
    share = padding_share(lengths, batch_size)
    wasted = f"shuffled padded batches would be {share:.0%} padding"
    if packing is True:
        return BatchingChoice("packed", share, "packing: true")
    if share > max_padding and packing == "auto":
        if packs_natively:
            return BatchingChoice("packed", share, f"{wasted}; the attention keeps packed conversations apart")
        if packs_natively is None:
            wasted += "; not packed: packs_natively is not set (pass the model's packs_natively())"
    if group_by_length is True or (group_by_length == "auto" and share > max_padding):
        grouped = padding_share(lengths, batch_size, grouped=True)
        why = "group_by_length: true" if group_by_length is True else wasted
        return BatchingChoice("grouped", share, f"{why}; grouped by length: {grouped:.0%}")
    return BatchingChoice("padded", share, wasted if share <= max_padding else f"{wasted}; packing and grouping off")
