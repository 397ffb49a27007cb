"""Every 11.11 from 2009 to 2021 as a replayable per-minute curve fitted to its milestones. Pure.

The figures are data: data/festivals.csv (totals, windows, rates) and data/milestones.csv
(published intraday cumulative milestones), both taken from data/festival-facts.md.

Strategy, per year:
- Shape: `simulator.curve.intraday_shape(spike, decay)`, i.e. midnight spike, decay through the
  first hour, overnight trough, daytime rise, evening surge. Where a year has precise
  milestones, spike and decay are fitted by grid search so that the shape's own cumulative is
  as close as possible to them (least squares on the log of the secant slopes below).
- Warp: what the fitted shape still misses is removed by a monotone time warp. The cumulative
  GMV is a monotone cubic (PCHIP) function of the shape's cumulative through (00:00, 0), every
  precise milestone and (end, total), so between milestones the rate is the shape's rate times
  a smooth factor, and at each milestone the curve is exact (within the minute, since weights
  are per minute). 5% of the warp is the piecewise-linear one, which keeps every minute > 0.
- Years without milestones are predicted by `simulator.curve_model` from what is published
  about them (the year and the peak payment rate over the day's mean rate), with the trend of
  its parameters fitted on the years with milestones; `leave_one_out_table` checks that trend
  on each fitted year it did not see.
- 2020 (Nov 1-11): Nov 11 follows 2019's fitted day, sized so that 372.3B of 498.2B is in by
  Nov 11 00:30 (G05); the quiet Nov 4-10 run at 2019's ordinary-day level implied by the +26%
  like-for-like; Nov 1-3 take the rest on an assumed split. 2021 published no milestones and
  replays 2020's shape at its own total.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from fractions import Fraction
from functools import cache
from pathlib import Path
from types import MappingProxyType

import numpy as np

from ticker.core.dimensions import BEIJING, Window

from .curve import MINUTES_PER_DAY, allocate, intraday_shape, minute_weights
from .curve_model import Observed, Published, Trend, fit_trend, leave_one_out

DATA = Path(__file__).resolve().parent.parent / "data"

LINEAR_SHARE = 0.05                 # part of the warp that is piecewise linear (keeps rates > 0)
SPIKES = np.geomspace(1.0, 3000.0, 300)
DECAYS = np.geomspace(1.0, 240.0, 80)
# Nov 1-3 2020, the first sales window: no daily figures are published, so the split between
# the three days and their spikes are assumed (as in the first 2020 scenario).
FIRST_WINDOW_WEIGHTS = (0.30, 0.12, 0.10)
FIRST_WINDOW_SPIKES = (30.0, 10.0, 8.0)  # below Nov 11: its midnight is the peak
ORDINARY_DAY_SPIKE = 2.0            # a day outside the festival: just the usual midnight bump
# USD 74.1B was +26% on the same eleven days of 2019 (G01-G04, G13): 5,880,952,380,952.38 cents.
LIKE_FOR_LIKE_2019_CENTS = round(Fraction(7_410_000_000_000) / Fraction("1.26"))


@dataclass(frozen=True)
class Festival:
    """One row of data/festivals.csv."""

    year: int
    gmv_rmb: int
    scope: str
    window: Window
    rmb_per_usd: str                # as written in the file; exact through Fraction
    rate_basis: str
    peak_orders_per_s: int | None
    peak_payments_per_s: Fraction | None    # facts section 2, per minute where so published
    aov_rmb: int                    # average order value (facts section 6; 180 assumed < 2012)
    sources: tuple[str, ...]

    @property
    def gmv_cents(self) -> int:
        return rmb_to_cents(self.gmv_rmb, self.rmb_per_usd)


@dataclass(frozen=True)
class Milestone:
    """A published cumulative amount at a published time, and when the model reaches it."""

    year: int
    published: datetime             # Beijing time
    published_minutes: float        # since the window's start
    amount: Decimal                 # in `currency` units
    currency: str                   # "RMB" or "USD"
    fraction: float                 # of the curve's total (of the scope's total for 2011)
    precise: bool
    sources: tuple[str, ...] = ()
    note: str = ""
    model_minutes: float | None = None

    @property
    def model_time(self) -> datetime:
        """When the model reaches `amount` (Beijing time)."""
        assert self.model_minutes is not None, "a milestone the model was not run on"
        return self.published + timedelta(minutes=self.model_minutes - self.published_minutes)

    @property
    def difference_seconds(self) -> float:
        assert self.model_minutes is not None, "a milestone the model was not run on"
        return (self.model_minutes - self.published_minutes) * 60

    @property
    def tolerance_seconds(self) -> float:
        """2% of the clock time since 00:00 of the published day, at least one minute."""
        midnight = datetime.combine(self.published.date(), time(), BEIJING)
        return max(0.02 * (self.published - midnight).total_seconds(), 60.0)

    @property
    def within_tolerance(self) -> bool:
        return abs(self.difference_seconds) <= self.tolerance_seconds


@dataclass(frozen=True, eq=False)
class Curve:
    """A festival's per-minute GMV: float weights and an exact integer total in US cents."""

    year: int
    window: Window
    gmv_cents: int
    minute_weights: np.ndarray      # float64, one per minute of the window
    milestones: tuple[Milestone, ...] = ()
    model: str = ""                 # how the weights were made, for people
    exact_cents: np.ndarray | None = field(default=None, repr=False)  # user per-minute files

    def __post_init__(self) -> None:
        w = np.array(self.minute_weights, dtype=np.float64)
        if (w.shape != (self.window.minutes,) or w.size == 0 or not np.all(np.isfinite(w))
                or w.min() < 0 or w.sum() <= 0):
            raise ValueError("minute_weights: one finite weight >= 0 per minute, some > 0")
        if self.gmv_cents < 0:
            raise ValueError(f"gmv_cents={self.gmv_cents}: must not be negative")
        if self.exact_cents is not None and (self.exact_cents.shape != w.shape
                                             or int(self.exact_cents.sum()) != self.gmv_cents):
            raise ValueError("exact_cents must give every minute and add up to gmv_cents")
        w.setflags(write=False)     # curves are cached and shared
        object.__setattr__(self, "minute_weights", w)

    def minute_gmv_cents(self) -> np.ndarray:
        """int64 cents per minute, adding up to `gmv_cents` exactly."""
        if self.exact_cents is not None:
            return self.exact_cents.copy()
        return allocate(self.gmv_cents, self.minute_weights)

    def cumulative_share(self) -> np.ndarray:
        """Share of the total in by each minute boundary: 0 at the start, 1 at the end."""
        c = np.concatenate(([0.0], np.cumsum(self.minute_weights)))
        return c / c[-1]

    def minutes_to_reach(self, fraction: float) -> float:
        """Elapsed minutes at which the cumulative reaches `fraction` (linear within a minute)."""
        c = self.cumulative_share()
        k = int(np.searchsorted(c, fraction, side="left"))
        if k == 0:
            return 0.0
        k = min(k, len(c) - 1)
        return k - 1 + (fraction - c[k - 1]) / (c[k] - c[k - 1])


