"""A festival day's shape predicted from what is published about it. Pure: numbers in and out.

The rate, in minutes t since 00:00 (relative units; only the shape matters, the total is given):

    rate(t) = daytime_level(t)
              + ramp(t) * (fast * exp(-t / fast_decay) + slow * exp(-t / slow_decay))

`daytime_level` is `simulator.curve`'s (overnight trough, morning rise, evening surge); the
ramp rises linearly from 0 at 00:00 to 1 at `ramp_minutes`. `fast` is the burst of the first
minutes, `slow` the rush that carries the first hours. Cumulatives are exact integrals, so the
model answers within a minute (RMB 1B at 00:00:21) as well as per minute.

How the five numbers are chosen (`fit_trend`), from the years with precise milestones:
1. Each year alone: on a grid, the (fast, slow, ramp) that pass its milestones best (least
   squares on the log of the elapsed time), for each pair of decays; the decays are the pair
   best for all the years together.
2. Trends across years, by least squares: log(1 + fast) linear in the year (the burst grew
   with the systems that take it), log(slow) linear in the log of the peak ratio (the published
   peak payment rate over the day's mean rate), ramp the geometric mean of the years'.
A year is then predicted from its year and peak ratio alone (`Trend.predict`), each clamped to
the range the trend was fitted on. `leave_one_out` refits without each year in turn.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

import numpy as np

from .curve import MINUTES_PER_DAY, daytime_level

DAY = float(MINUTES_PER_DAY)
FAST_DECAYS = (0.5, 1.0, 2.0, 4.0)                  # minutes
SLOW_DECAYS = (30.0, 40.0, 50.0, 65.0, 85.0)
RAMPS = (10 / 60, 20 / 60, 35 / 60, 1.0, 1.7, 3.0)
SLOW_GRID = np.geomspace(1.0, 100.0, 50)
FAST_GRID = np.concatenate(([0.0], np.geomspace(0.5, 300.0, 40)))
TREND_YEAR = 2015                                   # centre of the year covariate

_FINE = np.linspace(0.0, DAY, MINUTES_PER_DAY * 60 + 1)        # one point a second
_LEVEL = daytime_level(_FINE / 60)
_LEVEL_CUM = np.concatenate(([0.0], np.cumsum((_LEVEL[1:] + _LEVEL[:-1]) / 2 / 60)))
# Where cumulatives are inverted: dense near midnight, where the milestones are seconds apart.
_INVERT_AT = np.concatenate(([0.0], np.geomspace(1 / 600, DAY, 4000)))


def _level(t):
    return np.interp(t, _FINE, _LEVEL)


def _level_cum(t):
    return np.interp(t, _FINE, _LEVEL_CUM)


def _rush_cum(t, decay: float, ramp: float):
    """Integral from 0 to t of min(1, s / ramp) * exp(-s / decay) ds."""
    t = np.asarray(t, dtype=np.float64)
    inside = (decay**2 - decay * np.exp(-t / decay) * (t + decay)) / ramp
    at_ramp = (decay**2 - decay * np.exp(-ramp / decay) * (ramp + decay)) / ramp
    after = at_ramp + decay * (np.exp(-ramp / decay) - np.exp(-t / decay))
    return np.where(t <= ramp, inside, after)


def _rush(t, decay: float, ramp: float):
    return np.minimum(1.0, np.asarray(t) / ramp) * np.exp(-np.asarray(t) / decay)


@dataclass(frozen=True)
class DayShape:
    """One festival day's shape: five numbers, see the module docstring."""

    fast: float
    slow: float
    ramp_minutes: float
    fast_decay: float
    slow_decay: float

    def _cum(self, t):
        return (_level_cum(t) + self.fast * _rush_cum(t, self.fast_decay, self.ramp_minutes)
                + self.slow * _rush_cum(t, self.slow_decay, self.ramp_minutes))

    def share_by(self, minutes) -> np.ndarray:
        """Share of the day's GMV in by `minutes` after 00:00."""
        return self._cum(minutes) / self._cum(DAY)

    def minute_weights(self) -> np.ndarray:
        """The GMV of each minute of the day (exact integrals), summing to 1."""
        return np.diff(self.share_by(np.arange(MINUTES_PER_DAY + 1, dtype=np.float64)))

    def minutes_to_reach(self, fractions) -> np.ndarray:
        """Minutes after 00:00 at which the day's cumulative share reaches each fraction."""
        return np.interp(fractions, self.share_by(_INVERT_AT), _INVERT_AT)

    def peak_ratio(self) -> float:
        """The rate at the end of the ramp (the peak) over the day's mean rate."""
        t = self.ramp_minutes
        peak = (_level(t) + self.fast * _rush(t, self.fast_decay, t)
                + self.slow * _rush(t, self.slow_decay, t))
        return float(peak * DAY / self._cum(DAY))


