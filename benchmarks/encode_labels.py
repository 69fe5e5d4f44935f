"""Labelling throughput: ``encode_conversation`` (render, tokenise with offsets, locate replies) per second.

Encodes the shipped general conversations and the triage example with the embedded default tokenizer,
a few passes after one untimed warm-up, and prints conversations/s and tokens/s per data file::

    python benchmarks/encode_labels.py --passes 3
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from lightning_ft.data.collate import encode_conversation
from lightning_ft.data.datamodule import DEFAULT_REPLAY
from lightning_ft.data.formats import read_conversations
from lightning_ft.models import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FILES = {"general_chat": DEFAULT_REPLAY, "triage": str(ROOT / "examples" / "triage" / "train.jsonl")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    options = parser.parse_args()
    tokenizer = load_tokenizer(options.model)
    warnings.simplefilter("ignore")
    for name, path in FILES.items():
        conversations = read_conversations(path)
        tokens = sum(len(encode_conversation(c.messages, tokenizer)["input_ids"]) for c in conversations)
        start = time.perf_counter()
        for _ in range(options.passes):
            for conversation in conversations:
                encode_conversation(conversation.messages, tokenizer)
        seconds = (time.perf_counter() - start) / options.passes
        print(f"{name}: {len(conversations)} conversations, {tokens:,} tokens: {seconds * 1000:.0f} ms per pass, "
              f"{len(conversations) / seconds:,.0f} conversations/s, {tokens / seconds:,.0f} tokens/s")


if __name__ == "__main__":
    main()
