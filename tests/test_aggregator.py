"""The aggregator: `handle` fed literal messages on every topic it subscribes to, and the
`gmv aggregate` process against a real broker under what hostile producers send."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ticker.shell.aggregator import Aggregator
from ticker.core.control import Command, sign
from ticker.core.dimensions import FESTIVAL_2020
from ticker.shell.mqtt import BrokerSettings, ReliablePublisher, Topics, connect
from ticker.core.wire import MAX_TOTAL, ChatbotCount, OrderBatch, decode, encode, encode_chatbot

from .conftest import festival_limits
from .test_cli import GMV

T = Topics("gmv/v1")
TOKEN = "operator-secret"


def aggregator(**options) -> Aggregator:
    return Aggregator(BrokerSettings("127.0.0.1", 1), T, festival_limits(), FESTIVAL_2020,
                      **options)


def batch(producer: str, seq: int, amounts=(100, 250)) -> OrderBatch:
    n = len(amounts)
    return OrderBatch(producer, seq, 14400, np.array(amounts, np.int64),
                      np.arange(n, dtype=np.uint32), np.zeros(n, np.uint8),
                      np.zeros(n, np.uint8))


def test_a_batch_on_its_producers_topic_is_applied():
    """orders/{producer}/{partition} with that producer in the payload: applied, counted."""
    agg = aggregator()
    assert agg.handle(T.orders("shop-1"), encode(batch("shop-1", 0)), 0.0).outcome == "applied"
    assert agg.handle(T.orders("shop-1"), encode(batch("shop-1", 0)), 0.0).outcome == \
        "duplicate"
    assert agg.state.gmv_cents == 350


def test_a_payload_naming_another_producer_than_its_topic_is_rejected_and_dead_lettered():
    """The identity check: a victim's id in the payload on the attacker's topic changes nothing."""
    agg = aggregator()
    handled = agg.handle(T.orders("mallory"), encode(batch("victim", 0)), 0.0)
    assert handled.outcome == "rejected" and agg.state.rejected == {"producer_mismatch": 1}
    topic, letter = handled.dead_letter
    assert topic == T.rejected("producer_mismatch")
    assert orjson.loads(letter)["topic"] == T.orders("mallory")
    assert agg.state.gmv_cents == 0 and not agg.state.watermarks.seen("victim", 0)


@pytest.mark.parametrize("topic", ["gmv/v1/orders/0", "gmv/v1/orders/shop-1/x",
                                   "gmv/v1/orders/shop-1/0/extra", "gmv/v1/chatbot/shop-1"])
def test_a_batch_on_a_topic_of_the_wrong_shape_is_rejected_as_bad_topic(topic):
    """The pre-identity topic orders/{partition} and other shapes get a reason, not silence."""
    agg = aggregator()
    assert agg.handle(topic, encode(batch("shop-1", 0)), 0.0).outcome == "rejected"
    assert agg.state.rejected == {"bad_topic": 1}


def test_chatbot_counts_share_their_producers_sequence():
    """A chatbot count takes the next seq after the producer's batches, not a stream of its own."""
    agg = aggregator()
    agg.handle(T.orders("p"), encode(batch("p", 0)), 0.0)
    count = encode_chatbot(ChatbotCount("p", 1, 14409, 1234))
    assert agg.handle(T.chatbot("p"), count, 0.0).outcome == "applied"
    assert agg.state.chatbot_queries == 1234 and agg.state.watermarks.get("p").next_seq == 2


def test_announcements_must_come_on_their_producers_topic_and_within_bounds():
    """The old crash: a retained last_seq of 2^64-1 for someone else's id. Now refused."""
    agg = aggregator()
    agg.handle(T.orders("p"), encode(batch("p", 0)), 0.0)
    huge = orjson.dumps({"v": 1, "producer": "p", "last_seq": 2**64 - 1})
    assert agg.handle(T.producer("p"), huge, 0.0).outcome == "rejected"
    stranger = orjson.dumps({"v": 1, "producer": "p", "last_seq": 3})
    assert agg.handle(T.producer("q"), stranger, 0.0).outcome == "rejected"
    assert agg.handle(T.producer("p"), stranger, 0.0).outcome == "announcement"
    assert agg.handle(T.producer("p"), b"", 0.0).outcome == "ignored"  # a cleared one
    assert agg.state.rejected == {"out_of_range": 1, "producer_mismatch": 1}
    assert agg.state.watermarks.gaps == 3
    orjson.dumps(agg.state.snapshot())


