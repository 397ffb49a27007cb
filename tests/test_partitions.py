"""Brand partitions, pure: the split, shard ownership, per-stream sequences, the partition
check, and three shards' totals merging into exactly one shard's view."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import orjson
import pytest

from simulator.flow import AckWindow
from simulator.publisher import ScenarioSource
from simulator.recording import ORDERS, RecordingWriter
from simulator.scenario import scenario_for_year
from ticker.core.feed import MessageError, merge_shards, parse_totals, partition_layout
from ticker.core.partitions import Shard, split, stream_name, stream_of
from ticker.core.state import AggregateState
from ticker.core.dimensions import FESTIVAL_2020
from ticker.core.wire import BatchError, Limits, OrderBatch, encode, minute_runs
from ticker.shell import checkpoint
from ticker.shell.mqtt import Topics

LIMITS = Limits(n_brands=10, n_minutes=10, n_countries=3, n_platforms=2)


def batch(brands, minutes=None, seq: int = 0, producer: str = "p") -> OrderBatch:
    n = len(brands)
    runs = None if minutes is None else minute_runs(np.array(minutes))
    return OrderBatch(producer, seq, max(minutes or [4]), np.arange(1, n + 1, dtype=np.int64),
                      np.array(brands, np.uint32), np.array([b % 3 for b in brands], np.uint8),
                      np.zeros(n, np.uint8), 0, runs)


def test_split_puts_every_order_in_its_brands_partition_keeping_order_and_minutes():
    """Each part holds the orders of brand % P == p, in batch order, with their own minutes."""
    whole = batch([5, 0, 3, 2, 6, 9, 1], minutes=[1, 1, 2, 2, 3, 3, 3])
    parts = split(whole, 3)
    assert [p for p, _ in parts] == [0, 1, 2]
    for p, part in parts:
        rows = np.flatnonzero(whole.brand % 3 == p)
        assert part.brand.tolist() == whole.brand[rows].tolist()
        assert part.amount_cents.tolist() == whole.amount_cents[rows].tolist()
        assert part.order_minutes().tolist() == whole.order_minutes()[rows].tolist()
        assert part.minute == int(whole.order_minutes()[rows].max())
    assert sum(part.gmv_cents for _, part in parts) == whole.gmv_cents


def test_split_leaves_out_empty_parts_and_one_partition_is_the_batch_itself():
    """No empty batch is ever made; P = 1 costs nothing."""
    whole = batch([4, 8])
    assert [p for p, _ in split(whole, 4)] == [0]
    assert split(whole, 1) == [(0, whole)]


def test_every_partition_has_exactly_one_owner_among_the_shards():
    """Shard K of N owns p % N == K: together the N shards own each partition once."""
    for count, partitions in ((1, 1), (3, 3), (2, 8), (3, 10)):
        owned = [p for k in range(count) for p in Shard(k, count, partitions).owned]
        assert sorted(owned) == list(range(partitions))


@pytest.mark.parametrize("text, why", [("3/2", "K must be"), ("1", "expected K/N"),
                                       ("0/0", "K must be"), ("-1/2", "expected K/N"),
                                       ("a/b", "expected K/N"), ("0/3 ", "expected K/N")])
def test_a_bad_shard_spec_is_refused_with_its_reason(text, why):
    """`--shard` takes K/N with 0 <= K < N (and "0", the lone shard, as before)."""
    with pytest.raises(ValueError, match=why):
        Shard.parse(text)
    assert Shard.parse("0") == Shard() and Shard.parse("2/3") == Shard(2, 3, 3)
    assert Shard.parse("1/2", partitions=8).owned == [1, 3, 5, 7]


def test_stream_names_keep_partition_zero_as_the_producer_alone():
    """A producer that knows nothing of partitions is stream 0, named as before."""
    assert stream_name("shop-7", 0) == "shop-7" and stream_of("shop-7") == ("shop-7", 0)
    assert stream_name("shop-7", 5) == "shop-7/5" and stream_of("shop-7/5") == ("shop-7", 5)


def test_a_batch_with_a_brand_of_another_partition_is_rejected_whole():
    """A brand in two shards would be counted twice in the merged distinct-brand figures."""
    state = AggregateState(LIMITS, shard=Shard(1, 3, 3))
    with pytest.raises(BatchError, match="brand 3 is in partition 0, not 1") as caught:
        state.apply(batch([1, 4, 3]), partition=1)
    assert caught.value.reason == "wrong_partition"
    with pytest.raises(BatchError, match="partition 2 is not one of shard 1/3's"):
        state.apply(batch([2]), partition=2)
    assert state.gmv_cents == 0 and not state.gmv_by_brand.any() and state.batches == 0


def test_each_partition_has_its_own_sequence_and_ack():
    """seq 0 on partitions 0 and 2 are two batches; a redelivery is a duplicate per stream."""
    state = AggregateState(LIMITS, shard=Shard(0, 1, 3))
    assert state.apply(batch([3]), partition=0) and state.apply(batch([2]), partition=2)
    assert not state.apply(batch([2]), partition=2) and state.duplicates == 1
    acks = state.take_acks()
    assert sorted(acks) == ["p", "p/2"]
    assert (acks["p/2"]["producer"], acks["p/2"]["partition"], acks["p/2"]["next_seq"]) == \
        ("p", 2, 1)


def test_a_checkpoint_of_another_partitioning_is_refused(tmp_path):
    """A shard keeps its brands for life: restoring shard 0/1 as 0/3 would mix partitions."""
    path = tmp_path / "a.ckpt"
    checkpoint.save(path, checkpoint.export(AggregateState(LIMITS)))
    with pytest.raises(ValueError, match="saved by shard 0/1 of 1 partitions, not 0/3 of 3"):
        checkpoint.load(path, LIMITS, shard=Shard(0, 3, 3))
    assert checkpoint.load(path, LIMITS) is not None


def test_three_shards_merge_into_exactly_one_shards_view():
    """A day of the 2019 scenario split by brand % 3 over three shards: every merged figure
    (sums, distinct brands, brands above the line, top brands, countries, platforms, the
    curve, recent minutes) equals what one shard shows, to the cent."""
    scenario = scenario_for_year(2019, order_scale=0.0005)
    source = ScenarioSource(scenario)
    limits = Limits(n_brands=scenario.n_brands, n_minutes=scenario.window.minutes,
                    n_countries=12, n_platforms=3, max_order_cents=10**10)
    first_time = scenario.catalog.first_time
    line = 10**9  # a low line, so that many brands cross it
    one = AggregateState(limits, first_time, big_brand_cents=line)
    three = [AggregateState(limits, first_time, big_brand_cents=line, shard=Shard(k, 3, 3))
             for k in range(3)]
    seqs = [0, 0, 0]
    for seq, message in enumerate(m for minute in range(0, scenario.window.minutes, 7)
                                  for m in source.messages(minute)
                                  if isinstance(m, OrderBatch)):
        assert one.apply(dataclasses.replace(message, seq=seq))
        for p, part in split(message, 3):
            assert three[p].apply(dataclasses.replace(part, seq=seqs[p]), partition=p)
            seqs[p] += 1
    window = scenario.window.as_dict()

    def parsed(state: AggregateState, name: str) -> dict:
        doc = orjson.loads(orjson.dumps({"v": 1, "shard": name, "window": window,
                                         **state.snapshot()}))
        return parse_totals(name, doc)

    merged = merge_shards({str(k): parsed(s, str(k)) for k, s in enumerate(three)})
    alone = merge_shards({"0": parsed(one, "0")})
    assert merged.pop("stats")["shards"] == 3 and alone.pop("stats")["shards"] == 1
    assert merged == alone
    assert alone["gmv_cents"] == one.gmv_cents > 0 and alone["brands_big"] > 10


def test_the_window_bounds_each_shard_over_all_the_partitions_it_owns():
    """A shard owning partitions 0 and 2 queues both streams: the window counts them together,
    and a partition no running shard owns has no room at all."""
    topics = Topics("gmv/v1")
    acks = AckWindow(topics, "me", 10)
    acks.receive(topics.totals("0"), orjson.dumps({"state": "s", "partitions": 3,
                                                   "owned": [0, 2]}), False, 0.0)
    acks.begin(3)
    assert acks.unowned(0.0) == [1] and acks.layouts(0.0) == {"0": 3}
    assert acks.room(5, 0.0, partition=0) and acks.room(4, 0.0, partition=2)
    assert not acks.room(5, 0.0, partition=2)  # 5 + 5 unapplied on shard 0: full
    assert not acks.room(0, 0.0, partition=1)
    ack = {"v": 1, "shard": "0", "producer": "me", "partition": 2, "next_seq": 3,
           "max_seen": 2, "gaps": 0, "orders": 3, "gmv_cents": 30, "chatbot_queries": 0,
           "resets": 0, "state": "s"}
    acks.receive(topics.acks("0", "me/2"), orjson.dumps(ack), False, 0.1)
    assert acks.room(5, 0.1, partition=2) and acks.applied(0.1, partition=2) == 3
    verdict = acks.verdict([5, 0, 3], 8, 80, 0.1)
    assert verdict.unapplied == 5 and verdict.applied_orders == 3 and not verdict.exact


def test_a_recording_keeps_the_same_seq_of_two_partitions_and_drops_a_redelivery():
    """Seq 0 of partitions 0 and 1 are two batches, not a duplicate: both are recorded."""
    writer = RecordingWriter(io.BytesIO(), FESTIVAL_2020, 250_000)
    payload = encode(batch([3]))
    assert writer.write(ORDERS, payload, 0) and writer.write(ORDERS, encode(batch([4])), 1)
    assert not writer.write(ORDERS, payload, 0)
    assert (writer.messages, writer.orders, writer.skipped) == (2, 2, 1)


@pytest.mark.parametrize("layouts, expected", [
    ({}, (None, None)),
    ({"0": (3, [0]), "1": (3, [1]), "2": (3, [2])}, (3, None)),
    ({"0": (3, [0]), "2": (3, [2])}, (3, "no shard for partition 1 of 3")),
    ({"0": (2, [0, 1]), "1": (2, [1])}, (2, "partition 1 in two shards")),
    ({"0": (2, [0]), "1": (4, [1, 3])}, (None, "shards disagree on the partitions: 2, 4")),
])
def test_the_screen_is_told_when_the_shards_do_not_hold_every_partition_once(layouts,
                                                                            expected):
    """A partition no merged shard holds misses its brands from every figure; one in two
    shards may count a brand twice: the view says which, in a line the badge shows."""
    shards = {name: {"partitions": p, "owned": owned} for name, (p, owned) in layouts.items()}
    layout = partition_layout(shards)
    assert (layout["partitions"], layout["partitions_problem"]) == expected


@pytest.mark.parametrize("partitions, owned", [(0, [0]), (2, [2]), (2, [1, 1]), (2, []),
                                               (3, "0"), (2**11, [0])])
def test_totals_with_an_impossible_partitioning_are_refused(partitions, owned):
    """Partitions 1 .. 1024, owned a non-empty list of distinct ones below it, or the
    shard's totals do not fit the schema."""
    doc = {"v": 1, "shard": "0", "window": FESTIVAL_2020.as_dict(), "gmv_cents": 1,
           "orders": 1, "partitions": partitions, "owned": owned}
    with pytest.raises(MessageError):
        parse_totals("0", doc)


