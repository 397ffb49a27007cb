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

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import orjson

from .dimensions import COUNTRIES, PLATFORMS

MAX_MESSAGE_BYTES = 65_536      # a totals message is about 2 KiB
MAX_COUNT = 2**53 - 1           # exact in JavaScript too
MAX_WINDOW_MINUTES = 10**6
RECENT_MINUTES = 240            # what the aggregator reports of its latest minutes
MAX_NAMES = 64                  # entries of `rejected` and `latency_ms`
MAX_UNKNOWN_SHARDS = 10         # names kept of shards that are not expected
COUNT_FIELDS = ("gmv_cents", "orders", "brands_active", "brands_overseas_active",
                "chatbot_queries", "gmv_minute_cents", "batches", "duplicates", "gaps",
                "newest_sent_at_us", "producers")
COLUMN_FIELDS = (("country_gmv_cents", len(COUNTRIES)), ("country_orders", len(COUNTRIES)),
                 ("platform_gmv_cents", len(PLATFORMS)), ("platform_orders", len(PLATFORMS)))
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
            column = _list(key, doc[key], size, size)
            out[key] = [_count(key, value) for value in column]
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
    if doc.get("latency_ms") is not None:
        out["latency_ms"] = _numbers_by_name("latency_ms", doc["latency_ms"])
    return out


def parse_replay(doc: object) -> dict:
    """A replay status message's fields (state, speed, minute, scenario, loop), checked."""
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
    return {"state": state, "speed": speed, "minute": _optional_count("minute", doc.get("minute")),
            "scenario": scenario, "loop": loop}


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


def merge_shards(shards: dict[str, dict]) -> dict[str, object]:
    """Merge the latest totals message of every shard into the viewer's fields."""
    parts = list(shards.values())
    minutes = [p["minute"] for p in parts if p.get("minute") is not None]
    minute = max(minutes) if minutes else None
    window = parts[0]["window"] if parts else None

    def total(key: str) -> int:
        return sum(int(p.get(key, 0)) for p in parts)

    def column(key: str, size: int) -> list[int]:
        sums = [0] * size
        for p in parts:
            for i, value in enumerate(p.get(key, [])[:size]):
                sums[i] += int(value)
        return sums

    sim_time = None
    if window is not None and minute is not None:
        start = datetime.fromisoformat(window["start"])
        sim_time = (start + timedelta(minutes=minute)).isoformat()
    country_gmv, country_orders = (column("country_gmv_cents", len(COUNTRIES)),
                                   column("country_orders", len(COUNTRIES)))
    platform_gmv, platform_orders = (column("platform_gmv_cents", len(PLATFORMS)),
                                     column("platform_orders", len(PLATFORMS)))
    first_time = [p.get("brands_first_time_active") for p in parts]
    return {
        "gmv_cents": total("gmv_cents"),
        "orders": total("orders"),
        "brands_active": total("brands_active"),
        "brands_overseas_active": total("brands_overseas_active"),
        "brands_first_time_active": (sum(first_time) if parts and None not in first_time
                                     else None),
        "chatbot_queries": total("chatbot_queries"),
        # For latency measurements: the newest send time among the batches counted so far.
        "newest_sent_at_us": max((int(p.get("newest_sent_at_us") or 0) for p in parts),
                                 default=0),
        "minute": minute,
        "sim_time": sim_time,
        "window": window,
        "gmv_last_minute_cents": sum(int(p.get("gmv_minute_cents", 0)) for p in parts
                                     if p.get("minute") == minute),
        "platforms": [{"name": name, "gmv_cents": g, "orders": o}
                      for name, g, o in zip(PLATFORMS, platform_gmv, platform_orders)],
        "countries": [{"code": code, "name": name, "gmv_cents": g, "orders": o}
                      for (code, name), g, o in zip(COUNTRIES, country_gmv, country_orders)],
        "stats": {
            "batches": total("batches"),
            "rejected": sum(sum(p.get("rejected", {}).values()) for p in parts),
            "duplicates": total("duplicates"),
            "gaps": total("gaps"),
            "shards": len(parts),
        },
    }


@dataclass(frozen=True, eq=False)
class Comparison:
    """Last year's curve, to show this year against it at the same elapsed time."""

    label: str                # e.g. "2019 (Nov 1-11)"
    cumulative: np.ndarray    # int64 cents in by each minute boundary; [-1] is the total

    def at(self, minute: int | None) -> int:
        """Last year's GMV through the same minute as this year's latest."""
        if minute is None:
            return 0
        return int(self.cumulative[min(minute + 1, len(self.cumulative) - 1)])


