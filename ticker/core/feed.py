"""What viewers see: shard totals merged into one versioned view, framed once per version.

Pure: no sockets, no clock. Shards own disjoint brands, so every total merges by addition
and one shard is the same code path as many. Each version is encoded once as a full
`snapshot` frame and once as an `update` frame holding only the fields that changed since
the previous version; the server sends a viewer the update when it has the previous
version, the snapshot otherwise (see docs/websocket.md).

Anyone who can publish on the totals or replay topics can send anything, so a message is
checked against its schema (`parse_totals`, `parse_replay`) before it reaches the view: a
message that passes cannot make the merge raise, and one that fails is counted and dropped.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fractions import Fraction

import numpy as np
import orjson

from ticker.core.partitions import MAX_PARTITIONS
from ticker.core.dimensions import BIG_BRAND_CENTS, DEFAULT_DIMENSIONS, MAX_COUNTRIES, \
    MAX_CURVE_BUCKETS, MAX_PLATFORMS, Dimensions, curve_bucket_minutes

# A totals message is about 28 KiB (1,440 recent minutes); at worst 64 KiB with 256 countries
# and 256 platforms, every figure as long as its bound allows (tests/test_reference.py).
MAX_MESSAGE_BYTES = 131_072
MAX_COUNT = 2**53 - 1           # exact in JavaScript too
MAX_WINDOW_MINUTES = 10**6
RECENT_MINUTES = 1440           # what the aggregator reports of its latest minutes
MAX_BIG_BRAND_MINUTES = 1000    # crossing minutes of big brands a shard reports, at most
TOP_BRANDS = 10
MAX_BRAND_ID = 2**32 - 1
MAX_NAMES = 64                  # entries of `rejected` and `latency_ms`
MAX_UNKNOWN_SHARDS = 10         # names kept of shards that are not expected
MAX_QUIET_SHARDS = 100          # names listed in stats.shards_quiet
MAX_LISTED = 100                # partitions listed as unowned or doubled
QUIET_SECONDS = 5.0             # an expected shard silent this long is listed as quiet
REPLAY_TTL_SECONDS = 5.0        # the replay status is dropped this long after the last one
MEANINGFUL_SHARE = Fraction(1, 20)  # last year's figure below 5% of its total: no percentage
COUNT_FIELDS = ("gmv_cents", "orders", "brands_active", "brands_overseas_active",
                "chatbot_queries", "gmv_minute_cents", "batches", "duplicates", "gaps",
                "newest_sent_at_us", "producers", "brands_big", "big_brand_cents")
# (key, amount in billions) of the GMV milestones; RMB ones need the scenario's rate.
USD_MILESTONES = ("1", "10", "25", "50", "70")
RMB_MILESTONES = ("10", "100", "300", "372.3", "498.2")  # 372.3B: the 2020 release's 00:30
BRAND_MILESTONES = (100, 300, 470)
# Per-id columns: as many entries as the shard's countries or platforms, at most the uint8's.
COLUMN_FIELDS = (("country_gmv_cents", MAX_COUNTRIES), ("country_orders", MAX_COUNTRIES),
                 ("platform_gmv_cents", MAX_PLATFORMS), ("platform_orders", MAX_PLATFORMS))
REPLAY_STATES = ("playing", "paused", "seeking", "done")


class MessageError(ValueError):
    """A totals or replay message that does not fit its schema; the message says why."""


class UnknownShard(MessageError):
    """Totals from a shard that is not expected; `new` when its name was not seen before."""

    def __init__(self, shard: str, new: bool) -> None:
        super().__init__(f"shard {_short(shard)} is not expected")
        self.new = new


def decode_message(payload: bytes) -> object:
    """A message's JSON, within the size bound."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise MessageError(f"{len(payload)} bytes: at most {MAX_MESSAGE_BYTES}")
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise MessageError("not JSON") from None


