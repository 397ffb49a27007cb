"""The whole pipeline through a real Mosquitto: simulator -> aggregator -> server -> websocket."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from websockets.asyncio.client import connect as ws_connect

from simulator.publisher import publish_scenario
from simulator.scenario import scenario_for_year
from ticker.shell.mqtt import ReliablePublisher, connect

from .conftest import running_pipeline

SCENARIO = scenario_for_year(2020, order_scale=0.0001)


async def watch_until(port: int, done, timeout: float = 60.0) -> dict:
    """Follow the websocket like a page does (snapshot, updates, heartbeats) until `done(view)`."""
    view: dict = {}
    async with asyncio.timeout(timeout), ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
        async for frame in ws:
            message = orjson.loads(frame)
            if message["type"] == "heartbeat":
                continue
            if message["type"] == "snapshot":
                view = message
            else:
                assert message["type"] == "update" and message["seq"] == view["seq"] + 1
                view.update(message)
            if done(view):
                return view
    raise AssertionError("websocket closed early")


@pytest.mark.parametrize("encoding", ["binary", "json"])
async def test_published_equals_aggregated_equals_shown(mosquitto, topics, encoding):
    """A full-speed replay of the 11 days conserves GMV and orders to the cent end to end."""
    async with running_pipeline(mosquitto, topics) as pipeline:
        watcher = asyncio.create_task(watch_until(
            pipeline.port, lambda v: v["gmv_cents"] == SCENARIO.gmv_cents and v["minute"] == 15839))
        async with ReliablePublisher(mosquitto) as publisher:
            report = await publish_scenario(publisher, SCENARIO, topics, producer="conservation",
                                            speed=None, binary=encoding == "binary")
        shown = await watcher
    expected_orders = int(SCENARIO.minute_orders.sum())
    assert report.gmv_cents == pipeline.state.gmv_cents == shown["gmv_cents"] \
        == SCENARIO.gmv_cents == 7_410_000_000_000
    assert report.orders == pipeline.state.orders == shown["orders"] == expected_orders
    stats = {key: shown["stats"][key] for key in ("batches", "rejected", "duplicates", "gaps",
                                                  "shards")}
    assert stats == {"batches": report.batches, "rejected": 0, "duplicates": 0, "gaps": 0,
                     "shards": 1}
    assert sum(p["gmv_cents"] for p in shown["platforms"]) == SCENARIO.gmv_cents
    assert sum(c["gmv_cents"] for c in shown["countries"]) == SCENARIO.gmv_cents
    assert shown["sim_time"] == "2020-11-11T23:59:00+08:00"


async def test_republished_batches_are_not_counted_twice(mosquitto, topics):
    """Publishing the same producer's minutes twice (at-least-once redelivery) adds nothing."""
    async with running_pipeline(mosquitto, topics) as pipeline:
        async with ReliablePublisher(mosquitto) as publisher:
            for _ in range(2):
                first = await publish_scenario(publisher, SCENARIO, topics, producer="again",
                                               speed=None, last_minute=59)
        # The second round's 60 order batches and 6 chatbot counts are all duplicates.
        shown = await watch_until(pipeline.port, lambda v: v["stats"]["duplicates"] == 66)
    assert shown["gmv_cents"] == first.gmv_cents == int(SCENARIO.minute_gmv_cents[:60].sum())
    assert shown["stats"]["batches"] == first.batches


async def test_bad_batch_is_rejected_counted_and_dead_lettered(mosquitto, topics):
    """A malformed batch is refused whole, counted by reason, and republished as dead letter."""
    bad = b'{"v":1,"producer":"p","seq":0,"minute":0,"amount_cents":[100,-5],' \
          b'"brand":[1,2],"country":[0,0],"platform":[0,0]}'
    async with running_pipeline(mosquitto, topics) as pipeline, connect(mosquitto) as client:
        await client.subscribe(topics.rejected("+"), qos=1)
        await client.publish(topics.orders("p"), bad, qos=1)
        async with asyncio.timeout(10):
            message = await anext(aiter(client.messages))
        shown = await watch_until(pipeline.port, lambda v: v["stats"]["rejected"] == 1)
    assert str(message.topic) == topics.rejected("bad_amount")
    letter = orjson.loads(message.payload)
    assert (letter["reason"], letter["topic"], letter["size"], letter["head"]) == \
        ("bad_amount", topics.orders("p"), len(bad), bad.decode())
    assert "amounts must be 1.." in letter["detail"]
    assert pipeline.state.rejected == {"bad_amount": 1}
    assert shown["gmv_cents"] == 0 and shown["orders"] == 0


async def test_a_max_speed_replay_shows_each_milestone_on_the_curves_exact_minute(mosquitto,
                                                                                 topics):
    """A full-speed replay through the real broker, aggregator and server, with totals
    hundreds of minutes apart on the websocket: every milestone is on the minute where the
    scenario's own cumulative curve reaches it, 2019's total passed at Nov 11 01:08 (at max
    speed the page used to say 06:11)."""
    import numpy as np

    from gmv.app import screen_data
    from gmv.reference import demo_reference

    minutes_seen: list[int] = []

    def done(view: dict) -> bool:
        if view.get("minute") is not None and view["minute"] not in minutes_seen[-1:]:
            minutes_seen.append(view["minute"])
        return view["gmv_cents"] == SCENARIO.gmv_cents and view["minute"] == 15839

    options = screen_data(2020, demo_reference(SCENARIO))
    async with running_pipeline(mosquitto, topics, server_options=options) as pipeline:
        watcher = asyncio.create_task(watch_until(pipeline.port, done))
        async with ReliablePublisher(mosquitto) as publisher:
            await publish_scenario(publisher, SCENARIO, topics, producer="milestones",
                                   speed=None)
        shown = await watcher
    cumulative = np.cumsum(SCENARIO.minute_gmv_cents)
    milestones = {m["key"]: m for m in shown["milestones"]}
    reached = [t for t in pipeline.server.feed.thresholds if t.value <= cumulative[-1]]
    assert len(reached) == 10 and {t.key for t in reached} <= set(milestones)
    for t in reached:
        assert milestones[t.key]["minute"] == int(np.searchsorted(cumulative, t.value)), t.key
        assert milestones[t.key]["exact"]
    assert milestones["passed"]["at"] == shown["compare"]["passed_at"] \
        == "2020-11-11T01:08:00+08:00"
    assert max(np.diff(minutes_seen)) > 100  # the totals really were far apart