def test_a_signed_reset_is_obeyed_once_and_a_captured_copy_is_refused():
    """A reset needs the operator's signature; replaying the captured message does nothing."""
    agg = aggregator(control_token=TOKEN)
    now = time.time()
    reset = sign(Command("reset"), TOKEN, now=now)
    assert TOKEN.encode() not in reset
    assert agg.handle(T.control, reset, now).outcome == "reset"
    assert agg.handle(T.control, reset, now + 1).outcome == "refused"
    unsigned = orjson.dumps({"v": 1, "token": TOKEN, "cmd": "reset"})
    assert agg.handle(T.control, unsigned, now).outcome == "refused"
    assert agg.handle(T.control, sign(Command("reset"), "guess", now=now), now).outcome == \
        "refused"
    stale = sign(Command("reset"), TOKEN, now=now - 120)
    assert agg.handle(T.control, stale, now).outcome == "refused"


# --- nothing a message can send stops the aggregator or moves a total wrongly ---------------

producers = st.sampled_from(["a", "b", "a/b", "é", ""])
valid = st.builds(lambda p, seq, amounts: encode(batch(p, seq, amounts), binary=seq % 2 == 0),
                  st.sampled_from(["a", "b"]),
                  st.one_of(st.integers(0, 8), st.sampled_from([2**53 - 1, 2**63 - 1, 10**18])),
                  st.lists(st.integers(1, 10**10), min_size=1, max_size=4))
json_docs = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
              st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(
                                ["v", "producer", "seq", "minute", "last_seq", "queries",
                                 "amount_cents", "brand", "country", "platform", "cmd", "ts",
                                 "nonce", "mac"]), inner, max_size=8)), max_leaves=12)

payloads = st.one_of(valid, st.binary(max_size=64),
                     json_docs.map(lambda d: orjson.dumps(d, option=orjson.OPT_NON_STR_KEYS)),
                     st.tuples(valid, st.integers(0, 200), st.integers(0, 255)).map(
                         lambda t: t[0][:t[1]] + bytes([t[2]]) + t[0][t[1] + 1:]))
topics = st.one_of(
    st.builds(T.orders, producers), st.builds(T.chatbot, producers),
    st.builds(T.producer, producers), st.just(T.control), st.just("gmv/v1/orders/0"),
    st.just("gmv/v1/anything"), st.text(max_size=20))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(topics, payloads), max_size=30))
def test_any_messages_on_any_topic_never_raise_and_totals_move_only_by_applied_batches(stream):
    """Whatever arrives, handle returns; the GMV moves exactly by the batches it applied, and
    the totals always serialise with every figure below 2^53."""
    agg = aggregator(control_token=TOKEN)
    for topic, payload in stream:
        before = agg.state.gmv_cents
        handled = agg.handle(topic, payload, 1_000.0)
        if handled.outcome == "applied" and "/orders/" in topic:
            assert agg.state.gmv_cents - before == decode(payload, agg.state.limits).gmv_cents
        else:
            assert agg.state.gmv_cents == before, handled
    snapshot = orjson.loads(orjson.dumps(agg.state.snapshot()))
    assert all(0 <= v <= MAX_TOTAL for v in snapshot.values() if type(v) is int)
    assert agg.state.gmv_cents == int(agg.state.gmv_by_brand.sum())


# --- the process under hostile producers -----------------------------------------------------

async def totals_of(broker: BrokerSettings, topics: Topics, done, timeout: float = 20) -> dict:
    """The first live totals of shard 0 for which `done` holds."""
    async with connect(broker) as client:
        await client.subscribe(topics.totals("0"), qos=1)
        async with asyncio.timeout(timeout):
            async for message in client.messages:
                totals = orjson.loads(message.payload)
                if not message.retain and done(totals):
                    return totals
    raise AssertionError("no totals")