class Feed:
    """The versioned view and its frames; `seq` grows by one per changed view.

    Only shards "0" .. `expected_shards - 1` are merged: totals from any other shard name are
    counted, and the first names kept, for the viewers' `stats`."""

    def __init__(self, comparison: Comparison | None = None, *, expected_shards: int = 1) -> None:
        if expected_shards <= 0:
            raise ValueError(f"expected_shards={expected_shards}: must be positive")
        self.expected_shards = expected_shards
        self.shards: dict[str, dict] = {}
        self.comparison = comparison
        self.replay: dict | None = None
        self.ignored_totals = self.ignored_replay = self.unknown_shard_messages = 0
        self.unknown_shards: list[str] = []  # the first MAX_UNKNOWN_SHARDS names
        self._passed_at: str | None = None
        self._before: tuple[int, int] | None = None  # (minute, gmv) of the previous view
        self.view = self._complete(merge_shards({}))
        self.seq = 1
        self.snapshot_frame = self._frame("snapshot", self.view)
        self.update_frame = self.snapshot_frame
        self._dirty = False

    def accept_totals(self, shard: str, payload: bytes) -> None:
        """Take a totals message as it arrived on shard `shard`'s topic, if it is from an
        expected shard and fits the schema; else count it and raise MessageError."""
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
        self.receive(totals)

    def accept_replay(self, payload: bytes) -> None:
        """Take a replay status message as it arrived (empty: the status was deleted), if it
        fits the schema; else count it and raise MessageError."""
        try:
            self.receive_replay(parse_replay(decode_message(payload)) if payload else None)
        except MessageError:
            self.ignored_replay += 1
            self._dirty = True
            raise

    def receive(self, totals: dict) -> None:
        """Take a shard's checked totals (`parse_totals`); the view changes at the next
        `publish`."""
        self.shards[str(totals["shard"])] = totals
        self._dirty = True

    def receive_replay(self, status: dict | None) -> None:
        """Take the replay's checked status (playing, paused, speed...), shown beside the
        clock; None when there is none."""
        self.replay = status
        self._dirty = True

    def _expected(self, shard: str) -> bool:
        """One of "0" .. "N-1", in decimal without leading zeros, as aggregators name them."""
        return shard.isascii() and shard.isdigit() and len(shard) < 10 \
            and str(int(shard)) == shard and int(shard) < self.expected_shards

    def _complete(self, view: dict) -> dict:
        """Add what is not in the shards' totals: the comparison and the replay status."""
        view["replay"] = self.replay
        view["stats"].update(ignored_totals=self.ignored_totals,
                             ignored_replay=self.ignored_replay,
                             unknown_shards=list(self.unknown_shards),
                             unknown_shard_messages=self.unknown_shard_messages)
        view["compare"] = None
        c = self.comparison
        if c is None:
            return view
        total, gmv, minute = int(c.cumulative[-1]), view["gmv_cents"], view["minute"]
        if gmv < total:
            self._passed_at = None  # a replay went back: it has not passed (yet)
        elif self._passed_at is None and minute is not None:
            self._passed_at = self._crossing_time(view, total)
        view["compare"] = {"label": c.label, "gmv_cents": c.at(minute), "total_cents": total,
                           "passed_at": self._passed_at}
        self._before = (minute, gmv) if minute is not None else None
        return view

    def _crossing_time(self, view: dict, total: int) -> str | None:
        """When this year's total passed last year's: the exact minute when it is among the
        shards' recent minutes (one shard), else interpolated between two views."""
        minute, gmv = view["minute"], view["gmv_cents"]
        recent = self._recent_minutes()
        if recent is not None:
            # Walk back from now: the crossing minute is the last one whose start was below.
            for m in range(minute, minute - len(recent), -1):
                gmv -= recent[m - minute - 1]
                if gmv < total:
                    minute = m
                    break
        elif self._before is not None and self._before[1] < total and self._before[0] <= minute:
            m0, g0 = self._before
            minute = m0 + (minute - m0) * (total - g0) / max(gmv - g0, 1)
        start = datetime.fromisoformat(view["window"]["start"])
        return (start + timedelta(minutes=int(minute))).isoformat()

    def _recent_minutes(self) -> list[int] | None:
        """The recent per-minute GMV, if one shard reports it (shards split by brand would
        need adding minute by minute; then the interpolation is used)."""
        if len(self.shards) != 1:
            return None
        return next(iter(self.shards.values())).get("recent_gmv_cents") or None

    def publish(self) -> bool:
        """Fold received totals into a new version; False if nothing changed."""
        if not self._dirty:
            return False
        self._dirty = False
        view = self._complete(merge_shards(self.shards))
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
