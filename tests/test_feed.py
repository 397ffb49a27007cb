"""Merging shard totals into the viewer's view, its snapshot/update frames, and the schema
every totals and replay message must fit before it gets there."""

from __future__ import annotations

import re

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ticker.dimensions import FESTIVAL_2020
from ticker.feed import Feed, MessageError, UnknownShard, merge_shards, parse_replay, \
    parse_totals


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
                                "shards": 1, "ignored_totals": 0, "ignored_replay": 0,
                                "unknown_shards": [], "unknown_shard_messages": 0,
                                "shards_expected": 1, "shards_quiet": []}}


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


# --- the schema of totals and replay messages ----------------------------------------------

def full_totals(name: str = "0", **extra) -> dict:
    """Every field an aggregator sends, as it sends it."""
    return {**shard(name, 5000, 3, 2, brands_overseas_active=1, brands_first_time_active=None,
                    chatbot_queries=7, newest_sent_at_us=1_700_000_000_000_000, producers=2,
                    rejected={"bad_json": 1}, recent_gmv_cents=[0, 1000, 4000],
                    latency_ms={"count": 3, "p50": 1.5, "max": 2}), **extra}


def test_aggregator_totals_pass_unchanged_but_unknown_keys_are_dropped():
    """A complete totals message passes field for field; keys the feed does not know are left
    out."""
    doc = full_totals(note="x" * 10_000)
    parsed = parse_totals("0", doc)
    del doc["note"]
    assert parsed == doc


def test_optional_fields_may_be_absent():
    """Only v, shard, window, gmv_cents and orders are required."""
    parsed = parse_totals("3", {"v": 1, "shard": "3", "window": FESTIVAL_2020.as_dict(),
                                "gmv_cents": 1, "orders": 1})
    assert parsed["minute"] is None and parsed["brands_first_time_active"] is None
    assert merge_shards({"3": parsed})["gmv_cents"] == 1


def without(key: str) -> dict:
    doc = full_totals()
    del doc[key]
    return doc


def window(**fields) -> dict:
    return full_totals(window={**FESTIVAL_2020.as_dict(), **fields})


@pytest.mark.parametrize("doc, reason", [
    (full_totals(gmv_cents="lots"), "gmv_cents='lots'"),
    (full_totals(gmv_cents=True), "gmv_cents=True"),
    (full_totals(gmv_cents=-1), "gmv_cents=-1"),
    (full_totals(orders=2**53), "orders=9007199254740992"),
    (full_totals(orders=1.0), "orders=1.0"),
    (full_totals(producers={"sim-1": 4}), "producers="),
    (full_totals(brands_first_time_active="3"), "brands_first_time_active="),
    (without("gmv_cents"), "gmv_cents is missing"),
    (without("orders"), "orders is missing"),
    (full_totals(v=2), "version 1"),
    (full_totals(shard="1"), "shard='1' on the topic of shard '0'"),
    (full_totals(shard=0), "shard=0"),
    (without("window"), "window"),
    (window(start="2020-11-01T00:00:00"), "window.start"),
    (window(start="tomorrow"), "window.start"),
    (window(start="9999-12-31T00:00:00+08:00"), "window.start"),
    (window(minutes=0), "window.minutes=0"),
    (window(minutes=10**6 + 1), "window.minutes=1000001"),
    (window(label="x" * 201), "window.label"),
    (full_totals(minute=15_840), "minute=15840"),
    (full_totals(minute=-1), "minute=-1"),
    (full_totals(country_gmv_cents=[0] * 11), "country_gmv_cents"),
    (full_totals(platform_orders=[0, 0, "1"]), "platform_orders="),
    (full_totals(rejected={str(i): 1 for i in range(65)}), "rejected"),
    (full_totals(rejected={"x" * 41: 1}), "rejected"),
    (full_totals(rejected={"bad": -1}), "rejected"),
    (full_totals(recent_gmv_cents=[1] * 4), "recent_gmv_cents"),  # more minutes than seen
    (full_totals(latency_ms={"p50": "fast"}), "latency_ms"),
    ([full_totals()], "version 1"),
])
def test_totals_outside_the_schema_are_refused_with_the_reason(doc, reason):
    """Each way a totals message can break its schema raises MessageError naming the field."""
    with pytest.raises(MessageError, match=re.escape(reason)):
        parse_totals("0", doc)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False,
                                                                       allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=15) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=5),
    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(sorted(full_totals()) + ["start", "minutes", "label"]),
       value=json_values)