@dataclass(frozen=True)
class Published:
    """What a year's shape is predicted from."""

    year: int
    peak_ratio: float       # peak payment rate / the day's mean rate, both in RMB a second


@dataclass(frozen=True)
class Observed:
    """A fitted year: what is published about it, and its precise milestones."""

    published: Published
    minutes: tuple[float, ...]      # since 00:00
    fractions: tuple[float, ...]    # of the day's total (of its scope's total for 2011)


@dataclass(frozen=True)
class Trend:
    """The model's parameters as functions of a year's published quantities."""

    fast_decay: float
    slow_decay: float
    fast: tuple[float, float]       # log(1 + fast) = a + b * (year - TREND_YEAR)
    slow: tuple[float, float]       # log(slow) = a + b * log(peak_ratio)
    ramp_minutes: float
    years: tuple[int, int]          # the range the trend was fitted on, inclusive
    peak_ratios: tuple[float, float]

    def predict(self, published: Published) -> DayShape:
        year = min(max(published.year, self.years[0]), self.years[1])
        ratio = min(max(published.peak_ratio, self.peak_ratios[0]), self.peak_ratios[1])
        fast = np.expm1(self.fast[0] + self.fast[1] * (year - TREND_YEAR))
        slow = np.exp(self.slow[0] + self.slow[1] * np.log(ratio))
        return DayShape(float(max(fast, 0.0)), float(slow), self.ramp_minutes,
                        self.fast_decay, self.slow_decay)


@cache
def _best_by_decays(minutes: tuple[float, ...], fractions: tuple[float, ...]) -> dict:
    """For each (fast_decay, slow_decay): (cost, fast, slow, ramp) best for one year's milestones.

    Grid search over all three at once; the cost is the mean square of the log of modelled over
    published elapsed time, to first order (the cumulative's miss over rate x time).
    """
    t, f = np.array(minutes), np.array(fractions)
    level, level_rate, level_day = _level_cum(t), _level(t), _level_cum(DAY)
    slow, fast = SLOW_GRID[:, None, None], FAST_GRID[None, :, None]
    out = {}
    for fast_decay, slow_decay in itertools.product(FAST_DECAYS, SLOW_DECAYS):
        best = (np.inf, 0.0, 0.0, 0.0)
        for ramp in RAMPS:
            total = (level_day + fast * _rush_cum(DAY, fast_decay, ramp)
                     + slow * _rush_cum(DAY, slow_decay, ramp))
            cum = (level + fast * _rush_cum(t, fast_decay, ramp)
                   + slow * _rush_cum(t, slow_decay, ramp)) / total
            rate = (level_rate + fast * _rush(t, fast_decay, ramp)
                    + slow * _rush(t, slow_decay, ramp)) / total
            cost = (np.clip((f - cum) / (rate * t), -3, 3) ** 2).mean(axis=-1)
            i, j = np.unravel_index(int(cost.argmin()), cost.shape)
            if cost[i, j] < best[0]:
                best = (float(cost[i, j]), float(FAST_GRID[j]), float(SLOW_GRID[i]), ramp)
        out[fast_decay, slow_decay] = best
    return out


def fit_trend(observed: Mapping[int, Observed]) -> Trend:
    """The trend of the model's parameters across the `observed` years (at least two)."""
    if len(observed) < 2:
        raise ValueError(f"fit_trend needs at least two years, got {sorted(observed)}")
    bests = {y: _best_by_decays(o.minutes, o.fractions) for y, o in observed.items()}
    decays = min(bests[next(iter(bests))], key=lambda k: sum(b[k][0] for b in bests.values()))
    years = sorted(observed)
    fast, slow, ramp = (np.array([bests[y][decays][i] for y in years]) for i in (1, 2, 3))
    year_x = np.array(years, dtype=np.float64) - TREND_YEAR
    ratio_x = np.log([observed[y].published.peak_ratio for y in years])
    fast_b, fast_a = np.polyfit(year_x, np.log1p(fast), 1)
    slow_b, slow_a = np.polyfit(ratio_x, np.log(slow), 1)
    ratios = (float(np.exp(ratio_x.min())), float(np.exp(ratio_x.max())))
    return Trend(decays[0], decays[1], (float(fast_a), float(fast_b)),
                 (float(slow_a), float(slow_b)), float(np.exp(np.log(ramp).mean())),
                 (years[0], years[-1]), ratios)


def leave_one_out(observed: Mapping[int, Observed]) -> dict[int, np.ndarray]:
    """Each year's milestones as predicted by the trend fitted without that year (minutes)."""
    out = {}
    for year, o in observed.items():
        trend = fit_trend({y: v for y, v in observed.items() if y != year})
        out[year] = trend.predict(o.published).minutes_to_reach(np.array(o.fractions))
    return out