async def test_three_producers_at_the_largest_seq_and_a_huge_announcement_stop_nothing(
        mosquitto, topics, tmp_path):
    """The field report: three batches with seq 2^63-1 overflowed the gap sum, the exit path
    checkpointed it and every restart died again; a retained last_seq of 2^64-1 for another
    id killed even a fresh aggregator. Now all four are refused, and the shard goes on."""
    path = tmp_path / "shard.ckpt"
    args = GMV + ["aggregate", "--broker", mosquitto.url, "--prefix", topics.prefix,
                  "--checkpoint", str(path)]
    async with ReliablePublisher(mosquitto) as publisher:
        await publisher.send(topics.producer("victim"), orjson.dumps(
            {"v": 1, "producer": "victim", "last_seq": 2**64 - 1}), retain=True)
        proc = subprocess.Popen(args)
        try:
            await totals_of(mosquitto, topics, lambda t: True)
            for producer in ("a", "b", "c"):
                await publisher.send(topics.orders(producer), encode(batch(producer, 2**63 - 1)))
                await publisher.send(topics.orders(producer), encode(batch(producer, 2**53 - 1)))
            await publisher.send(topics.orders("a"), encode(batch("a", 0)))
            await publisher.flush()
            totals = await totals_of(mosquitto, topics, lambda t: t["batches"] == 1)
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
            proc = subprocess.Popen(args)  # and it starts again from its checkpoint
            again = await totals_of(mosquitto, topics, lambda t: True)
        finally:
            proc.terminate()
            proc.wait(10)
    assert totals["rejected"] == {"out_of_range": 4, "seq_jump": 3}
    assert totals["gmv_cents"] == 350 and totals["gaps"] == 0
    assert again["gmv_cents"] == 350 and again["rejected"] == totals["rejected"]


async def test_a_seq_jump_and_thousands_of_producer_ids_keep_the_totals_small(
        mosquitto, topics):
    """The field report: one seq of 10^18 showed 10^18 gaps on every screen, and 100,000
    producer ids grew the retained totals to 6.9 MB. Now the jump is refused and past
    --max-producers new ids are; the totals message stays the same size."""
    proc = subprocess.Popen(GMV + ["aggregate", "--broker", mosquitto.url, "--prefix",
                                   topics.prefix, "--no-checkpoint", "--max-producers", "100"])
    try:
        await totals_of(mosquitto, topics, lambda t: True)
        async with ReliablePublisher(mosquitto, max_inflight=64) as publisher:
            await publisher.send(topics.orders("p0"), encode(batch("p0", 0)))
            await publisher.flush()
            one = await totals_of(mosquitto, topics, lambda t: t["batches"] == 1)
            await publisher.send(topics.orders("p0"), encode(batch("p0", 10**15)))
            for i in range(1, 300):
                await publisher.send(topics.orders(f"p{i}"), encode(batch(f"p{i}", 0)))
            await publisher.flush()
        after = await totals_of(mosquitto, topics, lambda t: t["batches"] + sum(
            t["rejected"].values()) == 301)
    finally:
        proc.terminate()
        proc.wait(10)
    assert after["gaps"] == 0 and after["producers"] == 100 and after["batches"] == 100
    assert after["rejected"] == {"seq_jump": 1, "too_many_producers": 200}
    # 300 producers in, the message differs from one producer's only by its counts.
    assert len(orjson.dumps(after)) < len(orjson.dumps(one)) + 100


