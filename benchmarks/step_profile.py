"""Where one training step's time goes: attention, MLP, attention projections, head, optimizer, data, other.

A Lightning callback for ``benchmarks/sft_throughput.py --profile``: it runs ``torch.profiler`` over the first
timed step and sorts each operator's own (self) CPU time into parts. Matrix multiplies are told apart by
their shapes: the vocabulary-wide ones are the output head, those with the MLP's intermediate size are the
MLP, the rest are attention projections (q, k, v, o) and LoRA. Data is the wait for the batch before the step.
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from torch.profiler import ProfilerActivity, profile

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int4pack_mm", "aten::baddbmm")


def _part(name: str, shapes: str, vocab: int, intermediate: int) -> str:
    if "scaled_dot_product" in name or "flash_attention" in name or "_efficient_attention" in name:
        return "attention kernel"
    if name in MATMULS:
        if str(vocab) in shapes:
            return "head (matmul)"
        return "MLP (matmul)" if str(intermediate) in shapes else "attention projections + LoRA (matmul)"
    if name.startswith("Optimizer.") or "adam" in name.lower():
        return "optimizer"
    return "other (norms, activations, casts, loss)"


class StepProfile(pl.Callback):
    """Profile training step number ``step`` (0-based); :attr:`shares` maps each part to its share of the time."""

    def __init__(self, step: int) -> None:
        self.step, self.shares = step, {}
        self._profiler = None
        self._last_end = self._data_s = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self._data_s = time.perf_counter() - self._last_end if self._last_end else 0.0
            self._profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            self._profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._last_end = time.perf_counter()
        if self._profiler is None:
            return
        self._profiler.__exit__(None, None, None)
        config = pl_module.model.get_base_model().config
        seconds: dict[str, float] = {"data (waiting for the batch)": self._data_s}
        for event in self._profiler.key_averages(group_by_input_shape=True):
            if event.key.startswith("Optimizer.step"):
                # The optimizer's own ops are counted here by their total time; their self time is skipped below.
                seconds["optimizer"] = seconds.get("optimizer", 0.0) + event.cpu_time_total / 1e6
                continue
            part = _part(event.key, str(event.input_shapes), config.vocab_size, config.intermediate_size)
            if part != "optimizer":
                seconds[part] = seconds.get(part, 0.0) + event.self_cpu_time_total / 1e6
        optimizer_self = sum(e.self_cpu_time_total for e in self._profiler.key_averages()
                             if "adam" in e.key.lower() or e.key.startswith("aten::_foreach")) / 1e6
        seconds["other (norms, activations, casts, loss)"] = max(
            0.0, seconds.get("other (norms, activations, casts, loss)", 0.0) - optimizer_self)
        total = sum(seconds.values())
        self.shares = {part: round(value / total, 3) for part, value in sorted(seconds.items(), key=lambda x: -x[1])}
        self.shares["step seconds"] = round(total, 2)
        self._profiler = None
