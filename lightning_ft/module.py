"""The LightningModule: a Hugging Face causal LM, an adapter, token-weighted losses and a low-LR schedule."""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from peft import PeftConfig

from lightning_ft.atomic import atomic_directory, refuse_non_finite
from lightning_ft.adapters import (FullFineTune, LoRA, PeftAdapter, QLoRA, base_model_of, has_adapters,
                                   write_base_record)
from lightning_ft.callbacks.nonfinite import NonFiniteGuard
from lightning_ft.checkpoint_io import use_atomic_checkpoints
from lightning_ft.attention import PER_SEQUENCE_SDPA, native_packing_attention, register
from lightning_ft.losses import chunk_kl, chunked_sum, kl_penalty_sum, linear_cross_entropy, packing_is_exact
from lightning_ft.models import (DEFAULT_MODEL, base_fingerprint, decoder_layers, enable_checkpointing, load_config,
                                 load_model, load_tokenizer, unwrap_peft)
from lightning_ft.optim import (ADAMW_SETTINGS, SCHEDULE_SETTINGS, build_optimizer, build_scheduler, param_groups,
                                settings_problems)
from lightning_ft.schedules import DecayName

IGNORE_INDEX = -100
#: Peak learning rates that work for each method, and the level above which forgetting is likely.
DEFAULT_LR = {"lora": 2e-4, "peft": 2e-4, "full": 1e-5}
DESTRUCTIVE_LR = {"lora": 1e-3, "peft": 1e-2, "full": 1e-4}
#: Constructor arguments kept out of ``hparams`` (see ``__init__``).
HPARAMS_IGNORED = ["adapter", "optimizer", "lr_scheduler"]


