"""PreferenceDataModule: preference files -> checked pairs -> encoded chosen/rejected sides -> paired batches."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Literal

import torch
from pytorch_lightning import LightningDataModule
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lightning_ft.data.checks import enforce
from lightning_ft.data.collate import EmptyLabelsError
from lightning_ft.data.formats import DataError, DataProblem
from lightning_ft.data.sampling import ResumableDataLoader, ResumableSampler
from lightning_ft.data.sources import Source
from lightning_ft.models import generation_stop_ids, load_tokenizer
from lightning_ft.preference.checks import lint_pairs
from lightning_ft.preference.data import PairCollator, PreferencePair, encode_pair, scan_pairs


def _as_spec(spec: str | Source | Any) -> str | Source:
    """A Source stays one (its ``subset``/``split``/``columns`` matter); anything else is a path string."""
    return spec if isinstance(spec, Source) else str(spec)


class PreferenceDataModule(LightningDataModule):
    """Preference pairs (``prompt``/``chosen``/``rejected`` or two full conversations) for :class:`PreferenceModule`.

    ``prepare_data`` reads and checks every file and raises one :class:`~lightning_ft.data.formats.DataError`
    listing every bad record (file, line, field); the model-free preference checks of ``lightning_ft preference
    check-data`` (identical sides, duplicates, prompt leakage, length bias) print warnings once. Each batch holds
    ``batch_size`` pairs: their chosen sides, then their rejected sides (:func:`~lightning_ft.preference.collate_pairs`).

    Args:
        train_path: Training pairs: a ``.jsonl`` (one record per line), ``.json`` (a list of records), ``.parquet``,
            ``.csv`` or ``.arrow`` file, a glob of them, a ``Dataset.save_to_disk`` directory or a Hugging Face Hub
            dataset id; or a :class:`~lightning_ft.data.sources.Source` (``path`` plus ``subset``, ``split``,
            ``revision`` and a ``columns`` mapping onto ``prompt``/``chosen``/``rejected``).
        val_path: Validation pairs, from the same kinds of source. Leave unset to split ``val_fraction`` off the
            training pairs.
        val_fraction: Share of training pairs held out for validation (seeded) when there is no ``val_path``.
        tokenizer: Model spec whose tokenizer to use; the CLI links it from the model's ``model_name``.
            Python users may instead assign a tokenizer object to :attr:`tokenizer_obj`.
        chat_template: Jinja template overriding the tokenizer's own.
        system_prompt: System message inserted into prompts that have none.
        batch_size: Pairs per batch (the forward sees twice as many sequences).
        max_length: Longest sequence in tokens; longer sides keep their first ``max_length`` tokens.
        pad_to_multiple_of: Round each batch's padded length up to a multiple of this.
        num_workers: DataLoader worker processes.
        seed: Seeds the validation split and the training shuffle.
        checks: ``warn`` prints data-check warnings once, ``strict`` stops on them, ``off`` skips them.

    Example::

        data = PreferenceDataModule("pairs.jsonl", val_fraction=0.1, tokenizer="smollm2-135m-instruct")
        trainer.fit(PreferenceModule(loss="dpo"), datamodule=data)
    """

    def __init__(
        self,
        train_path: str | Source | None = None,
        val_path: str | Source | None = None,
        val_fraction: float = 0.0,
        tokenizer: str | None = None,
        chat_template: str | None = None,
        system_prompt: str | None = None,
        batch_size: int = 4,
        max_length: int = 1024,
        pad_to_multiple_of: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        checks: Literal["warn", "strict", "off"] = "warn",
    ) -> None:
        super().__init__()
        problems = []
        if not 0.0 <= val_fraction < 1.0:
            problems.append(f"val_fraction={val_fraction!r}: must be a number in [0, 1)")
        if val_path is not None and val_fraction > 0:
            problems.append(f"val_fraction={val_fraction!r}: must be 0 when val_path is set")
        for key, value, low in (("batch_size", batch_size, 1), ("max_length", max_length, 1),
                                ("num_workers", num_workers, 0)):
            if value < low:
                problems.append(f"{key}={value!r}: must be an integer >= {low}")
        for key, spec in (("train_path", train_path), ("val_path", val_path)):
            if isinstance(spec, Source):
                problems += [f"{key}: {problem}" for problem in spec.problems()]
        if checks not in ("warn", "strict", "off"):
            problems.append(f"checks={checks!r}: must be one of: warn, strict, off")
        if problems:
            raise ValueError("Invalid PreferenceDataModule arguments:\n  " + "\n  ".join(problems))
        self.train_path = None if train_path is None else _as_spec(train_path)
        self.val_path = None if val_path is None else _as_spec(val_path)
        self.val_fraction = float(val_fraction)
        self.tokenizer, self.chat_template, self.system_prompt = tokenizer, chat_template, system_prompt
        self.batch_size, self.max_length, self.pad_to_multiple_of = batch_size, max_length, pad_to_multiple_of
        self.num_workers, self.seed, self.checks = num_workers, seed, checks
        #: A ready tokenizer object; when set it is used instead of loading ``tokenizer``.
        self.tokenizer_obj: Any = None
        self.train_examples: list[dict[str, Any]] = []
        self.val_examples: list[dict[str, Any]] = []
        self._reference_state: dict[str, list[list[float]]] = {}
        self._stop_tokens: list[int] | None = None

    # -- reading -------------------------------------------------------------------------------------
    def scan(self) -> tuple[dict[str, list[PreferencePair]], list[DataProblem]]:
        """Read the files without raising on bad records: the good pairs per file and every problem."""
        if self.train_path is None and self.val_path is None:
            raise ValueError("PreferenceDataModule has no data: set train_path (a data file, glob, saved dataset or "
                             "Hub id).")
        data, problems = {}, []
        for split, path in (("train", self.train_path), ("val", self.val_path)):
            if path is not None:
                data[split], found = scan_pairs(path, self.system_prompt)
                problems += found
        return data, problems

    def split(self, data: dict[str, list[PreferencePair]]) -> tuple[list[PreferencePair], list[PreferencePair]]:
        """Training and validation pairs: the files as read, or a seeded ``val_fraction`` split."""
        train, val = data.get("train", []), data.get("val", [])
        if self.val_path is not None or self.val_fraction == 0 or not train:
            return train, val
        held_out = max(1, round(len(train) * self.val_fraction))
        if held_out >= len(train):
            raise ValueError(f"val_fraction={self.val_fraction} of {len(train)} training pairs leaves none to train on")
        order = list(range(len(train)))
        random.Random(self.seed).shuffle(order)
        chosen = set(order[:held_out])
        return [p for i, p in enumerate(train) if i not in chosen], [p for i, p in enumerate(train) if i in chosen]

    def _load_tokenizer(self) -> Any:
        if self.tokenizer_obj is None:
            if self.tokenizer is None:
                raise ValueError("PreferenceDataModule needs a tokenizer: set `tokenizer` (a model spec; the CLI links "
                                 "it from the model) or assign a tokenizer object to `datamodule.tokenizer_obj`.")
            self.tokenizer_obj = load_tokenizer(self.tokenizer, self.chat_template)
        return self.tokenizer_obj

    def _encode(self, pairs: list[PreferencePair], tokenizer: Any, errors: list[str]) -> list[dict[str, Any]]:
        examples = []
        for pair in pairs:
            try:
                examples.append(encode_pair(pair, tokenizer, self.max_length, self.chat_template, self.stop_tokens()))
            except EmptyLabelsError as error:
                errors.append(str(error))
            except ValueError as error:  # a template problem, the same for every pair: stop here
                raise ValueError(f"{pair.source}: {error}") from error
        return examples

    def stop_tokens(self) -> list[int]:
        """The model's end-of-reply token ids (its generation config's eos), learned after every reply."""
        if self._stop_tokens is None:
            self._stop_tokens = generation_stop_ids(self.tokenizer) if self.tokenizer is not None else []
        return self._stop_tokens

    def prepare_data(self) -> None:
        """Read, check and encode everything before Lightning creates any log directory."""
        self.setup()

    def setup(self, stage: str | None = None) -> None:
        """Read, check, split and encode once; log a one-line report."""
        if self.train_examples or self.val_examples:
            return
        data, problems = self.scan()
        if problems:
            raise DataError(problems)
        if self.train_path is None and stage in (None, "fit"):
            raise ValueError("PreferenceDataModule has no training data: set train_path (a data file, glob, saved "
                             "dataset or Hub id).")
        train, val = self.split(data)
        if self.checks != "off":
            enforce(lint_pairs({"train": train, "val": val}), self.checks, "lightning_ft preference check-data")
        tokenizer, errors = self._load_tokenizer(), []
        self.train_examples = self._encode(train, tokenizer, errors)
        self.val_examples = self._encode(val, tokenizer, errors)
        if errors:
            raise DataError(errors)
        self._restore_reference()
        rank_zero_info(f"Preference data: {len(self.train_examples)} train + {len(self.val_examples)} val pairs")

    # -- reference log-probabilities -----------------------------------------------------------------
    def precompute_reference(self, score: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                             device: torch.device) -> None:
        """Store ``score(batch)`` (the reference's summed log-probability per side) on every example, once.

        Kept in :meth:`state_dict`, so a resumed run reuses the values computed from the untrained model.
        """
        for split, examples in (("train", self.train_examples), ("val", self.val_examples)):
            if split in self._reference_state or not examples:
                continue
            values = []
            for start in range(0, len(examples), self.batch_size):
                chunk = [{side: e[side] for side in ("chosen", "rejected")} for e in examples[start:start + self.batch_size]]
                batch = {k: v.to(device) for k, v in self._collator()(chunk).items()}
                logps = score(batch).double().cpu()
                pairs = len(chunk)
                values += [[float(logps[i]), float(logps[pairs + i])] for i in range(pairs)]
            self._reference_state[split] = values
        self._restore_reference()

    def _restore_reference(self) -> None:
        for split, examples in (("train", self.train_examples), ("val", self.val_examples)):
            values = self._reference_state.get(split)
            if values is not None and len(values) == len(examples):
                for example, pair in zip(examples, values):
                    example["ref_logps"] = pair

    def state_dict(self) -> dict[str, Any]:
        return {"reference_logps": self._reference_state} if self._reference_state else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._reference_state = dict(state_dict.get("reference_logps", {}))
        self._restore_reference()

    # -- loaders -------------------------------------------------------------------------------------
    def _collator(self) -> PairCollator:
        tokenizer = self._load_tokenizer()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("The tokenizer has neither a pad nor an EOS token: set tokenizer_obj.pad_token.")
        return PairCollator(pad, self.pad_to_multiple_of)

    def _loader(self, examples: list[dict[str, Any]], shuffle: bool) -> DataLoader:
        # Seeded per epoch (seed + epoch): reproducible, different every epoch, resumable mid-epoch.
        return ResumableDataLoader(examples, batch_size=self.batch_size,
                                   sampler=ResumableSampler(len(examples), seed=self.seed, shuffle=shuffle),
                                   generator=torch.Generator().manual_seed(self.seed), collate_fn=self._collator(),
                                   num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; after a mid-epoch resume, only the batches the epoch has left."""
        if not self.train_examples:
            raise ValueError("No training pairs: set train_path and call setup('fit') first.")
        loader = self._loader(self.train_examples, shuffle=True)
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size == 1:
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            if 0 < done < len(loader):
                loader.sampler.resume_at(trainer.current_epoch, done * self.batch_size)
        return loader

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in file order, or ``[]`` when there is no validation data."""
        return self._loader(self.val_examples, shuffle=False) if self.val_examples else []

    def test_dataloader(self) -> DataLoader | list:
        """The validation data."""
        return self.val_dataloader()
