"""Per-minute GMV curve of a festival: a shape model and an exact integer split.

Pure: `minute_weights` is a function of the day weights and the shape parameters only, and
`allocate` turns any weights into integer cents that add up to the total exactly.

The intraday shape follows what the published 11.11 milestones show (facts section 3c): an
extreme spike in the first minutes after midnight decaying over the first hour, a flat
overnight trough from about 01:00 to 08:00, a daytime rise and an evening surge to midnight.
"""

from __future__ import annotations

import numpy as np

MINUTES_PER_DAY = 24 * 60


def daytime_level(hour: np.ndarray) -> np.ndarray:
    """The day without its midnight rush: trough overnight, morning rise, evening surge."""
    return (0.25
            + 0.75 / (1 + np.exp(-(hour - 9.0) * 1.2))      # morning rise
            + 0.60 * np.exp(-((hour - 21.5) / 1.8) ** 2))    # evening surge


def intraday_shape(spike: float, *, decay_minutes: float = 9.0) -> np.ndarray:
    """Relative GMV rate for each minute of one day; `spike` scales the midnight rush."""
    hour = np.arange(MINUTES_PER_DAY) / 60.0
    day = daytime_level(hour)
    # After the midnight rush the rate falls back to the trough by about 01:30.
    night = 0.6 * np.exp(-hour / 0.5)
    rush = spike * np.exp(-np.arange(MINUTES_PER_DAY) / decay_minutes)
    return day + night + rush


def minute_weights(day_weights: list[float], day_spikes: list[float]) -> np.ndarray:
    """Weights for every minute of a multi-day window; each day sums to its day weight."""
    if len(day_weights) != len(day_spikes) or not day_weights:
        raise ValueError("day_weights and day_spikes must be non-empty and of equal length")
    days = []
    for weight, spike in zip(day_weights, day_spikes):
        shape = intraday_shape(spike)
        days.append(shape * (weight / shape.sum()))
    return np.concatenate(days)


def allocate(total: int, weights: np.ndarray) -> np.ndarray:
    """Split `total` into int64 parts proportional to `weights`, summing to `total` exactly.

    Largest-remainder rounding: floor every (slightly shrunk) share so the floors can never
    overshoot, then hand the few leftover units to the largest fractional remainders.
    """
    if total < 0:
        raise ValueError(f"total={total}: must not be negative")
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or w.min() < 0 or w.sum() <= 0:
        raise ValueError("weights must be a non-empty 1-d array of finite non-negative numbers")
    return allocate_checked(total, w)


def allocate_checked(total: int, w: np.ndarray) -> np.ndarray:
    """`allocate` for a `total` >= 0 and float64 `w` already known to be valid weights (the
    order generator's log-normal draws), without checking them again: the same arithmetic."""
    share = w * (total * (1 - 2**-32) / w.sum())
    parts = np.floor(share).astype(np.int64)
    leftover = total - int(parts.sum())
    assert leftover >= 0, "shrunk floors overshot the total"
    whole, rest = divmod(leftover, len(w))
    parts += whole
    parts[np.argsort(parts - share, kind="stable")[:rest]] += 1
    return parts
