"""Variable-length chat data for the throughput benchmark: log-normal lengths, as real chat data has.

Conversations are written from small pools of sentences (a help-desk and how-to assistant), with an optional
system prompt, one to three user/assistant turns, and answers whose length is drawn so that whole
conversations are log-normal in tokens: median ~190, a few dozen to ~1,000 tokens (SmolLM2's tokenizer)::

    python benchmarks/chat_data.py runs/bench/chat.jsonl --count 400
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

TOPICS = ("backing up a laptop", "setting up a home router", "choosing a password manager", "a slow spreadsheet",
          "planning a team offsite", "learning Python", "a printer that jams", "writing a cover letter",
          "a flaky unit test", "moving photos to a new phone", "budgeting for a trip", "a noisy fridge")
ASKS = ("How do I deal with {t}?", "Can you help me with {t}? I tried a few things already.",
        "What's the quickest fix for {t}?", "Any advice on {t}? Keep it practical.",
        "I'm stuck on {t}. Where should I start?", "Explain {t} like I'm new to it.")
FOLLOW_UPS = ("What if that doesn't work?", "Can you make that shorter?", "Why does step two matter?",
              "Is there a cheaper option?", "Thanks! One more thing: how long will it take?")
SENTENCES = ("Start by writing down exactly what happens and when, so you can tell whether a change helped.",
             "Restart the device and check for updates first; it fixes more problems than it should.",
             "Make a copy of anything important before you change settings, just in case.",
             "If the problem comes back, note the time and what you were doing, because patterns are clues.",
             "Most people skip this step, but reading the error message carefully usually points to the cause.",
             "Try the simplest explanation before the clever one; loose cables and full disks are common.",
             "Change one thing at a time, otherwise you will not know which change made the difference.",
             "Set aside twenty minutes, close other tabs, and work through the list from the top.",
             "The official guide covers the basics well, although it hides the useful part near the end.",
             "If you get stuck, ask someone to watch you do it once; a second pair of eyes finds things fast.",
             "Keep a short log: date, what you tried, and what happened. Future you will be grateful.",
             "When in doubt, go back to the last state that worked and move forward in small steps.")
SYSTEMS = ("You are a helpful, concise assistant.", "You are a patient technical support assistant. Answer in "
           "plain language and number the steps when there are several.")


def answer(rng: random.Random, words: int) -> str:
    """About ``words`` words of advice, in sentences (and numbered steps for longer answers)."""
    parts, count = [], 0
    while count < words:
        sentence = rng.choice(SENTENCES)
        parts.append(f"{len(parts) + 1}. {sentence}" if words > 120 else sentence)
        count += len(sentence.split())
    return ("\n" if words > 120 else " ").join(parts)


def conversation(rng: random.Random, median_words: float = 110.0, sigma: float = 0.75) -> dict:
    """One conversation whose assistant words are log-normal (clipped to 15..700 words)."""
    total = min(700, max(15, int(rng.lognormvariate(math.log(median_words), sigma))))
    turns = 1 if total < 150 else rng.choice((1, 2, 3))
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.6 else []
    topic = rng.choice(TOPICS)
    for turn in range(turns):
        ask = rng.choice(ASKS).format(t=topic) if turn == 0 else rng.choice(FOLLOW_UPS)
        messages += [{"role": "user", "content": ask},
                     {"role": "assistant", "content": answer(rng, total // turns)}]
    return {"messages": messages}


def write(path: str | Path, count: int = 400, seed: int = 0, median_words: float = 110.0, sigma: float = 0.75) -> Path:
    """Write ``count`` conversations (seeded, lengths as :func:`conversation` draws them) as JSONL; returns the path."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as file:
        for _ in range(count):
            file.write(json.dumps(conversation(rng, median_words, sigma)) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("::")[0])
    parser.add_argument("path")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--median_words", type=float, default=110.0, help="median assistant words per conversation")
    parser.add_argument("--sigma", type=float, default=0.75, help="log-normal spread of the assistant words")
    args = parser.parse_args()
    print(write(args.path, args.count, args.seed, args.median_words, args.sigma))


if __name__ == "__main__":
    main()
