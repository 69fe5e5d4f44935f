"""The LightningDataModule: data sources -> checked conversations -> labelled examples (Arrow) -> batches."""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pytorch_lightning import LightningDataModule
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from lightning_ft.data.batching import BatchingChoice, choose_batching
from lightning_ft.data.checks import enforce, lint_sources
from lightning_ft.data.collate import MASKING, ChatCollator
from lightning_ft.data.encode import DROPPED, KEPT, NO_LABELS, TEMPLATE_ERROR, encode_dataset
from lightning_ft.data.formats import FORMATS, Conversation, DataError, DataProblem
from lightning_ft.data.lint import ArrowRows, Rows
from lightning_ft.data.mixture import ExampleView, MixtureDataset, SourceTaggingCollator, per_epoch
from lightning_ft.data.padding import pad_token_id
from lightning_ft.data.sampling import ResumableDataLoader, ResumableSampler
from lightning_ft.data.sources import Source, SourceData, as_source, read_source
from lightning_ft.data.stream_batches import Encoding, StreamingBatches, StreamLoader, StreamPosition
from lightning_ft.data.streaming import training_streams
from lightning_ft.models import generation_stop_ids, load_tokenizer

#: The general conversations shipped for replay (200, written for the package).
DEFAULT_REPLAY = str(Path(__file__).resolve().parents[1] / "benchmarks" / "general_chat.jsonl")
_STAT_KEYS = ("conversations", "train_conversations", "val_conversations", "tokens", "trained_tokens",
              "truncated", "trained_tokens_lost", "dropped")


def _joined(parts: list[ExampleView]) -> ExampleView:
    """One view over several sources' examples, in order (Arrow tables concatenated, nothing copied)."""
    import datasets

    present = [part.dataset for part in parts if part.dataset is not None]
    if len(present) < 2:
        return ExampleView(present[0] if present else None)
    return ExampleView(datasets.concatenate_datasets(present))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _argument_problems(args: dict[str, Any]) -> list[str]:
    """Every invalid constructor argument, as ``key=value: what is allowed``."""
    checks = {
        "train_path": (args["train_path"] is None or isinstance(args["train_path"], (str, os.PathLike)),
                       "must be a data file (.jsonl, .json, .parquet, .csv, .arrow), a glob, a saved dataset "
                       "directory or a Hub id, or None"),
        "val_path": (args["val_path"] is None or isinstance(args["val_path"], (str, os.PathLike)),
                     "must be a data file (.jsonl, .json, .parquet, .csv, .arrow), a glob, a saved dataset "
                     "directory or a Hub id, or None"),
        "sources": (args["sources"] is None or (isinstance(args["sources"], (list, tuple)) and all(
            isinstance(s, (Source, str, os.PathLike)) for s in args["sources"])), "must be a list of sources"),
        "num_proc": (args["num_proc"] is None or (_is_int(args["num_proc"]) and args["num_proc"] >= 1),
                     "must be an integer >= 1, or None"),
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
        "packs_natively": (args["packs_natively"] in (True, False, None), "must be true, false or None"),
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
        "streaming": (isinstance(args["streaming"], bool), "must be true or false"),
        "shuffle_buffer": (_is_int(args["shuffle_buffer"]) and args["shuffle_buffer"] >= 1, "must be an integer >= 1"),
    }
    problems = [f"{key}={args[key]!r}: {allowed}" for key, (ok, allowed) in checks.items() if not ok]
    if checks["sources"][0] and args["sources"]:
        problems += [f"sources: {p}" for s in args["sources"] for p in as_source(s).problems()]
        if args["train_path"] is not None:
            problems.append(f"train_path={args['train_path']!r}: set train_path or sources, not both")
    if args["val_path"] is not None and checks["val_fraction"][0] and args["val_fraction"] > 0:
        problems.append(f"val_fraction={args['val_fraction']!r}: must be 0 when val_path is set "
                        "(use a validation file or a split of the training file, not both)")
    if args["streaming"] is True:
        problems += _streaming_problems(args)
    if args["replay_path"] is not None and args["replay_ratio"] == 0:
        problems.append(f"replay_path={args['replay_path']!r}: replay_ratio=0 would mix none of it in "
                        "(set replay_ratio, e.g. 0.2, or drop replay_path)")
    return problems


