"""Aggregation state fed with literal batches: exact sums, dedup, gaps, rejections."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ticker.core.sequence import Watermarks
from ticker.core.state import AggregateState
from ticker.core.wire import MAX_SEQ, MAX_TOTAL, BatchError, Limits, OrderBatch, decode, encode

LIMITS = Limits(n_brands=5, n_minutes=10, n_countries=3, n_platforms=2)


def batch(seq: int, minute: int, amounts, brands, countries=None, platforms=None,
          producer: str = "p") -> OrderBatch:
    n = len(amounts)
    return OrderBatch(producer, seq, minute, np.array(amounts, np.int64),
                      np.array(brands, np.uint32),
                      np.array(countries or [0] * n, np.uint8),
                      np.array(platforms or [0] * n, np.uint8))


def test_apply_adds_every_dimension_exactly():
    """One batch lands in the brand, minute, country and platform arrays to the cent."""
    state = AggregateState(LIMITS)
    assert state.apply(batch(0, 3, [100, 250, 1], [4, 4, 0], [1, 2, 1], [0, 1, 1]))
    assert state.gmv_cents == 351 and state.orders == 3
    assert state.gmv_by_brand.tolist() == [1, 0, 0, 0, 350]
    assert state.orders_by_brand.tolist() == [1, 0, 0, 0, 2]
    assert state.gmv_by_minute[3] == 351 and state.orders_by_minute[3] == 3
    assert state.gmv_by_country.tolist() == [0, 101, 250]
    assert state.orders_by_country.tolist() == [0, 2, 1]
    assert state.gmv_by_platform.tolist() == [100, 251]
    assert state.orders_by_platform.tolist() == [1, 2]


def test_snapshot_reports_totals_and_active_brands():
    """The snapshot carries the totals, the active-brand count and the latest minute."""
    state = AggregateState(LIMITS)
    state.apply(batch(0, 2, [5, 7], [1, 3]))
    state.apply(batch(1, 1, [11], [1]))
    snap = state.snapshot()
    assert snap["gmv_cents"] == 23 and snap["orders"] == 3
    assert snap["brands_active"] == 2
    assert snap["minute"] == 2 and snap["gmv_minute_cents"] == 12
    assert snap["batches"] == 2 and snap["producers"] == 1


def test_empty_state_snapshot_has_no_minute():
    """Before any batch the snapshot says zero and no simulated time."""
    snap = AggregateState(LIMITS).snapshot()
    assert snap["gmv_cents"] == 0 and snap["minute"] is None and snap["brands_active"] == 0


def test_duplicate_producer_seq_is_dropped_and_counted():
    """A redelivered (producer, seq) changes nothing but the duplicate count."""
    state = AggregateState(LIMITS)
    assert state.apply(batch(0, 0, [100], [1]))
    assert not state.apply(batch(0, 0, [100], [1]))
    assert state.gmv_cents == 100 and state.duplicates == 1 and state.batches == 1


def test_same_seq_from_another_producer_is_applied():
    """Sequence numbers are per producer: two producers' seq 0 both count."""
    state = AggregateState(LIMITS)
    state.apply(batch(0, 0, [100], [1], producer="a"))
    state.apply(batch(0, 0, [200], [1], producer="b"))
    assert state.gmv_cents == 300 and state.duplicates == 0


def test_missing_seq_is_reported_as_gap_until_it_arrives():
    """A skipped sequence number shows as a gap; its late arrival is applied and closes it."""
    state = AggregateState(LIMITS)
    state.apply(batch(0, 0, [1], [0]))
    state.apply(batch(3, 0, [1], [0]))
    assert state.watermarks.gaps == 2
    state.apply(batch(1, 0, [1], [0]))
    assert state.watermarks.gaps == 1
    state.apply(batch(2, 0, [1], [0]))
    assert state.watermarks.gaps == 0 and state.gmv_cents == 4
    assert not state.apply(batch(3, 0, [1], [0]))


def test_watermarks_advance_over_out_of_order_arrivals():
    """Seqs arriving 2, 0, 1 leave the watermark at 3 with nothing pending."""
    marks = Watermarks(LIMITS)
    for seq in (2, 0, 1):
        assert not marks.seen("p", seq)
        marks.mark("p", seq)
    assert marks.get("p").next_seq == 3 and marks.get("p").starts == [] and marks.gaps == 0
    assert marks.seen("p", 1) and not marks.seen("p", 3)


