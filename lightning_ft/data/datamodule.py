"""The LightningDataModule: chat data files -> checked conversations -> labelled examples -> batches."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Literal

import torch
from pytorch_lightning import LightningDataModule
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from lightning_ft.data.collate import (
    MASKING,
    ChatCollator,
    EmptyLabelsError,
    Example,
    count_trained,
    encode_conversation,
    truncate_example,
)
from lightning_ft.data.batching import BatchingChoice, choose_batching
from lightning_ft.data.cache import encoding_key
from lightning_ft.data.cache import load as load_encoded
from lightning_ft.data.cache import save as save_encoded
from lightning_ft.data.checks import enforce, lint_conversations
from lightning_ft.data.sampling import ResumableDataLoader, ResumableSampler
from lightning_ft.data.formats import FORMATS, Conversation, DataError, DataProblem, scan_file
from lightning_ft.models import generation_stop_ids, load_tokenizer

#: The general conversations shipped for replay (200, written for the package).
DEFAULT_REPLAY = str(Path(__file__).resolve().parents[1] / "benchmarks" / "general_chat.jsonl")
_STAT_KEYS = ("conversations", "train_conversations", "val_conversations", "tokens", "trained_tokens",
              "truncated", "trained_tokens_lost", "dropped")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _argument_problems(args: dict[str, Any]) -> list[str]:
    """Every invalid constructor argument, as ``key=value: what is allowed``."""
    checks = {
        "train_path": (args["train_path"] is None or isinstance(args["train_path"], (str, os.PathLike)),
                       "must be a path to a .jsonl or .json file, or None"),
        "val_path": (args["val_path"] is None or isinstance(args["val_path"], (str, os.PathLike)),
                     "must be a path to a .jsonl or .json file, or None"),
        "val_fraction": (isinstance(args["val_fraction"], (int, float)) and not isinstance(args["val_fraction"], bool)
                         and 0.0 <= args["val_fraction"] < 1.0, "must be a number in [0, 1)"),
        "tokenizer": (args["tokenizer"] is None or isinstance(args["tokenizer"], str),
                      "must be a model spec string (hub id, local directory, .gguf file) or None"),
        "chat_template": (args["chat_template"] is None or isinstance(args["chat_template"], str),
                          "must be a Jinja template string or None"),
        "format": (args["format"] in ("auto", *FORMATS), f"must be one of: auto, {', '.join(FORMATS)}"),
        "system_prompt": (args["system_prompt"] is None
                          or (isinstance(args["system_prompt"], str) and bool(args["system_prompt"].strip())),
                          "must be a non-blank string, or None for no default system message"),
        "batch_size": (_is_int(args["batch_size"]) and args["batch_size"] >= 1, "must be an integer >= 1"),
        "max_length": (_is_int(args["max_length"]) and args["max_length"] >= 1, "must be an integer >= 1"),
        "truncation": (args["truncation"] in ("cut", "drop"), "must be one of: cut, drop"),
        "pad_to_multiple_of": (args["pad_to_multiple_of"] is None
                               or (_is_int(args["pad_to_multiple_of"]) and args["pad_to_multiple_of"] >= 1),
                               "must be an integer >= 1, or None"),
        "num_workers": (_is_int(args["num_workers"]) and args["num_workers"] >= 0, "must be an integer >= 0"),
        "seed": (_is_int(args["seed"]), "must be an integer"),
        "checks": (args["checks"] in ("warn", "strict", "off"), "must be one of: warn, strict, off"),
        "packing": (args["packing"] in (True, False, "auto"), "must be true, false or 'auto'"),
        "group_by_length": (args["group_by_length"] in (True, False, "auto"), "must be true, false or 'auto'"),
        "encode_cache": (isinstance(args["encode_cache"], bool), "must be true or false"),
        "replay_path": (args["replay_path"] is None or isinstance(args["replay_path"], (str, os.PathLike)),
                        "must be a chat data file, 'default' (the shipped general conversations), or None"),
        "stop_tokens": (args["stop_tokens"] is None or (isinstance(args["stop_tokens"], (list, tuple)) and all(
            isinstance(t, str) or _is_int(t) for t in args["stop_tokens"])),
            "must be a list of token ids or strings, or None"),
        "masking": (args["masking"] in MASKING, f"must be one of: {', '.join(MASKING)}"),
        "train_reasoning": (isinstance(args["train_reasoning"], bool), "must be true or false"),
        "replay_ratio": (isinstance(args["replay_ratio"], (int, float)) and not isinstance(args["replay_ratio"], bool)
                         and 0.0 <= args["replay_ratio"] < 1.0, "must be a number in [0, 1)"),
    }
    problems = [f"{key}={args[key]!r}: {allowed}" for key, (ok, allowed) in checks.items() if not ok]
    if args["val_path"] is not None and checks["val_fraction"][0] and args["val_fraction"] > 0:
        problems.append(f"val_fraction={args['val_fraction']!r}: must be 0 when val_path is set "
                        "(use a validation file or a split of the training file, not both)")
    if args["replay_path"] is not None and args["replay_ratio"] == 0:
        problems.append(f"replay_path={args['replay_path']!r}: replay_ratio=0 would mix none of it in "
                        "(set replay_ratio, e.g. 0.2, or drop replay_path)")
    return problems


class ChatDataModule(LightningDataModule):
    """Chat fine-tuning data: JSONL/JSON files in any supported format, assistant-only labels, dynamic padding.

    ``prepare_data`` checks every file and raises one :class:`~lightning_ft.data.formats.DataError`
    listing every bad record (file, line, field) before Lightning writes anything. It then runs the
    model-free checks of ``lightning_ft check-data`` (duplicates, train/validation leakage, mixed system
    prompts, odd answer shapes, outlier lengths) and prints their warnings once. ``setup`` tokenises
    everything once, splits off validation data and logs a one-line report; the counts stay in
    :attr:`stats`.

    Args:
        train_path: Training data, ``.jsonl`` (one record per line) or ``.json`` (a list of records).
        val_path: Validation data in the same formats. Leave unset to split ``val_fraction`` off the
            training data instead.
        val_fraction: Share of training conversations held out for validation (seeded) when there is
            no ``val_path``; 0 for no validation.
        tokenizer: Model spec whose tokenizer to use; the CLI links it from the model's ``model_name``.
            Python users may instead assign a tokenizer object to :attr:`tokenizer_obj`.
        chat_template: Jinja template overriding the tokenizer's own.
        format: Record format: ``messages``, ``alpaca``, ``sharegpt``, ``prompt_completion``, or
            ``auto`` to detect it per file.
        system_prompt: System message inserted into conversations that have none.
        batch_size: Conversations per batch.
        max_length: Longest sequence in tokens; see ``truncation``.
        truncation: What to do with longer conversations: ``cut`` keeps the first ``max_length``
            tokens, ``drop`` skips the conversation.
        pad_to_multiple_of: Round each batch's padded length up to a multiple of this.
        packing: Pack each batch's conversations into rows, with position ids restarting per conversation
            and attention kept inside each (no padding compute; the same conversations per step and the same
            loss as padded batches). Rows hold the whole batch when the attention keeps conversations apart
            by itself (flash, flex, or the per-sequence SDPA :class:`~lightning_ft.FineTuneModule` switches
            to), else ``max_length`` tokens each. ``auto`` packs when shuffled padded batches would be more
            than 10% padding and the LightningModule's ``supports_packing()`` says yes (see
            :func:`~lightning_ft.data.batching.choose_batching`); other modules get padded or grouped batches.
        group_by_length: Without packing, batch conversations of similar length together (seeded: sorted
            within windows of 50 batches, then the batches shuffled), so less of each batch is padding.
            ``auto`` groups when batches are not packed and would be more than 10% padding.
        encode_cache: Keep encoded conversations on disk (``$LIGHTNING_FT_CACHE/encoded``), keyed by their
            content, the tokenizer, the chat template, the truncation and labelling settings, so later runs on
            the same data skip tokenising.
        num_workers: DataLoader worker processes.
        seed: Seeds the validation split, the training shuffle and the replay draws.
        replay_path: General conversations mixed into training to keep what the base model knew (replay);
            ``None`` or ``"default"`` is the package's ``general_chat.jsonl`` (200 conversations written for
            it). Used only when ``replay_ratio > 0``.
        replay_ratio: Share of every epoch's training conversations drawn from the replay data, e.g. 0.2
            adds one replay conversation per four task ones (a fresh seeded draw every epoch; the task
            data is all used as before). Validation stays task-only.
        masking: Which tokens are trained: ``assistant`` every assistant reply with its stop marker,
            ``last_assistant`` only the final reply, ``all`` every token (``train_on_inputs``-style). An
            assistant message with ``"train": false`` or ``"weight": 0`` is never trained.
        stop_tokens: Token ids or strings that end a reply, besides the tokenizer's eos. ``None`` reads them
            from the model's ``generation_config.json`` (``eos_token_id``) in the ``tokenizer`` model spec.
        train_reasoning: Train ``<think>`` reasoning inside assistant messages where the chat template renders
            it (templates that strip it from earlier turns leave it out there); ``false`` trains answers only.
        checks: Data checks before training: ``warn`` prints duplicates, leakage and inconsistencies once,
            ``strict`` stops on them like on bad records, ``off`` skips them (bad records always stop a run).

    Example::

        data = ChatDataModule("train.jsonl", val_fraction=0.1, tokenizer="smollm2-135m-instruct")
        trainer.fit(module, datamodule=data)
    """

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        val_fraction: float = 0.0,
        tokenizer: str | None = None,
        chat_template: str | None = None,
        format: Literal["auto", "messages", "alpaca", "sharegpt", "prompt_completion"] = "auto",
        system_prompt: str | None = None,
        batch_size: int = 4,
        max_length: int = 1024,
        truncation: Literal["cut", "drop"] = "cut",
        pad_to_multiple_of: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        checks: Literal["warn", "strict", "off"] = "warn",
        replay_path: str | None = None,
        replay_ratio: float = 0.0,
        packing: bool | Literal["auto"] = "auto",
        group_by_length: bool | Literal["auto"] = "auto",
        encode_cache: bool = True,
        masking: Literal["assistant", "last_assistant", "all"] = "assistant",
        stop_tokens: list[int | str] | None = None,
        train_reasoning: bool = True,
    ) -> None:
        super().__init__()
        args = dict(locals())
        problems = _argument_problems(args)
        if problems:
            raise ValueError("Invalid ChatDataModule arguments:\n  " + "\n  ".join(problems))
        self.train_path = None if train_path is None else str(train_path)
        self.val_path = None if val_path is None else str(val_path)
        self.val_fraction = float(val_fraction)
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.format = format
        self.system_prompt = system_prompt
        self.batch_size = batch_size
        self.max_length = max_length
        self.truncation = truncation
        self.pad_to_multiple_of = pad_to_multiple_of
        self.num_workers = num_workers
        self.seed = seed
        self.checks = checks
        self.replay_path = None if replay_path is None else str(replay_path)
        self.replay_ratio = float(replay_ratio)
        self.packing = packing
        self.group_by_length = group_by_length
        self.encode_cache = encode_cache
        self.masking = masking
        self.stop_tokens = None if stop_tokens is None else list(stop_tokens)
        self.train_reasoning = train_reasoning
        #: A ready tokenizer object; when set it is used instead of loading ``tokenizer``.
        self.tokenizer_obj: Any = None
        #: Counts from :meth:`setup`: conversations, tokens, trained tokens, truncated, dropped.
        self.stats: dict[str, int] = {}
        self.train_examples: list[Example] = []
        self.val_examples: list[Example] = []
        self.replay_examples: list[Example] = []
        self._resume_position: tuple[int, int] | None = None  # (epoch, batches done) from a checkpoint

    def scan(self) -> tuple[dict[str, list[Conversation]], list[DataProblem]]:
        """Read the files without raising on bad records: the good conversations per file and every problem.

        Returns:
            ``{"train": [...], "val": [...]}`` (only the files that are set; see :meth:`split` for the
            validation split) and the problems in file order.
        """
        if self.train_path is None and self.val_path is None:
            raise ValueError("ChatDataModule has no data: set train_path (a .jsonl or .json file).")
        data, problems = {}, []
        for split, path in (("train", self.train_path), ("val", self.val_path)):
            if path is not None:
                data[split], found = scan_file(path, self.format, self.system_prompt)
                problems += found
        return data, problems

    def _read_files(self) -> dict[str, list[Conversation]]:
        data, problems = self.scan()
        if problems:
            raise DataError(problems)
        return data

    def prepare_data(self) -> None:
        """Read, check and encode everything before Lightning creates any log directory.

        One DataError lists every problem, so bad data stops a run before anything is written. On the
        process that runs this hook the encoded data is kept and :meth:`setup` has nothing left to do.
        """
        trainer = getattr(self, "trainer", None)
        self.setup(trainer.state.fn if trainer is not None else None)

    def split(self, data: dict[str, list[Conversation]]) -> tuple[list[Conversation], list[Conversation]]:
        """Training and validation conversations: the files as read, or a seeded ``val_fraction`` split."""
        train, val = data.get("train", []), data.get("val", [])
        if self.val_path is not None or self.val_fraction == 0 or not train:
            return train, val
        held_out = max(1, round(len(train) * self.val_fraction))
        if held_out >= len(train):
            raise ValueError(f"val_fraction={self.val_fraction} of {len(train)} training conversations leaves "
                             "none to train on: lower it or set val_path.")
        order = list(range(len(train)))
        random.Random(self.seed).shuffle(order)
        chosen = set(order[:held_out])
        return ([c for i, c in enumerate(train) if i not in chosen], [c for i, c in enumerate(train) if i in chosen])

    def _load_tokenizer(self) -> Any:
        if self.tokenizer_obj is None:
            if self.tokenizer is None:
                raise ValueError("ChatDataModule needs a tokenizer: set `tokenizer` (a model spec; the CLI links "
                                 "it from the model) or assign a tokenizer object to `datamodule.tokenizer_obj`.")
            self.tokenizer_obj = load_tokenizer(self.tokenizer, self.chat_template)
        if self.chat_template is None and getattr(self.tokenizer_obj, "chat_template", None) is None:
            raise ValueError("The tokenizer has no chat template: set `chat_template` (a Jinja string).")
        return self.tokenizer_obj

    def labelling(self) -> dict[str, Any]:
        """The labelling settings of :func:`~lightning_ft.data.collate.encode_conversation`, stop tokens resolved."""
        if self.stop_tokens is None:
            self.stop_tokens = generation_stop_ids(self.tokenizer) if self.tokenizer is not None else []
        return {"stop_tokens": self.stop_tokens, "masking": self.masking, "train_reasoning": self.train_reasoning}

    def _check(self, train: list[Conversation], val: list[Conversation]) -> None:
        """Model-free data checks: warnings printed once (rank zero), or raised with ``checks="strict"``."""
        if self.checks != "off":
            enforce(lint_conversations({"train": train, "val": val}), self.checks, "lightning_ft check-data")

    def _encode(self, conversations: list[Conversation], tokenizer: Any, stats: dict[str, int],
                errors: list[str]) -> list[Example]:
        """:meth:`_encode_uncached` through the disk cache (entries are written only for error-free encodings)."""
        if not conversations:
            return []
        key = None
        if self.encode_cache:
            key = encoding_key(conversations, tokenizer, self.chat_template, self.max_length, self.truncation,
                               self.labelling())
        hit = load_encoded(key) if key else None
        if hit is not None:
            examples, counts = hit
        else:
            counts, found = dict.fromkeys(_STAT_KEYS, 0), []
            examples = self._encode_uncached(conversations, tokenizer, counts, found)
            errors += found
            if key and not found:
                save_encoded(key, examples, counts)
        for name, value in counts.items():
            stats[name] += value
        return examples

    def _encode_uncached(self, conversations: list[Conversation], tokenizer: Any, stats: dict[str, int],
                         errors: list[str]) -> list[Example]:
        """Tokenise, truncate and count; conversations that train nothing go to ``errors``."""
        examples = []
        for conversation in conversations:
            try:
                example = encode_conversation(conversation.messages, tokenizer, chat_template=self.chat_template,
                                              **self.labelling())
            except EmptyLabelsError as error:
                errors.append(f"{conversation.source}: {error}")
                continue
            except ValueError as error:  # a template problem, the same for every conversation: stop here
                raise ValueError(f"{conversation.source}: {error}") from error
            trained = count_trained(example["labels"])
            kept = truncate_example(example, self.max_length, self.truncation)
            if kept is None:
                stats["dropped"] += 1
                continue
            if kept is not example:
                stats["truncated"] += 1
                stats["trained_tokens_lost"] += trained - count_trained(kept["labels"])
                if not count_trained(kept["labels"]):
                    errors.append(f"{conversation.source}: conversation yields no trained token after truncation "
                                  f"to max_length={self.max_length} (raise max_length, or set truncation='drop' "
                                  "to skip such conversations)")
                    continue
            stats["tokens"] += len(kept["input_ids"])
            stats["trained_tokens"] += count_trained(kept["labels"])
            examples.append(kept)
        return examples

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer, read, split, tokenise and truncate everything once; log a one-line report."""
        if self.stats:
            return  # already encoded for an earlier stage
        files = self._read_files()  # data problems first: they need no tokenizer
        if self.train_path is None and stage in (None, "fit"):
            raise ValueError("ChatDataModule has no training data: set train_path (a .jsonl or .json file).")
        tokenizer = self._load_tokenizer()
        train, val = self.split(files)
        self._check(train, val)
        stats = dict.fromkeys(_STAT_KEYS, 0)
        errors: list[str] = []
        self.train_examples = self._encode(train, tokenizer, stats, errors)
        self.val_examples = self._encode(val, tokenizer, stats, errors)
        self.replay_examples = self._encode_replay(tokenizer, errors)
        if errors:
            raise DataError(errors)
        if train and not self.train_examples:
            raise ValueError(f"Every training conversation is longer than max_length={self.max_length} and "
                             "truncation='drop' dropped them all: raise max_length or use truncation='cut'.")
        stats.update(train_conversations=len(self.train_examples), val_conversations=len(self.val_examples),
                     conversations=len(self.train_examples) + len(self.val_examples))
        stats.update(replay_conversations=len(self.replay_examples), replay_per_epoch=self.replay_per_epoch())
        self.stats = stats
        self._report()

    def replay_file(self) -> str | None:
        """The replay data file in use (the shipped default when ``replay_path`` is unset), or ``None``."""
        if self.replay_ratio == 0:
            return None
        return DEFAULT_REPLAY if self.replay_path in (None, "default") else self.replay_path

    def replay_per_epoch(self) -> int:
        """Replay conversations mixed into each training epoch: ``ratio / (1 - ratio)`` per task conversation."""
        if not self.replay_examples:
            return 0
        return max(1, round(len(self.train_examples) * self.replay_ratio / (1.0 - self.replay_ratio)))

    def _encode_replay(self, tokenizer: Any, errors: list[str]) -> list[Example]:
        """Read and encode the replay pool; every example (task and replay) is marked for the loss logging."""
        path = self.replay_file()
        if path is None:
            return []
        conversations, problems = scan_file(path, self.format, self.system_prompt)
        if problems:
            raise DataError(problems)
        replay_stats = dict.fromkeys(_STAT_KEYS, 0)
        replay = self._encode(conversations, tokenizer, replay_stats, errors)
        if not replay:
            raise ValueError(f"{path}: no replay conversation is left after encoding (max_length={self.max_length})")
        for example in self.train_examples:
            example["replay"] = [0]
        for example in replay:
            example["replay"] = [1]
        return replay

    def _report(self) -> None:
        s = self.stats
        line = (f"Data: {s['train_conversations']} train + {s['val_conversations']} val conversations, "
                f"{s['tokens']:,} tokens ({s['trained_tokens']:,} trained); {s['truncated']} truncated to "
                f"max_length={self.max_length} ({s['trained_tokens_lost']:,} trained tokens lost), "
                f"{s['dropped']} dropped")
        if s["replay_per_epoch"]:
            line += (f"; replay: {s['replay_per_epoch']} of {s['replay_conversations']} general conversations "
                     f"from {self.replay_file()} mixed into each epoch")
        (rank_zero_warn if s["trained_tokens_lost"] or s["dropped"] else rank_zero_info)(line)

    def _pad_token_id(self) -> int:
        tokenizer = self._load_tokenizer()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("The tokenizer has neither a pad nor an EOS token: set tokenizer_obj.pad_token.")
        return pad

    def batching(self) -> BatchingChoice:
        """Padded, length-grouped or packed training batches, chosen from the training lengths by
        :func:`~lightning_ft.data.batching.choose_batching` (asking the trainer's LightningModule whether its
        attention packs natively: ``supports_packing()``)."""
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        lengths = [len(e["input_ids"]) for e in self.train_examples + self.replay_examples]

        def packs_natively() -> bool:
            return bool(hasattr(module, "supports_packing") and module.supports_packing())

        if self.packing is True:
            packs_natively()  # lets the module switch to an attention that packs without a dense mask
        return choose_batching(lengths, self.batch_size, self.packing, self.group_by_length, packs_natively)

    def packs(self) -> bool:
        """Whether batches are packed (see :meth:`batching`)."""
        return self.batching().mode == "packed"

    def _loader(self, examples: list[Example], shuffle: bool, replay: list[Example] | None = None,
                choice: BatchingChoice | None = None) -> DataLoader:
        # Seeded per epoch (seed + epoch): reproducible, different every epoch, and resumable mid-epoch.
        replay = replay or []
        choice = choice or self.batching()
        packed = choice.mode == "packed"
        lengths = [len(e["input_ids"]) for e in examples + replay] if choice.mode == "grouped" else None
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        # One row per batch when the attention keeps packed conversations apart itself; else rows of max_length,
        # as a dense block-diagonal mask costs quadratically in the row length.
        whole_batch = packed and bool(getattr(module, "packs_natively", lambda: False)())
        pack_length = self.max_length * (self.batch_size if whole_batch else 1)
        sampler = ResumableSampler(len(examples), seed=self.seed, shuffle=shuffle, replay_size=len(replay),
                                   replay_per_epoch=self.replay_per_epoch() if replay else 0,
                                   lengths=lengths, batch_size=self.batch_size)
        return ResumableDataLoader(
            examples + replay,
            batch_size=self.batch_size,
            sampler=sampler,
            # Its own generator: creating an iterator must not draw from the global RNG, or a resumed
            # run's dropout masks would drift from the uninterrupted run's.
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=ChatCollator(self._pad_token_id(), self.pad_to_multiple_of,
                                    pack_length=pack_length if packed else None),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; after a mid-epoch resume, only the batches the epoch has left."""
        if not self.train_examples:
            raise ValueError("No training data: set train_path and call setup('fit') first.")
        choice = self.batching()
        rank_zero_info(str(choice))
        loader = self._loader(self.train_examples, shuffle=True, replay=self.replay_examples, choice=choice)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            epoch, done = self._resume_position or (trainer.current_epoch,
                                                    trainer.fit_loop.epoch_loop.batch_progress.current.processed)
            self._resume_position = None
            if 0 < done < len(loader):
                if trainer.world_size > 1:
                    rank_zero_warn("Resuming mid-epoch under a multi-process strategy restarts the epoch's data "
                                   "order from its beginning; single-process runs resume exactly.")
                else:
                    loader.sampler.resume_at(epoch, done * self.batch_size)
        return loader

    def state_dict(self) -> dict[str, int]:
        """Where training stands in the data: the epoch and the batches of it already trained on.

        Saved with every checkpoint because Lightning may build the training loader before it restores its
        loop progress (``configure_optimizers`` reading ``estimated_stepping_batches`` under ``max_epochs``),
        while a datamodule's state is restored first.
        """
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        return {"epoch": trainer.current_epoch, "batches_done": trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if state_dict:
            self._resume_position = (int(state_dict["epoch"]), int(state_dict["batches_done"]))

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in file order, or ``[]`` when there is no validation data."""
        return self._loader(self.val_examples, shuffle=False) if self.val_examples else []

    def test_dataloader(self) -> DataLoader | list:
        """The validation data."""
        return self.val_dataloader()
