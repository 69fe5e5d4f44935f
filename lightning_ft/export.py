"""Turn a checkpoint or adapter into a PEFT adapter directory or a merged, standalone Hugging Face model.

Every directory is written next to its target under a temporary name and renamed into place when
complete, so a crash leaves either the old directory or the new one, never a half-written mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` that replaces it only if the block finishes without error."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=target.suffix)
    os.close(handle)
    try:
        yield Path(staging)
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a staging directory that replaces ``target`` only if the block finishes without error.

    Args:
        target: The directory to create or replace.
        overwrite: ``False`` refuses an existing non-empty ``target`` before anything is written.
    """
    target = Path(target)
    if not overwrite and target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} already exists and is not empty: choose another directory or overwrite it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        os.chmod(staging, 0o755)
        if target.exists():
            old = target.with_name(f".{target.name}-old-{os.getpid()}")
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_peft_source(source: str | os.PathLike, model: str | None = None, for_merge: bool = False):
    """``(model, tokenizer)`` from a Lightning checkpoint or an adapter directory, in eval mode, on the CPU.

    For merging, a QLoRA checkpoint is rebuilt as plain LoRA on a full-precision base: merging into
    4-bit weights would round the update away.
    """
    from lightning_ft.generation import load_checkpoint_module, load_for_generation

    path = Path(source).expanduser()
    if path.is_dir():
        return load_for_generation(model=model, adapter=str(path))
    module = load_checkpoint_module(path, model, plain_lora=for_merge)
    return module.model.eval(), module.tokenizer


def merge(model: Any) -> Any:
    """Fold the adapter into the base weights: a plain ``transformers`` model without peft layers."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model  # full fine-tuning: already standalone
    return model.merge_and_unload(safe_merge=True)


def _probe_logits(model: Any, tokenizer: Any) -> torch.Tensor:
    from lightning_ft.generation import encode_prompt

    ids = encode_prompt(tokenizer, [{"role": "user", "content": "Check: 2 + 2 = ?"}])
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits.float()


def export(source: str | os.PathLike, output_dir: str | os.PathLike, merge_adapter: bool = False,
           model: str | None = None, overwrite: bool = False, atol: float = 1e-3) -> dict[str, Any]:
    """Write ``source`` (a ``.ckpt`` or adapter directory) to ``output_dir`` as an adapter or a merged model.

    Args:
        source: A Lightning checkpoint from ``fit`` or a PEFT adapter directory.
        output_dir: Where the Hugging Face directory goes (replaced atomically).
        merge_adapter: ``True`` writes a standalone model (safetensors, tokenizer with chat template,
            generation config) loadable with ``AutoModelForCausalLM.from_pretrained``; its logits are
            checked against base+adapter before it is moved into place.
        model: The base model spec, when it differs from the one recorded with the source.
        overwrite: Replace an existing ``output_dir``.
        atol: Largest logit difference accepted between the merged model and base+adapter.

    Returns:
        What was written: ``{"output_dir", "kind", "max_logit_diff"}``.
    """
    output_dir = Path(output_dir)
    if not overwrite and output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} already exists and is not empty: pass --overwrite or another directory.")
    from peft import PeftModel

    peft_model, tokenizer = load_peft_source(source, model, for_merge=merge_adapter)
    is_adapter = isinstance(peft_model, PeftModel)
    merge_adapter = merge_adapter and is_adapter  # a full fine-tune is standalone already
    reference = _probe_logits(peft_model, tokenizer) if merge_adapter else None
    final = merge(peft_model) if merge_adapter else peft_model
    kind = "merged" if merge_adapter else ("adapter" if is_adapter else "model")
    result: dict[str, Any] = {"output_dir": str(output_dir), "kind": kind}
    if merge_adapter:
        diff = (_probe_logits(final, tokenizer) - reference).abs().max().item()
        if diff > atol:
            raise ValueError(f"Merged model's logits differ from base+adapter by {diff:.3g} (> {atol}); nothing written.")
        result["max_logit_diff"] = diff
    with atomic_directory(output_dir, overwrite=True) as staging:
        final.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "lightning_ft_export.json").write_text(json.dumps({**result, "source": str(source)}, indent=2))
    return result
