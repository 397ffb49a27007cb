"""What viewers see: shard totals merged into one versioned view, framed once per version.

Pure: no sockets, no clock. Shards own disjoint brands, so every total merges by addition
and one shard is the same code path as many. Each version is encoded once as a full
`snapshot` frame and once as an `update` frame holding only the fields that changed since
the previous version; the server sends a viewer the update when it has the previous
version, the snapshot otherwise (see docs/websocket.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import orjson

from .dimensions import COUNTRIES, PLATFORMS


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
    """The versioned view and its frames; `seq` grows by one per changed view."""

    def __init__(self, comparison: Comparison | None = None) -> None:
        self.shards: dict[str, dict] = {}
        self.comparison = comparison
        self.replay: dict | None = None
        self._passed_at: str | None = None
        self._before: tuple[int, int] | None = None  # (minute, gmv) of the previous view
        self.view = self._complete(merge_shards({}))
        self.seq = 1
        self.snapshot_frame = self._frame("snapshot", self.view)
        self.update_frame = self.snapshot_frame
        self._dirty = False

    def receive(self, totals: dict) -> None:
        """Take a shard's totals message; the view changes at the next `publish`."""
        self.shards[str(totals["shard"])] = totals
        self._dirty = True

    def receive_replay(self, status: dict) -> None:
        """Take the replay's status (playing, paused, speed...), shown beside the clock."""
        self.replay = {key: status.get(key) for key in
                       ("state", "speed", "minute", "scenario", "loop")}
        self._dirty = True

    def _complete(self, view: dict) -> dict:
        """Add what is not in the shards' totals: the comparison and the replay status."""
        view["replay"] = self.replay
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
