"""Turn a checkpoint or adapter into a PEFT adapter directory or a merged, standalone Hugging Face model.

Every directory is written next to its target under a temporary name and renamed into place when
complete, so a crash leaves either the old directory or the new one, never a half-written mix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lightning_ft.adapters import write_base_record
from lightning_ft.atomic import atomic_directory, refuse_non_finite
from lightning_ft.generation import encode_prompt
from lightning_ft.loading import load_checkpoint_module, load_for_generation


def load_peft_source(source: str | os.PathLike, model: str | None = None, for_merge: bool = False):
    """``(model, tokenizer)`` from a Lightning checkpoint or an adapter directory, in eval mode, on the CPU.

    For merging, a QLoRA checkpoint is rebuilt as plain LoRA on a full-precision base: merging into
    4-bit weights would round the update away.
    """
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
        overwrite: Replace an existing ``output_dir``, only if it is empty or holds an earlier export and
            nothing else (its ``lightning_ft_export.json`` lists the files it wrote).
        atol: Largest logit difference accepted between the merged model and base+adapter.

    Returns:
        What was written: ``{"output_dir", "kind", "max_logit_diff"}``.
    """
    output_dir = Path(output_dir)
    if not overwrite and output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} already exists and is not empty: pass --overwrite or another directory.")
    _check_replaceable(output_dir)
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
    refuse_non_finite(final.state_dict(), str(output_dir))
    with atomic_directory(output_dir, overwrite=True) as staging:
        final.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if kind == "adapter":
            write_base_record(staging, peft_model, model or peft_model.peft_config[peft_model.active_adapter]
                              .base_model_name_or_path)
        files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()) + [EXPORT_RECORD]
        (staging / EXPORT_RECORD).write_text(json.dumps({**result, "source": str(source), "files": files}, indent=2))
    return result


#: Written last into every export: what it holds, and the files it wrote (``--overwrite`` replaces only those).
EXPORT_RECORD = "lightning_ft_export.json"


def _check_replaceable(output_dir: Path) -> None:
    """Refuse to replace ``output_dir`` unless it is missing, empty, or holds only an earlier export's files."""
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} is a file, not a directory: choose another --output_dir.")
    present = sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob("*") if not p.is_dir()) \
        if output_dir.is_dir() else []
    if not present:
        return
    record = output_dir / EXPORT_RECORD
    if record.is_file():
        written = json.loads(record.read_text()).get("files")
        foreign = [] if written is None else [name for name in present if name not in written]
    else:
        foreign = present
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"{output_dir} holds files an export did not write ({shown}): --overwrite only "
                              "replaces an earlier export. Move them or choose another --output_dir; nothing was "
                              "written.")
