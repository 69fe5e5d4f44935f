"""The batching rule: padded, grouped or packed from the data's padding share and the attention kernel."""

from __future__ import annotations

import pytest

from lightning_ft.data.batching import MAX_PADDING, choose_batching, padding_share

UNIFORM = [100 + i % 5 for i in range(64)]  # a few % padding
VARIED = [30, 900, 60, 200, 45, 120, 500, 80] * 8


def test_padding_share_of_shuffled_and_grouped_batches():
    assert padding_share([10] * 16, 4) == 0.0
    assert padding_share([10, 30], 2) == pytest.approx(1 - 40 / 60)
    assert padding_share(VARIED, 8) > 0.5 > 0.1 > padding_share(VARIED, 8, grouped=True)
    assert padding_share([], 8) == 0.0


def test_uniform_data_stays_padded_even_when_the_attention_packs():
    choice = choose_batching(UNIFORM, 8, packs_natively=True)
    assert choice.mode == "padded" and choice.padding <= MAX_PADDING
    assert "padding" in str(choice) and str(choice).startswith("Batches: padded")


def test_varied_data_packs_when_the_attention_does_it_natively_else_groups():
    packed = choose_batching(VARIED, 8, packs_natively=True)
    assert packed.mode == "packed" and "keeps packed conversations apart" in packed.reason
    grouped = choose_batching(VARIED, 8, packs_natively=False)
    assert grouped.mode == "grouped" and "grouped by length" in grouped.reason and "packs_natively" not in grouped.reason


def test_unknown_attention_does_not_pack_and_says_so():
    unknown = choose_batching(VARIED, 8, packs_natively=None)
    assert unknown.mode == "grouped" and "not packed: packs_natively is not set" in str(unknown)
    assert "packs_natively" not in choose_batching(UNIFORM, 8, packs_natively=None).reason  # packing would not pay
    with pytest.raises(TypeError, match=r"packs_natively=<function .*> must be true, false or None"):
        choose_batching(VARIED, 8, packs_natively=lambda: True)  # the old callable form is refused, not truthy


def test_explicit_settings_win():
    assert choose_batching(UNIFORM, 8, packing=True).mode == "packed"
    assert choose_batching(VARIED, 8, packing=False, packs_natively=True).mode == "grouped"
    assert choose_batching(VARIED, 8, packing=False, group_by_length=False).mode == "padded"
    assert choose_batching(UNIFORM, 8, group_by_length=True).mode == "grouped"
    assert choose_batching(VARIED, 8, packing=False, group_by_length=False).reason.endswith("packing and grouping off")