def test_reject_counts_by_reason_and_leaves_totals():
    """Rejected batches are counted per reason and never touch the totals."""
    state = AggregateState(LIMITS)
    state.reject("bad_json")
    state.reject("bad_json")
    state.reject("unknown_id")
    assert state.snapshot()["rejected"] == {"bad_json": 2, "unknown_id": 1}
    assert state.gmv_cents == 0


def test_memory_is_bounded_by_dimensions_not_orders():
    """Array sizes depend on the limits only; a million orders add no memory."""
    limits = Limits(n_brands=1000, n_minutes=60, n_countries=12, n_platforms=3)
    state = AggregateState(limits)
    sizes = sum(a.nbytes for a in vars(state).values() if isinstance(a, np.ndarray))
    rng = np.random.default_rng(1)
    for seq in range(10):
        n = 100_000
        state.apply(OrderBatch("p", seq, seq, rng.integers(1, 10_000, n),
                               rng.integers(0, 1000, n).astype(np.uint32),
                               rng.integers(0, 12, n).astype(np.uint8),
                               rng.integers(0, 3, n).astype(np.uint8)))
    after = sum(a.nbytes for a in vars(state).values() if isinstance(a, np.ndarray))
    assert state.orders == 1_000_000 and sizes == after == (2 * 1000 + 2 * 60 + 24 + 6) * 8 + 1000


# --- bounds: nothing a producer sends grows the state without limit or overflows a total -----

def test_seq_jump_beyond_the_window_is_rejected_not_counted_as_gaps():
    """One batch with seq 10**15 is refused (seq_jump): the screen never shows 10**15 gaps."""
    state = AggregateState(LIMITS)
    state.apply(batch(0, 0, [1], [0]))
    with pytest.raises(BatchError) as caught:
        state.apply(batch(10**15, 0, [1], [0]))
    assert caught.value.reason == "seq_jump"
    assert state.watermarks.gaps == 0 and state.gmv_cents == 1
    assert state.apply(batch(LIMITS.max_seq_jump, 0, [1], [0]))  # the edge of the window fits


def test_three_producers_at_the_largest_seq_cannot_overflow_the_gap_count():
    """The old crash: three producers at seq 2^63-1. The codec refuses it; at the codec's own
    bound the state refuses the jump, so the totals still serialise."""
    state = AggregateState(LIMITS)
    for producer in "abc":
        with pytest.raises(BatchError) as caught:
            decode(encode(batch(2**63 - 1, 0, [1], [0], producer=producer)), LIMITS)
        assert caught.value.reason == "out_of_range"
        with pytest.raises(BatchError):
            state.apply(batch(MAX_SEQ, 0, [1], [0], producer=producer))
    assert orjson.loads(orjson.dumps(state.snapshot()))["gaps"] == 0


def test_producers_past_max_producers_are_rejected_and_known_ones_still_apply():
    """The producer table is bounded; a known producer is never refused for it."""
    state = AggregateState(dataclasses.replace(LIMITS, max_producers=3))
    for producer in "abc":
        state.apply(batch(0, 0, [1], [0], producer=producer))
    with pytest.raises(BatchError) as caught:
        state.apply(batch(0, 0, [1], [0], producer="d"))
    assert caught.value.reason == "too_many_producers" and "max_producers=3" in str(caught.value)
    assert state.apply(batch(1, 0, [1], [0], producer="a"))
    assert len(state.watermarks.producers) == 3 and state.gmv_cents == 4


def test_holes_per_producer_are_bounded_and_filling_one_is_always_allowed():
    """Every other seq opens a hole; past max_seq_holes a new hole is refused, not stored."""
    state = AggregateState(dataclasses.replace(LIMITS, max_seq_holes=4))
    for seq in (0, 2, 4, 6, 8):
        state.apply(batch(seq, 0, [1], [0]))
    with pytest.raises(BatchError) as caught:
        state.apply(batch(10, 0, [1], [0]))
    assert caught.value.reason == "seq_holes"
    assert state.apply(batch(9, 0, [1], [0]))  # extends a run: no new hole
    assert state.apply(batch(1, 0, [1], [0]))  # fills one
    assert state.apply(batch(11, 0, [1], [0]))
    assert state.watermarks.gaps == 4  # 3, 5, 7 and 10


