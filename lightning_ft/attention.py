"""SDPA that attends within each packed sequence: packing without a varlen kernel, and without a dense mask.

Hugging Face models given packed rows (several conversations per row, position ids restarting, no attention
mask) build a dense ``rows x length x length`` block-diagonal mask for SDPA, so attention costs as much as if
each row were one long sequence. :func:`per_sequence_sdpa` instead runs causal SDPA on each conversation of
the row separately (no mask, SDPA's fastest kernels), so a packed batch costs what its conversations cost
unpadded. Padded batches, generation with a cache and every other input go through the ordinary SDPA path.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, flash_attention_mask, sdpa_mask

#: The ``attn_implementation`` name this module registers with transformers.
PER_SEQUENCE_SDPA = "lightning_ft_sdpa"


def packed_segments(position_ids: torch.Tensor | None) -> list[list[tuple[int, int]]] | None:
    """``(start, end)`` of every sequence in each row, where position ids restart; ``None`` when no row packs two.

    Example:
        >>> packed_segments(torch.tensor([[0, 1, 2, 0, 1, 0]]))
        [[(0, 3), (3, 5), (5, 6)]]
    """
    if position_ids is None or position_ids.ndim != 2 or position_ids.shape[1] < 2:
        return None
    restarts = (position_ids[:, 1:] - position_ids[:, :-1]) != 1
    if not bool(restarts.any()):
        return None
    length = position_ids.shape[1]
    segments = []
    for row in restarts.tolist():
        cuts = [0, *(i + 1 for i, cut in enumerate(row) if cut), length]
        segments.append(list(zip(cuts[:-1], cuts[1:])))
    return segments


def per_sequence_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """An attention function for transformers' ``AttentionInterface`` (registered as ``lightning_ft_sdpa``).

    Shapes as transformers passes them: ``query`` ``(batch, heads, length, head_dim)``, ``key``/``value``
    with the key-value heads, and it returns ``(batch, length, heads, head_dim)``. With no mask and packed
    ``position_ids`` it attends causally inside each sequence; otherwise it builds the same boolean mask
    transformers' SDPA path would from the 2D padding mask, which the model hands over as it does for flash
    attention (``None`` when nothing is padded).
    """
    segments = packed_segments(position_ids) if attention_mask is None else None
    if segments is None or position_ids.shape[0] != query.shape[0] or query.shape[2] != key.shape[2]:
        if attention_mask is not None and attention_mask.ndim == 2:
            q_length, kv_length = query.shape[2], key.shape[2]
            attention_mask = sdpa_mask(batch_size=query.shape[0], q_length=q_length, kv_length=kv_length,
                                       q_offset=kv_length - q_length, mask_function=causal_mask_function,
                                       attention_mask=attention_mask.bool(), device=query.device)
            if attention_mask is not None:
                # A query row with nothing to attend (left padding) would give NaN, which then leaks through
                # masked-out values: let it attend everywhere, as its output is ignored anyway.
                attention_mask = attention_mask | ~attention_mask.any(dim=-1, keepdim=True)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    kwargs.pop("is_causal", None)
    rows = []
    for row, spans in enumerate(segments):
        sizes = [end - start for start, end in spans]
        # One split per tensor (not a slice per sequence): its backward writes each gradient once.
        pieces = zip(*(tensor[row:row + 1].split(sizes, dim=2) for tensor in (query, key, value)))
        parts = [sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True,
                                        **kwargs)[0] for q, k, v in pieces]
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), None


def register() -> str:
    """Register :func:`per_sequence_sdpa` with transformers (idempotent); returns its name."""
    AttentionInterface.register(PER_SEQUENCE_SDPA, per_sequence_sdpa)
    # Flash attention's mask function: the 2D padding mask or None, never a dense 4D (block-diagonal) mask.
    AttentionMaskInterface.register(PER_SEQUENCE_SDPA, flash_attention_mask)
    return PER_SEQUENCE_SDPA


def full_attention_only(config) -> bool:
    """Whether every layer attends to the whole causal context (no sliding window, no chunked attention):
    the only models whose padding mask :func:`per_sequence_sdpa` rebuilds exactly."""
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        return False
    uses_window = getattr(config, "use_sliding_window", True)
    return not (uses_window and getattr(config, "sliding_window", None)) and not getattr(
        config, "attention_chunk_size", None)


def _default_attention(config) -> str:
    """What transformers loads when no attention is requested: SDPA where the architecture supports it, else eager."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return "eager"
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def native_packing_attention(config, requested: str | None = None, compiled: bool = False,
                             prompt_learning: bool = False) -> str | None:
    """The attention under which a model with this ``config`` keeps conversations packed into one row apart by
    itself, or ``None`` when it would need a dense block-diagonal mask (which costs more than the padding it saves).

    Decided from the configuration alone, before any weights load, so the data module can be told (the CLI links
    :meth:`~lightning_ft.FineTuneModule.packs_natively` into ``ChatDataModule(packs_natively=...)``) and the module
    loads the same attention:

    - flash attention (varlen kernels) and flex attention, as ``requested``;
    - SDPA (``requested`` ``None``, when the architecture supports it): :func:`per_sequence_sdpa`, unless the
      layers are ``compiled`` (the per-sequence loop would break their graph) or some layer has a sliding
      window or chunked attention (:func:`full_attention_only`);
    - eager and anything else: ``None``; a ``prompt_learning`` adapter (virtual tokens prepended to every
      row) never packs.

    Example:
        >>> from transformers import LlamaConfig, MistralConfig
        >>> native_packing_attention(LlamaConfig())
        'lightning_ft_sdpa'
        >>> native_packing_attention(MistralConfig(sliding_window=64)) is None
        True
    """
    if prompt_learning:
        return None
    implementation = requested or _default_attention(config)
    if "flash" in implementation or implementation == "flex_attention":
        return implementation
    if implementation in ("sdpa", PER_SEQUENCE_SDPA) and not compiled and full_attention_only(config):
        return PER_SEQUENCE_SDPA
    return None
