"""Merging shard totals into the viewer's view, its snapshot/update frames, and the schema
every totals and replay message must fit before it gets there."""

from __future__ import annotations

import re
from datetime import timedelta

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ticker.core.dimensions import FESTIVAL_2020
from ticker.core.feed import Comparison, Feed, MessageError, UnknownShard, merge_shards, \
    parse_replay, parse_totals


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
                                "shards_expected": 1, "shards_quiet": [],
                                "partitions": None, "partitions_problem": None}}


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
    from gmv.app import comparison_for

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
                    recent_orders=[0, 1, 2], latency_ms={"count": 3, "p50": 1.5, "max": 2},
                    brands_big=1, big_brand_cents=1000, big_brand_minutes=[1],
                    top_brands=[[7, 4000], [3, 1000]], curve_bucket_minutes=60,
                    curve_cents=[5000]), **extra}


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
    (full_totals(big_brand_minutes=[2, 1]), "big_brand_minutes: must be sorted"),
    (full_totals(big_brand_minutes=[0] * 1001), "big_brand_minutes: must be a list"),
    (full_totals(big_brand_minutes=[-1]), "big_brand_minutes=-1"),
    (full_totals(big_brand_minutes=[15_840]), "big_brand_minutes: must be sorted minutes"),
    (full_totals(big_brand_minutes="1,2"), "big_brand_minutes: must be a list"),
    (full_totals(brands_big=-3), "brands_big=-3"),
    (full_totals(big_brand_cents=1.5), "big_brand_cents=1.5"),
    (full_totals(top_brands=[[1, 5]] * 11), "top_brands: must be a list of 0 to 10"),
    (full_totals(top_brands=[[1, 5], [2, 9]]), "top_brands: must be distinct brands, most"),
    (full_totals(top_brands=[[1, 5], [1, 5]]), "top_brands: must be distinct"),
    (full_totals(top_brands=[[1, 9], [1, 5]]), "top_brands: must be distinct"),
    (full_totals(top_brands=[[2**32, 5]]), "top_brands: each entry"),
    (full_totals(top_brands=[[1, -5]]), "top_brands=-5"),
    (full_totals(top_brands=[[1, 5, 6]]), "top_brands: each entry"),
    (full_totals(top_brands=[{"id": 1}]), "top_brands: each entry"),
    (full_totals(recent_orders=[0, 1]), "recent_orders: must be a list of 3"),
    (full_totals(recent_orders=[0, 1, -2]), "recent_orders=-2"),
    (without("recent_gmv_cents"), "recent_orders"),
    (full_totals(curve_bucket_minutes=30), "curve_bucket_minutes=30"),
    (full_totals(curve_bucket_minutes=None), "curve_bucket_minutes=None"),
    (full_totals(curve_cents=[1] * 265), "curve_cents: must be a list of 0 to 264"),
    (full_totals(curve_cents=[1, "2"]), "curve_cents='2'"),
    (window(minutes=10**6), "curve_bucket_minutes=60: must be an integer from 1440"),
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
    (status(run=""), "run=''"),
    (status(run="r" * 65), "run="),
    (status(run=7), "run=7"),
    (status(**{"from": -1}), "from=-1"),
    (status(**{"from": 10, "to": 9}), "from=10 is after to=9"),
    (status(to="end"), "to='end'"),
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


# --- the screen's data: big brands, leaders, rates, milestones, curve ------------------------

def test_replay_status_from_to_and_run_pass():
    """A replay status may name the minute range it plays and its run id; they reach the view."""
    assert parse_replay(status(**{"from": 14_430, "to": 15_839, "run": "r-1f2e"})) == {
        "state": "playing", "speed": 120.0, "minute": 30, "scenario": "2020", "loop": False,
        "from": 14_430, "to": 15_839, "run": "r-1f2e"}


def test_a_retained_replay_status_is_ignored():
    """A status that arrives retained is an earlier version's leftover: it never shows."""
    feed = Feed()
    feed.accept_replay(orjson.dumps(status()), retained=True, now=0.0)
    feed.publish()
    assert feed.view["replay"] is None and feed.view["stats"]["ignored_replay"] == 0