def test_sequence_memory_is_bounded_by_holes_not_by_how_far_it_went():
    """A million seqs after one lost batch are two runs, not a set of a million numbers."""
    marks = Watermarks(Limits(n_brands=1, n_minutes=1, n_countries=1, n_platforms=1,
                              max_seq_jump=2))
    marks.mark("p", 0)
    for seq in range(2, 1_000_002):
        marks.admit("p", seq)
        marks.mark("p", seq)
    p = marks.get("p")
    assert (p.next_seq, p.starts, p.ends, marks.gaps) == (1, [2], [1_000_002], 1)


def test_a_batch_that_would_pass_the_largest_total_is_rejected_whole():
    """GMV stops at 2^53 - 1 cents (exact in JavaScript) and no int64 can wrap."""
    limits = dataclasses.replace(LIMITS, max_order_cents=10**15, max_batch_orders=1000)
    state = AggregateState(limits)
    amounts = [10**15] * 9
    assert state.apply(batch(0, 0, amounts, [0] * 9))
    with pytest.raises(BatchError) as caught:
        state.apply(batch(1, 0, amounts, [0] * 9))
    assert caught.value.reason == "total_overflow"
    assert state.gmv_cents == 9 * 10**15 == int(state.gmv_by_brand.sum()) <= MAX_TOTAL
    assert not state.watermarks.seen("p", 1)  # refused whole: its seq is still open


def test_announcement_beyond_the_jump_bound_or_of_a_stranger_is_not_taken():
    """A retained last_seq of 2^53 - 1 for any producer adds no gaps."""
    state = AggregateState(LIMITS)
    state.apply(batch(0, 0, [1], [0]))
    assert not state.watermarks.announce("p", MAX_SEQ)
    assert not state.watermarks.announce("stranger", 5)
    assert state.watermarks.announce("p", 3) and state.watermarks.gaps == 3


def test_reset_zeroes_the_totals_but_keeps_the_sequences():
    """After a reset, an old batch redelivered is still a duplicate; new ones count from 0."""
    state = AggregateState(LIMITS)
    state.apply(batch(0, 1, [500], [2]))
    state.take_acks()
    state.reset()
    assert state.gmv_cents == 0 and not state.gmv_by_brand.any() and state.resets == 1
    assert not state.apply(batch(0, 1, [500], [2]))
    assert state.apply(batch(1, 1, [7], [2])) and state.gmv_cents == 7
    [ack] = state.take_acks().values()
    assert ack == {"producer": "p", "partition": 0, "next_seq": 2, "max_seen": 1, "gaps": 0,
                   "orders": 1, "gmv_cents": 7, "chatbot_queries": 0, "resets": 1,
                   "state": state.state_id}


def test_acks_name_only_the_producers_that_changed():
    """take_acks reports each changed producer once, with what its own batches added."""
    state = AggregateState(LIMITS)
    state.apply(batch(0, 0, [5, 6], [1, 2], producer="a"))
    state.apply(batch(0, 0, [9], [1], producer="b"))
    assert [(a["producer"], a["orders"], a["gmv_cents"]) for a in
            state.take_acks().values()] == [("a", 2, 11), ("b", 1, 9)]
    assert state.take_acks() == {}
    state.apply(batch(2, 0, [1], [1], producer="a"))
    [ack] = state.take_acks().values()
    assert (ack["producer"], ack["next_seq"], ack["max_seen"], ack["gaps"]) == ("a", 1, 2, 1)


