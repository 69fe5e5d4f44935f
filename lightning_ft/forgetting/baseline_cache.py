"""The base model's forgetting baseline, measured once: every run and sweep trial over the same base model,
benchmark, prompts, precision and device reads it from the cache instead of measuring it again.

An entry is keyed by everything that determines the baseline's numbers: a fingerprint of the base weights
(sampled, so a 7B model costs no more than a 135M one to fingerprint), what the probe measures (its items,
prompts, ``top_k``, lm-eval tasks), the tokenizer and chat template that encode them, the batching, the
scorer's version, the precision and the device type. It holds the baseline metrics and, for full
fine-tuning, the base model's top-k log-probabilities the KL drift compares against. Written atomically,
checked on read (a corrupt or foreign entry is measured afresh), and filled under a lock beside it, so sweep
workers that start together measure the base once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from lightning_ft.atomic import atomic_file, file_lock
from lightning_ft.data.encode import tokenizer_fingerprint

#: Bumped whenever the scoring changes its numbers: every entry of an older scorer is then measured afresh.
SCORER_VERSION = 1
#: Elements hashed per tensor at most (evenly strided): enough to tell two checkpoints of a model apart.
_SAMPLED = 4096


def weights_fingerprint(model: torch.nn.Module, base_only: bool) -> str:
    """A digest of the model's weights: every tensor's name, shape, dtype and an evenly strided sample of its
    values. ``base_only`` leaves out the trainable parameters (a freshly attached adapter, which leaves the
    output unchanged), so trials with other LoRA ranks or seeds share the base model's entry. Unlike
    :func:`~lightning_ft.models.base_fingerprint` (architecture and the first embedding rows, enough to tell
    bases apart) every layer is sampled: a model fine-tuned before, with the embeddings untouched, differs."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        if base_only and parameter.requires_grad:
            continue
        flat = parameter.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // _SAMPLED)][:_SAMPLED].float().cpu()
        digest.update(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:24]


def baseline_key(model: torch.nn.Module, base_only: bool, probe: Any, tokenizer: Any, precision: str) -> str:
    """The cache key of a baseline: see the module docstring for what goes in."""
    device = next(model.parameters()).device.type
    template = getattr(tokenizer, "chat_template", None) or ""
    content = json.dumps([
        SCORER_VERSION, weights_fingerprint(model, base_only), probe.fingerprint, probe.batch_size,
        probe.max_length, tokenizer_fingerprint(tokenizer), hashlib.sha256(str(template).encode()).hexdigest(),
        str(precision), device,
    ])
    return hashlib.sha256(content.encode()).hexdigest()[:24]


class BaselineCache:
    """Baseline entries under ``directory`` (one ``<key>.pt`` each, and a ``.<key>.lock`` beside it)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.pt"

    def lock(self, key: str):
        """Held while an entry is looked up and, on a miss, measured and stored."""
        return file_lock(self.directory / f".{key}.lock")

    def load(self, key: str) -> dict[str, Any] | None:
        """The entry's ``metrics`` and ``reference``, or ``None`` when missing, unreadable or not this key's."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            metrics = {str(name): float(value) for name, value in entry["metrics"].items()}
            reference = entry["reference"]
            valid = (entry["key"] == key and entry["scorer"] == SCORER_VERSION and metrics and (
                reference is None or all(isinstance(r, dict) and all(isinstance(t, torch.Tensor) for t in r.values())
                                         for r in reference)))
        except Exception:  # noqa: BLE001 - a truncated, corrupt or foreign file: measure afresh
            return None
        return {"metrics": metrics, "reference": reference} if valid else None

    def store(self, key: str, metrics: dict[str, float], reference: list[dict[str, torch.Tensor]] | None) -> Path:
        path = self.path(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        entry = {"key": key, "scorer": SCORER_VERSION, "metrics": dict(metrics),
                 "reference": None if reference is None else [{k: v.cpu() for k, v in r.items()} for r in reference]}
        with atomic_file(path) as staging:
            torch.save(entry, staging)
        return path
