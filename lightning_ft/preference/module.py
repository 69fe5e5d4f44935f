"""PreferenceModule: DPO, IPO, SimPO and ORPO on top of FineTuneModule's model, adapters, schedule and export."""

from __future__ import annotations

from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch.utils.checkpoint import checkpoint

from peft import PeftConfig

from lightning_ft.adapters import FullFineTune, LoRA, QLoRA, has_adapters
from lightning_ft.callbacks.validate_at_start import ValidateAtStart
from lightning_ft.losses import linear_token_logps
from lightning_ft.models import DEFAULT_MODEL, unwrap_peft
from lightning_ft.module import HPARAMS_IGNORED, IGNORE_INDEX, FineTuneModule
from lightning_ft.preference.losses import LENGTH_NORMALISED, LOSSES, NEEDS_REFERENCE, LossName, preference_loss
from lightning_ft.schedules import DecayName

ReferenceName = Literal["auto", "copy", "precomputed"]


def _gather_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Half-precision logits are upcast before the softmax; float64 stays float64.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.gather(logits.log_softmax(-1), 1, targets[:, None]).squeeze(1)


def _chunk_token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _gather_logps(head(hidden), targets)


def token_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int,
                head_only_where_trained: bool = True) -> torch.Tensor:
    """Log-probability of every trained label (``labels != -100``) under ``model``, in row-major order.

    With ``head_only_where_trained`` the output head runs only at trained positions, in chunks, so no ``vocab x
    sequence`` logits are kept (same values as the full logits): a frozen head once
    (:func:`~lightning_ft.losses.linear_token_logps`), a training one recomputed in backward.
    """
    labels = batch["labels"][:, 1:]
    trained = labels != IGNORE_INDEX
    targets = labels[trained]
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask") if key in batch}
    base = unwrap_peft(model)
    if not head_only_where_trained or getattr(base.config, "final_logit_softcapping", None):
        return _gather_logps(model(**inputs).logits[:, :-1][trained], targets)
    hidden = base.get_decoder()(**inputs).last_hidden_state[:, :-1][trained]
    head = base.get_output_embeddings()
    fused = linear_token_logps(head, hidden, targets, chunk_size)
    if fused is not None:
        return fused
    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_token_logps, head, hidden[chunk], targets[chunk], use_reentrant=False))
        else:
            parts.append(_chunk_token_logps(head, hidden[chunk], targets[chunk]))
    return torch.cat(parts) if parts else hidden.new_zeros(0)