def test_a_finished_producer_is_retired_only_when_nothing_of_it_is_missing():
    """A producer that says it is done is forgotten (its ack cleared) once all of it is
    applied; with a hole it is kept, so the gap stays reported. Totals are untouched."""
    state = AggregateState(dataclasses.replace(LIMITS, max_producers=2))
    state.apply(batch(0, 0, [5], [1], producer="done"))
    state.apply(batch(0, 0, [7], [1], producer="holey"))
    state.apply(batch(2, 0, [7], [1], producer="holey"))
    state.take_acks()
    assert state.watermarks.retire("done") and not state.watermarks.retire("holey")
    assert not state.watermarks.retire("never-seen")
    assert state.take_acks() == {"done": None} and state.gmv_cents == 19
    assert state.apply(batch(0, 0, [5], [1], producer="new"))  # room for a new producer
    assert state.watermarks.gaps == 1


def test_watermarks_survive_a_dump_and_refuse_a_malformed_one():
    """dump/from_dump round-trip runs and totals; out-of-order runs are refused."""
    marks = Watermarks(LIMITS)
    for seq in (0, 1, 5, 6, 9):
        marks.mark("p", seq)
    again = Watermarks.from_dump(orjson.loads(orjson.dumps(marks.dump())), LIMITS)
    assert again.get("p") == marks.get("p") and again.gaps == marks.gaps == 5
    for bad in ({"p": [2, 1, 0, 0, 0, 6, 5]}, {"p": [0, 9, 0, 0, 0, 5]}, {"p": "x"},
                {"p": [0, 9, 0, -1, 0]}, [1]):
        with pytest.raises(ValueError):
            Watermarks.from_dump(bad, LIMITS)


# --- fuzzing: whatever arrives, the totals are the sum of the batches accepted once ---------

FUZZ_LIMITS = Limits(n_brands=5, n_minutes=10, n_countries=3, n_platforms=2,
                     max_order_cents=10**6)
valid_batches = st.builds(
    lambda producer, seq, minute, rows: batch(seq, minute, [r[0] for r in rows],
                                              [r[1] for r in rows], [r[2] for r in rows],
                                              [r[3] for r in rows], producer=producer),
    st.sampled_from(["a", "b"]), st.integers(0, 6), st.integers(0, 9),
    st.lists(st.tuples(st.integers(1, 10**6), st.integers(0, 4), st.integers(0, 2),
                       st.integers(0, 1)), min_size=1, max_size=8))
payloads = st.one_of(
    st.binary(max_size=80),
    st.tuples(valid_batches, st.booleans()).map(lambda t: encode(t[0], binary=t[1])),
    st.tuples(valid_batches, st.integers(0, 60), st.integers(0, 255)).map(
        lambda t: _flip(encode(t[0]), t[1], t[2])))


def _flip(payload: bytes, index: int, value: int) -> bytes:
    data = bytearray(payload)
    data[index % len(data)] = value
    return bytes(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(payloads, max_size=25))
def test_fuzz_totals_are_the_sum_of_batches_accepted_once(stream):
    """Any mix of bytes, valid, corrupted and repeated batches: totals stay exact."""
    state, expected, seen = AggregateState(FUZZ_LIMITS), 0, set()
    for payload in stream:
        try:
            decoded = decode(payload, FUZZ_LIMITS)
            applied = state.apply(decoded)
        except BatchError as exc:
            state.reject(exc.reason)
            continue
        if applied:
            assert (decoded.producer, decoded.seq) not in seen
            seen.add((decoded.producer, decoded.seq))
            expected += decoded.gmv_cents
    assert state.gmv_cents == expected == int(state.gmv_by_brand.sum()) \
        == int(state.gmv_by_minute.sum()) == int(state.gmv_by_country.sum())
    assert state.orders == int(state.orders_by_brand.sum()) == int(state.orders_by_platform.sum())
    assert state.batches == len(seen)


def test_stamped_batches_feed_the_latency_histogram():
    """Batches with a send time give latency percentiles; unstamped ones do not count."""
    state = AggregateState(LIMITS)
    state.apply(batch(0, 0, [1], [0]), now_us=5_000)  # not stamped
    assert state.snapshot()["latency_ms"] is None
    for seq, latency_us in enumerate([1_000] * 98 + [50_000, 200_000], start=1):
        stamped = OrderBatch("p", seq, 0, np.array([1]), np.array([0], np.uint32),
                             np.array([0], np.uint8), np.array([0], np.uint8),
                             sent_at_us=10**15 + seq)
        state.apply(stamped, now_us=10**15 + seq + latency_us)
    latency = state.snapshot()["latency_ms"]
    assert latency["count"] == 100 and latency["max"] == 200.0
    assert 0.92 < latency["p50"] < 1.09 and 46 < latency["p99"] < 55
    assert state.snapshot()["newest_sent_at_us"] == 10**15 + 100