def parse_totals(shard: str, doc: object) -> dict:
    """The fields of a shard's totals message that the feed uses, checked (shard, window,
    counts, columns); unknown keys are dropped. MessageError says what is wrong."""
    if not isinstance(doc, dict) or doc.get("v") != 1:
        raise MessageError("not a version 1 totals object")
    if doc.get("shard") != shard:
        raise MessageError(f"shard={_short(doc.get('shard'))} on the topic of shard {shard!r}")
    out: dict = {"v": 1, "shard": shard, "window": _window(doc.get("window"))}
    for key in ("gmv_cents", "orders"):
        if key not in doc:
            raise MessageError(f"{key} is missing")
    for key in COUNT_FIELDS:
        if key in doc:
            out[key] = _count(key, doc[key])
    for key, size in COLUMN_FIELDS:
        if key in doc:
            column = _list(key, doc[key], 1, size)
            out[key] = [_count(key, value) for value in column]
    for a, b in (("country_gmv_cents", "country_orders"),
                 ("platform_gmv_cents", "platform_orders")):
        if len(out.get(a, ())) != len(out.get(b, ())):
            raise MessageError(f"{a} and {b}: must be given together, of one length")
    out["brands_first_time_active"] = _optional_count(
        "brands_first_time_active", doc.get("brands_first_time_active"))
    minute = out["minute"] = _optional_count("minute", doc.get("minute"))
    if minute is not None and minute >= out["window"]["minutes"]:
        raise MessageError(f"minute={minute}: the window has {out['window']['minutes']}")
    if "rejected" in doc:
        out["rejected"] = _counts_by_name("rejected", doc["rejected"])
    if "recent_gmv_cents" in doc:
        # One entry per minute up to `minute`, so walking back never leaves the window.
        seen = 0 if minute is None else min(minute + 1, RECENT_MINUTES)
        recent = _list("recent_gmv_cents", doc["recent_gmv_cents"], 0, seen)
        out["recent_gmv_cents"] = [_count("recent_gmv_cents", value) for value in recent]
    if "recent_orders" in doc:
        size = len(out.get("recent_gmv_cents", ()))
        recent = _list("recent_orders", doc["recent_orders"], size, size)
        if "recent_gmv_cents" not in out:
            raise MessageError("recent_orders: needs recent_gmv_cents beside it")
        out["recent_orders"] = [_count("recent_orders", value) for value in recent]
    if doc.get("latency_ms") is not None:
        out["latency_ms"] = _numbers_by_name("latency_ms", doc["latency_ms"])
    if "partitions" in doc:  # an aggregator from before partitions says nothing
        partitions = out["partitions"] = _count("partitions", doc["partitions"])
        if not 0 < partitions <= MAX_PARTITIONS:
            raise MessageError(f"partitions={partitions}: must be 1 .. {MAX_PARTITIONS}")
        owned = _list("owned", doc.get("owned"), 1, partitions)
        if any(type(p) is not int or not 0 <= p < partitions for p in owned) \
                or len(set(owned)) != len(owned):
            raise MessageError(f"owned: not distinct partitions 0 .. {partitions - 1}")
        out["owned"] = sorted(owned)
    if "big_brand_minutes" in doc:
        big = _list("big_brand_minutes", doc["big_brand_minutes"], 0, MAX_BIG_BRAND_MINUTES)
        big = [_count("big_brand_minutes", m) for m in big]
        if any(a > b for a, b in zip(big, big[1:])) or \
                (big and big[-1] >= out["window"]["minutes"]):
            raise MessageError("big_brand_minutes: must be sorted minutes of the window")
        out["big_brand_minutes"] = big
    if "top_brands" in doc:
        out["top_brands"] = _top_brands(doc["top_brands"])
    if "curve_cents" in doc or "curve_bucket_minutes" in doc:
        width = doc.get("curve_bucket_minutes")
        minutes = out["window"]["minutes"]
        if type(width) is not int or not curve_bucket_minutes(minutes) <= width <= minutes:
            raise MessageError(f"curve_bucket_minutes={_short(width)}: must be an integer "
                               f"from {curve_bucket_minutes(minutes)} to the window's minutes")
        most = min(-(-minutes // width), MAX_CURVE_BUCKETS)
        curve = _list("curve_cents", doc.get("curve_cents"), 0, most)
        out["curve_bucket_minutes"] = width
        out["curve_cents"] = [_count("curve_cents", value) for value in curve]
        # The buckets split the shard's GMV: so the merged, cumulated curve stays within
        # the shards' total (past 2^64 no JSON encoder takes it).
        if sum(out["curve_cents"]) > out["gmv_cents"]:
            raise MessageError("curve_cents: the buckets add up to more than gmv_cents")
    return out


def _top_brands(value: object) -> list[list[int]]:
    """[[brand id, GMV cents], ...]: at most TOP_BRANDS, distinct ids, most GMV first (ties
    by lower id)."""
    rows = _list("top_brands", value, 0, TOP_BRANDS)
    out = []
    for row in rows:
        if not (isinstance(row, list) and len(row) == 2 and type(row[0]) is int
                and 0 <= row[0] <= MAX_BRAND_ID):
            raise MessageError("top_brands: each entry must be [brand id, gmv_cents]")
        out.append([row[0], _count("top_brands", row[1])])
    if len({row[0] for row in out}) != len(out) or \
            any((-a[1], a[0]) >= (-b[1], b[0]) for a, b in zip(out, out[1:])):
        raise MessageError("top_brands: must be distinct brands, most GMV first")
    return out


def parse_replay(doc: object) -> dict:
    """A replay status message's fields (state, speed, minute, scenario, loop; and when
    given, the minute range `from`..`to` and the `run` id), checked."""
    if not isinstance(doc, dict) or doc.get("v") != 1:
        raise MessageError("not a version 1 replay status object")
    state, speed, scenario, loop = (doc.get(key) for key in ("state", "speed", "scenario",
                                                             "loop"))
    if state not in REPLAY_STATES:
        raise MessageError(f"state={_short(state)}: expected one of {', '.join(REPLAY_STATES)}")
    if speed is not None and (type(speed) not in (int, float) or not 0 < speed < math.inf):
        raise MessageError(f"speed={_short(speed)}: must be a positive number or null")
    if scenario is not None and not (isinstance(scenario, str) and len(scenario) <= 64):
        raise MessageError(f"scenario={_short(scenario)}: must be a string of at most 64")
    if loop is not None and not isinstance(loop, bool):
        raise MessageError(f"loop={_short(loop)}: must be true or false")
    run = doc.get("run")
    if run is not None and not (isinstance(run, str) and 0 < len(run) <= 64):
        raise MessageError(f"run={_short(run)}: must be a string of 1 to 64 characters")
    status = {"state": state, "speed": speed,
              "minute": _optional_count("minute", doc.get("minute")),
              "scenario": scenario, "loop": loop}
    start, stop = (_optional_count(key, doc.get(key)) for key in ("from", "to"))
    if start is not None and stop is not None and start > stop:
        raise MessageError(f"from={start} is after to={stop}")
    for key, value in (("from", start), ("to", stop), ("run", run)):
        if value is not None:
            status[key] = value
    return status


def _count(key: str, value: object) -> int:
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise MessageError(f"{key}={_short(value)}: must be an integer from 0 to 2**53-1")
    return value


def _optional_count(key: str, value: object) -> int | None:
    return None if value is None else _count(key, value)


def _list(key: str, value: object, least: int, most: int) -> list:
    if not isinstance(value, list) or not least <= len(value) <= most:
        size = least if least == most else f"{least} to {most}"
        raise MessageError(f"{key}: must be a list of {size} entries")
    return value


def _counts_by_name(key: str, value: object) -> dict[str, int]:
    if not isinstance(value, dict) or len(value) > MAX_NAMES \
            or any(len(name) > 40 for name in value):
        raise MessageError(f"{key}: must be an object of at most {MAX_NAMES} "
                           "names of at most 40 characters")
    return {name: _count(f"{key}.{name}", n) for name, n in value.items()}


def _numbers_by_name(key: str, value: object) -> dict[str, float]:
    if not isinstance(value, dict) or len(value) > MAX_NAMES or any(
            len(name) > 40 or type(n) not in (int, float) for name, n in value.items()):
        raise MessageError(f"{key}: must be null or an object of numbers")
    return value


def _window(value: object) -> dict:
    if not isinstance(value, dict):
        raise MessageError("window: must be an object")
    start, minutes, label = value.get("start"), value.get("minutes"), value.get("label")
    if not _is_time(start):
        raise MessageError(f"window.start={_short(start)}: must be an ISO 8601 time with "
                           "its offset")
    if type(minutes) is not int or not 1 <= minutes <= MAX_WINDOW_MINUTES:
        raise MessageError(f"window.minutes={_short(minutes)}: must be an integer from 1 to "
                           f"{MAX_WINDOW_MINUTES}")
    if not isinstance(label, str) or len(label) > 200:
        raise MessageError("window.label: must be a string of at most 200 characters")
    return {"start": start, "minutes": minutes, "label": label}


def _is_time(text: object) -> bool:
    """An ISO 8601 time with an offset, from which every minute a window may have is a time
    too (so the clock cannot overflow)."""
    if not isinstance(text, str) or len(text) > 64:
        return False
    try:
        start = datetime.fromisoformat(text)
        start + timedelta(minutes=MAX_WINDOW_MINUTES)
    except (ValueError, OverflowError):
        return False
    return start.tzinfo is not None


def _short(value: object) -> str:
    """A value for a log line, cut short: it may come from anyone."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def merge_shards(shards: dict[str, dict],
                 dimensions: Dimensions = DEFAULT_DIMENSIONS) -> dict[str, object]:
    """Merge the latest totals message of every shard into the viewer's fields. Countries
    and platforms are named from `dimensions`: those it declares are listed, and past them
    any id a shard reports GMV for ("Country 12")."""
    parts = list(shards.values())
    minutes = [p["minute"] for p in parts if p.get("minute") is not None]
    minute = max(minutes) if minutes else None
    window = parts[0]["window"] if parts else None

    def total(key: str) -> int:
        return sum(int(p.get(key, 0)) for p in parts)

    def column(key: str, declared: int) -> list[int]:
        sums = [0] * max([declared, *(len(p.get(key, ())) for p in parts)])
        for p in parts:
            for i, value in enumerate(p.get(key, [])):
                sums[i] += int(value)
        return sums

    def listed(gmv: list[int], declared: int) -> int:
        """The entries shown: the declared ones, and past them up to the last with GMV."""
        return max(declared, max((i + 1 for i, g in enumerate(gmv) if g), default=0))

    sim_time = None
    if window is not None and minute is not None:
        sim_time = _time_of(window, minute)
    n_countries, n_platforms = len(dimensions.countries), len(dimensions.platforms)
    country_gmv, country_orders = (column("country_gmv_cents", n_countries),
                                   column("country_orders", n_countries))
    platform_gmv, platform_orders = (column("platform_gmv_cents", n_platforms),
                                     column("platform_orders", n_platforms))
    n_countries, n_platforms = listed(country_gmv, n_countries), listed(platform_gmv, n_platforms)
    first_time = [p.get("brands_first_time_active") for p in parts]
    # Big brands: shards own disjoint brands, so counts add and the N-th smallest crossing
    # minute of all shards is the minute N brands were above the line (each shard reports
    # its first 1,000, so the union holds the first 1,000 of all). Only for one line.
    lines = {p.get("big_brand_cents") for p in parts}
    one_line = len(lines) == 1 and None not in lines and all("brands_big" in p for p in parts)
    big_minutes = list(heapq.merge(*(p.get("big_brand_minutes", []) for p in parts)))
    top = heapq.nsmallest(TOP_BRANDS, (row for p in parts for row in p.get("top_brands", [])),
                          key=lambda row: (-row[1], row[0]))
    widths = {p.get("curve_bucket_minutes") for p in parts}
    width = widths.pop() if len(widths) == 1 else None
    curve = None
    if width is not None:
        sums = [0] * max(len(p["curve_cents"]) for p in parts)
        for p in parts:
            for i, value in enumerate(p["curve_cents"]):
                sums[i] += value
        running, cumulative = 0, []
        for value in sums:
            running += value
            cumulative.append(running)
        # Only the buckets that are complete: the one still filling grows with every update,
        # and resending the whole curve each time tripled the update frames. A viewer draws
        # the filling bucket from `gmv_cents` at `minute`.
        done = 0 if minute is None else minute + 1  # minutes in
        complete = len(cumulative) if window is not None and done >= window["minutes"] \
            else min(len(cumulative), done // width)
        curve = {"bucket_minutes": width, "cents": cumulative[:complete]}
    return {
        "gmv_cents": total("gmv_cents"),
        "orders": total("orders"),
        "brands_active": total("brands_active"),
        "brands_overseas_active": total("brands_overseas_active"),
        "brands_first_time_active": (sum(n for n in first_time if n is not None)
                                     if parts and None not in first_time
                                     else None),
        "brands_big": total("brands_big") if one_line else None,
        "brands_big_threshold_cents": lines.pop() if one_line else None,
        "chatbot_queries": total("chatbot_queries"),
        # For latency measurements: the newest send time among the batches counted so far.
        "newest_sent_at_us": max((int(p.get("newest_sent_at_us") or 0) for p in parts),
                                 default=0),
        "minute": minute,
        "sim_time": sim_time,
        "window": window,
        "gmv_last_minute_cents": sum(int(p.get("gmv_minute_cents", 0)) for p in parts
                                     if p.get("minute") == minute),
        "platforms": [{"name": dimensions.platform(i), "gmv_cents": platform_gmv[i],
                       "orders": platform_orders[i]} for i in range(n_platforms)],
        # The first country is the home market; the page ranks the others.
        "countries": [{"code": dimensions.country(i)[0], "name": dimensions.country(i)[1],
                       "gmv_cents": country_gmv[i], "orders": country_orders[i]}
                      for i in range(n_countries)],
        "top_brands": [{"id": row[0], "gmv_cents": row[1]} for row in top],
        "big_brand_minutes": big_minutes[:MAX_BIG_BRAND_MINUTES] if one_line else [],
        "curve": curve,
        "stats": {
            "batches": total("batches"),
            "rejected": sum(sum(p.get("rejected", {}).values()) for p in parts),
            "duplicates": total("duplicates"),
            "gaps": total("gaps"),
            "shards": len(parts),
        },
    }


def partition_layout(shards: dict[str, dict]) -> dict[str, object]:
    """Whether the merged shards hold every brand partition exactly once: `partitions`, the
    count they agree on (None if they do not say or disagree), and `partitions_problem`, a
    line for the screen when not: a partition no merged shard holds (its brands are missing
    from every figure) or one two shards claim (a brand of it may count twice)."""
    layouts = [(t["partitions"], t["owned"]) for t in shards.values() if "partitions" in t]
    counts = sorted({p for p, _ in layouts})
    if len(counts) > 1:
        return {"partitions": None, "partitions_problem": "shards disagree on the partitions: "
                + ", ".join(map(str, counts[:MAX_LISTED]))}
    if not counts:
        return {"partitions": None, "partitions_problem": None}
    owners = Counter(p for _, owned in layouts for p in owned)
    missing = [p for p in range(counts[0]) if p not in owners]
    doubled = sorted(p for p, n in owners.items() if n > 1)
    problem = f"no shard for partition {_listed(missing)} of {counts[0]}" if missing \
        else f"partition {_listed(doubled)} in two shards" if doubled else None
    return {"partitions": counts[0], "partitions_problem": problem}


def _listed(items: list[int]) -> str:
    shown = ", ".join(map(str, items[:MAX_LISTED]))
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def _time_of(window: dict, minute: int) -> str:
    return (datetime.fromisoformat(window["start"]) + timedelta(minutes=minute)).isoformat()


@dataclass(frozen=True)
class Recent:
    """The shards' recent minutes added minute by minute: GMV and orders of each minute from
    `first` to `last`, and the merged GMV through the end of each (`cumulative`). Where a
    shard's report does not reach back to a minute, that minute is not here: `first` is the
    earliest minute every shard covers."""

    first: int
    last: int
    gmv: list[int]
    orders: list[int] | None          # None: some shard does not report orders per minute
    cumulative: list[int]             # cumulative[i]: GMV through minute first + i
    before: int                       # GMV before minute `first`
    complete: int                     # the last minute every shard has moved past

    @classmethod
    def of(cls, shards: dict[str, dict]) -> Recent | None:
        parts = [p for p in shards.values() if p.get("minute") is not None]
        if not parts:
            return None
        last = max(p["minute"] for p in parts)
        first = max(p["minute"] + 1 - len(p.get("recent_gmv_cents", [])) for p in parts)
        if first > last:
            return None
        n = last - first + 1
        gmv, orders = [0] * n, [0] * n
        has_orders = all("recent_orders" in p for p in parts)
        for p in parts:
            recent = p.get("recent_gmv_cents", [])
            start = p["minute"] + 1 - len(recent)  # the minute of recent[0]
            skip = first - start
            for i, value in enumerate(recent[skip:]):
                gmv[i] += value
            if has_orders:
                for i, value in enumerate(p["recent_orders"][skip:]):
                    orders[i] += value
        total = sum(int(p.get("gmv_cents", 0)) for p in shards.values())
        before = total - sum(gmv)
        cumulative, running = [], before
        for value in gmv:
            running += value
            cumulative.append(running)
        complete = min(p["minute"] for p in parts) - 1
        return cls(first, last, gmv, orders if has_orders else None, cumulative, before,
                   complete)

    def crossing(self, cents: int) -> tuple[int, int] | None:
        """(minute, seconds since the window start) at which the merged GMV reached `cents`,
        if that happened within these minutes: the minute whose end first holds it, and the
        second within it by linear interpolation of that minute's GMV."""
        if self.before >= cents or not self.cumulative or self.cumulative[-1] < cents:
            return None
        i = _first_at_least(self.cumulative, cents)
        minute = self.first + i
        earlier = self.cumulative[i - 1] if i else self.before
        second = min(59, (cents - earlier) * 60 // max(self.gmv[i], 1))
        return minute, minute * 60 + second


def _first_at_least(values: list[int], target: int) -> int:
    """The first index of a non-decreasing list whose value is >= target (one is)."""
    lo, hi = 0, len(values) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if values[mid] >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass(frozen=True, eq=False)
class Comparison:
    """Last year's curve, to show this year against it at the same elapsed time."""

    label: str                # e.g. "2019 (Nov 1-11)"
    cumulative: np.ndarray    # int64 cents in by each minute boundary; [-1] is the total
    curve_cents: list[int] = field(init=False)  # in by the end of each curve bucket

    def __post_init__(self) -> None:
        minutes = len(self.cumulative) - 1
        width = curve_bucket_minutes(max(minutes, 1))
        ends = [min((i + 1) * width, minutes) for i in range(-(-minutes // width))]
        object.__setattr__(self, "curve_cents", [int(self.cumulative[e]) for e in ends])

    def at(self, minute: int | None) -> int:
        """Last year's GMV through the same minute as this year's latest."""
        if minute is None:
            return 0
        return int(self.cumulative[min(minute + 1, len(self.cumulative) - 1)])


@dataclass(frozen=True)
class Currency:
    """The festival's exchange rate, for the RMB view and milestones: "6.723" RMB a USD,
    exact as written, and where the rate comes from."""

    rmb_per_usd: str
    basis: str

    def __post_init__(self) -> None:
        try:
            rate = Fraction(self.rmb_per_usd)
        except (ValueError, ZeroDivisionError):
            rate = Fraction(0)
        if rate <= 0:
            raise ValueError(f"rmb_per_usd={self.rmb_per_usd!r}: must be a positive number")

    def cents(self, rmb: Fraction) -> int:
        """US cents for an RMB amount, rounded half up (as simulator/history.py does)."""
        return math.floor(rmb * 100 / Fraction(self.rmb_per_usd) + Fraction(1, 2))


@dataclass(frozen=True)
class Threshold:
    key: str
    kind: str                 # gmv, brands, passed
    currency: str | None
    label: str
    value: int                # cents (gmv, passed) or brands


def thresholds(comparison: Comparison | None, currency: Currency | None) -> list[Threshold]:
    """The milestones a screen announces: USD amounts, their RMB equivalents when the rate is
    known, passing last year's total when there is one; the brand counts are separate."""
    out = [Threshold(f"usd-{b}b", "gmv", "USD", f"USD {b}B", int(Fraction(b) * 10**11))
           for b in USD_MILESTONES]
    if currency is not None:
        out += [Threshold(f"rmb-{b}b", "gmv", "RMB", f"RMB {b}B",
                          currency.cents(Fraction(b) * 10**9)) for b in RMB_MILESTONES]
    if comparison is not None:
        out.append(Threshold("passed", "passed", None, f"Passed {comparison.label}",
                             int(comparison.cumulative[-1])))
    return out


def default_name(brand: int) -> str:
    return f"Brand {brand}"


class Feed:
    """The versioned view and its frames; `seq` grows by one per changed view.

    Only shards "0" .. `expected_shards - 1` are merged: totals from any other shard name are
    counted, and the first names kept, for the viewers' `stats`. Time arrives as data: the
    server passes `now` (its monotonic clock) with each message and to `tick`."""

    def __init__(self, comparison: Comparison | None = None, *, expected_shards: int = 1,
                 brand_name: Callable[[int], str] = default_name,
                 currency: Currency | None = None,
                 dimensions: Dimensions = DEFAULT_DIMENSIONS) -> None:
        """`brand_name`: the name shown for a brand id (the aggregators know ids only).
        `currency`: the festival's exchange rate, for the RMB milestones and view.
        `dimensions`: the names of the country and platform ids (reference data)."""
        if expected_shards <= 0:
            raise ValueError(f"expected_shards={expected_shards}: must be positive")
        self.expected_shards = expected_shards
        self.shards: dict[str, dict] = {}
        self.comparison = comparison
        self.currency = currency
        self.brand_name = brand_name
        self.dimensions = dimensions
        self.thresholds = thresholds(comparison, currency)
        self.replay: dict | None = None
        self.ignored_totals = self.ignored_replay = self.unknown_shard_messages = 0
        self.unknown_shards: list[str] = []  # the first MAX_UNKNOWN_SHARDS names
        self.milestones: dict[str, dict] = {}  # key -> the milestone as viewers get it
        self.peak: dict | None = None  # the highest complete-minute orders/s seen
        self.heard: dict[str, float] = {}  # expected shard -> when its last live totals came
        self.last_heard: float | None = None  # the latest of those
        self._replay_at: float | None = None  # when the last replay status came
        self._started: float | None = None  # the first `tick`
        self._quiet: list[str] = []
        self.view = self._complete(merge_shards({}, dimensions))
        self.seq = 1
        self.snapshot_frame = self._frame("snapshot", self.view)
        self.update_frame = self.snapshot_frame
        self._dirty = False

    def accept_totals(self, shard: str, payload: bytes, now: float | None = None) -> None:
        """Take a totals message as it arrived on shard `shard`'s topic, if it is from an
        expected shard and fits the schema; else count it and raise MessageError. `now`:
        when it arrived, for a live message (None: a retained copy, which may come from a
        dead aggregator and says nothing about whether it is alive)."""
        self._dirty = True  # the counts below are in the view too
        if not self._expected(shard):
            self.unknown_shard_messages += 1
            name = shard[:40]
            new = name not in self.unknown_shards and \
                len(self.unknown_shards) < MAX_UNKNOWN_SHARDS
            if new:
                self.unknown_shards.append(name)
            raise UnknownShard(shard, new)
        try:
            totals = parse_totals(shard, decode_message(payload))
        except MessageError:
            self.ignored_totals += 1
            raise
        self.receive(totals, now)

    def accept_replay(self, payload: bytes, *, retained: bool = False,
                      now: float | None = None) -> None:
        """Take a replay status message as it arrived (empty: the status was deleted), if it
        fits the schema; else count it and raise MessageError. A retained status is ignored:
        replays publish theirs live at least once a second, and a retained one is an earlier
        run's leftover."""
        if retained:
            return
        try:
            self.receive_replay(parse_replay(decode_message(payload)) if payload else None, now)
        except MessageError:
            self.ignored_replay += 1
            self._dirty = True
            raise

    def receive(self, totals: dict, now: float | None = None) -> None:
        """Take a shard's checked totals (`parse_totals`); the view changes at the next
        `publish`. `now`: when a live message arrived (None: a retained copy)."""
        shard = str(totals["shard"])
        self.shards[shard] = totals
        if now is not None and self._expected(shard):
            self.heard[shard] = now
            self.last_heard = now if self.last_heard is None else max(self.last_heard, now)
        self._dirty = True

    def receive_replay(self, status: dict | None, now: float | None = None) -> None:
        """Take the replay's checked status (playing, paused, speed...), shown beside the
        clock; None when there is none. With `now`, it expires REPLAY_TTL_SECONDS later
        unless another comes (see `tick`)."""
        self.replay = status
        self._replay_at = now
        self._dirty = True

    def tick(self, now: float) -> None:
        """The server's clock, now and then: drops a replay status nothing has renewed for
        REPLAY_TTL_SECONDS, and lists the expected shards silent for QUIET_SECONDS (one
        never heard from counts from the first tick)."""
        if self._started is None:
            self._started = now
        if self.replay is not None and self._replay_at is not None \
                and now - self._replay_at > REPLAY_TTL_SECONDS:
            self.replay = self._replay_at = None
            self._dirty = True
        quiet = [str(i) for i in range(self.expected_shards)
                 if now - self.heard.get(str(i), self._started) > QUIET_SECONDS]
        quiet = quiet[:MAX_QUIET_SHARDS]
        if quiet != self._quiet:
            self._quiet = quiet
            self._dirty = True

    def _expected(self, shard: str) -> bool:
        """One of "0" .. "N-1", in decimal without leading zeros, as aggregators name them."""
        return shard.isascii() and shard.isdigit() and len(shard) < 10 \
            and str(int(shard)) == shard and int(shard) < self.expected_shards

    def _complete(self, view: dict) -> dict:
        """Add what is not in the shards' totals: names, rates, milestones, the comparison,
        the replay status."""
        view["replay"] = self.replay
        view["stats"].update(partition_layout(self.shards))
        view["stats"].update(ignored_totals=self.ignored_totals,
                             ignored_replay=self.ignored_replay,
                             unknown_shards=list(self.unknown_shards),
                             unknown_shard_messages=self.unknown_shard_messages,
                             shards_expected=self.expected_shards,
                             shards_quiet=list(self._quiet))
        view["top_brands"] = [{"id": row["id"], "name": self._name(row["id"]),
                               "gmv_cents": row["gmv_cents"]} for row in view["top_brands"]]
        big_minutes = view.pop("big_brand_minutes")
        recent = Recent.of(self.shards)
        self._rates(view, recent)
        self._place_milestones(view, recent, big_minutes)
        view["milestones"] = sorted(self.milestones.values(),
                                    key=lambda m: (m["minute"], m["elapsed_s"], m["key"]))
        view["currency"] = None if self.currency is None else {
            "rmb_per_usd": self.currency.rmb_per_usd, "basis": self.currency.basis}
        view["compare"] = view["compare_curve_cents"] = None
        c = self.comparison
        if c is None:
            return view
        # Apart from `compare`, which changes with every minute: unchanged, it is in no update.
        view["compare_curve_cents"] = c.curve_cents
        total, minute = int(c.cumulative[-1]), view["minute"]
        passed = self.milestones.get("passed")
        last_year = c.at(minute)
        view["compare"] = {"label": c.label, "gmv_cents": last_year, "total_cents": total,
                           "passed_at": passed["at"] if passed else None,
                           "meaningful": last_year > 0 and last_year >= total * MEANINGFUL_SHARE}
        return view

    def _name(self, brand: int) -> str:
        try:
            name = self.brand_name(brand)
        except Exception:  # a name function of the caller's must not stop the view
            name = None
        return name if isinstance(name, str) else default_name(brand)

    def _rates(self, view: dict, recent: Recent | None) -> None:
        """Orders per second of the last complete minute (the latest may still be filling),
        and the highest such figure seen, from the shards' recent minutes."""
        view["orders_per_second"] = None
        if recent is not None and recent.orders is not None \
                and recent.first <= recent.complete:
            complete = recent.orders[:recent.complete - recent.first + 1]
            view["orders_per_second"] = complete[-1] // 60
            best = max(range(len(complete)), key=lambda i: (complete[i], -i))
            if self.peak is None or complete[best] // 60 > self.peak["value"]:
                minute = recent.first + best
                self.peak = {"value": complete[best] // 60, "minute": minute,
                             "at": _time_of(view["window"], minute)}
        view["peak_orders_per_second"] = self.peak

    def _place_milestones(self, view: dict, recent: Recent | None,
                          big_minutes: list[int]) -> None:
        """Each milestone on its exact minute where the shards' recent minutes reach back to
        it (then recomputed from them every time: a reset or a seek moves it); one reached
        before those minutes (a server started late) is placed within its curve bucket by
        interpolation, marked `exact: false`. Those above the total again are dropped."""
        window, gmv = view["window"], view["gmv_cents"]
        for t in self.thresholds:
            if gmv < t.value or window is None:
                self.milestones.pop(t.key, None)
                continue
            found = recent.crossing(t.value) if recent is not None else None
            if found is not None:
                self.milestones[t.key] = self._milestone(t, window, *found, exact=True)
            elif t.key not in self.milestones:
                self.milestones[t.key] = self._milestone(
                    t, window, *self._estimate(view, recent, t.value), exact=False)
        brands = view["brands_big"]
        line = view["brands_big_threshold_cents"]
        for n in BRAND_MILESTONES:
            key = f"brands-{n}"
            if brands is None or brands < n or len(big_minutes) < n or window is None:
                self.milestones.pop(key, None)
                continue
            minute = big_minutes[n - 1]
            label = f"{n} brands above {self._line_label(line)}"
            self.milestones[key] = self._milestone(
                Threshold(key, "brands", None, label, n), window, minute, minute * 60,
                exact=True)

    @staticmethod
    def _line_label(line: int) -> str:
        """The big-brand line as the 2020 release wrote it (RMB 100M, given there as USD
        15.11M), or in USD when it is another."""
        return "RMB 100M" if line == BIG_BRAND_CENTS else f"USD {line / 10**8:,.2f}M"

    @staticmethod
    def _estimate(view: dict, recent: Recent | None, cents: int) -> tuple[int, int]:
        """(minute, elapsed s) of a crossing older than the recent minutes: linear within
        the curve bucket where the cumulative curve reaches `cents`, else the first minute
        known."""
        limit = recent.first - 1 if recent is not None else view["minute"] or 0
        curve = view["curve"]
        if curve is not None and curve["cents"] and curve["cents"][-1] >= cents:
            ends, width = curve["cents"], curve["bucket_minutes"]
            b = _first_at_least(ends, cents)
            earlier = ends[b - 1] if b else 0
            seconds = b * width * 60 + (cents - earlier) * width * 60 // max(ends[b] - earlier, 1)
            seconds = max(0, min(seconds, limit * 60 + 59))
            return seconds // 60, seconds
        limit = max(limit, 0)
        return limit, limit * 60

    def _milestone(self, t: Threshold, window: dict, minute: int, elapsed: int, *,
                   exact: bool) -> dict:
        return {"key": t.key, "kind": t.kind, "currency": t.currency, "label": t.label,
                "minute": minute, "at": _time_of(window, minute), "elapsed_s": elapsed,
                "exact": exact}

    def publish(self) -> bool:
        """Fold received totals into a new version; False if nothing changed."""
        if not self._dirty:
            return False
        self._dirty = False
        view = self._complete(merge_shards(self.shards, self.dimensions))
        changed = {key: value for key, value in view.items() if self.view.get(key) != value}
        if not changed:
            return False
        self.view = view
        self.seq += 1
        self.snapshot_frame = self._frame("snapshot", view)
        self.update_frame = self._frame("update", changed)
        return True

    def frame_for(self, viewer_seq: int) -> bytes:
        """The frame that brings a viewer at `viewer_seq` to the current version."""
        return self.update_frame if viewer_seq == self.seq - 1 else self.snapshot_frame

    def _frame(self, kind: str, fields: dict[str, object]) -> bytes:
        return orjson.dumps({"type": kind, "seq": self.seq, **fields})