def test_the_replay_status_expires_5_s_after_the_last_one():
    """The replay status stays while renewed and is dropped 5 s after the last one."""
    feed = Feed()
    feed.tick(100.0)
    for now in (100.0, 101.0, 102.0):
        feed.accept_replay(orjson.dumps(status(minute=int(now))), now=now)
        feed.tick(now + 0.5)
    feed.tick(106.9)
    feed.publish()
    assert feed.view["replay"]["minute"] == 102
    feed.tick(107.1)
    assert feed.publish() and feed.view["replay"] is None


def test_expected_shards_silent_for_5_s_are_listed_quiet():
    """An expected shard whose live totals stopped (or never came) for over 5 s is listed in
    stats.shards_quiet; retained totals do not count as hearing from it."""
    feed = Feed(expected_shards=3)
    feed.tick(10.0)
    feed.accept_totals("0", orjson.dumps(full_totals("0")), now=10.0)
    feed.accept_totals("1", orjson.dumps(full_totals("1")), now=None)  # retained
    feed.tick(14.0)
    feed.publish()
    assert feed.view["stats"]["shards_quiet"] == [] and feed.view["stats"]["shards_expected"] == 3
    feed.accept_totals("0", orjson.dumps(full_totals("0")), now=14.0)
    feed.tick(15.5)
    feed.publish()
    assert feed.view["stats"]["shards_quiet"] == ["1", "2"] and feed.last_heard == 14.0