def rmb_to_cents(rmb: int, rmb_per_usd: str) -> int:
    """US cents for an RMB amount, exact rational arithmetic, rounded half up to the cent."""
    return math.floor(Fraction(rmb) * 100 / Fraction(rmb_per_usd) + Fraction(1, 2))


def cumulative_at(curve: Curve, elapsed_minutes: float) -> int:
    """Cents in by `elapsed_minutes` after the window's start (a partial minute pro rata)."""
    cents = curve.minute_gmv_cents()
    t = min(max(float(elapsed_minutes), 0.0), float(len(cents)))
    whole = int(t)
    partial = int(cents[whole] * (t - whole)) if whole < len(cents) else 0
    return int(cents[:whole].sum()) + partial


# --- the sourced data ---------------------------------------------------------------------

@cache
def festivals() -> MappingProxyType[int, Festival]:
    """data/festivals.csv by year (read-only: it is cached)."""
    out = {}
    with open(DATA / "festivals.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            start = datetime.combine(date.fromisoformat(row["window_start"]), time(), BEIJING)
            window = Window(start, int(row["window_days"]) * MINUTES_PER_DAY, row["label"])
            peak = row["peak_orders_per_s"]
            per_s, per_min = row["peak_payments_per_s"], row["peak_payments_per_min"]
            payments = Fraction(per_s) if per_s else Fraction(per_min) / 60 if per_min else None
            out[int(row["year"])] = Festival(
                int(row["year"]), int(row["gmv_rmb"]), row["scope"], window,
                row["rmb_per_usd"], row["rate_basis"], int(peak) if peak else None,
                payments, int(row["aov_rmb"]), tuple(row["sources"].split(";")))
    return MappingProxyType(out)


def festival_years() -> list[int]:
    return sorted(festivals())


@cache
def _published_milestones(year: int) -> tuple[Milestone, ...]:
    fest = festivals()[year]
    out = []
    with open(DATA / "milestones.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if int(row["year"]) != year:
                continue
            at = datetime.combine(date.fromisoformat(row["date"]),
                                  time.fromisoformat(row["time"]), BEIJING)
            amount = Decimal(row["amount"])
            rmb = Fraction(amount) * (Fraction(fest.rmb_per_usd) if row["currency"] == "USD" else 1)
            # 2011's milestones count Tmall only: use them as shares of Tmall's own total.
            scope_total = int(row["scope_total_rmb"] or fest.gmv_rmb)
            out.append(Milestone(
                year, at, (at - fest.window.start).total_seconds() / 60, amount,
                row["currency"], float(rmb / scope_total), row["precise"] == "1",
                tuple(row["sources"].split(";")), row["note"]))
    return tuple(sorted(out, key=lambda m: m.published_minutes))


def _payments_per_order() -> tuple[float, float]:
    """log(peak payments / peak orders) = a + b * year, over the years that publish both."""
    both = [(f.year, float(payments) / orders) for f in festivals().values()
            if (payments := f.peak_payments_per_s) and (orders := f.peak_orders_per_s)]
    b, a = np.polyfit([year for year, _ in both], [np.log(r) for _, r in both], 1)
    return float(a), float(b)


def _peak_payments_per_s(year: int) -> float | None:
    """Published, or the peak order rate at that year's payments per order (at most one)."""
    fest = festivals()[year]
    if fest.peak_payments_per_s is not None:
        return float(fest.peak_payments_per_s)
    if fest.peak_orders_per_s is None:
        return None
    a, b = _payments_per_order()
    return fest.peak_orders_per_s * min(float(np.exp(a + b * year)), 1.0)


def _one_day(year: int) -> bool:
    return festivals()[year].window.minutes == MINUTES_PER_DAY


@cache
def published(year: int) -> Published:
    """What the model predicts a one-day festival from. The peak ratio is the peak payment rate
    times the average order over the day's mean rate; a year with no peak figure (2010, 2012)
    takes the log-linear interpolation between the years around it."""
    if not _one_day(year):
        raise ValueError(f"year={year}: the day model is for one-day festivals (2009-2019)")

    def ratio(y: int) -> float | None:
        payments, fest = _peak_payments_per_s(y), festivals()[y]
        return None if payments is None else payments * fest.aov_rmb * 86_400 / fest.gmv_rmb
    if (own := ratio(year)) is not None:
        return Published(year, own)
    known = {y: r for y in festival_years() if _one_day(y) and (r := ratio(y)) is not None}
    return Published(year, float(np.exp(np.interp(year, list(known),
                                                  np.log(list(known.values()))))))


def observed() -> dict[int, Observed]:
    """The one-day years with precise milestones, as the model is fitted to them."""
    out = {}
    for year in festival_years():
        precise = [m for m in _published_milestones(year) if m.precise]
        if precise and _one_day(year):
            out[year] = Observed(published(year), tuple(m.published_minutes for m in precise),
                                 tuple(m.fraction for m in precise))
    return out


@cache
def trend() -> Trend:
    """The model's trend, fitted on every year with precise milestones."""
    return fit_trend(observed())


# --- the model ----------------------------------------------------------------------------

def _anchors(milestones: tuple[Milestone, ...], minutes: int) -> tuple[np.ndarray, np.ndarray]:
    precise = [m for m in milestones if m.precise]
    times = [0.0] + [m.published_minutes for m in precise] + [float(minutes)]
    return np.array(times), np.array([0.0] + [m.fraction for m in precise] + [1.0])


def _pchip(x: np.ndarray, y: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Monotone cubic (Fritsch-Carlson, as scipy's PchipInterpolator) through (x, y), at `at`."""
    h, d = np.diff(x), np.diff(y) / np.diff(x)
    m = np.full(len(x), d[0])
    if len(x) > 2:
        w1, w2 = 2 * h[1:] + h[:-1], h[1:] + 2 * h[:-1]
        both = (d[:-1] > 0) & (d[1:] > 0)
        safe = np.where(d > 0, d, 1.0)
        m[1:-1] = np.where(both, (w1 + w2) / (w1 / safe[:-1] + w2 / safe[1:]), 0.0)
        m[0], m[-1] = _end_slope(h[0], h[1], d[0], d[1]), _end_slope(h[-1], h[-2], d[-1], d[-2])
    k = np.clip(np.searchsorted(x, at, side="right") - 1, 0, len(h) - 1)
    t = (at - x[k]) / h[k]
    return ((1 + 2 * t) * (1 - t) ** 2 * y[k] + t * (1 - t) ** 2 * h[k] * m[k]
            + t * t * (3 - 2 * t) * y[k + 1] + t * t * (t - 1) * h[k] * m[k + 1])


def _end_slope(h0: float, h1: float, d0: float, d1: float) -> float:
    m = ((2 * h0 + h1) * d0 - h0 * d1) / (h0 + h1)
    if m <= 0 or d0 <= 0:
        return 0.0
    return 3 * d0 if d1 <= 0 and m > 3 * d0 else m


def warp(shape: np.ndarray, times: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Minute weights that follow `shape` and whose cumulative passes every (time, fraction).

    `times` are minutes since the start, strictly increasing from 0 to len(shape); `fractions`
    rise from 0 to 1. Weights are > 0 where the fractions strictly increase.
    """
    s = np.concatenate(([0.0], np.cumsum(shape)))
    s /= s[-1]
    x = np.interp(times, np.arange(len(s)), s)          # the anchors in "shape time"
    cum = (1 - LINEAR_SHARE) * _pchip(x, fractions, s) + LINEAR_SHARE * np.interp(s, x, fractions)
    return np.maximum(np.diff(cum), 0.0)                # only rounding can dip below 0


def _fit_shape(times: np.ndarray, fractions: np.ndarray) -> tuple[float, float]:
    """The (spike, decay) whose one-day shape needs the least warping to pass the anchors."""
    grid = np.arange(MINUTES_PER_DAY + 1)
    base = np.concatenate(([0.0], np.cumsum(intraday_shape(0.0))))
    b = np.interp(times, grid, base)
    best = (np.inf, 0.0, 0.0)
    for decay in DECAYS:
        rush = np.concatenate(([0.0], np.cumsum(intraday_shape(1.0, decay_minutes=decay))))
        rush -= base                                     # the shape is linear in the spike
        r = np.interp(times, grid, rush)
        x = b + SPIKES[:, None] * r                      # shape time, one row per spike
        slopes = np.diff(fractions) / np.diff(x / x[:, -1:], axis=1)
        cost = (np.log(slopes) ** 2).sum(axis=1)
        i = int(cost.argmin())
        if cost[i] < best[0]:
            best = (cost[i], float(SPIKES[i]), float(decay))
    return best[1], best[2]


def _with_model_times(milestones: tuple[Milestone, ...], c: Curve) -> tuple[Milestone, ...]:
    return tuple(replace(m, model_minutes=c.minutes_to_reach(m.fraction)) for m in milestones)


def _curve(year: int, weights: np.ndarray, model: str) -> Curve:
    fest = festivals()[year]
    raw = Curve(year, fest.window, fest.gmv_cents, weights, model=model)
    return Curve(year, fest.window, fest.gmv_cents, weights,
                 _with_model_times(_published_milestones(year), raw), model)


def _fitted_day(year: int) -> Curve:
    times, fractions = _anchors(_published_milestones(year), MINUTES_PER_DAY)
    spike, decay = _fit_shape(times, fractions)
    weights = warp(intraday_shape(spike, decay_minutes=decay), times, fractions)
    return _curve(year, weights, f"fitted to {len(times) - 2} milestones: "
                                 f"spike {spike:.1f}, decay {decay:.1f} min, warped through them")


def _predicted_day(year: int) -> Curve:
    shape, ratio, (low, high) = trend().predict(published(year)), published(year).peak_ratio, \
        trend().peak_ratios
    clamped = f" (outside the fitted {low:.1f}-{high:.1f}: as {high:.1f})" if ratio > high else (
        f" (outside the fitted {low:.1f}-{high:.1f}: as {low:.1f})" if ratio < low else "")
    return _curve(year, shape.minute_weights(), f"no precise milestones: predicted from peak "
                  f"ratio {ratio:.1f}{clamped}, first hour {shape.share_by(60.0):.1%}")


def _eleven_days(year: int) -> Curve:
    """Nov 1-11 2020 through its milestone; 2021 (no milestones) replays 2020's shape."""
    if year != 2020:
        return _curve(year, curve(2020).minute_weights, "2020's shape (no milestones published)")
    day11 = curve(2019).minute_weights / curve(2019).minute_weights.sum()
    times, fractions = _anchors(_published_milestones(2020), festivals()[2020].window.minutes)
    assert len(times) == 3, "2020 has one precise milestone, Nov 11 00:30"
    # The release says *more than* 372.3B by 00:30: aim 0.05% (RMB 0.19B) above it, which
    # moves the model's time to reach 372.3B only seconds earlier.
    fractions = fractions.copy()
    fractions[1] *= 1.0005
    # Nov 11 after 00:30 holds 1 - 372.3/498.2 of the total; the share of 2019's day after
    # 00:30 turns that into the size of the whole of Nov 11.
    after = np.interp(times[1] - 10 * MINUTES_PER_DAY, np.arange(MINUTES_PER_DAY + 1),
                      np.concatenate(([0.0], np.cumsum(day11))))
    nov11 = (1 - fractions[1]) / (1 - after)
    # Quiet days as 2019's ordinary days (the like-for-like total less Nov 11 2019, / 10).
    quiet = (LIKE_FOR_LIKE_2019_CENTS - curve(2019).gmv_cents) / 10 / festivals()[2020].gmv_cents
    first = np.array(FIRST_WINDOW_WEIGHTS) / sum(FIRST_WINDOW_WEIGHTS) * (1 - nov11 - 7 * quiet)
    shape = np.concatenate((
        minute_weights(list(first) + [quiet] * 7,
                       list(FIRST_WINDOW_SPIKES) + [ORDINARY_DAY_SPIKE] * 7),
        day11 * nov11))
    return _curve(year, warp(shape, times, fractions),
                  f"Nov 1-3 {first.sum():.1%} (assumed split), Nov 4-10 {quiet:.2%} a day "
                  f"(2019's ordinary days), Nov 11 {nov11:.1%} shaped as 2019")


def _has_precise(year: int) -> bool:
    return any(m.precise for m in _published_milestones(year))


@cache
def curve(year: int) -> Curve:
    """The festival of `year` (2009-2021) as a per-minute curve at its published total."""
    if year not in festivals():
        raise ValueError(f"year={year}: no festival data (have {festival_years()})")
    if festivals()[year].window.minutes != MINUTES_PER_DAY:
        return _eleven_days(year)
    return _fitted_day(year) if _has_precise(year) else _predicted_day(year)


@cache
def curve_like_for_like_2019() -> Curve:
    """Nov 1-11 2019, the window 2020's +26% compares against: USD 74.1B / 1.26 in cents.

    Nov 11 is 2019's fitted day at its own total; Nov 1-10 (ordinary trading) share the rest
    evenly, each with the ordinary day shape (a small midnight bump, trough, evening peak).
    """
    day = curve(2019)
    nov11 = day.gmv_cents / LIKE_FOR_LIKE_2019_CENTS
    ordinary = minute_weights([(1 - nov11) / 10] * 10, [ORDINARY_DAY_SPIKE] * 10)
    weights = np.concatenate((ordinary, day.minute_weights / day.minute_weights.sum() * nov11))
    window = Window(datetime(2019, 11, 1, tzinfo=BEIJING), 11 * MINUTES_PER_DAY,
                    "Nov 1-11 2019 (like-for-like with 2020)")
    return Curve(2019, window, LIKE_FOR_LIKE_2019_CENTS, weights,
                 model="Nov 1-10 ordinary days, Nov 11 as curve(2019); total USD 74.1B / 1.26")


def milestone_table() -> list[dict]:
    """One row per precise published milestone, with the model's time to reach it."""
    rows = []
    for year in festival_years():
        c = curve(year)
        for m in c.milestones:
            if m.precise:
                rows.append({
                    "year": year, "amount": m.amount, "currency": m.currency,
                    "published": m.published, "model": m.model_time,
                    "difference_s": round(float(m.difference_seconds), 1),
                    "tolerance_s": round(float(m.tolerance_seconds), 1),
                    "within_tolerance": bool(m.within_tolerance),
                    "note": m.note, "sources": m.sources,
                })
    return rows


def leave_one_out_table() -> list[dict]:
    """Each fitted year's precise milestones as predicted without them: elapsed-time ratios."""
    predicted = leave_one_out(observed())
    rows = []
    for year, minutes in predicted.items():
        precise = [m for m in _published_milestones(year) if m.precise]
        for m, at in zip(precise, minutes):
            rows.append({"year": year, "amount": m.amount, "currency": m.currency,
                         "published": m.published,
                         "predicted": m.published + timedelta(minutes=at - m.published_minutes),
                         "ratio": float(at / m.published_minutes), "note": m.note})
    return rows