# --- what the screen needs: big brands, leaders, recent minutes, the curve -------------------

class SpanningBatch(OrderBatch):
    """A batch whose orders fall in several minutes (as a catch-up's bulk batch does)."""

    def order_minutes(self) -> np.ndarray:
        return self.__dict__["minutes"]


BIG = Limits(n_brands=6, n_minutes=20, n_countries=3, n_platforms=2)


def spanning(seq: int, rows) -> SpanningBatch:
    """rows: (minute, brand, cents) in order."""
    minutes, brands, amounts = zip(*rows)
    n = len(rows)
    spans = SpanningBatch("p", seq, max(minutes), np.array(amounts, np.int64),
                          np.array(brands, np.uint32), np.zeros(n, np.uint8),
                          np.zeros(n, np.uint8))
    spans.__dict__["minutes"] = np.array(minutes, np.int64)  # the dataclass may be frozen
    return spans


def test_a_brand_crosses_the_line_at_the_minute_of_the_order_that_takes_it_over():
    """brands_big counts brands at or above the line; each one's crossing minute is that of
    the order that took it there, even inside a batch spanning minutes, sorted."""
    state = AggregateState(BIG, big_brand_cents=100)
    state.apply(spanning(0, [(2, 1, 60), (3, 2, 99), (4, 1, 39), (5, 1, 1), (6, 1, 500)]))
    assert state.big_brand_minutes == [5]
    state.apply(spanning(1, [(7, 2, 1), (8, 3, 100), (9, 2, 5)]))
    snap = state.snapshot()
    assert snap["brands_big"] == 3 and snap["big_brand_cents"] == 100
    assert snap["big_brand_minutes"] == [5, 7, 8]


def test_reset_forgets_the_big_brands():
    """After a reset no brand is big and no crossing is remembered."""
    state = AggregateState(BIG, big_brand_cents=10)
    state.apply(batch(0, 1, [50], [2]))
    state.reset()
    snap = state.snapshot()
    assert snap["brands_big"] == 0 and snap["big_brand_minutes"] == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 19), st.integers(0, 5),
                                   st.integers(1, 60)), min_size=1, max_size=12),
                max_size=12), st.integers(1, 200))
def test_crossing_minutes_match_an_order_by_order_walk(batches, line):
    """Whatever the batches, the crossing minutes are those a walk over every order finds."""
    state = AggregateState(BIG, big_brand_cents=line)
    totals, crossed = [0] * 6, []
    for seq, rows in enumerate(batches):
        state.apply(spanning(seq, rows))
        for minute, brand, cents in rows:
            if totals[brand] < line <= totals[brand] + cents:
                crossed.append(minute)
            totals[brand] += cents
    snap = state.snapshot()
    assert snap["big_brand_minutes"] == sorted(crossed)
    assert snap["brands_big"] == sum(t >= line for t in totals)


def test_only_the_first_1000_crossing_minutes_are_kept():
    """With more than 1,000 big brands, the 1,000 earliest crossing minutes are reported (a
    later batch may bring earlier minutes); the count is of all of them."""
    limits = Limits(n_brands=3000, n_minutes=100, n_countries=3, n_platforms=2)
    state = AggregateState(limits, big_brand_cents=10)
    state.apply(batch(0, 50, [10] * 1500, list(range(1500))))
    state.apply(batch(1, 20, [10] * 600, list(range(1500, 2100))))
    snap = state.snapshot()
    assert snap["brands_big"] == 2100
    assert snap["big_brand_minutes"] == [20] * 600 + [50] * 400


def test_big_brand_cents_must_be_a_positive_integer():
    """The line is checked up front, naming the parameter."""
    for bad in (0, -5, 1.5):
        with pytest.raises(ValueError, match="big_brand_cents="):
            AggregateState(LIMITS, big_brand_cents=bad)


