"""Write the triage preference pairs (train.jsonl, val.jsonl) from the triage example's conversations.

Chosen is always the triage dataset's answer: one line of compact, correct JSON. Rejected cycles through four
ways to get it wrong, chosen so that length alone does not separate the sides (two are longer, one is shorter,
one is about as long): a chatty answer with the JSON pretty-printed in a code fence; the right JSON with a
sentence after it; the wrong category; the summary left out.

    python examples/preference/make_pairs.py      # deterministic: rewrites the committed files identically
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRIAGE = HERE.parent / "triage"
CATEGORIES = ("billing", "shipping", "technical", "account", "other")


def _verbose(answer: dict) -> str:
    return ("Sure! I have looked at this ticket carefully. Here is my triage:\n\n```json\n"
            + json.dumps(answer, indent=2) + "\n```\n\nLet me know if you need anything else!")


def _trailing(answer: dict) -> str:
    return json.dumps(answer) + f"\nThis ticket should go to the {answer['category']} team."


def _wrong_category(answer: dict) -> str:
    wrong = CATEGORIES[(CATEGORIES.index(answer["category"]) + 1) % len(CATEGORIES)]
    return json.dumps({**answer, "category": wrong})


def _no_summary(answer: dict) -> str:
    return json.dumps({"category": answer["category"], "urgency": answer["urgency"]})


REJECTS = (_verbose, _wrong_category, _no_summary, _trailing)


def pairs(source: Path, limit: int) -> list[dict]:
    """The first ``limit`` conversations of ``source`` as prompt/chosen/rejected records."""
    records = []
    for index, line in enumerate(source.read_text(encoding="utf-8").splitlines()[:limit]):
        messages = json.loads(line)["messages"]
        chosen = messages[-1]["content"]
        answer = json.loads(chosen)
        records.append({"prompt": messages[:-1], "chosen": chosen, "rejected": REJECTS[index % len(REJECTS)](answer)})
    return records


def main() -> None:
    for name, limit in (("train", 160), ("val", 32)):
        with open(HERE / f"{name}.jsonl", "w", encoding="utf-8") as file:
            for record in pairs(TRIAGE / f"{name}.jsonl", limit):
                file.write(json.dumps(record, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
