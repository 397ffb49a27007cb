"""Merging shard totals into the viewer's view, and its snapshot/update frames."""

from __future__ import annotations

import orjson

from ticker.dimensions import FESTIVAL_2020
from ticker.feed import Feed, merge_shards


def shard(name: str, gmv: int, orders: int, minute: int | None, **extra) -> dict:
    return {"v": 1, "shard": name, "window": FESTIVAL_2020.as_dict(), "gmv_cents": gmv,
            "orders": orders, "brands_active": orders, "minute": minute,
            "gmv_minute_cents": gmv // 2, "country_gmv_cents": [gmv] + [0] * 11,
            "country_orders": [orders] + [0] * 11, "platform_gmv_cents": [gmv, 0, 0],
            "platform_orders": [orders, 0, 0], "batches": 1, "duplicates": 0, "gaps": 0,
            "rejected": {}, **extra}


def test_shards_merge_by_addition():
    """Two shards' totals, countries and platforms add up; the clock is the later shard's."""
    view = merge_shards({"0": shard("0", 1000, 3, 5), "1": shard("1", 234, 2, 7,
                                                                  rejected={"bad_json": 2})})
    assert view["gmv_cents"] == 1234 and view["orders"] == 5 and view["brands_active"] == 5
    assert view["minute"] == 7 and view["sim_time"] == "2020-11-01T00:07:00+08:00"
    assert view["gmv_last_minute_cents"] == 117  # only the shard at the latest minute
    assert view["countries"][0] == {"code": "CN", "name": "China", "gmv_cents": 1234,
                                    "orders": 5}
    assert view["platforms"][0]["gmv_cents"] == 1234
    assert view["stats"] == {"batches": 2, "rejected": 2, "duplicates": 0, "gaps": 0,
                             "shards": 2}


def test_no_shards_is_an_empty_view():
    """Before any aggregator reports, the view is zero with no time."""
    view = merge_shards({})
    assert view["gmv_cents"] == 0 and view["sim_time"] is None and view["stats"]["shards"] == 0


def test_update_frame_holds_only_changed_fields():
    """A new version's update carries seq and the fields that changed, nothing else."""
    feed = Feed()
    feed.receive(shard("0", 100, 1, 0))
    assert feed.publish()
    feed.receive(shard("0", 100, 1, 0, duplicates=4))
    assert feed.publish()
    update = orjson.loads(feed.update_frame)
    assert update == {"type": "update", "seq": feed.seq,
                      "stats": {"batches": 1, "rejected": 0, "duplicates": 4, "gaps": 0,
                                "shards": 1}}


def test_unchanged_totals_make_no_new_version():
    """Receiving the same totals again does not bump the version."""
    feed = Feed()
    feed.receive(shard("0", 100, 1, 0))
    feed.publish()
    seq = feed.seq
    feed.receive(shard("0", 100, 1, 0))
    assert not feed.publish() and feed.seq == seq
    assert not feed.publish()


def test_viewer_one_version_behind_gets_update_others_snapshot():
    """frame_for sends the delta to a viewer that has the previous version, else a snapshot."""
    feed = Feed()
    for gmv in (1, 2, 3):
        feed.receive(shard("0", gmv, gmv, 0))
        feed.publish()
    assert orjson.loads(feed.frame_for(feed.seq - 1))["type"] == "update"
    snapshot = orjson.loads(feed.frame_for(feed.seq - 2))
    assert snapshot["type"] == "snapshot" and snapshot["gmv_cents"] == 3
    assert snapshot["seq"] == feed.seq
    assert orjson.loads(feed.frame_for(0))["type"] == "snapshot"


def test_passing_last_years_total_is_placed_on_its_exact_minute():
    """Snapshots 200 minutes apart still place the moment 2019's total was passed exactly,
    from the shard's recent per-minute GMV (2020 passes it during Nov 11 01:08)."""
    import numpy as np

    from simulator.scenario import scenario_for_year
    from ticker.app import comparison_for

    gmv = scenario_for_year(2020).minute_gmv_cents
    cumulative = np.cumsum(gmv)
    feed = Feed(comparison_for(2020))
    for minute in (14_300, 14_500):
        feed.receive(shard("0", int(cumulative[minute]), 1, minute,
                           recent_gmv_cents=gmv[minute - 239:minute + 1].tolist()))
        feed.publish()
    crossing = int(np.searchsorted(cumulative, feed.comparison.cumulative[-1]))
    assert crossing == 14_468
    assert feed.view["compare"]["passed_at"] == "2020-11-11T01:08:00+08:00"