def test_top_brands_are_the_ten_with_most_gmv_ties_by_lower_id():
    """top_brands is [[id, cents], ...], most first, equal GMV by lower id, none at zero."""
    limits = Limits(n_brands=30, n_minutes=10, n_countries=3, n_platforms=2)
    state = AggregateState(limits)
    assert state.snapshot()["top_brands"] == []
    state.apply(batch(0, 0, [5, 9, 9, 1, 9], [20, 3, 17, 4, 8]))
    assert state.snapshot()["top_brands"] == [[3, 9], [8, 9], [17, 9], [20, 5], [4, 1]]
    state.apply(batch(1, 0, [7] * 20, list(range(10, 30))))
    assert state.snapshot()["top_brands"] == [[17, 16], [20, 12], [3, 9], [8, 9], [10, 7],
                                              [11, 7], [12, 7], [13, 7], [14, 7], [15, 7]]


def test_recent_orders_align_with_recent_gmv_and_the_curve_has_hourly_buckets():
    """recent_orders has one entry per recent minute beside recent_gmv_cents; the curve is
    the GMV of each hour from the start to the latest one, not cumulative."""
    limits = Limits(n_brands=5, n_minutes=15_840, n_countries=3, n_platforms=2)
    state = AggregateState(limits)
    state.apply(batch(0, 0, [5], [1]))
    state.apply(batch(1, 59, [7, 1], [1, 2]))
    state.apply(batch(2, 130, [11], [1]))
    snap = state.snapshot()
    assert len(snap["recent_gmv_cents"]) == len(snap["recent_orders"]) == 131
    assert snap["recent_orders"][59] == 2 and snap["recent_gmv_cents"][59] == 8
    assert snap["curve_bucket_minutes"] == 60 and snap["curve_cents"] == [13, 0, 11]
    state.apply(batch(3, 15_839, [1], [1]))
    snap = state.snapshot()
    assert len(snap["recent_gmv_cents"]) == len(snap["recent_orders"]) == 1440
    assert len(snap["curve_cents"]) == 264 and sum(snap["curve_cents"]) == state.gmv_cents


def test_a_long_window_has_at_most_720_curve_buckets():
    """A window of 10^6 minutes gets buckets of whole hours, at most 720 of them."""
    limits = Limits(n_brands=5, n_minutes=10**6, n_countries=3, n_platforms=2)
    state = AggregateState(limits)
    state.apply(batch(0, 10**6 - 1, [3], [1]))
    snap = state.snapshot()
    assert snap["curve_bucket_minutes"] == 1440 and len(snap["curve_cents"]) == 695
    assert snap["curve_cents"][-1] == 3


@pytest.mark.parametrize("minutes", [15_840, 10**6])
def test_the_totals_message_stays_under_the_servers_64_KiB_at_worst(minutes):
    """With every figure as long as the bounds allow (2^53 cents spread over the recent
    minutes and the curve, 1,000 crossing minutes, ten 16-digit leaders), a shard's totals
    message is under the 64 KiB the server accepts."""
    from ticker.core.dimensions import FESTIVAL_2020
    from ticker.core.feed import MAX_MESSAGE_BYTES, parse_totals

    limits = Limits(n_brands=250_000, n_minutes=minutes, n_countries=12, n_platforms=3)
    state = AggregateState(limits)
    state.latest_minute = minutes - 1
    spread = MAX_TOTAL // minutes if minutes > 1440 * 100 else MAX_TOTAL // 1440
    state.gmv_by_minute[-1440:] = spread
    state.orders_by_minute[-1440:] = spread
    if minutes > 1440 * 100:
        state.gmv_by_minute[:] = spread  # the curve's buckets as long as they get
    state.gmv_by_brand[:10] = 10**15
    state.big_brand_minutes = [minutes - 1] * 1000
    state.gmv_cents = state.orders = MAX_TOTAL
    window = {**FESTIVAL_2020.as_dict(), "minutes": minutes}
    doc = {"v": 1, "shard": "0", "window": window, **state.snapshot()}
    payload = orjson.dumps(doc)
    assert len(payload) < 56_000 < MAX_MESSAGE_BYTES, len(payload)
    parse_totals("0", orjson.loads(payload))


