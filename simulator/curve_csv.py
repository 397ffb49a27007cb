"""Your own festival curve from a CSV file, parsed into a `history.Curve`. Pure apart from reading.

Two kinds, told apart by the header (the first line that is not blank or a `#` comment):

    elapsed,cumulative_usd      cumulative milestones in US dollars (up to 2 decimals)
    elapsed,cumulative_cents    the same in whole US cents
    minute,gmv_cents            GMV of each minute, minutes counted from 0

`elapsed` is minutes since the window's start (`90`, `90.5`), `HH:MM[:SS]` (hours may pass
24, so `24:00` is the end of day one) or `D HH:MM[:SS]` (`10 00:30` is Nov 11 00:30 of a
window starting Nov 1). Cumulative rows go through the same warp as the historical years
(history.warp): the default festival day's shape, bent to pass every row; the cents of each
stretch between rows on whole minutes are split on their own, so the cumulative is exact to the
cent there. The window ends at the last row (rounded up to a whole minute). Per-minute rows
are replayed as given, a minute left out has no GMV, and the window ends after the largest
minute.

Every problem raises CurveFileError with the message `PATH:LINE: reason`, lines counted from 1
including the header (`PATH: reason` for a file that cannot be read at all); see docs/curves.md
("Your own curve").
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import numpy as np

from ticker.core.dimensions import BEIJING, Window

from .curve import MINUTES_PER_DAY, allocate, intraday_shape
from .history import Curve, Milestone, warp

HEADERS = ("elapsed,cumulative_usd", "elapsed,cumulative_cents", "minute,gmv_cents")
DEFAULT_START = datetime(2020, 11, 11, tzinfo=BEIJING)
MAX_MINUTES = 60 * MINUTES_PER_DAY      # bounds the arrays a file can ask for
MAX_CENTS = 2**53 - 1                   # the most the ticker shows exactly: a JS number
USER_SPIKE = 40.0                       # midnight spike of the day shape between your rows

_ELAPSED = re.compile(r"(?:(\d+) )?(\d+):(\d\d)(?::(\d\d))?")
_DECIMAL = re.compile(r"-?\d+(?:\.\d+)?")
_INTEGER = re.compile(r"-?\d+")


class CurveFileError(ValueError):
    """A malformed curve file; the message is `PATH:LINE: reason`."""


def read_curve(path: str | Path, *, start: datetime = DEFAULT_START,
               label: str | None = None) -> Curve:
    """Parse the curve file at `path`; its window starts at `start` (Beijing 11.11 00:00)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CurveFileError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:  # exc.object: the bytes after a byte order mark
        line = exc.object.count(b"\n", 0, exc.start) + 1
        raise CurveFileError(f"{path}:{line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x})"
                             ": save the curve as UTF-8 CSV") from None
    return parse_curve(text, str(path), start=start, label=label)


def parse_curve(text: str, name: str = "<curve>", *, start: datetime = DEFAULT_START,
                label: str | None = None) -> Curve:
    """Parse curve-file text; `name` stands for the path in error messages."""
    rows = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]
    if not rows:
        raise CurveFileError(f"{name}:1: empty file: expected a header, one of {HEADERS}")
    header_line, header = rows[0]
    header = header.replace(" ", "").lower()
    if header not in HEADERS:
        # At most 40 characters of it: a file that is not a curve may have no line breaks.
        raise CurveFileError(f"{name}:{header_line}: unknown header {rows[0][1][:40]!r}: "
                             f"expected one of {HEADERS}")
    if len(rows) == 1:
        raise CurveFileError(f"{name}:{header_line}: no data rows after the header")
    label = label or f"curve from {Path(name).name}"
    data = [(n, _split(name, n, line)) for n, line in rows[1:]]
    if header == "minute,gmv_cents":
        return _per_minute(name, data, start, label)
    return _cumulative(name, data, header.endswith("usd"), start, label)


def _split(name: str, n: int, line: str) -> tuple[str, str]:
    cells = [c.strip() for c in line.split(",")]
    if len(cells) != 2:
        raise CurveFileError(f"{name}:{n}: expected 2 columns, got {len(cells)}")
    return cells[0], cells[1]


def _elapsed(name: str, n: int, cell: str) -> float:
    if m := _ELAPSED.fullmatch(cell):
        days, hours, mins, secs = (int(g or 0) for g in m.groups())
        if mins >= 60 or secs >= 60:
            raise CurveFileError(f"{name}:{n}: {cell!r}: minutes and seconds must be below 60")
        t = days * MINUTES_PER_DAY + hours * 60 + mins + secs / 60
    elif _DECIMAL.fullmatch(cell):
        t = float(cell)
    else:
        raise CurveFileError(f"{name}:{n}: {cell!r} is not an elapsed time "
                             "(minutes, HH:MM[:SS] or D HH:MM[:SS])")
    if not 0 <= t <= MAX_MINUTES:
        raise CurveFileError(f"{name}:{n}: elapsed {cell!r} out of range 0..{MAX_MINUTES} min")
    return t