def _streaming_problems(args: dict[str, Any]) -> list[str]:
    """Settings a stream cannot honour: it has no size to hold a fraction out of or to count examples in."""
    problems = []
    if isinstance(args["val_fraction"], (int, float)) and args["val_fraction"] > 0:
        problems.append(f"val_fraction={args['val_fraction']!r}: a stream has no size to hold a share out of; "
                        "with streaming: true set val_path (read whole) or val_fraction: 0")
    counted = [as_source(s).path for s in args["sources"] or [] if isinstance(s, Source) and s.count is not None]
    if counted:
        problems.append(f"sources: {counted[0]}: count needs the source's size; with streaming: true give it a weight")
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
        train_path: Training data: a ``.jsonl`` (one record per line), ``.json`` (a list of records),
            ``.parquet``, ``.csv`` or ``.arrow`` file, a glob of them, a ``Dataset.save_to_disk`` directory or a
            Hugging Face Hub dataset id. Shorthand for ``sources`` with one source.
        val_path: Validation data from any of the same kinds of source. Leave unset to split ``val_fraction``
            off the training data instead.
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
            loss as padded batches). Rows hold the whole batch when ``packs_natively``, else ``max_length``
            tokens each. ``auto`` packs when shuffled padded batches would be more than 10% padding and
            ``packs_natively`` is true (see :func:`~lightning_ft.data.batching.choose_batching`); otherwise
            batches are padded or grouped.
        group_by_length: Without packing, batch conversations of similar length together (seeded: sorted
            within windows of 50 batches, then the batches shuffled), so less of each batch is padding.
            ``auto`` groups when batches are not packed and would be more than 10% padding.
        packs_natively: Whether the model's attention keeps conversations packed into one row apart by itself
            (flash attention, flex attention, or the per-sequence SDPA :class:`~lightning_ft.FineTuneModule`
            switches to), without a dense block-diagonal mask. The CLI links it from the model's
            :meth:`~lightning_ft.FineTuneModule.packs_natively`; in Python pass ``module.packs_natively()``.
            ``None`` (not known) counts as false, and the batching line says so when it kept batches unpacked.
        encode_cache: Keep encoded conversations on disk as Arrow (``$LIGHTNING_FT_CACHE/encoded``), keyed by
            their content, the tokenizer, the chat template, the truncation and labelling settings, so later
            runs on the same data skip tokenising; an entry is checked (rows, lengths, token checksum) before use.
            The data checks' findings are kept too (``$LIGHTNING_FT_CACHE/checks``), keyed by the conversations'
            content and locations, so a later run on the same data reads them back instead of checking again.
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
        sources: Training sources of a mixture (instead of ``train_path``), each a
            :class:`~lightning_ft.data.sources.Source` with a ``weight`` or ``count`` (or neither: used whole),
            a name, a subset/split/revision for Hub data and a column mapping. ``val_fraction`` holds out that
            share of every source. Each source's share of the examples trained on is logged as
            ``train/source_share/<name>``.
        num_proc: Worker processes that read and tokenise large sources (``None``: one process).
        streaming: Read the training sources as streams (larger than disk or memory): records are converted and
            tokenised as batches are drawn (by the ``num_workers`` DataLoader workers, each its own share), after
            a seeded ``shuffle_buffer``; sources are mixed by weight (a source without one weighs 1, ``count`` is
            refused) with replay at ``replay_ratio`` of the draws; packing and length grouping work on each batch
            and windows of 50 batches. Needs ``trainer.max_steps``; validation comes from ``val_path`` (read
            whole). Resume is exact: the stream is re-created and the consumed records skipped without
            tokenising them. A bad record stops the run when it is reached (source and row named), rather
            than all bad records being listed before training; run ``lightning_ft check-data`` for that.
        shuffle_buffer: Records each streamed source holds for its seeded shuffle (memory grows with it).

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
        sources: list[Source] | None = None,
        num_proc: int | None = None,
        streaming: bool = False,
        shuffle_buffer: int = 10_000,
        packs_natively: bool | None = None,
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
        self.packs_natively = packs_natively
        self.encode_cache = encode_cache
        self.masking = masking
        self.stop_tokens = None if stop_tokens is None else list(stop_tokens)
        self.train_reasoning = train_reasoning
        self.sources = None if sources is None else [as_source(source) for source in sources]
        self.num_proc = num_proc
        self.streaming = streaming
        self.shuffle_buffer = shuffle_buffer
        #: A ready tokenizer object; when set it is used instead of loading ``tokenizer``.
        self.tokenizer_obj: Any = None
        #: Counts from :meth:`setup`: conversations, tokens, trained tokens, truncated, dropped.
        self.stats: dict[str, int] = {}
        #: The encoded training, validation and replay examples: sequences of ``{"input_ids", "labels"}`` read
        #: from memory-mapped Arrow data.
        self.train_examples = ExampleView()
        self.val_examples = ExampleView()
        self.replay_examples = ExampleView()
        self._sources_read: dict[str, Any] | None = None
        self._mixture: list[tuple[str, ExampleView, int | None, bool]] = []
        self._replay_per_epoch = 0
        self._source_counts = torch.zeros(0, dtype=torch.long)
        self._resume_position: tuple[int, int] | None = None  # (epoch, batches done) from a checkpoint
        self._stream: StreamingBatches | None = None  # streaming: the training batches, and where they stand
        self._stream_next = StreamPosition()
        self._stream_consumed = torch.zeros(0, dtype=torch.long)
        self._sample_lengths: list[int] = []

    def training_sources(self) -> list[Source]:
        """The training sources: ``sources``, or ``train_path`` as one source (replay not included)."""
        if self.sources:
            return [as_source(source) for source in self.sources]
        return [Source(self.train_path)] if self.train_path is not None else []

    def _read(self) -> dict[str, Any]:
        """Every source read into Arrow once: ``{"train": [SourceData...], "val": SourceData | None}``."""
        if self._sources_read is None:
            if not self.training_sources() and self.val_path is None:
                raise ValueError("ChatDataModule has no data: set train_path (a data file, glob, saved dataset or "
                                 "Hub id) or sources.")
            read = partial(read_source, format=self.format, system_prompt=self.system_prompt, num_proc=self.num_proc)
            self._sources_read = {"train": [read(source) for source in self.training_sources()],
                                  "val": read(self.val_path) if self.val_path is not None else None}
        return self._sources_read

    def scan(self) -> tuple[dict[str, list[Conversation]], list[DataProblem]]:
        """Read the sources without raising on bad records: the good conversations and every problem.

        Returns:
            ``{"train": [...], "val": [...]}`` (every training source, then the validation source, where set;
            see :meth:`split` for the validation split) and the problems in source order.
        """
        read = self._read()
        parts = [("train", part) for part in read["train"]] + ([("val", read["val"])] if read["val"] else [])
        data: dict[str, list[Conversation]] = {}
        for split, part in parts:
            data.setdefault(split, []).extend(part.conversations())
        return data, [problem for _, part in parts for problem in part.problems]

    def scan_rows(self) -> tuple[Rows, Rows, list[DataProblem]]:
        """:meth:`scan` and :meth:`split` as ``fit`` splits, streamed: the training and validation conversations as
        :class:`~lightning_ft.data.lint.ArrowRows` (read from Arrow a batch at a time) and every problem."""
        problems = [problem for part in self._parts_read() for problem in part.problems]
        train, val = self._split_sources()
        return ArrowRows(train), ArrowRows(val), problems

    def prepare_data(self) -> None:
        """Read, check and encode everything before Lightning creates any log directory.

        One DataError lists every problem, so bad data stops a run before anything is written. On the
        process that runs this hook the encoded data is kept and :meth:`setup` has nothing left to do.
        """
        trainer = getattr(self, "trainer", None)
        self.setup(trainer.state.fn if trainer is not None else None)

    def _held_out(self, size: int, seed: int) -> set[int]:
        """The seeded ``val_fraction`` of ``size`` conversations held out for validation."""
        if self.val_path is not None or self.val_fraction == 0 or not size:
            return set()
        held_out = max(1, round(size * self.val_fraction))
        if held_out >= size:
            raise ValueError(f"val_fraction={self.val_fraction} of {size} training conversations leaves "
                             "none to train on: lower it or set val_path.")
        order = list(range(size))
        random.Random(seed).shuffle(order)
        return set(order[:held_out])

    def split(self, data: dict[str, list[Conversation]]) -> tuple[list[Conversation], list[Conversation]]:
        """Training and validation conversations: the files as read, or a seeded ``val_fraction`` split."""
        train, val = data.get("train", []), data.get("val", [])
        chosen = self._held_out(len(train), self.seed)
        if not chosen:
            return train, val
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

    def _check(self, results: Any) -> None:
        """Report the model-free data checks' ``results``: warnings printed once (rank zero), or raised with
        ``checks="strict"``."""
        enforce(results, self.checks, "lightning_ft check-data")

    def _encode(self, part: SourceData, conversations: Any, tokenizer: Any, stats: dict[str, int],
                errors: list[str]) -> ExampleView:
        """Encode (or fetch from the cache) one source's conversations; counts into ``stats``, bad rows into
        ``errors``; a template that cannot render stops at once."""
        if conversations is None or not len(conversations):
            return ExampleView()
        started = time.perf_counter()
        encoded = encode_dataset(conversations, tokenizer, self.chat_template, self.max_length, self.truncation,
                                 self.labelling(), self.num_proc, self.encode_cache,
                                 f"Tokenising {part.source.display_name()}")
        table = encoded.data
        column = {name: table.column(name).to_numpy(zero_copy_only=False)
                  for name in ("status", "length", "trained", "lost", "truncated")}
        kept = column["status"] == KEPT
        stats["tokens"] += int(column["length"][kept].sum())
        stats["trained_tokens"] += int(column["trained"][kept].sum())
        stats["truncated"] += int(column["truncated"].sum())
        stats["trained_tokens_lost"] += int(column["lost"].sum())
        stats["dropped"] += int((column["status"] == DROPPED).sum())
        failed = np.flatnonzero((column["status"] == NO_LABELS) | (column["status"] == TEMPLATE_ERROR))
        for row in encoded.select(failed).select_columns(["status", "error", "row", "part"]):
            message = f"{part.location(row['part'], row['row'])}: {row['error']}"
            if row["status"] == TEMPLATE_ERROR:
                raise ValueError(message)
            errors.append(message)
        rank_zero_info(f"Encoded {len(encoded):,} conversations of {part.source.label} in "
                       f"{time.perf_counter() - started:.1f}s")
        return ExampleView(encoded.select(np.flatnonzero(kept)).select_columns(["input_ids", "labels", "length"]))

    def _split_sources(self) -> tuple[list[tuple[SourceData, Any]], list[tuple[SourceData, Any]]]:
        """``(source, conversations)`` for training and for validation (a file, or held out of every source)."""
        read = self._read()
        train, val = [], []
        for number, part in enumerate(read["train"]):
            if part.dataset is None:
                continue
            chosen = self._held_out(len(part.dataset), self.seed + number)
            if chosen:
                val.append((part, part.dataset.select(sorted(chosen))))
                part_train = part.dataset.select([i for i in range(len(part.dataset)) if i not in chosen])
            else:
                part_train = part.dataset
            train.append((part, part_train))
        if read["val"] is not None and read["val"].dataset is not None:
            val.append((read["val"], read["val"].dataset))
        return train, val

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer, read, split, tokenise and truncate everything once; log a one-line report."""
        if self.stats:
            return  # already encoded for an earlier stage
        if self.streaming:
            return self._setup_stream(stage)
        problems = [problem for part in self._parts_read() for problem in part.problems]
        if problems:
            raise DataError(problems)  # data problems first: they need no tokenizer
        if not self.training_sources() and stage in (None, "fit"):
            raise ValueError("ChatDataModule has no training data: set train_path (a data file, glob, saved "
                             "dataset or Hub id) or sources.")
        tokenizer = self._load_tokenizer()
        train, val = self._split_sources()
        stats = dict.fromkeys(_STAT_KEYS, 0)
        errors: list[str] = []
        beside_workers = bool(self.num_proc and self.num_proc > 1)
        with ThreadPoolExecutor(1) as pool:
            # The checks stream from Arrow (no Python object per conversation). With tokenising workers they run
            # in a thread of this process, which otherwise waits for the workers, reported once those are done
            # (the workers' progress bar is the stage's); alone, they print their own progress lines.
            lint = None if self.checks == "off" else pool.submit(
                lint_sources, {"train": train, "val": val}, self.encode_cache, not beside_workers)
            if lint is not None and not beside_workers:
                self._check(lint.result())
            trained = [self._encode(part, ds, tokenizer, stats, errors) for part, ds in train]
            val_parts = [self._encode(part, ds, tokenizer, stats, errors) for part, ds in val]
            self.replay_examples = self._encode_replay(tokenizer, errors)
            if lint is not None and beside_workers:
                self._check(lint.result())
        if errors:
            raise DataError(errors)
        self._mix([part.source for part, _ in train], trained)
        self.val_examples = _joined(val_parts)
        if train and not len(self.train_examples):
            raise ValueError(f"Every training conversation is longer than max_length={self.max_length} and "
                             "truncation='drop' dropped them all: raise max_length or use truncation='cut'.")
        stats.update(train_conversations=len(self.train_examples), val_conversations=len(self.val_examples),
                     conversations=len(self.train_examples) + len(self.val_examples))
        stats.update(replay_conversations=len(self.replay_examples), replay_per_epoch=self.replay_per_epoch())
        self.stats = stats
        self._report()

    def _setup_stream(self, stage: str | None) -> None:
        """Streaming: open every source (formats detected from the first records), encode a sample to choose the
        batching from and to catch bad data early, and read the validation file whole."""
        trainer = getattr(self, "trainer", None)
        if stage in (None, "fit") and trainer is not None and (trainer.max_steps is None or trainer.max_steps < 0):
            raise ValueError("data.streaming: true needs trainer.max_steps: a stream has no length to plan the "
                             "learning-rate schedule from (set e.g. --trainer.max_steps 1000)")
        interval = getattr(trainer, "val_check_interval", 1.0)
        if stage in (None, "fit") and isinstance(interval, float) and interval != 1.0:
            raise ValueError(f"data.streaming: true needs trainer.val_check_interval as a number of batches (e.g. 200), "
                             f"not a share ({interval}) of an epoch whose length a stream does not know")
        if not self.training_sources():
            raise ValueError("ChatDataModule has no training data: set train_path or sources.")
        tokenizer = self._load_tokenizer()
        streams, weights, replay = training_streams(self.training_sources(), self.replay_file(), self.replay_ratio,
                                                    self.format, self.shuffle_buffer, self.seed)
        encoding = Encoding(tokenizer, self.chat_template, self.max_length, self.truncation, self.labelling(),
                            self.system_prompt)
        self._stream = StreamingBatches(streams, weights, replay, encoding, self.batch_size, seed=self.seed)
        sample = self._stream.sample(self.batch_size * 50)
        self._sample_lengths = [len(example["input_ids"]) for example in sample]
        self._mixture = [(s.source.display_name(), ExampleView(), None, r) for s, r in zip(streams, replay)]
        stats = dict.fromkeys(_STAT_KEYS, 0)
        errors: list[str] = []
        if self.val_path is not None:
            part = read_source(self.val_path, self.format, self.system_prompt, self.num_proc)
            if part.problems:
                raise DataError(part.problems)
            self.val_examples = self._encode(part, part.dataset, tokenizer, stats, errors)
        if errors:
            raise DataError(errors)
        self.stats = {"streaming": 1, "val_conversations": len(self.val_examples), "sample_conversations": len(sample),
                      "sample_tokens": sum(self._sample_lengths)}
        rank_zero_info(f"Data: streaming {', '.join(name for name, *_ in self._mixture)}"
                       f"{f' (weights {weights})' if weights else ''}; the first {len(sample)} conversations hold "
                       f"{sum(self._sample_lengths):,} tokens; {len(self.val_examples)} val conversations")

    def _parts_read(self) -> list[SourceData]:
        read = self._read()
        return read["train"] + ([read["val"]] if read["val"] is not None else [])

    def _mix(self, sources: list[Source], parts: list[ExampleView]) -> None:
        """The training mixture: sources used whole first, then the drawn ones (replay first among them)."""
        self.train_examples = _joined(parts)
        plan = per_epoch(sources, [len(part) for part in parts])
        names = [source.display_name() for source in sources]
        whole = [i for i, n in enumerate(plan) if n is None]
        drawn = [i for i, n in enumerate(plan) if n is not None]
        self._mixture = [(names[i], parts[i], None, False) for i in whole]
        if self.replay_examples:
            task = sum(len(part) if n is None else n for part, n in zip(parts, plan))
            self._replay_per_epoch = max(1, round(task * self.replay_ratio / (1.0 - self.replay_ratio)))
            self._mixture.append(("replay", self.replay_examples, self._replay_per_epoch, True))
        self._mixture += [(names[i], parts[i], plan[i], False) for i in drawn]
        empty = [names[i] for i in drawn if not len(parts[i])]
        if empty:
            raise ValueError(f"Source {empty[0]!r} has no example left after encoding: nothing to draw from")

    def replay_file(self) -> str | None:
        """The replay data file in use (the shipped default when ``replay_path`` is unset), or ``None``."""
        if self.replay_ratio == 0:
            return None
        return DEFAULT_REPLAY if self.replay_path in (None, "default") else self.replay_path

    def replay_per_epoch(self) -> int:
        """Replay conversations mixed into each training epoch: ``ratio / (1 - ratio)`` per task conversation."""
        return self._replay_per_epoch if self.replay_examples else 0

    def _encode_replay(self, tokenizer: Any, errors: list[str]) -> ExampleView:
        """Read and encode the replay pool (shorthand for a mixture source drawn at ``replay_ratio``)."""
        path = self.replay_file()
        if path is None:
            return ExampleView()
        part = read_source(Source(path, name="replay"), self.format, self.system_prompt, self.num_proc)
        if part.problems:
            raise DataError(part.problems)
        replay_stats = dict.fromkeys(_STAT_KEYS, 0)
        replay = self._encode(part, part.dataset, tokenizer, replay_stats, errors)
        if not len(replay):
            raise ValueError(f"{path}: no replay conversation is left after encoding (max_length={self.max_length})")
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

    def batching(self) -> BatchingChoice:
        """Padded, length-grouped or packed training batches, chosen from the training lengths by
        :func:`~lightning_ft.data.batching.choose_batching`, given ``packs_natively``."""
        lengths = self._sample_lengths if self.streaming else [  # from Arrow, no rows read
            n for _, part, _, _ in self._mixture for n in part.lengths()]
        return choose_batching(lengths, self.batch_size, self.packing, self.group_by_length, self.packs_natively)

    def packs(self) -> bool:
        """Whether batches are packed (see :meth:`batching`)."""
        return self.batching().mode == "packed"

    def _collator(self, choice: BatchingChoice) -> ChatCollator:
        packed = choice.mode == "packed"
        # One row per batch when the attention keeps packed conversations apart itself; else rows of max_length,
        # as a dense block-diagonal mask costs quadratically in the row length.
        whole_batch = packed and bool(self.packs_natively)
        pack_length = self.max_length * (self.batch_size if whole_batch else 1)
        return ChatCollator(pad_token_id(self._load_tokenizer()), self.pad_to_multiple_of,
                            pack_length=pack_length if packed else None)

    def _loader(self, dataset: MixtureDataset, sampler: ResumableSampler, choice: BatchingChoice) -> DataLoader:
        collate = self._collator(choice)
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            # Its own generator: creating an iterator must not draw from the global RNG, or a resumed
            # run's dropout masks would drift from the uninterrupted run's.
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=SourceTaggingCollator(collate) if len(dataset.parts) > 1 else collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _stream_loader(self) -> DataLoader:
        """Streamed training batches for this rank; after a resume, from the batch after the last one trained."""
        choice = self.batching()
        rank_zero_info(f"{choice} (from the first {len(self._sample_lengths)} streamed conversations)")
        trainer = getattr(self, "trainer", None)
        stream = self._stream
        stream.collate_fn, stream.grouped = self._collator(choice), choice.mode == "grouped"
        stream.rank, stream.world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        stream.resume = self._stream_next if self._stream_next != StreamPosition() else None
        return StreamLoader(stream, lambda: trainer.current_epoch if trainer is not None else 0, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; after a mid-epoch resume, only the batches the epoch has left."""
        if self.streaming:
            return self._stream_loader()
        if not self.train_examples:
            raise ValueError("No training data: set train_path and call setup('fit') first.")
        choice = self.batching()
        rank_zero_info(str(choice))
        # Seeded per epoch (seed + epoch): reproducible, different every epoch, and resumable mid-epoch.
        dataset = MixtureDataset([part for _, part, _, _ in self._mixture],
                                 replay=[replay for _, _, _, replay in self._mixture])
        whole = sum(len(part) for _, part, n, _ in self._mixture if n is None)
        pools = [(len(part), n) for _, part, n, _ in self._mixture if n is not None]
        lengths = dataset.lengths() if choice.mode == "grouped" else None
        sampler = ResumableSampler(whole, seed=self.seed, shuffle=True, pools=pools, lengths=lengths,
                                   batch_size=self.batch_size)
        loader = self._loader(dataset, sampler, choice)
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

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Take the mixture's ``source_ids`` off the batch and log each source's share of the examples seen
        (``train/source_share/<name>``, over the last ``log_every_n_steps`` batches)."""
        sources = batch.pop("source_ids", None) if isinstance(batch, dict) else None
        position = batch.pop("stream_position", None) if isinstance(batch, dict) else None
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.training:
            return batch
        if position is not None:  # the batch after this one is where a checkpoint taken now resumes
            epoch, unit, number = (int(v) for v in position)
            self._stream_next = StreamPosition(epoch, unit, number + 1)
            if len(self._stream_consumed) != len(self._mixture):
                self._stream_consumed = torch.zeros(len(self._mixture), dtype=torch.long)
            self._stream_consumed += torch.bincount(sources, minlength=len(self._mixture))[: len(self._mixture)]
        if sources is None:
            return batch
        if len(self._source_counts) != len(self._mixture):
            self._source_counts = torch.zeros(len(self._mixture), dtype=torch.long)
        self._source_counts += torch.bincount(sources, minlength=len(self._mixture))[: len(self._mixture)]
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0 and trainer.loggers:
            shares = self._source_counts / self._source_counts.sum().clamp(min=1)
            metrics = {f"train/source_share/{name}": float(share) for (name, *_), share in zip(self._mixture, shares)}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            self._source_counts.zero_()
        return batch

    def state_dict(self) -> dict[str, int]:
        """Where training stands in the data: the epoch and the batches of it already trained on.

        Saved with every checkpoint because Lightning may build the training loader before it restores its
        loop progress (``configure_optimizers`` reading ``estimated_stepping_batches`` under ``max_epochs``),
        while a datamodule's state is restored first.
        """
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        if self.streaming:  # the next batch's place in the stream, and the examples trained on per source
            return {"stream_epoch": self._stream_next.epoch, "stream_unit": self._stream_next.unit,
                    "stream_batch": self._stream_next.batch, "examples_per_source": self._stream_consumed.tolist()}
        return {"epoch": trainer.current_epoch, "batches_done": trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "stream_epoch" in state_dict:
            self._stream_next = StreamPosition(int(state_dict["stream_epoch"]), int(state_dict["stream_unit"]),
                                               int(state_dict["stream_batch"]))
            self._stream_consumed = torch.tensor(state_dict["examples_per_source"], dtype=torch.long)
            if self._stream is not None:  # a loader built before the restore resumes too
                self._stream.resume = self._stream_next
        elif state_dict:
            self._resume_position = (int(state_dict["epoch"]), int(state_dict["batches_done"]))

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in file order, or ``[]`` when there is no validation data."""
        if not self.val_examples:
            return []
        return self._loader(MixtureDataset([self.val_examples]),
                            ResumableSampler(len(self.val_examples), seed=self.seed, shuffle=False), self.batching())

    def test_dataloader(self) -> DataLoader | list:
        """The validation data."""
        return self.val_dataloader()