def sequence_logps(values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of :func:`token_logps` output and the number of trained labels per row."""
    trained = labels[:, 1:] != IGNORE_INDEX
    rows = trained.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=values.dtype, device=values.device).index_add(0, rows, values)
    return sums, trained.sum(dim=1)


class PreferenceModule(FineTuneModule):
    """Preference fine-tuning (DPO, IPO, SimPO, ORPO) of a causal LM, with LoRA (default) or in full.

    Each batch holds the chosen replies then the rejected ones (:class:`~lightning_ft.preference.PreferenceDataModule`)
    and goes through the model in one forward. Only the final assistant reply and its stop marker are scored.
    DPO and IPO compare with a reference model: with an adapter, the same model with the adapter disabled (no copy);
    full fine-tuning keeps a frozen copy, or ``reference: precomputed`` scores every pair once before training and
    keeps only two numbers per pair (no second model in memory, one extra pass over the data; stored in checkpoints).

    Logged under ``train/`` and ``val/``: ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin``,
    ``rewards/accuracy`` (share of pairs whose chosen reward is higher), ``logps/chosen``, ``logps/rejected``
    (summed over the reply), ``ref_logps/*`` (DPO, IPO) and ``nll`` (ORPO, or ``sft_weight > 0``).

    Example::

        module = PreferenceModule("smollm2-135m-instruct", loss="dpo", beta=0.1)
        data = PreferenceDataModule("pairs.jsonl", tokenizer="smollm2-135m-instruct")
        pl.Trainer(max_steps=20).fit(module, data)

    Args:
        model_name: Model spec, as for :class:`~lightning_ft.FineTuneModule`.
        adapter: ``LoRA(...)`` (default), ``QLoRA(...)``, ``FullFineTune(...)`` or a peft config.
        loss: ``dpo`` (sigmoid), ``ipo``, ``simpo`` (reference-free, length-normalised, margin ``simpo_gamma``)
            or ``orpo`` (reference-free odds ratio plus the chosen reply's NLL).
        beta: Strength of the objective: DPO's KL weight (0.1 typical), IPO's τ, SimPO's reward scale (2.0
            typical), ORPO's weight of the odds-ratio term (0.1 typical).
        label_smoothing: Share of pairs assumed mislabelled (conservative DPO; also SimPO), in ``[0, 0.5)``.
        simpo_gamma: SimPO's target reward margin.
        sft_weight: Weight of the chosen reply's mean token NLL added to the loss (0 turns it off; ORPO always
            adds it with weight 1, this adds on top).
        reference: Where DPO/IPO's reference log-probabilities come from: ``auto`` (adapter disabled, or a
            frozen copy for full fine-tuning), ``copy`` (always a frozen copy) or ``precomputed``.
        learning_rate: Peak learning rate; ``None`` picks the method's default.
        weight_decay: Weight decay for weight matrices (never applied to norms and biases).
        betas: AdamW betas (the default optimizer's).
        warmup_ratio: Fraction of the run spent in linear warmup.
        warmup_steps: Explicit warmup steps.
        decay: Shape after warmup: cosine, linear or constant.
        min_lr_ratio: Floor of the decay as a fraction of the peak learning rate.
        chat_template: A Jinja chat template replacing the tokenizer's own (keep it equal to the data's).
        dtype: Dtype the weights are loaded in.
        attn_implementation: The model's attention kernel.
        gradient_checkpointing: Recompute activations in backward: ``True``, or the fraction of layers.
        trained_logits_only: Run the output head only at scored positions (same values, less memory).
        logits_chunk_size: Scored positions per chunk of head + log-softmax.
        compile: Compile each decoder layer with ``torch.compile``.
        validate_at_start: Validate once before the first step (:class:`~lightning_ft.callbacks.ValidateAtStart`),
            so ``val/rewards/*`` start at the untrained model; a resumed run is not validated again.
        optimizer: The optimizer class (``None``: AdamW), as :class:`~lightning_ft.FineTuneModule`'s.
        lr_scheduler: A scheduler class stepped every optimizer step (``None``: warmup and decay).
    """

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        adapter: LoRA | QLoRA | FullFineTune | PeftConfig | None = None,
        loss: LossName = "dpo",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        sft_weight: float = 0.0,
        reference: ReferenceName = "auto",
        learning_rate: float | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.1,
        warmup_steps: int | None = None,
        decay: DecayName = "cosine",
        min_lr_ratio: float = 0.1,
        chat_template: str | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool | float = False,
        trained_logits_only: bool = True,
        logits_chunk_size: int = 1024,
        compile: bool = False,
        validate_at_start: bool = True,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(model_name, adapter, learning_rate, weight_decay, betas, warmup_ratio, warmup_steps, decay,
                         min_lr_ratio, chat_template, dtype, attn_implementation, gradient_checkpointing,
                         trained_logits_only, logits_chunk_size, 0.0, compile, optimizer=optimizer,
                         lr_scheduler=lr_scheduler)
        problems = []
        if loss not in LOSSES:
            problems.append(f"loss={loss!r} must be one of {', '.join(LOSSES)}")
        if beta <= 0:
            problems.append(f"beta={beta} must be > 0")
        if not 0.0 <= label_smoothing < 0.5:
            problems.append(f"label_smoothing={label_smoothing} must be in [0, 0.5)")
        if label_smoothing and loss not in ("dpo", "simpo"):
            problems.append(f"label_smoothing={label_smoothing} applies to dpo and simpo only, not {loss!r}")
        if sft_weight < 0:
            problems.append(f"sft_weight={sft_weight} must be >= 0")
        if reference not in ("auto", "copy", "precomputed"):
            problems.append(f"reference={reference!r} must be one of auto, copy, precomputed")
        if self._prompt_learning:
            problems.append("prompt-learning adapters are not supported (their virtual tokens shift the scored positions)")
        if problems:
            raise ValueError("Invalid PreferenceModule settings: " + "; ".join(problems))
        self.save_hyperparameters(ignore=HPARAMS_IGNORED)
        self.hparams["learning_rate"] = self.learning_rate
        self._val_totals: torch.Tensor | None = None
        self._first_step_written = False

    @property
    def uses_reference(self) -> bool:
        """Whether the objective compares with a reference model (DPO, IPO)."""
        return self.hparams.loss in NEEDS_REFERENCE

    def _wants_reference_copy(self) -> bool:
        """A frozen copy for DPO/IPO with ``reference: copy``, or ``auto`` under full fine-tuning."""
        reference = self.hparams.reference
        return self.uses_reference and (reference == "copy" or (reference == "auto" and self.adapter.method == "full"))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.uses_reference and self.hparams.reference == "precomputed":
            if datamodule is None or not hasattr(datamodule, "precompute_reference"):
                raise ValueError("reference='precomputed' needs a PreferenceDataModule to store the log-probabilities")
            datamodule.precompute_reference(self.reference_logps, self.device)

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed log-probability of each row's scored reply under the reference model, shape ``(rows,)``."""
        if not self._reference and not has_adapters(self.model):
            # Full fine-tuning with a precomputed reference: called before the first step, the model is the base.
            values = token_logps(self.model, batch, self.hparams.logits_chunk_size, self.hparams.trained_logits_only)
            return sequence_logps(values, batch["labels"])[0]
        with self.base_model() as base:
            values = token_logps(base, batch, self.hparams.logits_chunk_size, self.hparams.trained_logits_only)
        return sequence_logps(values, batch["labels"])[0]

    def _pair_metrics(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's loss and per-pair values to log (all detached except the loss)."""
        hp = self.hparams
        values = token_logps(self.model, batch, hp.logits_chunk_size, hp.trained_logits_only)
        sums, counts = sequence_logps(values, batch["labels"])
        pairs = sums.shape[0] // 2
        ref = None
        if self.uses_reference:
            ref = batch["ref_logps"].to(sums) if "ref_logps" in batch else self.reference_logps(batch)
        scores, ref_scores = sums, ref
        if hp.loss in LENGTH_NORMALISED:
            scores = sums / counts.clamp(min=1)
            ref_scores = None if ref is None else ref / counts.clamp(min=1)
        split = (lambda t: (None, None) if t is None else (t[:pairs], t[pairs:]))
        result = preference_loss(hp.loss, *split(scores), *split(ref_scores), hp.beta, hp.label_smoothing,
                                 hp.simpo_gamma)
        loss = result.losses.mean()
        logged = {"rewards/chosen": result.chosen_rewards, "rewards/rejected": result.rejected_rewards,
                  "rewards/margin": result.chosen_rewards - result.rejected_rewards,
                  "rewards/accuracy": (result.chosen_rewards > result.rejected_rewards).float(),
                  "logps/chosen": sums[:pairs].detach(), "logps/rejected": sums[pairs:].detach()}
        if ref is not None:
            logged.update({"ref_logps/chosen": ref[:pairs], "ref_logps/rejected": ref[pairs:]})
        nll_weight = hp.sft_weight + (1.0 if hp.loss == "orpo" else 0.0)
        if nll_weight:
            # Token-mean NLL of the chosen replies, as SFT's loss on the same tokens.
            nll = -sums[:pairs].sum() / counts[:pairs].sum().clamp(min=1)
            loss = loss + nll_weight * nll
            logged["nll"] = nll.detach().expand(pairs)
        return loss, logged

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, logged = self._pair_metrics(batch)
        pairs = batch["input_ids"].shape[0] // 2
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=pairs)
        for name, values in logged.items():
            self.log(f"train/{name}", values.float().mean(), prog_bar=name == "rewards/accuracy", batch_size=pairs)
        n_tokens = int(batch["attention_mask"].sum())
        self.seen_tokens["tokens"] += n_tokens
        self.seen_tokens["trained_tokens"] += int((batch["labels"] != IGNORE_INDEX).sum())
        self.log("train/tokens", float(self.seen_tokens["tokens"]), reduce_fx="max")
        self._step_tokens = n_tokens
        self._write_first_step(loss.detach(), logged)
        return loss

    def configure_callbacks(self) -> list[pl.Callback]:
        """FineTuneModule's, and :class:`~lightning_ft.callbacks.ValidateAtStart` unless turned off or already there."""
        callbacks = list(super().configure_callbacks())
        if self.hparams.validate_at_start and not any(isinstance(c, ValidateAtStart) for c in self.trainer.callbacks):
            callbacks.append(ValidateAtStart())
        return callbacks

    def _write_first_step(self, loss: torch.Tensor, logged: dict[str, torch.Tensor]) -> None:
        """Write step 0's values to the loggers: Lightning's first write is at step ``log_every_n_steps - 1``, and
        step 0 is the value every curve starts from (DPO with an adapter: exactly ln 2)."""
        if self._first_step_written or self.trainer.global_step > 0 or self.trainer.log_every_n_steps <= 1:
            return
        self._first_step_written = True
        names = ["train/loss", *(f"train/{name}" for name in logged)]
        row = torch.stack([loss.float(), *(values.float().mean() for values in logged.values())])
        row = self.trainer.strategy.reduce(row, reduce_op="mean")  # every rank's first batch, as Lightning's sync
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(dict(zip(names, row.tolist())), step=0)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Nothing to rescale: the loss is a mean over pairs (FineTuneModule's per-token scaling does not apply)."""

    def on_validation_epoch_start(self) -> None:
        self._val_totals = None
        self._val_names: list[str] = []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, logged = self._pair_metrics(batch)
        pairs = batch["input_ids"].shape[0] // 2
        sums = {"loss": loss.detach() * pairs, **{name: values.sum() for name, values in logged.items()}}
        self._val_names = sorted(sums)
        row = torch.stack([sums[name].double() for name in self._val_names] + [loss.new_tensor(pairs).double()])
        self._val_totals = row if self._val_totals is None else self._val_totals + row

    def on_validation_epoch_end(self) -> None:
        self._log_pair_means("val")

    def on_test_epoch_end(self) -> None:
        self._log_pair_means("test")

    def _log_pair_means(self, prefix: str) -> None:
        # Means over every pair of the set (and all ranks), not means of per-batch means.
        if self._val_totals is None:
            return
        totals = self.trainer.strategy.reduce(self._val_totals, reduce_op="sum")
        pairs = totals[-1].clamp(min=1)
        for name, total in zip(self._val_names, totals[:-1]):
            self.log(f"{prefix}/{name}", (total / pairs).float(), prog_bar=prefix == "val" and name == "rewards/accuracy")
        self._val_totals = None

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Per-pair rewards: which pairs the model already orders correctly."""
        _, logged = self._pair_metrics(batch)
        return {name: logged[name] for name in ("rewards/chosen", "rewards/rejected", "rewards/margin")}
