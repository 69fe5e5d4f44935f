"""Load fine-tuned output for inference: a Lightning checkpoint into its module, an adapter onto its base.

Three kinds of fine-tuned output load onto their base model:

- an adapter directory (``hf_model/`` of a LoRA run: ``adapter_config.json`` + weights + tokenizer),
- a Lightning checkpoint (``checkpoints/last.ckpt``): the module is rebuilt from its hyper-parameters and
  the adapter weights loaded, so a run can be tried before it finishes,
- a merged export or a full fine-tune's ``hf_model/`` (an ordinary Hugging Face model directory).

Example::

    model, tokenizer = load_for_generation(adapter="runs/quickstart/lightning_logs/version_0/hf_model")
    print(generate(model, tokenizer, [[{"role": "user", "content": "My parcel never arrived."}]])[0])
"""

from __future__ import annotations

import inspect
import json
import pickle
from pathlib import Path

import torch

from lightning_ft.adapters import QLoRA, adapter_from_dict, check_base_record
from lightning_ft.models import DEFAULT_MODEL, ModelNotFoundError, _load_tokenizer, load_model, load_tokenizer
from lightning_ft.module import FineTuneModule


def load_checkpoint_module(path: str | Path, model_name: str | None = None, plain_lora: bool = False):
    """A :class:`~lightning_ft.module.FineTuneModule` rebuilt from a Lightning checkpoint, weights loaded, in eval mode.

    Args:
        path: A ``.ckpt`` written by ``fit`` (LoRA checkpoints hold only the adapter; the base is reloaded).
        model_name: Overrides the base model spec stored in the checkpoint (e.g. when its path moved).
        plain_lora: Rebuild a QLoRA adapter as plain LoRA on the full-precision base (for merging).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found" if not file.is_dir() else f"{path}: is a directory, "
                                "expected a .ckpt file")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"{path}: not a loadable Lightning checkpoint ({str(error).splitlines()[0]})") from error
    if "hyper_parameters" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not a lightning_ft checkpoint (no hyper_parameters or state_dict)")
    hparams = dict(checkpoint["hyper_parameters"])
    accepted = inspect.signature(FineTuneModule.__init__).parameters
    kwargs = {key: value for key, value in hparams.items() if key in accepted and key != "self"}
    spec = checkpoint.get("lightning_ft", {}).get("adapter")
    adapter = adapter_from_dict(spec) if isinstance(spec, dict) else None
    kwargs["adapter"] = adapter.as_lora() if plain_lora and isinstance(adapter, QLoRA) else adapter
    if model_name is not None:
        kwargs["model_name"] = model_name
    module = FineTuneModule(**kwargs)
    module.configure_model()
    module.on_load_checkpoint(checkpoint)  # checks the base and the adapter's keys
    module.load_state_dict(checkpoint["state_dict"], strict=module.adapter.method == "full")
    return module.eval()


def load_for_generation(model: str | None = None, adapter: str | None = None, checkpoint: str | None = None,
                        merged: str | None = None, dtype: str = "float32", chat_template: str | None = None):
    """Load ``(model, tokenizer)`` in eval mode from a model spec plus at most one fine-tuned output.

    Args:
        model: Base model spec. Defaults to the base recorded with the adapter or checkpoint, else the
            embedded default model.
        adapter: A PEFT adapter directory (or a full fine-tune's ``hf_model/``, loaded as a model).
        checkpoint: A Lightning ``.ckpt`` from ``fit``.
        merged: A complete Hugging Face model directory (e.g. an adapter merged into its base).
        dtype: Weight dtype name.
        chat_template: A Jinja template overriding the tokenizer's.
    """
    if sum(x is not None for x in (adapter, checkpoint, merged)) > 1:
        raise ValueError("Give at most one of adapter, checkpoint, merged.")
    if checkpoint is not None:
        module = load_checkpoint_module(checkpoint, model)
        tokenizer = load_tokenizer(module.hparams.model_name, chat_template or module.hparams.chat_template)
        return module.model.eval(), tokenizer
    if adapter is not None:
        directory = Path(adapter).expanduser()
        if (directory / "adapter_config.json").is_file():
            return _load_adapter(directory, model, dtype, chat_template)
        if not (directory / "config.json").is_file():
            what = "does not exist" if not directory.exists() else "has neither adapter_config.json (a PEFT " \
                                                                  "adapter) nor config.json (a model)"
            raise ModelNotFoundError(f"{adapter}: {what}")
        merged = adapter
    spec = merged or model or DEFAULT_MODEL
    return load_model(spec, dtype=dtype).eval(), load_tokenizer(spec, chat_template)


def _load_adapter(directory: Path, model: str | None, dtype: str, chat_template: str | None):
    from peft import PeftModel

    recorded = json.loads((directory / "adapter_config.json").read_text()).get("base_model_name_or_path")
    spec = model or recorded or DEFAULT_MODEL
    try:
        base = load_model(spec, dtype=dtype)
    except ModelNotFoundError as error:
        raise ModelNotFoundError(f"{error} (the base model of adapter {directory}; pass --model)") from error
    check_base_record(directory, base, spec)
    has_tokenizer = (directory / "tokenizer_config.json").is_file()
    tokenizer = _load_tokenizer(str(directory), chat_template) if has_tokenizer else load_tokenizer(spec, chat_template)
    return PeftModel.from_pretrained(base, directory).eval(), tokenizer