# --- batches spanning minutes (minute runs) ------------------------------------------------------

def arrays(state: AggregateState) -> dict[str, object]:
    """Every figure a state holds, to compare two states."""
    names = ("gmv_by_brand", "orders_by_brand", "gmv_by_minute", "orders_by_minute",
             "gmv_by_country", "orders_by_country", "gmv_by_platform", "orders_by_platform",
             "brand_overseas")
    figures: dict[str, object] = {name: getattr(state, name).tolist() for name in names}
    figures.update(gmv_cents=state.gmv_cents, orders=state.orders,
                   latest_minute=state.latest_minute,
                   big_brand_minutes=list(state.big_brand_minutes))
    return figures


def test_a_bulk_batch_gives_exactly_the_arrays_of_the_minute_by_minute_batches():
    """Two hours of 2020's Nov 11 (the peak minute included) as 3 bulk batches with minute
    runs, through the codec, leave every array, the latest minute and each big brand's
    crossing minute exactly as 120 batches of one minute do."""
    from simulator.publisher import ScenarioSource
    from simulator.scenario import scenario_for_year
    from simulator.slicing import Bulk

    from .conftest import festival_limits
    limits = festival_limits()
    source = ScenarioSource(scenario_for_year(2020))
    line = 2_000_000_00  # USD 2M: some brands cross it within these two hours
    one_by_one = AggregateState(limits, big_brand_cents=line)
    bulk_state = AggregateState(limits, big_brand_cents=line)
    bulk, seq, bulk_batches = Bulk(max_orders=150_000), 0, []
    for minute in range(14_400, 14_520):
        messages = [m for m in source.messages(minute) if isinstance(m, OrderBatch)]
        for m in messages:
            one_by_one.apply(dataclasses.replace(m, producer="p", seq=seq))
            seq += 1
        bulk_batches += bulk.add(messages)
    bulk_batches += bulk.flush()
    assert len(bulk_batches) == 3 and all(b.minute_runs is not None for b in bulk_batches)
    for seq, b in enumerate(bulk_batches):
        for binary in (True, False):
            payload = encode(dataclasses.replace(b, producer="q", seq=seq), binary=binary)
            decoded = decode(payload, limits)
            assert decoded.order_minutes().tolist() == b.order_minutes().tolist()
        assert bulk_state.apply(decoded)
    assert one_by_one.big_brand_minutes  # the comparison below covers crossings
    assert arrays(bulk_state) == arrays(one_by_one)
    assert bulk_state.latest_minute == 14_519 and bulk_state.batches == 3


def test_minute_runs_split_one_batch_over_its_minutes():
    """Orders of minutes 1, 1, 4 in one batch add to minutes 1 and 4 (GMV and orders); the
    latest minute is 4; the snapshot's minute GMV is minute 4's."""
    state = AggregateState(LIMITS)
    spanning = dataclasses.replace(batch(0, 4, [100, 20, 3], [0, 1, 2]),
                                   minute_runs=np.array([[1, 2], [4, 1]]))
    assert state.apply(spanning)
    assert state.gmv_by_minute.tolist() == [0, 120, 0, 0, 3, 0, 0, 0, 0, 0]
    assert state.orders_by_minute.tolist() == [0, 2, 0, 0, 1, 0, 0, 0, 0, 0]
    assert state.latest_minute == 4 and state.snapshot()["gmv_minute_cents"] == 3
    assert state.gmv_by_brand.tolist() == [100, 20, 3, 0, 0]


def test_a_bulk_batch_of_minute_runs_puts_each_crossing_on_its_orders_minute():
    """A catch-up's bulk batch (minute runs, through the wire codec) crosses the line for each
    brand at the minute of the order that takes it over, not at the batch's latest minute."""
    runs = np.array([[2, 2], [5, 2], [9, 1]])
    bulk = dataclasses.replace(batch(0, 9, [60, 50, 50, 49, 1], [1, 2, 1, 2, 2]),
                               minute_runs=runs)
    state = AggregateState(BIG, big_brand_cents=100)
    assert state.apply(decode(encode(bulk), BIG))
    assert state.snapshot()["big_brand_minutes"] == [5, 9]  # brand 1 at minute 5, 2 at 9


