"""What viewers see: shard totals merged into one versioned view, framed once per version.

Pure: no sockets, no clock. Shards own disjoint brands, so every total merges by addition
and one shard is the same code path as many. Each version is encoded once as a full
`snapshot` frame and once as an `update` frame holding only the fields that changed since
the previous version; the server sends a viewer the update when it has the previous
version, the snapshot otherwise (see docs/websocket.md).
"""

from __future__ import annotations

from datetime import datetime, timedelta

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
    return {
        "gmv_cents": total("gmv_cents"),
        "orders": total("orders"),
        "brands_active": total("brands_active"),
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


class Feed:
    """The versioned view and its frames; `seq` grows by one per changed view."""

    def __init__(self) -> None:
        self.shards: dict[str, dict] = {}
        self.view = merge_shards({})
        self.seq = 1
        self.snapshot_frame = self._frame("snapshot", self.view)
        self.update_frame = self.snapshot_frame
        self._dirty = False

    def receive(self, totals: dict) -> None:
        """Take a shard's totals message; the view changes at the next `publish`."""
        self.shards[str(totals["shard"])] = totals
        self._dirty = True

    def publish(self) -> bool:
        """Fold received totals into a new version; False if nothing changed."""
        if not self._dirty:
            return False
        self._dirty = False
        view = merge_shards(self.shards)
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
