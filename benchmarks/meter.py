"""The step meter the throughput benchmarks share, and the callbacks that drive it from Lightning and from TRL.

Each contender of a benchmark runs in its own process with one :class:`Meter`; a Lightning run adds
``lightning_timing(meter)`` to its callbacks, a TRL (transformers ``Trainer``) run ``trl_timing(meter)``.
"""

from __future__ import annotations

import resource
import sys
import time


class Meter:
    """Per-step wall and CPU time, and (when counted) token counts, skipping the first ``warmup`` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.step, self.started = warmup, 0, 0.0
        self.seconds, self.tokens, self.trained = 0.0, 0, 0
        self.cpu_seconds = self.cpu_started = 0.0  # all threads of this process: robust to other load
        self.warmup_seconds = 0.0  # the untimed first steps: compilation shows up here
        self.pending = (0, 0)

    def count(self, batch) -> None:
        """Record the real and trained tokens of the batch about to be trained on."""
        labels = batch["labels"]
        if "token_mask" in batch:  # lightning_ft's packed rows
            real = int(batch["token_mask"].sum())
        elif "attention_mask" in batch:
            real = int(batch["attention_mask"].sum())
        else:  # TRL's padding-free rows: one flattened sequence, no padding
            real = int(batch["input_ids"].numel())
        self.pending = (real, int((labels[:, 1:] != -100).sum()))

    def begin(self) -> None:
        self._sync()
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    @staticmethod
    def _sync() -> None:
        import torch

        if torch.cuda.is_available():  # time the GPU's work, not the queueing of it
            torch.cuda.synchronize()

    def end(self) -> None:
        self._sync()
        elapsed, cpu = time.perf_counter() - self.started, time.process_time() - self.cpu_started
        print(f"step {self.step}: {elapsed:.1f} s, {cpu:.1f} CPU s, {self.pending[0]} tokens", file=sys.stderr, flush=True)
        if self.step < self.warmup:
            self.warmup_seconds += elapsed
        else:
            self.seconds += elapsed
            self.cpu_seconds += cpu
            self.tokens += self.pending[0]
            self.trained += self.pending[1]
        self.step += 1

    def result(self, name: str, n_linear: int | None = None, extra: dict | None = None) -> dict:
        """The timed steps' numbers; token rates when batches were counted, model FLOP/s given ``n_linear``."""
        timed = self.step - self.warmup
        result = {"name": name, "steps": timed, "steps_per_s": timed / self.seconds, "s_per_step": self.seconds / timed,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "warmup_s": self.warmup_seconds}
        if self.tokens:
            result |= {"tokens_per_s": self.tokens / self.seconds, "trained_tokens_per_s": self.trained / self.seconds,
                       "tokens_per_cpu_s": self.tokens / max(self.cpu_seconds, 1e-9)}
        if n_linear is not None:
            result["model_flops"] = 4 * n_linear * self.tokens / self.seconds
        return result | (extra or {})


def lightning_timing(meter: Meter, count: bool = False):
    """A Lightning callback timing each training step on ``meter`` (and counting its tokens with ``count``)."""
    import pytorch_lightning as pl

    class Timing(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if count:
                meter.count(batch)
            meter.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            meter.end()

    return Timing()


def trl_timing(meter: Meter):
    """A transformers ``TrainerCallback`` timing each training step on ``meter`` (TRL's trainers)."""
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def on_step_begin(self, *_, **__):
            meter.begin()

        def on_step_end(self, *_, **__):
            meter.end()

    return Timing()
