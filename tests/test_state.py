"""Aggregation state fed with literal batches: exact sums, dedup, gaps, rejections."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ticker.state import AggregateState, Watermarks
from ticker.wire import BatchError, Limits, OrderBatch, decode, encode

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
    assert snap["batches"] == 2 and snap["producers"] == {"p": 2}


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
    marks = Watermarks()
    for seq in (2, 0, 1):
        assert not marks.seen("p", seq)
        marks.mark("p", seq)
    assert marks.as_dict() == {"p": 3} and marks.gaps == 0
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
        except BatchError as exc:
            state.reject(exc.reason)
            continue
        if state.apply(decoded):
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
