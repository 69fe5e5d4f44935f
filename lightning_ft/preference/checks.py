"""Model-free checks of preference pairs: identical sides, duplicates, contradictions, leakage and length bias.

Each check maps pairs to :class:`~lightning_ft.data.checks.Finding` (never raising on bad data), so
``lightning_ft preference check-data`` reports them all and :class:`PreferenceDataModule` warns about them at
``fit`` time. Structural problems (an empty side, a prompt that differs between sides, a missing field) are
found while reading (:func:`~lightning_ft.preference.data.scan_pairs`) and reported as errors with file and line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lightning_ft.data.checks import NEAR_DUPLICATE_THRESHOLD, Finding, find_leakage, normalize
from lightning_ft.data.formats import Conversation
from lightning_ft.preference.data import PreferencePair

#: |length bias| from which chosen replies count as systematically longer (or shorter): 0.5 means 75% of the
#: pairs that differ in length go one way.
LENGTH_BIAS_THRESHOLD = 0.5
#: Fewer pairs than this differing in length say nothing about a bias.
MIN_PAIRS_FOR_BIAS = 5


def _key(pair: PreferencePair) -> tuple[str, str]:
    return "\n".join(normalize(m["content"]) for m in pair.prompt if m["role"] != "system"), normalize(pair.chosen)


def find_identical_sides(pairs: Sequence[PreferencePair]) -> list[Finding]:
    """Pairs whose chosen and rejected replies are the same text (up to case and punctuation): no signal."""
    return [Finding("warning", "identical-pair", pair.source,
                    "chosen and rejected replies are identical" + ("" if pair.chosen == pair.rejected
                                                                   else " up to case and punctuation")
                    + ": the pair teaches nothing")
            for pair in pairs if normalize(pair.chosen) == normalize(pair.rejected)]


def find_pair_duplicates(pairs: Sequence[PreferencePair]) -> list[Finding]:
    """Repeated pairs (same prompt and replies), and contradictions (another pair prefers the opposite reply)."""
    findings, seen = [], {}
    for pair in pairs:
        prompt, chosen = _key(pair)
        rejected = normalize(pair.rejected)
        key = (prompt, chosen, rejected)
        if key in seen:
            findings.append(Finding("warning", "duplicate-pair", pair.source, f"same pair as {seen[key].source}"))
        elif (prompt, rejected, chosen) in seen:
            findings.append(Finding("warning", "contradicting-pair", pair.source,
                                    f"prefers the reply that {seen[(prompt, rejected, chosen)].source} rejects"))
        seen.setdefault(key, pair)
    return findings


def _as_conversation(pair: PreferencePair) -> Conversation:
    return Conversation(tuple(pair.conversation("chosen")), pair.source)


def length_bias(pairs: Sequence[PreferencePair]) -> tuple[float, int, float]:
    """``(bias, pairs that differ in length, mean chosen/rejected length ratio)``, lengths in characters.

    ``bias`` is (pairs whose chosen reply is longer - pairs whose chosen reply is shorter) / pairs that differ:
    +1 when every chosen reply is longer, -1 when every one is shorter, 0 when length says nothing.
    """
    longer = sum(len(p.chosen) > len(p.rejected) for p in pairs)
    shorter = sum(len(p.chosen) < len(p.rejected) for p in pairs)
    differ = longer + shorter
    ratios = [len(p.chosen) / max(1, len(p.rejected)) for p in pairs]
    return ((longer - shorter) / differ if differ else 0.0), differ, (sum(ratios) / len(ratios) if ratios else 1.0)


def find_length_bias(pairs: Sequence[PreferencePair], name: str = "train") -> list[Finding]:
    """The length bias as a number (info), a warning when chosen replies are systematically longer or shorter.

    DPO learns "longer is better" (or "shorter is better") when length alone separates chosen from rejected.
    """
    if not pairs:
        return []
    bias, differ, ratio = length_bias(pairs)
    direction = "longer" if bias > 0 else "shorter"
    share = (1 + abs(bias)) / 2
    message = (f"{name}: length bias {bias:+.2f} (chosen reply {direction} than rejected in {share:.0%} of the "
               f"{differ} pairs that differ in length; mean chosen/rejected length ratio {ratio:.2f})")
    if differ >= MIN_PAIRS_FOR_BIAS and abs(bias) >= LENGTH_BIAS_THRESHOLD:
        return [Finding("warning", "length-bias", "", message + ": the model may learn length instead of quality; "
                        "add pairs where the preferred reply is the " + ("shorter" if bias > 0 else "longer") + " one")]
    return [Finding("info", "length-bias", "", message)]


def lint_pairs(splits: Mapping[str, Sequence[PreferencePair]],
               threshold: float = NEAR_DUPLICATE_THRESHOLD) -> list[Finding]:
    """Every model-free preference check; ``splits`` maps ``train``/``val`` to pairs.

    Identical sides, duplicates and length bias are checked per split; every split other than ``train`` is
    checked for prompts leaking from ``train`` (validation rewards would be inflated).
    """
    findings = []
    for name, pairs in splits.items():
        findings += find_identical_sides(pairs) + find_pair_duplicates(pairs) + find_length_bias(pairs, name)
    train = splits.get("train", ())
    for name, pairs in splits.items():
        if name != "train" and train and pairs:
            # One conversation per distinct prompt: several pairs per prompt are normal in preference data.
            unique = {_key(p)[0]: p for p in reversed(train)}
            findings += find_leakage([_as_conversation(p) for p in unique.values()],
                                     [_as_conversation(p) for p in pairs], threshold,
                                     "validation" if name == "val" else name)
    return findings
