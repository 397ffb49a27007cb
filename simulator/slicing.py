"""Time slices and bulk batches: how a replay cuts a minute, and how it catches up. Pure.

Slices. At speeds where a simulated minute lasts long on the wall (a minute takes a minute at
`--speed 1`), publishing a minute at once makes the screen sit still, then jump. So the
publishing loop cuts each minute into `slices_per_minute(speed)` equal slices of simulated
time, about `SLICES_PER_WALL_SECOND` a wall second (at most `MAX_SLICES`, a quarter of a
simulated second each), and publishes slice j at minute + j/k on the playback clock.
`slice_bounds` says which of the minute's orders fall in each slice, following the
festival's per-second shape (`Scenario.second_orders`: flat, except the pinned peak
minute), with a second's orders spread evenly over it. The split is exact: the slices are
consecutive ranges of the minute's orders (the same orders, in the same order, as a minute
published whole), so every order goes out once and every minute's total is unchanged.

Bulk. After a seek, `--from` or a restart, the minutes behind the clock must reach the
screens at once: one message a minute would be 15,840 messages for the 11 days, about 10 s
through flow control. `Bulk` gathers consecutive minutes' batches into a few batches of
up to `max_orders` orders whose minute runs say which orders belong to which minute
(wire format: `minute_runs`), so each per-minute figure stays exact, and sums their chatbot
counts into one count per bulk batch (the aggregators keep chatbot queries as one total).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ticker.core.wire import MAX_CHATBOT_QUERIES, ChatbotCount, OrderBatch, minute_runs

SLICES_PER_WALL_SECOND = 4
MAX_SLICES = 240  # a quarter of a simulated second: --speed 1 gives 4 publishes a second
# Orders in one bulk batch: 200,000 make a 2.8 MB binary batch (a festival's first ten
# days at order scale 0.001 in about eight), well under `Limits.max_batch_orders` (1,000,000)
# and Mosquitto's and the embedded broker's message limits; JSON, at up to ~25 bytes an
# order, takes 100,000 to stay under its 4 MiB budget (`Limits.max_json_bytes`).
BULK_ORDERS = {"binary": 200_000, "json": 100_000}

Message = OrderBatch | ChatbotCount


def slices_per_minute(speed: float | None) -> int:
    """How many slices a minute is cut into at `speed` (None, max: 1): about
    SLICES_PER_WALL_SECOND a wall second, 1 once a minute lasts under 1/4 s (speed >= 240)."""
    if speed is None:
        return 1
    return max(1, min(MAX_SLICES, int(60.0 / speed * SLICES_PER_WALL_SECOND + 1e-9)))


def slice_bounds(second_orders: np.ndarray, k: int) -> np.ndarray:
    """Where each of `k` equal time slices of a minute starts among its orders, and where the
    last ends: k + 1 non-decreasing int64 indices from 0 to the minute's order count.
    `second_orders`: the minute's orders in each of its seconds; within a second, orders are
    spread evenly (slice j starts at 60 j / k s, after floor(cumulative orders then))."""
    per_second = np.asarray(second_orders, dtype=np.int64)
    if k < 1 or per_second.ndim != 1 or len(per_second) == 0 or per_second.min() < 0:
        raise ValueError(f"k={k}: must be positive, with a count of orders for each second")
    seconds = len(per_second)
    before = np.concatenate(([0], np.cumsum(per_second)))  # orders before each second
    second, part = np.divmod(np.arange(k + 1, dtype=np.int64) * seconds, k)
    within = np.concatenate((per_second, [0]))[second] * part // k
    return before[second] + within


class Bulk:
    """Batches of consecutive minutes gathered into bulk batches of at most `max_orders`
    orders (a batch bigger than that alone goes out as it is), in order; chatbot counts
    summed, one per bulk batch. Feed `add` each minute's messages, then `flush`."""

    def __init__(self, max_orders: int) -> None:
        if max_orders <= 0:
            raise ValueError(f"max_orders={max_orders}: must be positive")
        self.max_orders = max_orders
        self._parts: list[OrderBatch] = []
        self._orders = 0
        self._queries = 0
        self._queries_minute = -1

    def add(self, messages: Iterable[Message]) -> list[Message]:
        """Take messages; return the bulk batches (and counts) now full."""
        out: list[Message] = []
        for message in messages:
            if isinstance(message, ChatbotCount):
                self._queries += message.queries
                self._queries_minute = max(self._queries_minute, message.minute)
                continue
            if self._parts and self._orders + len(message) > self.max_orders:
                out += self.flush()
            self._parts.append(message)
            self._orders += len(message)
        return out

    def flush(self) -> list[Message]:
        """Whatever is gathered, as at most one batch and the chatbot counts since the last."""
        out: list[Message] = []
        if self._parts:
            out.append(merge(self._parts))
            self._parts, self._orders = [], 0
        while self._queries:  # one count, unless it passes a count's bound
            queries = min(self._queries, MAX_CHATBOT_QUERIES)
            out.append(ChatbotCount("", 0, self._queries_minute, queries))
            self._queries -= queries
        return out


_COLUMNS = ("amount_cents", "brand", "country", "platform")


def merge(parts: list[OrderBatch]) -> OrderBatch:
    """One batch holding every order of `parts`, with their minutes as runs (a plain batch
    if they are all of one minute). Orders keep their order, except that they are sorted by
    minute, stably, if the parts are not (a recording of several producers)."""
    if len(parts) == 1 and parts[0].minute_runs is None:
        return parts[0]
    columns = {name: np.concatenate([getattr(p, name) for p in parts]) for name in _COLUMNS}
    minutes = np.concatenate([p.order_minutes() for p in parts])
    if len(minutes) > 1 and (np.diff(minutes) < 0).any():
        order = np.argsort(minutes, kind="stable")
        minutes = minutes[order]
        columns = {name: column[order] for name, column in columns.items()}
    return OrderBatch("", 0, int(minutes[-1]), columns["amount_cents"], columns["brand"],
                      columns["country"], columns["platform"], minute_runs=minute_runs(minutes))
