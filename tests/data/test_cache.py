"""The encode cache key changes with every setting that changes labels, and with the encoder's version."""

from __future__ import annotations

from lightning_ft.data import cache
from lightning_ft.data.formats import Conversation

CONVERSATIONS = [Conversation(({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}), "t:1")]


def test_labelling_settings_and_version_are_part_of_the_key(tiny_tokenizer, monkeypatch):
    def key(**labelling):
        return cache.encoding_key(CONVERSATIONS, tiny_tokenizer, None, 64, "cut", labelling)

    base = key(stop_tokens=[2], masking="assistant", train_reasoning=True)
    assert base == key(masking="assistant", train_reasoning=True, stop_tokens=[2])
    assert len({base, key(stop_tokens=[2, 0], masking="assistant", train_reasoning=True),
                key(stop_tokens=[2], masking="all", train_reasoning=True),
                key(stop_tokens=[2], masking="assistant", train_reasoning=False)}) == 4
    monkeypatch.setattr(cache, "ENCODING_VERSION", cache.ENCODING_VERSION + 1)
    assert key(stop_tokens=[2], masking="assistant", train_reasoning=True) != base
