"""LoRA fine-tuning throughput: lightning_ft against TRL's SFTTrainer and a plain PyTorch + PEFT loop.

Same model (the embedded SmolLM2-135M-Instruct), same LoRA (r=16, alpha=32, all linear layers, no dropout),
same conversations, same batch size, precision and number of steps; the loss is on assistant tokens only
everywhere. Two data sets: ``chat`` (400 generated conversations with log-normal lengths, 55-1051 tokens,
mean 258: ``benchmarks/chat_data.py``) and ``triage`` (the example's 320 near-uniform conversations). Every
precision the hardware runs natively is measured (fp32, and bf16-mixed on CPUs with AVX512-BF16/AMX and
bf16 GPUs). Each contender runs in its own process (so peak RSS is its own) and prints one JSON line; the
parent prints one table per data set and precision, with each contender's estimated epoch time and its
speed against TRL's fastest padding-free run in the same table::

    pip install -e ".[bench]"
    python benchmarks/sft_throughput.py                     # default contenders, both data sets, all precisions
    python benchmarks/sft_throughput.py --data chat --precision bf16-mixed --only lightning_ft --only trl_padding_free
    python benchmarks/sft_throughput.py --data chat --only lightning_ft --profile   # where one step's time goes

Reported per contender: real (non-pad) tokens/s, trained tokens/s, seconds/step, peak RSS, and the model
FLOP/s (4 x linear parameters x real tokens: forward plus the input gradients of a frozen base; LoRA's
own FLOPs are negligible) against the matmul peak of this machine, measured here in fp32 and bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from meter import Meter, lightning_timing, trl_timing

ROOT = Path(__file__).resolve().parents[1]
TRIAGE = ROOT / "examples" / "triage" / "train.jsonl"
#: lightning_ft contenders and their FineTuneModule / ChatDataModule settings on top of the defaults.
LIGHTNING_FT = {
    "lightning_ft": {},
    "lightning_ft_padded": {"packing": False, "group_by_length": False},
    "lightning_ft_grouped": {"packing": False, "group_by_length": True},
    "lightning_ft_packed": {"packing": True},
    "lightning_ft_checkpointing": {"gradient_checkpointing": True},
    "lightning_ft_half_checkpointing": {"gradient_checkpointing": 0.5},
    "lightning_ft_compile": {"compile": True},
    "lightning_ft_compile_half_checkpointing": {"compile": True, "gradient_checkpointing": 0.5},
    # GPU only (benchmarks/gpu_check.sh):
    "lightning_ft_flash": {"attn_implementation": "flash_attention_2"},
    "lightning_ft_qlora": {"qlora": True},
    "lightning_ft_fsdp": {"strategy": "fsdp"},
}
CONTENDERS = (*LIGHTNING_FT, "trl", "trl_no_checkpointing", "trl_padding_free", "trl_padding_free_no_checkpointing",
              "trl_padding_free_compile", "trl_padding_free_flash", "trl_packing", "plain_peft")
#: Run when --only is not given: our defaults, each batching mode, and TRL's padding-free runs.
DEFAULT_CONTENDERS = ("lightning_ft", "lightning_ft_padded", "lightning_ft_grouped", "lightning_ft_packed",
                      "trl_padding_free", "trl_padding_free_no_checkpointing")
DATA_KEYS = ("packing", "group_by_length")
TRAINER_KEYS = ("strategy", "qlora")
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def matmul_peak(dtype_name: str, size: int = 1024, repeats: int = 20, device: str = "cpu") -> float:
    """Measured FLOP/s of a square matmul on this machine (best of ``repeats``)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def linear_params(model) -> int:
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def data_path(args) -> Path:
    """The data set's training file (the chat data is generated into the work directory once)."""
    if args.data == "triage":
        return TRIAGE
    path = Path(args.workdir) / "chat.jsonl"
    if not path.exists():
        sys.path.insert(0, str(Path(__file__).parent))
        from chat_data import write

        write(path)
    return path


def conversations(args, limit: int) -> list[list[dict]]:
    with open(data_path(args)) as file:
        return [json.loads(line)["messages"] for line in file][:limit]


