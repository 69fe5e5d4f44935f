"""Where one training step's time goes: attention, MLP, attention projections, head, optimizer, data, other.

A Lightning callback for ``benchmarks/sft_throughput.py --profile``: it runs ``torch.profiler`` over the first
timed step and sorts each operator's own (self) CPU time into parts. Matrix multiplies are told apart by
their shapes: the vocabulary-wide ones are the output head, those with a dimension of at most 64 LoRA's,
those with the MLP's intermediate size the MLP, the rest attention projections (q, k, v, o). Data is the
wait for the batch before the step. The ``Optimizer.step`` wrapper is skipped: under Lightning its time
holds the closure (forward and backward); the optimizer's own kernels are counted instead.
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from torch.profiler import ProfilerActivity, profile

THIN = 64  # a matmul with a dimension this small is an adapter's (LoRA rank), not the base model's
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int4pack_mm", "aten::baddbmm")


def _part(name: str, shapes: list, vocab: int, intermediate: int) -> str:
    if "scaled_dot_product" in name or "flash_attention" in name or "_efficient_attention" in name:
        return "attention kernel"
    if name in MATMULS:
        dims = [d for shape in shapes if isinstance(shape, list) for d in shape]
        if vocab in dims:
            return "head (matmul)"
        if dims and min(dims) <= THIN:
            return "LoRA (thin matmuls)"
        return "MLP (matmul)" if intermediate in dims else "attention projections (matmul)"
    if "adam" in name.lower() or name.startswith("aten::_foreach"):
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
            if event.key.startswith("Optimizer."):
                # The wrapper's time holds Lightning's closure (forward and backward): its ops count on their own.
                continue
            part = _part(event.key, event.input_shapes, config.vocab_size, config.intermediate_size)
            seconds[part] = seconds.get(part, 0.0) + event.self_cpu_time_total / 1e6
        total = sum(seconds.values())
        self.shares = {part: round(value / total, 3) for part, value in sorted(seconds.items(), key=lambda x: -x[1])}
        self.shares["step seconds"] = round(total, 2)
        self._profiler = None
