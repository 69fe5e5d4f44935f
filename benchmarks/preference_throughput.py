"""LoRA DPO throughput: lightning_ft's PreferenceModule against TRL's DPOTrainer, in one run.

Same model (the embedded SmolLM2-135M-Instruct), same LoRA (r=16, alpha=32, all linear layers, no dropout),
same pairs (examples/preference/train.jsonl), same pairs per step, max length, precision (fp32, or bf16 autocast
with ``--bf16`` on both sides), DPO sigmoid with
beta 0.1, and the reference is the same model with the adapter disabled everywhere. Each contender runs in
its own process (so peak RSS is its own) and prints one JSON line; the parent prints the table::

    python benchmarks/preference_throughput.py                       # 8 timed steps after 2 untimed
    python benchmarks/preference_throughput.py --only trl --steps 4

TRL turns gradient checkpointing on by default (less memory, more compute): it runs both ways, and lightning_ft
also with part of its layers checkpointed (``--checkpointing``, default 0.5: ``gradient_checkpointing: 0.5``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from meter import Meter, lightning_timing, trl_timing

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "preference" / "train.jsonl"
CONTENDERS = ("lightning_ft", "lightning_ft_checkpointing", "trl", "trl_no_checkpointing")
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def run_lightning_ft(args, checkpointing: float = 0.0) -> dict:
    import pytorch_lightning as pl

    from lightning_ft import LoRA
    from lightning_ft.preference import PreferenceDataModule, PreferenceModule

    meter = Meter(args.warmup)

    module = PreferenceModule(adapter=LoRA(r=16, alpha=32, dropout=0.0), loss="dpo", beta=0.1, learning_rate=5e-5,
                              gradient_checkpointing=checkpointing, validate_at_start=False)
    data = PreferenceDataModule(str(DATA), tokenizer=module.hparams.model_name, batch_size=args.batch_size,
                                max_length=args.max_length, checks="off")
    trainer = pl.Trainer(max_steps=args.warmup + args.steps, precision="bf16-mixed" if args.bf16 else "32-true",
                         logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[lightning_timing(meter)])
    trainer.fit(module, data)
    return meter.result("lightning_ft PreferenceModule (dpo)" + (f", checkpointing {checkpointing:g} of layers"
                                                                  if checkpointing else ""))


def run_trl(args, variant: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from lightning_ft.models import DEFAULT_MODEL, load_model, load_tokenizer

    meter = Meter(args.warmup)
    rows = []
    for line in DATA.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        rows.append({"prompt": record["prompt"], "chosen": [{"role": "assistant", "content": record["chosen"]}],
                     "rejected": [{"role": "assistant", "content": record["rejected"]}]})
    config = DPOConfig(
        output_dir=str(Path(args.workdir) / variant), per_device_train_batch_size=args.batch_size,
        max_length=args.max_length, max_steps=args.warmup + args.steps, learning_rate=5e-5, beta=0.1,
        gradient_checkpointing=variant != "trl_no_checkpointing", bf16=args.bf16, fp16=False, use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=10**6, dataloader_num_workers=0, seed=42)
    trainer = DPOTrainer(model=load_model(DEFAULT_MODEL), args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=load_tokenizer(DEFAULT_MODEL),
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))

    trainer.add_callback(trl_timing(meter))
    trainer.train()
    return meter.result("TRL DPOTrainer" + (", no gradient checkpointing" if variant == "trl_no_checkpointing"
                                            else " (defaults: gradient checkpointing)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=CONTENDERS)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4, help="pairs per step")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--checkpointing", type=float, default=0.5,
                        help="the fraction of layers the checkpointing lightning_ft contender recomputes")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (native on AVX512-BF16/AMX)")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench_preference"))
    args = parser.parse_args()
    if args.only:  # a child: one contender, one JSON line
        import torch

        torch.manual_seed(42)
        if args.only.startswith("lightning_ft"):
            result = run_lightning_ft(args, args.checkpointing if args.only == "lightning_ft_checkpointing" else 0.0)
        else:
            result = run_trl(args, args.only)
        print("RESULT " + json.dumps(result), flush=True)
        return
    import os

    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"{args.batch_size} pairs/step, max_length {args.max_length}, {args.steps} timed steps, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}", flush=True)
    results = []
    for contender in CONTENDERS:
        command = [sys.executable, __file__, "--only", contender, *sys.argv[1:]]
        out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        line = next((line for line in out.stdout.splitlines() if line.startswith("RESULT ")), None)
        if line is None:
            print(f"{contender} failed:\n{out.stderr[-2000:]}", flush=True)
            continue
        results.append(json.loads(line[7:]))
        print(f"{results[-1]['name']:52} {results[-1]['steps_per_s']:.3f} steps/s  "
              f"peak RSS {results[-1]['peak_rss_gb']:.2f} GB", flush=True)
    ours = [r for r in results if r["name"].startswith("lightning_ft")]
    for mine in ours:
        for other in (r for r in results if r not in ours):
            print(f"{mine['name']} vs {other['name']}: {mine['steps_per_s'] / other['steps_per_s']:.2f}x steps/s, "
                  f"{mine['peak_rss_gb'] - other['peak_rss_gb']:+.2f} GB peak RSS")


if __name__ == "__main__":
    main()
