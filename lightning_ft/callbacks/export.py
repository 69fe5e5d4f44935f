"""Save the fine-tuned model in Hugging Face format when ``fit`` ends."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info


class SaveHFModel(pl.Callback):
    """At the end of ``fit``, write ``<log_dir>/<dirname>`` via the module's ``save_pretrained``.

    For LoRA that is a PEFT adapter directory; for full fine-tuning, safetensors weights; both with the
    tokenizer and its chat template. Written atomically, from global rank zero only.

    Example::

        trainer = pl.Trainer(callbacks=[SaveHFModel(dirname="hf_model")])

    Args:
        dirname: Directory name under the run's log directory (or an absolute path).
    """

    def __init__(self, dirname: str = "hf_model") -> None:
        self.dirname = dirname
        self.saved_to: Path | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # trainer.log_dir broadcasts from rank 0: every rank must ask for it, before any branching.
        root = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.global_rank == 0 and hasattr(pl_module, "save_pretrained"):
            self.saved_to = pl_module.save_pretrained(root / self.dirname)
            rank_zero_info(f"Saved the fine-tuned model in Hugging Face format to {self.saved_to}")
        trainer.strategy.barrier("lightning_ft.save_hf")
