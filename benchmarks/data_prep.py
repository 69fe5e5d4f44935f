"""Data preparation at scale: lightning_ft's ChatDataModule against TRL's SFTTrainer and the tokenizer floor.

Writes N synthetic multi-turn conversations (system prompt, 3-4 user/assistant turns, ~150 tokens each with
the default model's tokenizer) to a JSONL file, then runs each contender in a fresh process and reports
wall time, time per 100k conversations, the ratio to the floor and peak RSS, measured the same way for every
contender: the main process (``ru_maxrss``), the largest worker process, and the process tree (main plus
workers, sampled every 0.2 s) twice: the sum of RSS (a page shared after fork counts once per process that
maps it) and the sum of PSS (a shared page split between them: what the tree really holds):

- ``floor``: the fast tokenizer's batched tokenisation of the same conversations rendered by the chat
  template (rendering not timed): no labels, no checks, no reading.
- ``lightning_ft``: ``ChatDataModule.setup("fit")`` with its defaults from the JSONL file (reading, record
  checks, the data checks of ``checks="warn"``, labels, truncation, the Arrow cache written), on a cold cache;
  ``lightning_ft (cache hit)`` runs it again.
- ``trl``: ``SFTTrainer``'s dataset preparation of the same file (``load_dataset("json")``, chat template,
  tokenisation), with a tiny model so that only the data counts.

With ``--streaming B``, only ``lightning_ft (streaming)`` runs: ``ChatDataModule(streaming=True)`` set up and
``B`` training batches of 4 drawn (shuffle buffer of 10,000, packed, ``--num_proc`` DataLoader workers): time to
the first batch, time for all ``B``, conversations per second after the first batch, and peak RSS, which should
not grow with the corpus.

    python benchmarks/data_prep.py --conversations 100000 --num_proc 2
    python benchmarks/data_prep.py --conversations 100000 1000000 --streaming 200 --num_proc 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_WORDS = ("the model data train token loss time value river cloud light paper stone green quick slow answer "
          "question because system order result number market energy garden music history simple").split()


def write_corpus(path: Path, count: int, seed: int = 0) -> None:
    """``count`` synthetic conversations: a system prompt and 3-4 user/assistant turns of 6-16 words."""
    rng = random.Random(seed)
    with path.open("w") as out:
        for index in range(count):
            messages = [{"role": "system", "content": "You are a concise assistant."}]
            for _ in range(rng.randint(3, 4)):
                messages.append({"role": "user", "content": " ".join(rng.choices(_WORDS, k=rng.randint(6, 16))) + "?"})
                messages.append({"role": "assistant", "content": f"{index}: " + " ".join(
                    rng.choices(_WORDS, k=rng.randint(6, 16))) + "."})
            out.write(json.dumps({"messages": messages}) + "\n")


def _peak_mb() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def _tree_memory_mb(root: int) -> tuple[float, float]:
    """Resident memory of ``root`` and every process below it: the sum of their RSS (a page shared after ``fork``
    counted once per process that maps it) and of their PSS (a shared page split between the processes)."""
    parents, rss = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                parents[int(entry)], rss[int(entry)] = int(fields[1]), int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    return sum(rss.get(pid, 0) for pid in tree) / 2**20, sum(_pss_kb(pid) for pid in tree) / 2**10


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            return next((int(line.split()[1]) for line in rollup if line.startswith("Pss:")), 0)
    except (OSError, ValueError):
        return 0


class _TreePeak(threading.Thread):
    """Samples the process tree's resident memory every 0.2 s: worker processes count, at their own peaks."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.peak_pss, self.done = 0.0, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            rss, pss = _tree_memory_mb(os.getpid())
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)


def run_floor(path: str, tokenizer_spec: str, _: int) -> dict:
    from lightning_ft.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_spec)
    with open(path) as lines:
        conversations = [json.loads(line)["messages"] for line in lines]
    texts = tokenizer.apply_chat_template(conversations, tokenize=False)
    del conversations
    started = time.perf_counter()
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return {"seconds": time.perf_counter() - started, "tokens": tokens}


def run_lightning_ft(path: str, tokenizer_spec: str, num_proc: int) -> dict:
    from lightning_ft.data.datamodule import ChatDataModule

    started = time.perf_counter()
    # The defaults a user gets (checks="warn": duplicates, leakage and consistency checks included).
    data = ChatDataModule(path, tokenizer=tokenizer_spec, max_length=2048, num_proc=num_proc)
    data.setup("fit")
    return {"seconds": time.perf_counter() - started, "tokens": data.stats["tokens"]}


def run_trl(path: str, tokenizer_spec: str, num_proc: int) -> dict:
    import datasets
    import pyarrow.compute as pc
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from lightning_ft.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_spec)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    started = time.perf_counter()
    train = datasets.load_dataset("json", data_files=[path], split="train")
    with tempfile.TemporaryDirectory() as output:
        trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=train, args=SFTConfig(
            output_dir=output, max_length=2048, dataset_num_proc=num_proc if num_proc > 1 else None,
            report_to=[], packing=False, bf16=False, use_cpu=True))
        # Counted from Arrow, as ours is: materialising the column as lists would inflate TRL's peak memory.
        lengths = pc.list_value_length(trainer.train_dataset.data.column("input_ids"))
        tokens = pc.sum(lengths).as_py()
    return {"seconds": time.perf_counter() - started, "tokens": tokens}