def test_any_json_in_any_field_is_refused_or_merges(key, value):
    """Whatever JSON replaces a field, parse_totals raises MessageError or the totals merge
    into a view without error."""
    doc = full_totals()
    if key in ("start", "minutes", "label"):
        doc["window"][key] = value
    else:
        doc[key] = value
    feed = Feed()
    try:
        feed.accept_totals("0", orjson.dumps(_fit(doc)))
    except MessageError:
        assert feed.ignored_totals == 1 and not feed.shards
        return
    feed.publish()
    assert feed.view["stats"]["shards"] == 1


def _fit(value: object) -> object:
    """What orjson can encode: integers beyond 64 bits become floats, as JSON parsers read
    them."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        return float(value)
    if isinstance(value, list):
        return [_fit(v) for v in value]
    if isinstance(value, dict):
        return {k: _fit(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("payload", [b"", b"\xff\xfe", b"not json", b"[1, 2]", b"null",
                                     b"{}", b'{"v": 1}', b"[" * 5000,
                                     b'{"v": 1, "pad": "' + b"x" * 70_000 + b'"}'])
def test_malformed_payloads_are_counted_and_change_nothing(payload):
    """A payload that is not a totals object is counted as ignored; the shard's last good
    totals stay."""
    feed = Feed()
    feed.accept_totals("0", orjson.dumps(full_totals()))
    with pytest.raises(MessageError):
        feed.accept_totals("0", payload)
    feed.publish()
    assert feed.view["gmv_cents"] == 5000 and feed.view["stats"]["ignored_totals"] == 1


def test_only_expected_shards_are_merged_and_the_others_named():
    """With 2 expected shards, "0" and "1" merge; any other name is counted, and its name
    shown once."""
    feed = Feed(expected_shards=2)
    for name in ("0", "1"):
        feed.accept_totals(name, orjson.dumps(full_totals(name)))
    news = []
    for name in ("zz", "2", "01", "-1", "\uff11", "zz", "1 "):
        with pytest.raises(UnknownShard) as refused:
            feed.accept_totals(name, orjson.dumps(full_totals(name)))
        news.append(refused.value.new)
    feed.publish()
    assert feed.view["gmv_cents"] == 10_000 and feed.view["stats"]["shards"] == 2
    assert feed.view["stats"]["unknown_shards"] == ["zz", "2", "01", "-1", "\uff11", "1 "]
    assert feed.view["stats"]["unknown_shard_messages"] == 7
    assert news == [True, True, True, True, True, False, True]


def test_unknown_shard_names_kept_are_bounded():
    """However many names a publisher invents, ten are kept (cut to 40 characters) and the
    rest only counted."""
    feed = Feed()
    for i in range(1000):
        with pytest.raises(UnknownShard):
            feed.accept_totals(f"fake-{i}-" + "x" * 100, b"{}")
    assert len(feed.unknown_shards) == 10 and all(len(n) == 40 for n in feed.unknown_shards)
    assert feed.unknown_shard_messages == 1000


def test_expected_shards_must_be_positive():
    """expected_shards=0 is refused, naming the parameter and the value."""
    with pytest.raises(ValueError, match="expected_shards=0: must be positive"):
        Feed(expected_shards=0)


def status(**fields) -> dict:
    return {"v": 1, "state": "playing", "speed": 120.0, "minute": 30, "scenario": "2020",
            "loop": False, **fields}


def test_replay_status_passes_and_an_empty_payload_clears_it():
    """A valid replay status is shown as is; the empty payload that deletes a retained
    message clears it."""
    feed = Feed()
    feed.accept_replay(orjson.dumps(status(speed=None, extra=1)))
    feed.publish()
    assert feed.view["replay"] == {"state": "playing", "speed": None, "minute": 30,
                                   "scenario": "2020", "loop": False}
    feed.accept_replay(b"")
    feed.publish()
    assert feed.view["replay"] is None


@pytest.mark.parametrize("doc, reason", [
    (status(state="exploding"), "state='exploding'"),
    (status(speed=0), "speed=0"),
    (status(speed="max"), "speed='max'"),
    (status(minute=-5), "minute=-5"),
    (status(minute=1.5), "minute=1.5"),
    (status(scenario="s" * 65), "scenario="),
    (status(loop="yes"), "loop='yes'"),
    (status(v=0), "version 1"),
])
def test_replay_status_outside_the_schema_is_refused(doc, reason):
    """Each way a replay status can break its schema raises MessageError naming the field."""
    with pytest.raises(MessageError, match=re.escape(reason)):
        parse_replay(doc)


def test_refused_replay_status_is_counted_and_keeps_the_last_good_one():
    """A malformed replay status is counted in stats and the shown status stays."""
    feed = Feed()
    feed.accept_replay(orjson.dumps(status()))
    with pytest.raises(MessageError):
        feed.accept_replay(b'{"v": 1, "state": 3}')
    feed.publish()
    assert feed.view["replay"]["state"] == "playing"
    assert feed.view["stats"]["ignored_replay"] == 1
