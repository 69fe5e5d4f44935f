"""One epoch of ``lightning_ft fit --config configs/quickstart.yaml`` against one epoch of TRL's SFTTrainer.

Issue 14's bar as a user meets it. Ours: the quickstart config with only the data paths, ``max_length``
(so that no conversation is cut: TRL's padding-free mode takes no ``max_length``) and ``max_epochs: 1``
changed; no precision, packing or batching flags. The peer: TRL's ``SFTTrainer`` padding-free, its fastest
correct setting without a varlen kernel, with the same LoRA as the quickstart (read from its config: r=16, alpha=32,
all linear layers), batch 8, learning rate and schedule, the loss on the assistant's reply only, and the
precision ``precision: auto`` chose for us (``--fp32`` runs both in fp32, as a CPU without native bf16
would). TRL runs with its default gradient checkpointing and without it.

The data is generated (``benchmarks/chat_data.py``): 160 training conversations (``--count``) with log-normal lengths of
72-483 tokens, mean 180, close to the issue's 47-385 / 172; 24 more for our validation::

    python benchmarks/fit_epoch.py            # ours, TRL, TRL without checkpointing; in auto precision
    python benchmarks/fit_epoch.py --fp32     # the same in fp32

Each contender runs in its own process and reports: the epoch's training time (our epoch without its two
validation passes, which TRL doesn't run; TRL's ``train()``), the whole command's wall time, and the
process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytorch_lightning as pl

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = ("lightning_ft", "trl_padding_free", "trl_padding_free_no_checkpointing")
VAL = 24
LENGTHS = {"median_words": 80.0, "sigma": 0.6}  # 72-483 tokens, mean 180 (SmolLM2's tokenizer)
TIMES_ENV = "LIGHTNING_FT_BENCH_TIMES"


class EpochTimer(pl.Callback):
    """Writes the first training epoch's seconds, without the validation inside it, to ``$LIGHTNING_FT_BENCH_TIMES``."""

    def __init__(self) -> None:
        self.validating = 0.0
        self.started: float | None = None
        self.val_started = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        self.val_started = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.started is not None:  # the sanity check runs before the epoch
            self.validating += time.perf_counter() - self.val_started

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.started is None or trainer.current_epoch > 0:
            return
        total = time.perf_counter() - self.started
        Path(os.environ[TIMES_ENV]).write_text(json.dumps(
            {"train_s": total - self.validating, "validation_s": self.validating, "steps": trainer.global_step}))


def data(workdir: Path, count: int) -> tuple[Path, Path]:
    sys.path.insert(0, str(Path(__file__).parent))
    from chat_data import write

    return (write(workdir / "train.jsonl", count, seed=0, **LENGTHS),
            write(workdir / "val.jsonl", VAL, seed=1, **LENGTHS))


def run_ours(args, train: Path, val: Path) -> dict:
    from lightning_ft.console import main

    times = Path(args.workdir) / "ours_times.json"
    os.environ[TIMES_ENV] = str(times)
    argv = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
            "--data.train_path", str(train), "--data.val_path", str(val), "--data.max_length", "2048",
            "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(Path(args.workdir) / "ours"),
            "--trainer.callbacks+=fit_epoch.EpochTimer"]
    if args.fp32:
        argv += ["--trainer.precision", "32-true"]  # what ``auto`` chooses on a CPU without native bf16
    if main(argv) != 0:
        raise SystemExit("lightning_ft fit failed")
    return {"name": "lightning_ft fit, quickstart config", **json.loads(times.read_text())}


def run_trl(args, train: Path, checkpointing: bool) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from lightning_ft.models import DEFAULT_MODEL, load_model, load_tokenizer
    from lightning_ft.precision import resolve_precision

    with open(train) as file:
        conversations = [json.loads(line)["messages"] for line in file]
    rows = [{"prompt": conv[:-1], "completion": conv[-1:]} for conv in conversations]
    bf16 = not args.fp32 and resolve_precision("cpu").precision.startswith("bf16")
    config = SFTConfig(
        output_dir=str(Path(args.workdir) / "trl"), per_device_train_batch_size=8, num_train_epochs=1,
        learning_rate=2e-4, warmup_steps=0.05, lr_scheduler_type="cosine", completion_only_loss=True,
        padding_free=True, max_length=None, gradient_checkpointing=checkpointing, bf16=bf16, use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=10**6, dataloader_num_workers=0, seed=42)
    lora = quickstart_lora()
    trainer = SFTTrainer(model=load_model(DEFAULT_MODEL), args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=load_tokenizer(DEFAULT_MODEL),
                         peft_config=LoraConfig(task_type="CAUSAL_LM", r=lora["r"], lora_alpha=lora["alpha"],
                                                lora_dropout=lora["dropout"], target_modules=lora["target_modules"]))
    output = trainer.train()  # its metrics hold the training loop's own wall time
    name = "TRL SFTTrainer padding-free" + ("" if checkpointing else ", no gradient checkpointing")
    return {"name": name, "train_s": output.metrics["train_runtime"], "validation_s": 0.0,
            "steps": trainer.state.global_step}


def quickstart_lora() -> dict:
    """The quickstart config's LoRA settings, so that TRL gets the same adapter."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    return config["model"]["adapter"]["init_args"]


def child(args) -> None:
    started = time.perf_counter()
    train, val = data(Path(args.workdir), args.count)
    if args.child == "lightning_ft":
        result = run_ours(args, train, val)
    else:
        result = run_trl(args, train, checkpointing=not args.child.endswith("no_checkpointing"))
    peak_kb = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(json.dumps({**result, "wall_s": time.perf_counter() - started, "peak_rss_gb": peak_kb / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("::")[0])
    parser.add_argument("--only", action="append", choices=CONTENDERS, help="contenders (default: all)")
    parser.add_argument("--fp32", action="store_true", help="both in fp32, as on a CPU without native bf16")
    parser.add_argument("--count", type=int, default=160, help="training conversations")
    parser.add_argument("--workdir", default="runs/bench/fit_epoch")
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.child:
        return child(args)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    results = []
    for name in args.only or CONTENDERS:
        command = [sys.executable, __file__, "--child", name, "--workdir", args.workdir,
                   "--count", str(args.count)] + (["--fp32"] if args.fp32 else [])
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    print(table(results, args.count, "fp32" if args.fp32 else "auto precision"))


def table(results: list[dict], count: int, precision: str) -> str:
    peers = [r["train_s"] for r in results if r["name"].startswith("TRL")]
    fastest = min(peers) if peers else None
    lines = [f"One epoch, {count} conversations, batch 8, {precision}:",
             "| contender | epoch training | vs fastest TRL | validation | whole command | peak RSS |",
             "|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{fastest / r['train_s']:.2f}x" if fastest else "-"
        lines.append(f"| {r['name']} | {r['train_s']:.0f} s ({r['steps']} steps) | {ratio} | "
                     f"{r['validation_s']:.0f} s | {r['wall_s']:.0f} s | {r['peak_rss_gb']:.2f} GB |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