def test_latency_percentiles_never_pass_the_largest_or_smallest_latency_seen():
    """A bucket's midpoint can lie above the max (or below the min) of what fell in it; the
    percentiles reported are clamped to what was seen, so p50 <= p99.9 <= max always."""
    from ticker.core.state import LatencyHistogram

    for values in ([1_000], [1_000, 1_001, 1_002], [7, 7, 7, 900_000], list(range(1, 5_000, 7))):
        histogram = LatencyHistogram()
        for value in values:
            histogram.add(value)
        p = histogram.percentiles()
        assert p is not None
        assert min(values) / 1000 <= p["p50"] <= p["p90"] <= p["p99"] <= p["p999"] <= p["max"]
        assert p["max"] == max(values) / 1000


def test_top_brands_bounded_by_the_last_kth_equal_a_full_ranking_through_resets_and_ties():
    """top_brands takes only the brands at or above the last call's k-th GMV (GMV only grows
    between resets); after every batch, with ties and a reset, it equals a full ranking."""
    rng = np.random.default_rng(7)
    state = AggregateState(Limits(n_brands=300, n_minutes=10, n_countries=2, n_platforms=2))
    for seq in range(80):
        n = int(rng.integers(1, 60))
        amounts = rng.choice([1, 2, 100], n) if seq % 3 else rng.integers(1, 10**6, n)
        state.apply(OrderBatch("p", seq, 0, amounts.astype(np.int64),
                               rng.integers(0, 300, n).astype(np.uint32),
                               np.zeros(n, np.uint8), np.zeros(n, np.uint8)))
        if seq == 40:
            state.reset()
        gmv = state.gmv_by_brand
        ids = np.flatnonzero(gmv > 0)
        ids = ids[np.lexsort((ids, -gmv[ids]))][:10]
        assert state.top_brands() == [[int(i), int(gmv[i])] for i in ids]


@pytest.mark.parametrize(("countries", "platforms"), [(12, 3), (40, 10), (256, 256)])
@pytest.mark.parametrize("n", [1, 1023, 1024, 5_000])
def test_country_and_platform_totals_equal_a_plain_sum_for_any_cell_count_and_batch_size(
        countries, platforms, n):
    """The lanes of the (country, platform) scatter add up to a plain per-order sum: cells
    in uint8 (12 x 3), in uint16 (40 x 10), each on its own (a batch over 256 x 256 ids),
    batches around the length of the lane row."""
    limits = Limits(n_brands=100, n_minutes=10, n_countries=countries, n_platforms=platforms)
    state = AggregateState(limits)
    rng = np.random.default_rng(n)
    amount = rng.integers(1, 100_000_000, n)
    country = rng.integers(0, countries, n).astype(np.uint8)
    platform = rng.integers(0, platforms, n).astype(np.uint8)
    brand = rng.integers(0, 100, n).astype(np.uint32)
    assert state.apply(OrderBatch("p", 0, 3, amount, brand, country, platform))
    for name, ids, size in (("country", country, countries), ("platform", platform, platforms)):
        gmv, orders = np.zeros(size, np.int64), np.zeros(size, np.int64)
        for i, cents in zip(ids.tolist(), amount.tolist()):
            gmv[i] += cents
            orders[i] += 1
        assert np.array_equal(getattr(state, f"gmv_by_{name}"), gmv)
        assert np.array_equal(getattr(state, f"orders_by_{name}"), orders)
    assert np.array_equal(state.orders_by_brand, np.bincount(brand, minlength=100))
    assert np.array_equal(state.brand_overseas, np.isin(np.arange(100), brand[country != 0]))


def test_an_empty_batch_applies_as_nothing():
    """A batch of no orders (only a direct caller can make one: decode rejects it) changes no
    total, as before the country/platform cells were sized by the batch's ids."""
    state = AggregateState(LIMITS)
    empty = np.zeros(0, np.int64)
    assert state.apply(OrderBatch("p", 0, 1, empty, empty.astype(np.uint32),
                                  empty.astype(np.uint8), empty.astype(np.uint8)))
    assert state.gmv_cents == state.orders == 0
    assert not state.orders_by_country.any() and not state.gmv_by_platform.any()
