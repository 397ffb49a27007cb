"""Load generation for `gmv bench`: a pool of real festival batches and an open-loop schedule.

Pure. Generating orders costs more than aggregating them, so a load test draws its batches
from a pool cut from a real busy minute of the 2020 festival (festival-shaped brands,
countries, platforms and amounts) and only re-stamps each one's producer, sequence number,
minute and send time. The schedule gives every batch an absolute deadline, so a publisher
that falls behind sends late batches at once instead of silently lowering the offered load
(no coordinated omission); how late is part of the report.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import orjson

from ticker.core.wire import FLAG_SENT_AT, MAGIC, VERSION, OrderBatch, encode

from .generator import MinuteOrders
from .scenario import Scenario

_HEADER = struct.Struct("<4sBBHIQIq")  # the binary header followed by the send time


@dataclass(frozen=True, eq=False)
class Pool:
    """Pre-encoded batch bodies; `payload(i, ...)` stamps batch i for sending."""

    bodies: list[bytes]     # binary: producer + columns; JSON: the column part
    orders: list[int]
    gmv_cents: list[int]
    binary: bool
    producer: str

    def payload(self, i: int, seq: int, minute: int, sent_at_us: int) -> bytes:
        k = i % len(self.bodies)
        if self.binary:
            header = _HEADER.pack(MAGIC, VERSION, FLAG_SENT_AT, len(self.producer.encode()),
                                  self.orders[k], seq, minute, sent_at_us)
            return header + self.bodies[k]
        return b'{"v":1,"producer":"%s","seq":%d,"minute":%d,"sent_at_us":%d,' % (
            self.producer.encode(), seq, minute, sent_at_us) + self.bodies[k]


def build_pool(scenario: Scenario, minute: int, batch_orders: int, batches: int, *,
               binary: bool, producer: str, partition: tuple[int, int] = (0, 1)) -> Pool:
    """Cut `batches` batches of `batch_orders` from `minute` of `scenario` (wrapping around).
    `partition` (p, P): of the minute's orders, only those of brand partition p of P."""
    orders = scenario.orders(minute)
    p, partitions = partition
    if partitions > 1:
        keep = orders.brand % partitions == p
        orders = MinuteOrders(orders.amount_cents[keep], orders.brand[keep],
                              orders.country[keep], orders.platform[keep])
    if batch_orders > len(orders):
        raise ValueError(f"batch_orders={batch_orders}: minute {minute} has {len(orders)}")
    bodies, counts, gmv = [], [], []
    slots = len(orders) // batch_orders
    for i in range(batches):
        part = orders.slice((i % slots) * batch_orders, (i % slots + 1) * batch_orders)
        batch = OrderBatch(producer, 0, minute, part.amount_cents, part.brand, part.country,
                           part.platform, sent_at_us=1)
        full = encode(batch, binary=binary)
        if binary:
            bodies.append(full[_HEADER.size:])
        else:
            columns = orjson.dumps({"amount_cents": part.amount_cents, "brand": part.brand,
                                    "country": part.country, "platform": part.platform},
                                   option=orjson.OPT_SERIALIZE_NUMPY)
            bodies.append(columns[1:])  # without the opening brace
        counts.append(len(batch))
        gmv.append(batch.gmv_cents)
    return Pool(bodies, counts, gmv, binary, producer)