def run_streaming(path: str, tokenizer_spec: str, num_proc: int, batches: int) -> dict:
    from lightning_ft.data.datamodule import ChatDataModule

    started = time.perf_counter()
    data = ChatDataModule(path, tokenizer=tokenizer_spec, max_length=2048, streaming=True, packing=True,
                          num_workers=num_proc if num_proc > 1 else 0)
    data.setup("fit")
    tokens, first = 0, None
    for number, batch in enumerate(data.train_dataloader(), start=1):
        first = first if first is not None else time.perf_counter() - started
        tokens += int(batch["token_mask"].sum())
        if number == batches:
            break
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "first_batch_s": first, "batches": number, "tokens": tokens,
            "conversations_per_s": (number - 1) * data.batch_size / max(seconds - first, 1e-9)}  # after the first


_CONTENDERS = {"floor": run_floor, "lightning_ft": run_lightning_ft, "trl": run_trl}


def _worker(name: str, path: str, tokenizer: str, num_proc: int, batches: int) -> None:
    sampler = _TreePeak()
    sampler.start()
    if name == "streaming":
        result = run_streaming(path, tokenizer, num_proc, batches)
    else:
        result = _CONTENDERS[name](path, tokenizer, num_proc)
    sampler.done.set()
    own, children = _peak_mb()
    print(json.dumps({**result, "peak_rss_mb": round(own), "worker_peak_rss_mb": round(children),
                      "tree_peak_rss_mb": round(max(sampler.peak, own)),
                      "tree_peak_pss_mb": round(sampler.peak_pss)}))


def _run(name: str, path: Path, tokenizer: str, num_proc: int, env: dict, batches: int = 0) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--data", str(path), "--tokenizer", tokenizer,
               "--num_proc", str(num_proc), "--streaming", str(batches)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, nargs="+", default=[100_000])
    parser.add_argument("--num_proc", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tokenizer", default="smollm2-135m-instruct")
    parser.add_argument("--skip", nargs="*", default=[], choices=list(_CONTENDERS), help="contenders not to run")
    parser.add_argument("--streaming", type=int, default=0, metavar="B",
                        help="measure streaming instead: set up and draw B batches")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        _worker(options.worker, options.data, options.tokenizer, options.num_proc, options.streaming)
        return
    if options.streaming:
        _stream_table(options)
        return
    rows = []
    for count in options.conversations:
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "chat.jsonl"
            write_corpus(path, count)
            env = _scratch_env(scratch)  # the first lightning_ft run is cold, the second a cache hit
            names = [n for n in ("floor", "lightning_ft", "lightning_ft", "trl") if n not in options.skip]
            results = {}
            for name in names:
                label = name if name not in results else f"{name} (cache hit)"
                results[label] = _run(name, path, options.tokenizer, options.num_proc, env)
                print(f"{count:,} conversations, {label}: {results[label]}", file=sys.stderr, flush=True)
            floor = results.get("floor", {}).get("seconds")
            for label, result in results.items():
                rows.append({"conversations": count, "contender": label, **result,
                             "per_100k_s": result["seconds"] * 100_000 / count,
                             "x_floor": result["seconds"] / floor if floor else None})
    print(f"{'conversations':>13} {'contender':<26} {'tokens':>12} {'wall s':>8} {'s/100k':>8} {'x floor':>8} "
          f"{'RSS MB':>7} {'worker MB':>9} {'tree MB':>8} {'tree PSS':>8}")
    for row in rows:
        ratio = f"{row['x_floor']:.2f}" if row["x_floor"] else "-"
        print(f"{row['conversations']:>13,} {row['contender']:<26} {row['tokens']:>12,} {row['seconds']:>8.1f} "
              f"{row['per_100k_s']:>8.1f} {ratio:>8} {row['peak_rss_mb']:>7} {row['worker_peak_rss_mb']:>9} "
              f"{row['tree_peak_rss_mb']:>8} {row.get('tree_peak_pss_mb', '-'):>8}")
    print(json.dumps(rows))


def _scratch_env(scratch: str) -> dict:
    """A fresh cache for every library, with the converted default model linked in (never converted again)."""
    env = {**os.environ, "LIGHTNING_FT_CACHE": str(Path(scratch) / "cache"),
           "HF_DATASETS_CACHE": str(Path(scratch) / "hf_datasets"), "TOKENIZERS_PARALLELISM": "true"}
    models = Path(os.environ.get("LIGHTNING_FT_CACHE", Path.home() / ".cache" / "lightning_ft")) / "models"
    (Path(scratch) / "cache").mkdir()
    if models.exists():
        os.symlink(models, Path(scratch) / "cache" / "models")
    return env


def _stream_table(options: argparse.Namespace) -> None:
    rows = []
    for count in options.conversations:
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "chat.jsonl"
            write_corpus(path, count)
            result = _run("streaming", path, options.tokenizer, options.num_proc, _scratch_env(scratch),
                          options.streaming)
            print(f"{count:,} conversations, streaming: {result}", file=sys.stderr, flush=True)
            rows.append({"conversations": count, "contender": "lightning_ft (streaming)", **result})
    print(f"{'conversations':>13} {'first batch s':>13} {'batches':>8} {'wall s':>8} {'conv/s':>8} {'RSS MB':>7} "
          f"{'worker MB':>9}")
    for row in rows:
        print(f"{row['conversations']:>13,} {row['first_batch_s']:>13.1f} {row['batches']:>8} {row['seconds']:>8.1f} "
              f"{row['conversations_per_s']:>8.0f} {row['peak_rss_mb']:>7} {row['worker_peak_rss_mb']:>9}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