def test_a_shard_retired_by_a_resharding_does_not_hold_the_window():
    """Shard 3 of a 4-shard layout acked partition 3 at seq 5 and is gone; shard 0 of 3 owns
    partition 3 now: the window follows shard 0 alone. With no running owner, a shard that
    acked the partition is waited for (its session may hold our messages)."""
    topics = Topics("gmv/v1")
    acks = AckWindow(topics, "me", 10)
    old = {"v": 1, "shard": "3", "producer": "me", "partition": 3, "next_seq": 5,
           "max_seen": 4, "gaps": 0, "orders": 5, "gmv_cents": 50, "chatbot_queries": 0,
           "resets": 0, "state": "old"}
    acks.receive(topics.acks("3", "me/3"), orjson.dumps(old), True, 0.0)
    acks.begin(12)
    assert acks.shards(0.0, 3) == {"3"}  # nobody else owns it: wait for the one that acked
    acks.receive(topics.totals("0"), orjson.dumps({"state": "s", "partitions": 12,
                                                   "owned": [0, 3, 6, 9]}), False, 1.0)
    now = {**old, "shard": "0", "next_seq": 12, "max_seen": 11, "state": "s"}
    acks.receive(topics.acks("0", "me/3"), orjson.dumps(now), False, 1.5)
    assert acks.shards(1.5, 3) == {"0"} and acks.applied(1.5, 3) == 12
    assert acks.room(16, 1.5, 3)  # shard 3's seq 5 no longer holds it back
