"""Curve model and the exact integer split."""

from __future__ import annotations

import numpy as np
import pytest

from simulator.curve import MINUTES_PER_DAY, allocate, intraday_shape, minute_weights


@pytest.mark.parametrize("total", [0, 1, 7, 999_983, 7_410_000_000_000, 2**62])
def test_allocate_sums_exactly(total):
    """Parts always add up to the total exactly, even at 2**62 cents over 15,840 minutes."""
    weights = np.random.default_rng(total % 97).random(15_840) + 1e-3
    parts = allocate(total, weights)
    assert parts.dtype == np.int64 and int(parts.sum()) == total and parts.min() >= 0


def test_allocate_uses_largest_remainders():
    """10 split three ways gives 4, 3, 3; 5 over (1, 3) gives 1, 4 after rounding 1.25, 3.75."""
    assert allocate(10, np.array([1, 1, 1])).tolist() == [4, 3, 3]
    assert allocate(5, np.array([1, 3])).tolist() == [1, 4]


def test_allocate_rejects_bad_weights():
    """Negative, NaN or all-zero weights and a negative total are refused with a reason."""
    for weights in ([1, -1], [np.nan, 1], [0, 0], []):
        with pytest.raises(ValueError, match="weights"):
            allocate(10, np.array(weights, dtype=float))
    with pytest.raises(ValueError, match="total=-1"):
        allocate(-1, np.ones(3))


def test_day_shape_has_midnight_spike_trough_and_evening_surge():
    """The intraday shape peaks at 00:00, bottoms out overnight, and rises again by evening."""
    shape = intraday_shape(spike=50.0)
    hour = lambda h: shape[int(h * 60)]  # noqa: E731
    assert shape.argmax() == 0
    assert hour(4) < hour(12) < hour(21.5)
    assert hour(0.05) > 10 * hour(4)


def test_minute_weights_give_each_day_its_weight():
    """Every day's minutes add up to that day's weight."""
    weights = minute_weights([0.5, 0.2, 0.3], [10.0, 1.0, 20.0])
    assert len(weights) == 3 * MINUTES_PER_DAY
    days = weights.reshape(3, MINUTES_PER_DAY).sum(axis=1)
    assert np.allclose(days, [0.5, 0.2, 0.3])