async def test_the_readme_aggregator_restarted_keeps_the_screen(mosquitto, topics, state_dir,
                                                              tmp_path):
    """The field report: `gmv aggregate` as the README runs it (no flag), stopped for a while
    and started again, fell from $4.89B to $0.36B. Now it is durable by default: the total
    survives, and batches published while it was down are counted once it is back."""
    args = GMV + ["aggregate", "--broker", mosquitto.url, "--prefix", topics.prefix]
    log = tmp_path / "aggregate.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stderr=out)
        try:
            await totals_of(mosquitto, topics, lambda t: True)
            async with ReliablePublisher(mosquitto) as publisher:
                for seq in range(10):
                    await publisher.send(topics.orders("shop"), encode(batch("shop", seq)))
                await publisher.flush()
                await totals_of(mosquitto, topics, lambda t: t["batches"] == 10)
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(10) == 0
                for seq in range(10, 15):  # while it is down: the broker holds them
                    await publisher.send(topics.orders("shop"), encode(batch("shop", seq)))
                await publisher.flush()
            proc = subprocess.Popen(args, stderr=out)
            totals = await totals_of(mosquitto, topics, lambda t: t["batches"] == 15)
        finally:
            proc.terminate()
            proc.wait(10)
    assert totals["gmv_cents"] == 15 * 350 and totals["gaps"] == 0
    err = log.read_text()
    assert "resuming 20 orders" in err and str(state_dir) in err
    assert list(state_dir.glob("aggregator-*.ckpt"))


async def test_a_checkpoint_path_that_cannot_work_fails_before_the_broker_session(
        mosquitto, topics, tmp_path):
    """The field report: a checkpoint path in a missing directory ended the broker session
    before the process failed, and the batches the broker held were gone. Now the path is
    checked first: one line, exit 2, and the held batches are still there for the real run."""
    path = tmp_path / "shard.ckpt"
    args = ["aggregate", "--broker", mosquitto.url, "--prefix", topics.prefix]
    proc = subprocess.Popen(GMV + args + ["--checkpoint", str(path)])
    try:
        await totals_of(mosquitto, topics, lambda t: True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        async with ReliablePublisher(mosquitto) as publisher:
            for seq in range(5):
                await publisher.send(topics.orders("held"), encode(batch("held", seq)))
            await publisher.flush()
        missing = tmp_path / "no-such-dir" / "shard.ckpt"
        wrong = subprocess.run(GMV + args + ["--checkpoint", str(missing)],
                               capture_output=True, text=True, timeout=30)
        proc = subprocess.Popen(GMV + args + ["--checkpoint", str(path)])
        totals = await totals_of(mosquitto, topics, lambda t: t["batches"] == 5)
    finally:
        proc.terminate()
        proc.wait(10)
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1
    assert wrong.stderr.startswith(f"gmv: error: --checkpoint={missing}: ")
    assert totals["gmv_cents"] == 5 * 350


async def test_gmv_aggregate_takes_the_big_brand_line_and_reports_the_screen_figures(
        mosquitto, topics):
    """`gmv aggregate --big-brand-cents` sets the line; its totals carry the count of brands
    above it, when each crossed, its top brands, orders per minute and the curve buckets, and
    they pass the server's schema."""
    from ticker.core.feed import parse_totals

    args = GMV + ["aggregate", "--broker", mosquitto.url, "--prefix", topics.prefix,
                  "--no-checkpoint", "--big-brand-cents", "300"]
    proc = subprocess.Popen(args, stderr=subprocess.DEVNULL)
    try:
        await totals_of(mosquitto, topics, lambda t: True)
        async with ReliablePublisher(mosquitto) as publisher:
            for seq in range(3):  # brand 1 gets 250 a batch: over 300 in the second
                await publisher.send(topics.orders("shop"), encode(batch("shop", seq)))
            await publisher.flush()
        totals = await totals_of(mosquitto, topics, lambda t: t["batches"] == 3)
    finally:
        proc.terminate()
        proc.wait(10)
    assert totals["big_brand_cents"] == 300 and totals["brands_big"] == 2
    assert totals["big_brand_minutes"] == [14400, 14400]
    assert totals["top_brands"] == [[1, 750], [0, 300]]
    assert totals["recent_orders"][-1] == 6 and len(totals["recent_orders"]) == 1440
    assert totals["curve_bucket_minutes"] == 60 and totals["curve_cents"][-1] == 1050
    parse_totals("0", totals)