def deadlines(rate_per_s: np.ndarray, batch_orders: int, total_orders: int) -> np.ndarray:
    """Send time (s from the start) of each batch, for an offered rate given per second.

    `rate_per_s[k]` is the order rate during second k; batch b is due when the cumulative
    offered orders reach b * batch_orders (linear within a second).
    """
    cumulative = np.concatenate(([0.0], np.cumsum(rate_per_s, dtype=np.float64)))
    n = int(min(total_orders, cumulative[-1]) // batch_orders)
    targets = np.arange(n) * float(batch_orders)
    second = np.searchsorted(cumulative, targets, side="right") - 1
    second = np.clip(second, 0, len(rate_per_s) - 1)
    within = (targets - cumulative[second]) / np.maximum(rate_per_s[second], 1e-9)
    return second + within


def festival_rates(scenario: Scenario, seconds: int, peak: float) -> np.ndarray:
    """The festival's per-minute curve squeezed into `seconds`, with its busiest second at
    `peak` orders/s."""
    curve = scenario.minute_gmv_cents.astype(np.float64)
    edges = np.linspace(0, len(curve), seconds + 1).astype(int)
    per_second = np.add.reduceat(curve, edges[:-1])
    return per_second / per_second.max() * peak


# -- the live generator as a source: the festival's own orders, generated as they go out -----

@dataclass(frozen=True, eq=False)
class FestivalPlan:
    """Which orders of `scenario` each batch carries: the festival's minutes in order from its
    first, each cut into batches of at most `batch_orders` (a minute's last one shorter), as
    many as add up to the orders asked for. Batch b holds orders start[b]:stop[b] of minute
    minute[b]; nothing is generated until a producer makes the batch (`batch`)."""

    scenario: Scenario
    minute: np.ndarray  # int64, non-decreasing
    start: np.ndarray   # int64
    stop: np.ndarray    # int64

    def __len__(self) -> int:
        return len(self.minute)

    @property
    def orders_before(self) -> np.ndarray:
        """Orders in the batches before each batch: when the offered load reaches it."""
        return np.concatenate(([0], np.cumsum(self.stop - self.start)[:-1])).astype(np.int64)

    def batch(self, b: int, orders: MinuteOrders, *, producer: str, seq: int,
              sent_at_us: int = 0) -> OrderBatch:
        """Batch b, cut from its minute's orders (`scenario.orders(minute[b])`)."""
        part = orders.slice(int(self.start[b]), int(self.stop[b]))
        return OrderBatch(producer, seq, int(self.minute[b]), part.amount_cents, part.brand,
                          part.country, part.platform, sent_at_us=sent_at_us)


def festival_plan(scenario: Scenario, batch_orders: int, max_orders: int | None = None) \
        -> FestivalPlan:
    """The batches of `scenario` from its first minute: every minute, or whole batches up to
    `max_orders` orders."""
    if batch_orders <= 0:
        raise ValueError(f"batch_orders={batch_orders}: must be positive")
    counts = scenario.minute_orders.astype(np.int64)
    per_minute = -(-counts // batch_orders)  # ceil: batches in each minute
    minute = np.repeat(np.arange(len(counts), dtype=np.int64), per_minute)
    first = np.concatenate(([0], np.cumsum(per_minute)[:-1]))  # each minute's first batch
    start = (np.arange(len(minute), dtype=np.int64) - np.repeat(first, per_minute)) \
        * batch_orders
    stop = np.minimum(start + batch_orders, counts[minute])
    if max_orders is not None:
        keep = int(np.searchsorted(np.cumsum(stop - start), max_orders, side="right"))
        minute, start, stop = minute[:keep], start[:keep], stop[:keep]
    return FestivalPlan(scenario, minute, start, stop)


def festival_own_rates(scenario: Scenario, seconds: int) -> np.ndarray:
    """Orders in each of `seconds` wall seconds when the scenario's minutes are spread evenly
    over them (minute m in [m, m + 1) x seconds / minutes): the festival's own shape, at its
    order scale, whose sum is every order of the festival."""
    counts = scenario.minute_orders.astype(np.float64)
    edges = np.arange(len(counts) + 1) * (seconds / len(counts))  # each minute's slot
    cumulative = np.concatenate(([0.0], np.cumsum(counts)))
    at = np.interp(np.arange(seconds + 1, dtype=np.float64), edges, cumulative)
    return np.diff(at)


def due_times(rate_per_s: np.ndarray, orders_before: np.ndarray) -> np.ndarray:
    """When (s from the start) the offered load, `rate_per_s[k]` orders in second k (linear
    within it), reaches each batch's `orders_before`; batches it never reaches are left out."""
    cumulative = np.concatenate(([0.0], np.cumsum(rate_per_s, dtype=np.float64)))
    offsets = np.asarray(orders_before, dtype=np.float64)
    offsets = offsets[offsets < cumulative[-1]]
    second = np.clip(np.searchsorted(cumulative, offsets, side="right") - 1, 0,
                     len(rate_per_s) - 1)
    within = (offsets - cumulative[second]) / np.maximum(rate_per_s[second], 1e-9)
    return second + within