def run_lightning_ft(args, contender: str) -> dict:
    import pytorch_lightning as pl
    from step_profile import StepProfile

    from lightning_ft import ChatDataModule, FineTuneModule, LoRA, QLoRA

    settings = dict(LIGHTNING_FT[contender])
    data_settings = {key: settings.pop(key) for key in DATA_KEYS if key in settings}
    special = {key: settings.pop(key) for key in TRAINER_KEYS if key in settings}
    meter = Meter(args.warmup)

    adapter = (QLoRA if special.get("qlora") else LoRA)(r=16, alpha=32, dropout=0.0)
    module = FineTuneModule(adapter=adapter, **settings)
    strategy = "auto"
    if special.get("strategy") == "fsdp":  # one GPU: FSDP's code path (sharding units, flat parameters) at world size 1
        from pytorch_lightning.strategies import FSDPStrategy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        strategy = FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, use_orig_params=True)
    data = ChatDataModule(str(data_path(args)), tokenizer=module.hparams.model_name, batch_size=args.batch_size,
                          max_length=args.max_length, encode_cache=False, checks="off",
                          packs_natively=module.packs_natively(), **data_settings)
    callbacks = [lightning_timing(meter, count=True)] + ([StepProfile(args.warmup)] if args.profile else [])
    trainer = pl.Trainer(max_steps=args.warmup + args.steps, precision=args.precision, logger=False,
                         accelerator=args.device, devices=1, strategy=strategy,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(module, data)
    name = "lightning_ft, " + (", ".join(f"{key}={value}" for key, value in LIGHTNING_FT[contender].items())
                               or "defaults") + f" ({data.batching().mode})"
    extra = {"epoch_tokens": data.stats["tokens"], **({"profile": callbacks[-1].shares} if args.profile else {})}
    return meter.result(name, linear_params(module.model.get_base_model()), extra)


def run_trl(args, variant: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from lightning_ft.models import DEFAULT_MODEL, load_model, load_tokenizer

    meter = Meter(args.warmup)
    rows = [{"prompt": conv[:-1], "completion": conv[-1:]} for conv in conversations(args, 10**9)]
    padding_free = variant.startswith("trl_padding_free")
    config = SFTConfig(
        output_dir=str(Path(args.workdir) / variant), per_device_train_batch_size=args.batch_size,
        # Padding-free without packing refuses max_length: the triage conversations are all shorter anyway.
        max_length=None if padding_free else args.max_length,
        max_steps=args.warmup + args.steps, learning_rate=2e-4,
        completion_only_loss=True, padding_free=padding_free, packing=variant == "trl_packing",
        torch_compile=variant.endswith("_compile"),
        # TRL turns gradient checkpointing on by default: less memory, ~1/3 more compute per step.
        gradient_checkpointing=not variant.endswith("no_checkpointing"),
        bf16=args.precision.startswith("bf16"), fp16=args.precision.startswith("16"), use_cpu=args.device == "cpu", report_to=[], save_strategy="no", logging_steps=10**6,
        dataloader_num_workers=0, seed=42,
    )
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    attention = {"attn_implementation": "flash_attention_2"} if variant.endswith("_flash") else {}
    trainer = SFTTrainer(model=load_model(DEFAULT_MODEL, **attention), args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        meter.count(batch)
        return batch

    trainer.data_collator = counting_collator

    trainer.add_callback(trl_timing(meter))
    trainer.train()
    return meter.result(variant.replace("_", " ").replace("trl", "TRL SFTTrainer", 1),
                        linear_params(trainer.model.get_base_model()))


def run_plain(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from lightning_ft.data.collate import collate, encode_conversation, truncate_example
    from lightning_ft.models import DEFAULT_MODEL, load_model, load_tokenizer

    torch.manual_seed(42)
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    examples = [truncate_example(encode_conversation(conv, tokenizer), args.max_length)
                for conv in conversations(args, args.batch_size * (args.warmup + args.steps))]
    model = get_peft_model(load_model(DEFAULT_MODEL), LoraConfig(task_type="CAUSAL_LM", **LORA))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    meter = Meter(args.warmup)
    for step in range(args.warmup + args.steps):
        batch = collate(examples[step * args.batch_size:(step + 1) * args.batch_size], tokenizer.pad_token_id)
        meter.count(batch)
        meter.begin()
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision.startswith("bf16")):
            loss = model(**batch).loss  # HF's mean over the batch's trained tokens, full-vocabulary logits everywhere
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        meter.end()
    return meter.result("plain PyTorch + PEFT loop", linear_params(model.get_base_model()))


def child(args) -> None:
    import torch

    torch.manual_seed(42)
    if args.only in LIGHTNING_FT:
        result = run_lightning_ft(args, args.only)
    elif args.only.startswith("trl"):
        result = run_trl(args, args.only)
    else:
        result = run_plain(args)
    print("RESULT " + json.dumps(result), flush=True)


def table(results: list[dict], peak: float, precision: str) -> str:
    """One row per contender. The epoch estimate is the data's real tokens at each contender's rate; "vs TRL"
    compares with TRL's fastest padding-free run in wall time and in tokens per CPU-second of the process
    (all its threads), which other load on the machine disturbs far less than wall time."""
    trl = [r for r in results if r["name"].startswith("TRL SFTTrainer padding free")]
    best_wall = max((r["tokens_per_s"] for r in trl), default=None)
    best_cpu = max((r["tokens_per_cpu_s"] for r in trl), default=None)
    epoch_tokens = next((r["epoch_tokens"] for r in results if "epoch_tokens" in r), None)
    head = (f"{'contender':60} {'tokens/s':>9} {'/CPU-s':>7} {'s/step':>7} {'epoch s':>8} {'vs TRL':>7} "
            f"{'(CPU)':>6} {'peak RSS':>9} {'GFLOP/s':>8} {f'% {precision} peak':>16} {'warmup s':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        epoch = f"{epoch_tokens / r['tokens_per_s']:8.0f}" if epoch_tokens else f"{'':8}"
        wall = f"{r['tokens_per_s'] / best_wall:6.2f}x" if best_wall else f"{'':7}"
        cpu = f"{r['tokens_per_cpu_s'] / best_cpu:5.2f}x" if best_cpu else f"{'':6}"
        lines.append(f"{r['name']:60} {r['tokens_per_s']:9.1f} {r['tokens_per_cpu_s']:7.1f} {r['s_per_step']:7.2f} "
                     f"{epoch} {wall} {cpu} {r['peak_rss_gb']:7.2f}GB {r['model_flops'] / 1e9:8.1f} "
                     f"{100 * r['model_flops'] / peak:15.1f}% {r['warmup_s']:8.1f}")
    for r in results:
        if r.get("profile"):
            lines.append(f"one step of {r['name']}: " + ", ".join(f"{k} {v:.0%}" if k != "step seconds" else
                                                                  f"{k} {v}" for k, v in r["profile"].items()))
    return "\n".join(lines)


def hardware_precisions(device: str) -> list[str]:
    """fp32, and bf16-mixed where the hardware runs bf16 natively (what ``precision: auto`` would pick)."""
    from lightning_ft.precision import resolve_precision

    native = resolve_precision("cuda" if device == "cuda" else "cpu").precision
    return ["32-true"] + ([native] if native != "32-true" else [])


def run_child(args, name: str, data: str, precision: str) -> dict | None:
    command = [sys.executable, __file__, "--child", "--only", name, "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--batch_size", str(args.batch_size), "--max_length", str(args.max_length),
               "--workdir", args.workdir, "--data", data, "--precision", precision, "--device", args.device]
    log = Path(args.workdir) / f"{data}_{precision}_{name}.log"  # the child's stderr, step times included
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as stderr:
        done = subprocess.run(command + (["--profile"] if args.profile else []), stdout=subprocess.PIPE,
                              stderr=stderr, text=True)
    found = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not found:
        print(f"{name}: failed (exit {done.returncode})\n{log.read_text()[-2000:]}", flush=True)
        return None
    result = json.loads(found[0])
    print(f"{data}, {precision}, {name}: {result['tokens_per_s']:.1f} tokens/s, {result['peak_rss_gb']:.2f} GB",
          flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("::")[0])
    parser.add_argument("--only", choices=CONTENDERS, action="append",
                        help=f"contenders to run (default: {', '.join(DEFAULT_CONTENDERS)})")
    parser.add_argument("--data", choices=("chat", "triage"), action="append", help="data sets (default: both)")
    parser.add_argument("--precision", action="append", help="Trainer precisions (default: every native one)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per contender")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--profile", action="store_true", help="profile the first timed step of lightning_ft runs")
    parser.add_argument("--workdir", default="runs/bench")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.only, args.data, args.precision = args.only[0], args.data[0], args.precision[0]
        return child(args)
    import torch

    from lightning_ft.precision import cpu_bf16_flags

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, native bf16 flags: "
          f"{', '.join(cpu_bf16_flags()) or 'none'}; device {args.device}", flush=True)
    for precision in args.precision or hardware_precisions(args.device)[::-1]:
        dtype = "bfloat16" if precision.startswith("bf16") else "float16" if precision.startswith("16") else "float32"
        peak = matmul_peak(dtype, device=args.device)
        for data in args.data or ("chat", "triage"):
            results = [r for name in args.only or DEFAULT_CONTENDERS if (r := run_child(args, name, data, precision))]
            print(f"\n{data} data, {precision} (matmul peak {peak / 1e9:.1f} GFLOP/s in {dtype}):")
            print(table(results, peak, precision), flush=True)


if __name__ == "__main__":
    main()