def _cents(name: str, n: int, cell: str, usd: bool) -> int:
    if not (_DECIMAL if usd else _INTEGER).fullmatch(cell):
        what = "a US dollar amount" if usd else "a whole number of cents"
        raise CurveFileError(f"{name}:{n}: {cell!r} is not {what}")
    value = Decimal(cell) * (100 if usd else 1)
    if value != value.to_integral_value():
        raise CurveFileError(f"{name}:{n}: {cell!r} has more than 2 decimals")
    if value < 0:
        raise CurveFileError(f"{name}:{n}: negative amount {cell}")
    if value > MAX_CENTS:
        raise CurveFileError(f"{name}:{n}: amount {cell} too large (max {MAX_CENTS} cents)")
    return int(value)


def _cumulative(name: str, data: list, usd: bool, start: datetime, label: str) -> Curve:
    times, cents, lines = [0.0], [0], [0]
    for n, (t_cell, c_cell) in data:
        t, c = _elapsed(name, n, t_cell), _cents(name, n, c_cell, usd)
        if t == 0 and len(times) == 1:          # an explicit 00:00 row must say 0
            if c:
                raise CurveFileError(f"{name}:{n}: cumulative at elapsed 0 must be 0")
            continue
        if t <= times[-1]:
            raise CurveFileError(f"{name}:{n}: elapsed {t_cell} is not after the previous row")
        if c < cents[-1]:
            raise CurveFileError(f"{name}:{n}: cumulative {c_cell} is below the previous row's")
        times.append(t)
        cents.append(c)
        lines.append(n)
    total = cents[-1]
    if total == 0:
        raise CurveFileError(f"{name}:{data[-1][0]}: no GMV: the last cumulative value is 0")
    minutes = math.ceil(times[-1])
    anchors = times + ([float(minutes)] if minutes > times[-1] else [])
    fractions = np.array(cents + [total] * (len(anchors) - len(cents))) / total
    shape = np.tile(intraday_shape(USER_SPIKE), -(-minutes // MINUTES_PER_DAY))[:minutes]
    window = Window(start, minutes, label)
    weights = warp(shape, np.array(anchors), fractions)
    exact = _exact_at_whole_minutes(weights, anchors, cents + [total])
    raw = Curve(start.year, window, total, weights, model="your cumulative rows, warped",
                exact_cents=exact)
    milestones = tuple(
        Milestone(start.year, start + timedelta(minutes=t), t, Decimal(c) / 100, "USD",
                  c / total, True, note=f"line {n}", model_minutes=raw.minutes_to_reach(c / total))
        for t, c, n in zip(times[1:], cents[1:], lines[1:]))
    return Curve(start.year, window, total, weights, milestones, raw.model, exact)


def _exact_at_whole_minutes(weights: np.ndarray, times: list[float], cents: list[int]):
    """Cents per minute that hit your cumulative exactly at every row on a whole minute."""
    marks = [(0, 0)] + [(int(t), c) for t, c in zip(times, cents) if t == int(t) and t > 0]
    parts = []
    for (a, ca), (b, cb) in zip(marks, marks[1:]):
        parts.append(allocate(cb - ca, weights[a:b]) if cb > ca else np.zeros(b - a, np.int64))
    exact = np.concatenate(parts)
    exact.setflags(write=False)
    return exact


def _per_minute(name: str, data: list, start: datetime, label: str) -> Curve:
    seen: dict[int, int] = {}
    values = []
    total = 0
    for n, (m_cell, c_cell) in data:
        if not _INTEGER.fullmatch(m_cell):
            raise CurveFileError(f"{name}:{n}: minute {m_cell!r} is not a whole number")
        minute = int(m_cell)
        if not 0 <= minute < MAX_MINUTES:
            raise CurveFileError(f"{name}:{n}: minute {minute} out of range 0..{MAX_MINUTES - 1}")
        if minute in seen:
            raise CurveFileError(
                f"{name}:{n}: minute {minute} already given on line {seen[minute]}")
        seen[minute] = n
        cents = _cents(name, n, c_cell, usd=False)
        total += cents
        if total > MAX_CENTS:
            raise CurveFileError(f"{name}:{n}: total too large (max {MAX_CENTS} cents)")
        values.append((minute, cents))
    if total == 0:
        raise CurveFileError(f"{name}:{data[-1][0]}: no GMV: every minute is 0")
    exact = np.zeros(max(seen) + 1, dtype=np.int64)
    for minute, cents in values:
        exact[minute] = cents
    exact.setflags(write=False)
    return Curve(start.year, Window(start, len(exact), label), total, exact.astype(np.float64),
                 model="your per-minute rows, as given", exact_cents=exact)
