"""One padding helper for both sides, and one rule for the pad id."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lightning_ft.data.padding import pad, pad_token_id, padded_length


def test_right_and_left_padding_with_masks():
    ids, mask = pad([[5, 6, 7], [8]], value=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad([[5, 6, 7], [8]], value=-100, side="left")
    assert ids.tolist() == [[5, 6, 7], [-100, -100, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_length_rounds_up_to_the_multiple_and_an_exact_multiple_stays():
    assert pad([[1, 2, 3]], 0, pad_to_multiple_of=4)[0].shape == (1, 4)
    assert pad([[1, 2, 3, 4]], 0, pad_to_multiple_of=4)[0].shape == (1, 4)
    assert padded_length(5, None) == 5 and padded_length(5, 8) == 8 and padded_length(0, 8) == 0
    assert pad([[1]], 9, length=3)[0].tolist() == [[1, 9, 9]]
    with pytest.raises(ValueError, match="row 0 has 2 tokens, more than the padded length 1"):
        pad([[1, 2]], 0, length=1)


@pytest.mark.parametrize("pad_id, eos_id, expected", [(3, 7, 3), (None, 7, 7), (None, None, 0), (0, 7, 0)])
def test_one_pad_id_rule(pad_id, eos_id, expected):
    assert pad_token_id(SimpleNamespace(pad_token_id=pad_id, eos_token_id=eos_id)) == expected