def _real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Bool mask of real (non-pad) tokens: padded batches carry an attention mask, packed ones a token mask."""
    mask = batch.get("attention_mask", batch.get("token_mask"))
    return torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()


class FineTuneModule(pl.LightningModule):
    """Fine-tune a causal language model with LoRA (default) or in full.

    The model is loaded in :meth:`configure_model`, so building the module is instant and sharded
    strategies (FSDP, DeepSpeed) can initialise it in place.

    Example::

        module = FineTuneModule("smollm2-135m-instruct", adapter=LoRA(r=8))
        data = ChatDataModule("examples/triage/train.jsonl", tokenizer="smollm2-135m-instruct",
                              packs_natively=module.packs_natively())
        pl.Trainer(max_steps=20).fit(module, data)

    Args:
        model_name: Model spec: ``"smollm2-135m-instruct"`` (the embedded default), a ``.gguf`` file, a local
            Hugging Face directory, or a hub id.
        adapter: What trains: ``LoRA(...)``, ``QLoRA(...)``, ``FullFineTune(...)``, or any ``peft`` config
            (e.g. ``peft.IA3Config``), passed through unchanged. ``None`` means ``LoRA()``.
        learning_rate: Peak learning rate. ``None`` picks the method's default (LoRA 2e-4, full 1e-5).
        weight_decay: Weight decay for weight matrices (never applied to norms and biases).
        betas: AdamW betas (the default optimizer's; with ``optimizer`` set, give them in its ``init_args``).
        warmup_ratio: Fraction of the run spent in linear warmup (ignored when ``warmup_steps`` is set).
        warmup_steps: Explicit warmup steps.
        decay: Shape after warmup: cosine, linear or constant.
        min_lr_ratio: Floor of the decay as a fraction of the peak learning rate.
        chat_template: A Jinja chat template replacing the tokenizer's own (keep it equal to the data's).
        dtype: Dtype the weights are loaded in; mixed precision is the Trainer's ``precision``.
        attn_implementation: The model's attention kernel (``from_pretrained``'s ``attn_implementation``):
            ``None`` lets transformers choose (SDPA, which this module runs per packed conversation when
            :meth:`packs_natively`); ``flash_attention_2`` on GPUs with ``flash-attn`` installed packs natively too.
        gradient_checkpointing: Recompute activations in the backward pass to save memory: ``True`` for every
            decoder layer, or the fraction of layers to checkpoint, spread evenly (``0.5``: every other
            layer). Each checkpointed layer frees its saved activations and costs one more forward of that
            layer, so a fraction trades memory for speed in between ``False`` and ``True``. ``"auto"``:
            0.9 under mixed precision (bf16/fp16 matmuls are cheap to repeat), 0.6 in full precision, where the
            repeated matmuls dominate the step (README, Speed).
        trained_logits_only: Compute the output head and loss only at trained positions (same loss and
            gradients, less compute and memory); ``False`` uses the model's full logits.
        logits_chunk_size: Trained positions per chunk of head + loss (256: each chunk's logits and their
            gradient, 2 x 256 x vocabulary floats, live on top of the forward's peak of saved activations).
        kl_beta: Weight of a KL(base || current) penalty, the mean over every real position of the batch
            (prompts included), added to the per-token loss to hold the model near what the base model would
            say (0 turns it off). For LoRA and other adapters the base is the same model with the adapter
            disabled (one extra forward pass, no copy); full fine-tuning keeps a frozen copy of the base
            model in memory. Logged as ``train/kl``.
        compile: Compile each decoder layer with ``torch.compile`` (in place: checkpoints and exports are
            unchanged). Faster steps once compiled; the first steps (and each new sequence length until
            shapes turn dynamic) pay the compilation, so it is off by default.
        optimizer: The optimizer class, e.g. ``torch.optim.SGD`` or ``bitsandbytes.optim.AdamW8bit`` (in YAML
            ``class_path`` and ``init_args``); ``None`` is AdamW with ``betas``. It receives two parameter
            groups carrying ``learning_rate`` and ``weight_decay`` (none for norms and biases): set those
            here, not in its ``init_args``.
        lr_scheduler: A scheduler class stepped every optimizer step, e.g.
            ``torch.optim.lr_scheduler.ConstantLR``; ``None`` is the warmup and decay above.
    """

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        adapter: LoRA | QLoRA | FullFineTune | PeftConfig | None = None,
        learning_rate: float | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.05,
        warmup_steps: int | None = None,
        decay: DecayName = "cosine",
        min_lr_ratio: float = 0.1,
        chat_template: str | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool | float | Literal["auto"] = False,
        trained_logits_only: bool = True,
        logits_chunk_size: int = 256,
        kl_beta: float = 0.0,
        compile: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if adapter is None:
            adapter = LoRA()
        self.adapter = PeftAdapter(adapter) if isinstance(adapter, PeftConfig) else adapter
        method = self.adapter.method
        lr = DEFAULT_LR[method] if learning_rate is None else learning_rate
        problems = []
        if lr <= 0:
            problems.append(f"learning_rate={lr} must be > 0")
        if weight_decay < 0:
            problems.append(f"weight_decay={weight_decay} must be >= 0")
        if not 0.0 <= warmup_ratio < 1.0:
            problems.append(f"warmup_ratio={warmup_ratio} must be in [0, 1)")
        if warmup_steps is not None and warmup_steps < 0:
            problems.append(f"warmup_steps={warmup_steps} must be >= 0")
        if not 0.0 <= min_lr_ratio <= 1.0:
            problems.append(f"min_lr_ratio={min_lr_ratio} must be in [0, 1]")
        if logits_chunk_size < 1:
            problems.append(f"logits_chunk_size={logits_chunk_size} must be >= 1")
        if gradient_checkpointing != "auto" and not (isinstance(gradient_checkpointing, (bool, int, float))
                                                     and 0 <= float(gradient_checkpointing) <= 1):
            problems.append(f"gradient_checkpointing={gradient_checkpointing} must be true, false, 'auto' or a "
                            "fraction of layers in [0, 1]")
        if kl_beta < 0:
            problems.append(f"kl_beta={kl_beta} must be >= 0")
        if kl_beta > 0 and self._prompt_learning:
            problems.append("kl_beta > 0 does not work with prompt-learning adapters (their forward adds virtual "
                            "tokens, so positions do not line up with the base model's)")
        if decay not in ("cosine", "linear", "constant"):
            problems.append(f"decay={decay!r} must be one of cosine, linear, constant")
        settings = dict(betas=betas, warmup_ratio=warmup_ratio, warmup_steps=warmup_steps, decay=decay,
                        min_lr_ratio=min_lr_ratio)
        problems += settings_problems(optimizer, lr_scheduler, settings, self._signature_defaults())
        if problems:
            raise ValueError(f"Invalid {type(self).__name__} settings: " + "; ".join(problems))
        if lr > DESTRUCTIVE_LR[method]:
            rank_zero_warn(
                f"learning_rate={lr:g} is high for {method} fine-tuning (default {DEFAULT_LR[method]:g}, "
                f"typical at most {DESTRUCTIVE_LR[method]:g}): expect catastrophic forgetting of what the "
                "base model knew. Add a ForgettingCheck callback to measure it."
            )
        self.learning_rate = lr
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        # The adapter object stays out of hparams (LightningCLI re-parses them on --ckpt_path); its spec is
        # saved under checkpoint["lightning_ft"]["adapter"] instead. The optimizer and scheduler callables
        # are no plain data either (a weights_only load refuses them): the run's config.yaml records them.
        self.save_hyperparameters(ignore=HPARAMS_IGNORED)
        self.hparams["learning_rate"] = lr
        self.model: torch.nn.Module | None = None
        self._tokenizer = None
        self._step_started = 0.0
        self._step_tokens = 0
        self._val_sums: torch.Tensor | None = None
        self._window_trained = 0  # trained tokens in the current gradient-accumulation window
        self.base_fingerprint: str | None = None
        self.seen_tokens = {"tokens": 0, "trained_tokens": 0}
        # Full fine-tuning's frozen base for kl_beta, in a list so it is no submodule: outside the state
        # dict, the optimizer and the parameter count.
        self._reference: list[torch.nn.Module] = []
        self._packing_exact: bool | None = None

    @classmethod
    def _signature_defaults(cls) -> dict[str, Any]:
        parameters = inspect.signature(cls.__init__).parameters
        return {key: parameters[key].default for key in ADAMW_SETTINGS + SCHEDULE_SETTINGS}

    # -- model ---------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the base model and attach the adapter (idempotent: Lightning may call it more than once)."""
        if self.model is not None:
            return
        kwargs = self.adapter.load_kwargs()
        if self.hparams.attn_implementation:
            if self.hparams.attn_implementation == PER_SEQUENCE_SDPA:
                register()
            kwargs["attn_implementation"] = self.hparams.attn_implementation
        model = load_model(self.hparams.model_name, dtype=self.hparams.dtype, **kwargs)
        self.base_fingerprint = base_fingerprint(model)
        if fraction := self._checkpointed_fraction():
            enable_checkpointing(model, fraction)
        model.config.use_cache = False
        self.model = self.adapter.attach(model)
        self.model.train()  # from_pretrained returns eval mode, which would silently disable dropout
        if self.hparams.compile:
            self._compile_layers()
        if self._wants_reference_copy():
            reference = load_model(self.hparams.model_name, dtype=self.hparams.dtype, **kwargs)
            self._reference = [reference.eval().requires_grad_(False)]

    def _checkpointed_fraction(self) -> float:
        """The share of decoder layers to recompute (``gradient_checkpointing``, ``"auto"`` resolved by the
        Trainer's precision: 0.9 mixed, 0.6 full; full precision without a Trainer)."""
        setting = self.hparams.gradient_checkpointing
        if setting != "auto":
            return float(setting)
        precision = str(getattr(self._trainer, "precision", "32-true"))
        fraction = 0.6 if precision.startswith(("32", "64")) else 0.9
        rank_zero_info(f"gradient_checkpointing: auto -> {fraction:g} of the decoder layers recomputed ({precision})")
        return fraction

    def _wants_reference_copy(self) -> bool:
        """Whether :meth:`configure_model` keeps a frozen copy of the base model (full fine-tuning's KL reference)."""
        return self.hparams.kl_beta > 0 and self.adapter.method == "full"

    def _compile_layers(self) -> None:
        base = unwrap_peft(self.model)
        for layer in decoder_layers(base, "compile=True"):
            layer.compile()  # per layer and in place: one small graph reused by every layer, same state dict keys

    def setup(self, stage: str) -> None:
        use_atomic_checkpoints(self.trainer)  # checkpoints land complete or not at all, never in $TMPDIR

    def on_fit_start(self) -> None:
        for reference in self._reference:
            reference.to(self.device)

    @contextmanager
    def base_model(self) -> Iterator[torch.nn.Module]:
        """The base model's forward, for the KL penalty: the adapter-disabled model, or full FT's frozen copy
        (see :func:`~lightning_ft.adapters.base_model_of`)."""
        if not self._reference and not has_adapters(self.model):
            raise ValueError("kl_beta needs the base model: an adapter to disable, or a frozen copy (full fine-tuning)")
        with base_model_of(self.model, self._reference[0] if self._reference else None) as base:
            yield base

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.model_name, self.hparams.chat_template)
        return self._tokenizer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @property
    def _prompt_learning(self) -> bool:
        """A peft prompt-learning adapter: its forward prepends virtual tokens, so positions shift."""
        return isinstance(self.adapter, PeftAdapter) and self.adapter.config.is_prompt_learning

    def packs_natively(self) -> bool:
        """Whether the model's attention keeps conversations packed into one row apart by itself (flash-attention
        varlen kernels, flex attention's block mask, :mod:`lightning_ft.attention`'s per-sequence SDPA) rather
        than attending to the whole row under a dense block-diagonal mask (eager, compiled layers, sliding-window
        models), which costs more than the padding it saves (``benchmarks/sft_throughput.py``).

        Decided by :func:`~lightning_ft.attention.native_packing_attention` from the model's configuration, the
        requested ``attn_implementation``, ``compile`` and the adapter, without loading weights, so it is known
        right after construction: the CLI links it into ``ChatDataModule(packs_natively=...)``, and the first
        packed batch switches a model on SDPA to the per-sequence SDPA it names (padded batches keep transformers'
        SDPA, which builds its mask once per forward rather than once per layer). Python users pass it the same way::

            ChatDataModule("train.jsonl", tokenizer=name, packs_natively=module.packs_natively())
        """
        return self._packing_attention is not None

    @cached_property
    def _packing_attention(self) -> str | None:
        """The attention implementation that packs natively for this model and these settings, else ``None``."""
        config = load_config(self.hparams.model_name)
        return native_packing_attention(config, self.hparams.attn_implementation, self.hparams.compile,
                                        self._prompt_learning)

    def packing_is_exact(self) -> bool:
        """Whether packed batches train exactly like padded ones with this model, measured once with
        :func:`~lightning_ft.losses.packing_is_exact` (``False`` before :meth:`configure_model`; prompt-learning
        adapters never are)."""
        if self._packing_exact is None:
            if self.model is None:
                return False
            self._packing_exact = not self._prompt_learning and packing_is_exact(self.model)
        return self._packing_exact

    def _prepare_packed(self, batch: Any) -> None:
        """At the first packed batch (position ids restarting per conversation, no attention mask): switch to the
        attention :meth:`packs_natively` named, then measure that packing is exact, and refuse packed batches
        when the model mixes the conversations of a row (training on them would be wrong)."""
        if self._packing_exact is not None or not isinstance(batch, dict) or self.model is None:
            return
        if "position_ids" not in batch or "attention_mask" in batch:
            return
        base = unwrap_peft(self.model)
        if self._packing_attention == PER_SEQUENCE_SDPA and base.config._attn_implementation == "sdpa":
            base.set_attn_implementation(register())
        if not self.packing_is_exact():
            why = ("a prompt-learning adapter prepends virtual tokens to every row" if self._prompt_learning else
                   f"{type(base).__name__} lets packed conversations attend to each other")
            raise ValueError(f"The batches are packed, but {why}: set data.packing=false.")

    # -- steps ---------------------------------------------------------------------------------------
    def _head_parts(self) -> tuple[torch.nn.Module, torch.nn.Module] | None:
        """The decoder and the output head, when the loss may skip logits at untrained positions."""
        if not self.hparams.trained_logits_only:
            return None
        if self._prompt_learning:
            return None  # prompt tuning prepends virtual tokens inside PeftModel.forward
        base = unwrap_peft(self.model)
        if getattr(base.config, "final_logit_softcapping", None):
            return None  # the head's output is transformed further in the model's own forward
        decoder, head = base.get_decoder(), base.get_output_embeddings()
        return (decoder, head) if decoder is not None and head is not None else None

    def _loss_sum(self, batch: dict[str, torch.Tensor], with_kl: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Summed next-token cross-entropy over trained positions, how many positions that is, and (with
        ``with_kl``) the mean KL(base || current) of the next-token distributions over every real (non-pad)
        position of the batch: prompts too, so the penalty holds the model near the base on what it reads,
        not only where the data pulls it away.

        By default the output head runs only where a label is trained, in chunks, instead of producing
        ``vocab x sequence`` logits everywhere: the prompt, the system message and padding cost no head
        FLOPs, and peak memory holds one chunk of logits.
        """
        labels = batch["labels"][:, 1:]
        trained = labels != IGNORE_INDEX
        targets = labels[trained]
        # Padded batches carry an attention mask; packed ones position ids (and must not carry a mask).
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
        real = _real_tokens(batch)[:, :-1]
        parts = self._head_parts()
        if parts is None:
            logits = self(**inputs).logits[:, :-1]
            loss_sum = torch.nn.functional.cross_entropy(logits[trained].float(), targets, reduction="sum")
            if not with_kl:
                return loss_sum, trained.sum(), None
            with torch.no_grad(), self.base_model() as base:
                base_logits = base(**inputs).logits[:, :-1][real]
            return loss_sum, trained.sum(), kl_penalty_sum(base_logits, logits[real]) / real.sum().clamp(min=1)
        decoder, head = parts
        hidden = decoder(**inputs).last_hidden_state[:, :-1]
        loss_sum = linear_cross_entropy(head, hidden[trained], targets, self.hparams.logits_chunk_size)
        if not with_kl:
            return loss_sum, trained.sum(), None
        with torch.no_grad(), self.base_model() as base:
            base = unwrap_peft(base)
            base_hidden = base.get_decoder()(**inputs).last_hidden_state[:, :-1][real]
            base_head = base.get_output_embeddings()
            base_head = getattr(base_head, "base_layer", base_head)  # a LoRA-wrapped head's frozen weight
        kl = chunked_sum(chunk_kl, self.hparams.logits_chunk_size, head, hidden[real], base_head, base_hidden)
        return loss_sum, trained.sum(), kl / real.sum().clamp(min=1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        beta = self.hparams.kl_beta
        loss_sum, n_trained, kl = self._loss_sum(batch, with_kl=beta > 0)
        loss = loss_sum.detach() / n_trained.clamp(min=1)
        self._window_trained += int(n_trained)
        n_tokens = _real_tokens(batch).sum()
        if bool(torch.isfinite(loss)):  # a non-finite step is reported (and skipped) by NonFiniteGuard instead
            self.log("train/loss", loss, prog_bar=True, batch_size=int(n_trained))
        if kl is not None:
            self.log("train/kl", kl.detach(), prog_bar=True, batch_size=int(n_trained))
            # Gradients are divided by the trained tokens later: scaling by them keeps beta a per-token weight.
            loss_sum = loss_sum + beta * kl * n_trained
        if "replay_tokens" in batch:
            replay_trained = ((batch["labels"][:, 1:] != IGNORE_INDEX) & batch["replay_tokens"][:, 1:]).sum()
            self.log("train/replay_share", replay_trained.float() / n_trained.clamp(min=1), batch_size=int(n_trained))
        # Running totals (this rank's; saved in checkpoints so they survive a resume).
        self.seen_tokens["tokens"] += int(n_tokens)
        self.seen_tokens["trained_tokens"] += int(n_trained)
        self.log("train/tokens", float(self.seen_tokens["tokens"]), reduce_fx="max")
        self.log("train/trained_tokens", float(self.seen_tokens["trained_tokens"]), reduce_fx="max")
        self._step_tokens = int(n_tokens)
        # Backpropagate the sum; on_before_optimizer_step divides the gradients by the trained tokens of the
        # whole accumulation window on all ranks, so every trained token weighs the same however the
        # batch is split into micro-batches or processes.
        return loss_sum

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        trainer = self.trainer
        window = torch.tensor(float(self._window_trained), device=self.device)
        total = trainer.strategy.reduce(window, reduce_op="sum").clamp(min=1.0)
        # Lightning already divided each micro-batch loss by accumulate_grad_batches and DDP averages over ranks.
        scale = trainer.accumulate_grad_batches * trainer.world_size / total
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.mul_(scale.to(param.grad.dtype))
        self._window_trained = 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._prepare_packed(batch)
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Forward, backward and optimizer step: the throughput a user pays for (data loading excluded).
        elapsed = time.perf_counter() - self._step_started
        self.log("train/tokens_per_sec", self._step_tokens / max(elapsed, 1e-9), prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(2, dtype=torch.float64, device=self.device)

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._prepare_packed(batch)  # outside the step's autocast, which would blur the measured logits

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._prepare_packed(batch)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, n_trained, _ = self._loss_sum(batch)
        self._val_sums += torch.stack([loss_sum.detach().double(), n_trained.double()])

    def on_validation_epoch_end(self) -> None:
        self._log_token_weighted("val")

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_token_weighted("test")

    def _log_token_weighted(self, prefix: str) -> None:
        # Token-weighted over the whole set (and all ranks), not a mean of per-batch means.
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        if sums[1] == 0:
            return
        loss = (sums[0] / sums[1]).float()
        self.log(f"{prefix}/loss", loss, prog_bar=prefix == "val")
        self.log(f"{prefix}/perplexity", torch.exp(loss.clamp(max=50.0)))
        self.log(f"{prefix}/trained_tokens", sums[1].float())

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Per-conversation mean loss on trained tokens: a quick way to find surprising examples."""
        logits = self(batch["input_ids"], batch.get("attention_mask")).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        counts = (labels != IGNORE_INDEX).sum(dim=1)
        return {"loss": losses.sum(dim=1) / counts.clamp(min=1), "trained_tokens": counts}

    # -- optimisation --------------------------------------------------------------------------------
    def configure_callbacks(self) -> list[pl.Callback]:
        """A :class:`~lightning_ft.callbacks.nonfinite.NonFiniteGuard` with its defaults, unless the trainer has one:
        a NaN step must not reach the weights even when the module is used outside the CLI."""
        return [] if any(isinstance(c, NonFiniteGuard) for c in self.trainer.callbacks) else [NonFiniteGuard()]

    def configure_optimizers(self) -> dict[str, Any]:
        """``optimizer`` (AdamW by default) over matrices with weight decay and norms and biases without, at
        ``learning_rate``; ``lr_scheduler`` (warmup and decay by default) stepped every optimizer step."""
        hparams = self.hparams
        groups = param_groups(self.named_parameters(), self.learning_rate, hparams.weight_decay)
        optimizer = build_optimizer(groups, self.optimizer, hparams.betas)
        total = max(1, int(min(self.trainer.estimated_stepping_batches, 10**9)))
        schedule = build_scheduler(optimizer, self.lr_scheduler, total, hparams.warmup_steps, hparams.warmup_ratio,
                                   hparams.decay, hparams.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    # -- checkpoints and export ----------------------------------------------------------------------
    def _trainable_keys(self) -> set[str]:
        return {name for name, param in self.named_parameters() if param.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A LoRA checkpoint needs only the adapter: the frozen base is reloaded from the model spec.
        if self.adapter.method != "full":
            keep = self._trainable_keys()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["lightning_ft"] = {
            "model": self.hparams.model_name,
            "base_fingerprint": self.base_fingerprint,
            "adapter": self.adapter.to_dict(),
            "seen_tokens": dict(self.seen_tokens),
            # Dropout masks after a resume match an uninterrupted run only if the RNG continues too.
            "rng": {"torch": torch.get_rng_state()},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("lightning_ft", {})
        self.seen_tokens.update(saved.get("seen_tokens", {}))
        if "rng" in saved:
            torch.set_rng_state(saved["rng"]["torch"])
        if saved.get("base_fingerprint") not in (None, self.base_fingerprint):
            raise ValueError(
                f"Checkpoint was trained on base model {saved.get('model')!r}, which differs from this module's "
                f"base {self.hparams.model_name!r} (architecture or weights). Set model_name to the checkpoint's base."
            )
        if self.adapter.method == "full":
            return
        self.strict_loading = False  # the base weights are not in the checkpoint, by design
        expected, found = self._trainable_keys(), set(checkpoint["state_dict"])
        if expected and found != expected:
            missing, extra = sorted(expected - found), sorted(found - expected)
            raise ValueError(
                "Checkpoint does not match this module's adapter: "
                f"{len(missing)} adapter weights missing (e.g. {missing[:2]}), {len(extra)} unexpected "
                f"(e.g. {extra[:2]}). It was saved for {checkpoint.get('lightning_ft', {})}."
            )

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the model in Hugging Face format with its tokenizer and chat template, atomically.

        LoRA writes a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) that
        ``PeftModel.from_pretrained`` loads onto the base; full fine-tuning writes safetensors weights.
        The directory appears complete or not at all; an existing one is replaced only after success, and
        never by weights holding NaN or infinity. An adapter is written with the record of its base model
        (``lightning_ft_base.json``), checked wherever it is loaded.
        """
        refuse_non_finite(self.model.state_dict(), str(directory))
        with atomic_directory(directory) as staging:
            self.model.save_pretrained(staging, safe_serialization=True)
            self.tokenizer.save_pretrained(staging)
            if self.adapter.method != "full":
                write_base_record(staging, self.model, self.hparams.model_name)
        return Path(directory)