def festival(n_brands: int, per_minute: int, seed: int = 11):
    """The 2020 scenario's exact per-minute GMV as one small batch a minute: `per_minute`
    orders of random brands, splitting the minute's GMV exactly. (minute, brands, amounts)."""
    import numpy as np

    from simulator.scenario import scenario_for_year

    gmv = scenario_for_year(2020).minute_gmv_cents
    rng = np.random.default_rng(seed)
    for minute, cents in enumerate(gmv.tolist()):
        n = per_minute
        amounts = np.full(n, cents // n, np.int64)
        amounts[:cents % n] += 1
        yield minute, rng.integers(0, n_brands, n).astype(np.uint32), amounts


def replay_into(feed: Feed, shards: int, every, n_brands: int = 1500, per_minute: int = 40):
    """Replay `festival` into `shards` aggregation states split by brand, handing the feed
    every shard's totals (as JSON, through parse_totals) at the minutes `every` picks, as a
    max-speed replay does. The states, for checks."""
    import numpy as np

    from ticker.core.state import AggregateState
    from ticker.core.wire import Limits, OrderBatch

    limits = Limits(n_brands=n_brands, n_minutes=FESTIVAL_2020.minutes, n_countries=12,
                    n_platforms=3, max_batch_orders=1000, max_order_cents=10**12)
    states = [AggregateState(limits) for _ in range(shards)]
    for minute, brands, amounts in festival(n_brands, per_minute):
        for k, state in enumerate(states):
            mine = brands % shards == k
            zeros = np.zeros(int(mine.sum()), np.uint8)
            state.apply(OrderBatch("sim", minute, minute, amounts[mine], brands[mine], zeros,
                                   zeros))
        if every(minute) or minute == FESTIVAL_2020.minutes - 1:
            for k, state in enumerate(states):
                doc = {"v": 1, "shard": str(k), "window": FESTIVAL_2020.as_dict(),
                       **state.snapshot()}
                feed.accept_totals(str(k), orjson.dumps(doc))
            feed.publish()
    return states


def _2020_feed(shards: int, every) -> Feed:
    from gmv.app import screen_data
    from gmv.reference import SHIPPED_2020
    from ticker.shell import reference

    feed = Feed(expected_shards=shards, **screen_data(2020, reference.load(SHIPPED_2020)))
    replay_into(feed, shards, every)
    return feed


@pytest.fixture(scope="module")
def max_speed_views():
    """The finished 2020 replay seen by a feed with totals hundreds of minutes apart (as at
    `--speed max`), from one shard and from three."""
    gaps = [1, 300, 997, 1439, 5, 640]  # minutes between two totals, in turn

    def every_factory():
        state = {"next": 0, "i": 0}

        def every(minute: int) -> bool:
            if minute < state["next"]:
                return False
            state["next"] = minute + gaps[state["i"] % len(gaps)]
            state["i"] += 1
            return True
        return every
    return _2020_feed(1, every_factory()), _2020_feed(3, every_factory())


def test_three_shards_and_one_give_the_same_screen_data(max_speed_views):
    """Brands split over three shards give the same big-brand count, milestones (to the
    second), top brands, curve and rates as one shard: every figure merges exactly, the big
    brands' crossing minutes from each shard's first 1,000 (1,500 brands cross here)."""
    one, three = (feed.view for feed in max_speed_views)
    assert one["brands_big"] == 1500 and one["brands_big_threshold_cents"] == 15_110_000_00
    for key in ("gmv_cents", "brands_big", "top_brands", "curve", "milestones",
                "orders_per_second", "peak_orders_per_second", "compare"):
        assert three[key] == one[key], key
    top = one["top_brands"][0]
    assert len(one["top_brands"]) == 10 and re.fullmatch(f"[A-Z]{{2}} brand {top['id']:05d}",
                                                         top["name"])
    assert [m["key"] for m in one["milestones"] if m["kind"] == "brands"] == \
        ["brands-100", "brands-300", "brands-470"]


def test_milestones_at_max_speed_land_on_the_curves_exact_minute(max_speed_views):
    """Totals up to 1,439 minutes apart still put each milestone on the minute the scenario's
    own cumulative curve reaches it, its second interpolated in that minute's GMV; 2019's
    total is passed at Nov 11 01:08 (the page said 06:11 at max speed)."""
    import numpy as np

    from simulator.scenario import scenario_for_year

    gmv = scenario_for_year(2020).minute_gmv_cents
    cumulative = np.cumsum(gmv)
    feed = max_speed_views[0]
    milestones = {m["key"]: m for m in feed.view["milestones"]}
    gmv_keys = [t for t in feed.thresholds if t.value <= cumulative[-1]]
    assert {t.key for t in gmv_keys} <= set(milestones)
    assert "rmb-498.2b" not in milestones  # USD 74.1038B at 6.723: above the exact 74.1B
    for t in gmv_keys:
        minute = int(np.searchsorted(cumulative, t.value))
        before = int(cumulative[minute - 1]) if minute else 0
        m = milestones[t.key]
        assert m["exact"] and m["minute"] == minute, t.key
        assert m["elapsed_s"] == minute * 60 + (t.value - before) * 60 // int(gmv[minute])
        assert m["at"] == (FESTIVAL_2020.start + timedelta(minutes=minute)).isoformat()
    assert milestones["passed"]["at"] == "2020-11-11T01:08:00+08:00"
    assert feed.view["compare"]["passed_at"] == "2020-11-11T01:08:00+08:00"
    assert milestones["usd-1b"]["elapsed_s"] == 154  # "USD 1B in 2 min 34 s"
    minutes = [m["minute"] for m in feed.view["milestones"]]
    assert minutes == sorted(minutes)


def test_brand_milestones_are_the_minute_the_nth_brand_crossed_the_line(max_speed_views):
    """"100 brands above RMB 100M" is the minute the 100th brand's running GMV reached the
    line, order by order (checked here by brute force over every order)."""
    import numpy as np

    line = 15_110_000_00
    totals = np.zeros(1500, np.int64)
    crossed = []
    for minute, brands, amounts in festival(1500, 40):
        for b, a in zip(brands.tolist(), amounts.tolist()):
            if totals[b] < line <= totals[b] + a:
                crossed.append(minute)
            totals[b] += a
    crossed.sort()
    milestones = {m["key"]: m for m in max_speed_views[0].view["milestones"]}
    for n in (100, 300, 470):
        assert milestones[f"brands-{n}"]["minute"] == crossed[n - 1]
        assert milestones[f"brands-{n}"]["label"] == f"{n} brands above RMB 100M"


def minutes_shard(name: str, gmv: list[int], orders: list[int], **extra) -> dict:
    """A shard whose every minute so far is in its recent arrays (minute = len - 1)."""
    return shard(name, sum(gmv), sum(orders), len(gmv) - 1, recent_gmv_cents=gmv,
                 recent_orders=orders, **extra)


def test_orders_per_second_ignores_the_minute_still_filling():
    """Orders per second is the last complete minute's orders / 60: the latest minute, still
    filling at real time, is never used; with two shards, a minute is complete once both have
    moved past it."""
    feed = Feed(expected_shards=2)
    feed.receive(minutes_shard("0", [10, 10, 10], [600, 1234, 5]))
    feed.publish()
    assert feed.view["orders_per_second"] == 1234 // 60
    feed.receive(minutes_shard("1", [10, 10], [60, 66]))  # shard 1 is still in minute 1
    feed.publish()
    assert feed.view["orders_per_second"] == (600 + 60) // 60
    feed = Feed()
    feed.receive(minutes_shard("0", [10], [6000]))  # only a minute that is still filling
    feed.publish()
    assert feed.view["orders_per_second"] is None and feed.view["peak_orders_per_second"] is None


def test_the_peak_is_found_between_two_totals_and_kept():
    """The peak orders/s is the highest complete minute in the recent minutes, so a peak
    between two totals is not missed; a lower one later does not replace it."""
    feed = Feed()
    feed.receive(minutes_shard("0", [1] * 5, [60, 6000, 120, 60, 9000]))
    feed.publish()
    assert feed.view["peak_orders_per_second"] == {"value": 100, "minute": 1,
                                                   "at": "2020-11-01T00:01:00+08:00"}
    feed.receive(minutes_shard("0", [1] * 6, [60, 6000, 120, 60, 9000, 0]))
    feed.publish()
    assert feed.view["peak_orders_per_second"]["value"] == 150
    feed.receive(minutes_shard("0", [1] * 3, [0, 60, 0]))  # a reset: lower minutes
    feed.publish()
    assert feed.view["peak_orders_per_second"]["value"] == 150


def test_milestones_above_the_total_are_dropped_and_placed_again_when_reached():
    """A reset or a seek back drops the milestones above the new total; reached again, they
    are placed on the new minute."""
    billion = 10**11  # USD 1B in cents
    feed = Feed()
    feed.receive(minutes_shard("0", [billion // 2, billion // 2, billion * 10], [1, 1, 1]))
    feed.publish()
    assert [m["key"] for m in feed.view["milestones"]] == ["usd-1b", "usd-10b"]
    assert feed.view["milestones"][0]["minute"] == 1
    feed.receive(minutes_shard("0", [billion // 2], [1]))
    feed.publish()
    assert feed.view["milestones"] == []
    feed.receive(minutes_shard("0", [billion // 2, 0, 0, billion // 4, billion // 4], [1] * 5))
    feed.publish()
    assert [(m["key"], m["minute"], m["elapsed_s"]) for m in feed.view["milestones"]] == \
        [("usd-1b", 4, 4 * 60 + 59)]


def test_a_milestone_older_than_the_recent_minutes_is_placed_in_its_curve_bucket():
    """A server that starts after a milestone (its minute no longer in any shard's recent
    minutes) places it by interpolation within its curve bucket, marked inexact."""
    feed = Feed()
    minute = 3000
    gmv = [10**9] * 1440  # USD 10M a minute for the last day
    total = 2 * 10**11 + sum(gmv)
    feed.receive(shard("0", total, 1, minute, recent_gmv_cents=gmv, curve_bucket_minutes=60,
                       curve_cents=[0] * 20 + [2 * 10**11] + [0] * 30))  # USD 2B in hour 20
    feed.publish()
    (m,) = [m for m in feed.view["milestones"] if m["key"] == "usd-1b"]
    assert not m["exact"] and m["elapsed_s"] == 20 * 3600 + 1800 and m["minute"] == 1230
    assert [m["exact"] for m in feed.view["milestones"]] == [False, True]  # USD 10B: exact


def test_compare_is_meaningful_only_past_5_percent_of_last_years_total():
    """On Nov 1 2019's like-for-like figure is tiny (it was one day, Nov 11), so the
    percentage is not meaningful; on Nov 11 it is. Last year's curve comes per bucket."""
    import numpy as np

    from gmv.app import comparison_for

    c = comparison_for(2020)
    feed = Feed(c)
    feed.receive(shard("0", 10**11, 1, 60))
    feed.publish()
    assert feed.view["compare"]["meaningful"] is False
    assert feed.view["compare"]["gmv_cents"] < feed.view["compare"]["total_cents"] // 20
    feed.receive(shard("0", 10**11, 1, 14_500))
    feed.publish()
    assert feed.view["compare"]["meaningful"] is True
    curve = feed.view["compare_curve_cents"]
    assert len(curve) == 264 and curve[-1] == int(c.cumulative[-1])
    assert curve[239] == int(c.cumulative[240 * 60]) and curve == sorted(curve)
    assert np.all(np.diff(curve) >= 0)


def test_top_brands_carry_names_from_the_name_function_or_a_plain_one():
    """The feed names brand ids with the function it was given (the scenario's simulated
    names); without one, or if it fails, "Brand 42"."""
    doc = shard("0", 100, 2, 0, top_brands=[[42, 60], [7, 40]])
    named = Feed(brand_name=lambda b: f"US brand {b:05d}")
    named.receive(doc)
    named.publish()
    assert named.view["top_brands"] == [{"id": 42, "name": "US brand 00042", "gmv_cents": 60},
                                        {"id": 7, "name": "US brand 00007", "gmv_cents": 40}]
    for feed in (Feed(), Feed(brand_name=lambda b: 1 / 0)):
        feed.receive(doc)
        feed.publish()
        assert [b["name"] for b in feed.view["top_brands"]] == ["Brand 42", "Brand 7"]


def test_top_brands_are_the_top_ten_of_every_shards_top_ten():
    """Shards' top tens merge into the ten with the most GMV, ties by lower id."""
    a = [[i, 100 - i] for i in range(0, 20, 2)]
    b = [[i, 100 - i] for i in range(1, 21, 2)] + []
    b[0] = [101, 100]  # ties with brand 0: the lower id first
    b.sort(key=lambda row: (-row[1], row[0]))
    feed = Feed(expected_shards=2)
    feed.receive(shard("0", 1, 1, 0, top_brands=a))
    feed.receive(shard("1", 1, 1, 0, top_brands=b))
    feed.publish()
    assert [row["id"] for row in feed.view["top_brands"]] == [0, 101, 2, 3, 4, 5, 6, 7, 8, 9]


def test_the_curve_adds_shards_bucket_by_bucket_and_cumulates():
    """Shards' curve buckets add up and the view's curve is cumulative, over the complete
    buckets only (minute 130 is in the third hour, still filling: the page draws it from the
    total); shards with another bucket width give no curve."""
    feed = Feed(expected_shards=2)
    feed.receive(shard("0", 6, 1, 130, curve_bucket_minutes=60, curve_cents=[1, 2, 3]))
    feed.receive(shard("1", 5, 1, 70, curve_bucket_minutes=60, curve_cents=[4, 1]))
    feed.publish()
    assert feed.view["curve"] == {"bucket_minutes": 60, "cents": [5, 8]}
    feed.receive(shard("0", 6, 1, 179, curve_bucket_minutes=60, curve_cents=[1, 2, 3]))
    feed.publish()
    assert feed.view["curve"] == {"bucket_minutes": 60, "cents": [5, 8, 11]}
    feed.receive(shard("1", 5, 1, 70, curve_bucket_minutes=120, curve_cents=[5]))
    feed.publish()
    assert feed.view["curve"] is None


def test_curves_adding_up_past_their_shards_gmv_are_refused_and_the_feed_goes_on():
    """A shard's curve buckets split its GMV, so they add up to at most its gmv_cents. Before,
    three fake totals (anyone can write them on a broker without ACL) of 720 buckets of
    2^53 - 1 cents each cumulated past 2^64, and `publish` raised TypeError (orjson: "Integer
    exceeds 64-bit range"), which ended the server's pusher: every screen froze."""
    most = 2**53 - 1
    feed = Feed(expected_shards=3)
    for name in ("0", "1", "2"):
        doc = {"v": 1, "shard": name, "gmv_cents": most, "orders": most, "minute": 43199,
               "window": {"start": "2020-11-01T00:00:00+08:00", "minutes": 43200,
                          "label": "x"},
               "curve_bucket_minutes": 60, "curve_cents": [most] * 720}
        with pytest.raises(MessageError, match="curve_cents"):
            feed.accept_totals(name, orjson.dumps(doc), now=1.0)
        feed.accept_totals(name, orjson.dumps({**doc, "curve_cents": [most // 720] * 720}),
                           now=1.0)
    assert feed.publish() and feed.view["stats"]["ignored_totals"] == 3
    assert feed.view["curve"]["cents"][-1] == 3 * (most // 720) * 720


def test_big_brands_merge_only_for_one_line():
    """Brand counts add across shards that use the same line; with different lines there is
    no count, and no brand milestone."""
    feed = Feed(expected_shards=2)
    feed.receive(shard("0", 1, 1, 9, brands_big=60, big_brand_cents=100,
                       big_brand_minutes=list(range(60))))
    feed.receive(shard("1", 1, 1, 9, brands_big=50, big_brand_cents=100,
                       big_brand_minutes=list(range(50))))
    feed.publish()
    assert feed.view["brands_big"] == 110 and feed.view["brands_big_threshold_cents"] == 100
    (m,) = feed.view["milestones"]
    assert (m["key"], m["minute"], m["label"]) == ("brands-100", 49, "100 brands above "
                                                                     "USD 0.00M")
    feed.receive(shard("1", 1, 1, 9, brands_big=50, big_brand_cents=200,
                       big_brand_minutes=list(range(50))))
    feed.publish()
    assert feed.view["brands_big"] is None and feed.view["milestones"] == []


def test_the_currency_and_rmb_milestones_use_the_festivals_rate():
    """With the festival's rate, the view states it exactly and RMB milestones are in cents
    at that rate, rounded half up."""
    from ticker.core.feed import Currency

    feed = Feed(currency=Currency("6.723", "headline pair"))
    feed.receive(minutes_shard("0", [148_743_120_631, 1], [1, 1]))  # RMB 10B = 148,743,120,631
    feed.publish()
    assert feed.view["currency"] == {"rmb_per_usd": "6.723", "basis": "headline pair"}
    assert [(m["key"], m["currency"], m["minute"]) for m in feed.view["milestones"]] == \
        [("usd-1b", "USD", 0), ("rmb-10b", "RMB", 0)]
    assert Feed().view["currency"] is None
    with pytest.raises(ValueError, match="rmb_per_usd='0'"):
        Currency("0", "")


def test_an_update_within_a_curve_bucket_carries_neither_curve():
    """While the total grows inside one hour, update frames carry neither this year's curve
    (complete buckets only) nor last year's (it never changes): both stay in snapshots, so
    an update is a few hundred bytes, not the 3.7 KB of the whole curve it once was."""
    import numpy as np

    c = Comparison("2019", np.arange(15_841, dtype=np.int64) * 10**6)
    feed = Feed(c)
    feed.receive(shard("0", 10**12, 1, 7_230, curve_bucket_minutes=60,
                       curve_cents=[10**10] * 121))
    feed.publish()
    feed.receive(shard("0", 10**12 + 5, 2, 7_231, curve_bucket_minutes=60,
                       curve_cents=[10**10] * 120 + [5]))
    assert feed.publish()
    update = orjson.loads(feed.update_frame)
    assert "gmv_cents" in update and "curve" not in update
    assert "compare_curve_cents" not in update
    assert len(orjson.loads(feed.snapshot_frame)["compare_curve_cents"]) == 264
    assert feed.view["curve"]["cents"][-1] == 120 * 10**10
