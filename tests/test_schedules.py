import math

import pytest

from lightning_ft.schedules import lr_lambda, warmup_steps_for


def test_warmup_rises_linearly_to_peak_then_cosine_reaches_floor():
    f = lr_lambda(total_steps=110, warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert f(0) == pytest.approx(1 / 11)
    assert f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


def test_zero_warmup_starts_at_peak():
    f = lr_lambda(total_steps=10, warmup_steps=0, decay="linear", min_lr_ratio=0.0)
    assert f(0) == 1.0
    assert f(5) == pytest.approx(0.5)
    assert f(10) == 0.0


def test_warmup_longer_than_run_is_capped_and_never_zero():
    f = lr_lambda(total_steps=5, warmup_steps=50, decay="cosine")
    values = [f(s) for s in range(5)]
    assert values == sorted(values) and values[0] > 0 and values[-1] < 1.0
    assert warmup_steps_for(5, None, 2.0) == 5


def test_floor_holds_past_the_planned_end():
    f = lr_lambda(total_steps=20, warmup_steps=2, decay="cosine", min_lr_ratio=0.05)
    assert f(1000) == pytest.approx(0.05)


def test_constant_stays_at_peak_after_warmup():
    f = lr_lambda(total_steps=20, warmup_steps=4, decay="constant")
    assert [f(s) for s in range(4, 25)] == [1.0] * 21


def test_cosine_midpoint_matches_formula():
    f = lr_lambda(total_steps=100, warmup_steps=0, decay="cosine", min_lr_ratio=0.0)
    assert f(25) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_warmup_ratio_rounds_and_explicit_steps_win():
    assert warmup_steps_for(100, None, 0.05) == 5
    assert warmup_steps_for(100, 7, 0.05) == 7
    assert warmup_steps_for(100, None, 0.0) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"total_steps": 0}, "total_steps must be >= 1"),
        ({"total_steps": 10, "min_lr_ratio": 1.5}, "min_lr_ratio must be in"),
        ({"total_steps": 10, "decay": "step"}, "decay must be one of"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lr_lambda(**kwargs)
