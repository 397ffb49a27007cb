"""Aggregation state: validated batches in, exact totals out. No I/O, no clock.

Strategy. Every total is an int64 numpy array indexed by a small id, so memory is bounded by
the number of brands, minutes, countries and platforms, never by the number of orders:
250,000 brands x 2 arrays + 15,840 minutes x 2 + a few dozen cells = about 4.3 MB.
Applying a batch of n orders costs three `np.add.at` scatters and one `np.bincount`
(O(n), no Python loop per order); the minute totals are one scalar add for a batch of one
minute, and one `np.add.reduceat` over its runs for a batch spanning several (a catch-up's
bulk batch: at most `max_minute_runs` runs, so O(n + runs)). Money stays integer cents: a
batch that would take the GMV past `wire.MAX_TOTAL` (2^53 - 1) is refused, and every array
cell is at most the GMV, so no int64 can overflow and every figure is exact as a JavaScript
number on the page.

Invariants:
* a batch is applied whole or not at all (it arrives validated by `wire.decode`; the bounds
  checked here are checked before anything changes);
* each (producer, seq) is applied at most once: `Watermarks` tracks what has been applied,
  so at-least-once redelivery never double counts, and missing sequence numbers are
  reported as gaps instead of passing silently;
* what any producer sends has a bound: at most `max_producers` producers, each with at most
  `max_seq_holes` runs of missing seqs, none jumping more than `max_seq_jump` ahead. So the
  state stays a few megabytes and the totals message is the same size whatever they send.
"""

from __future__ import annotations

import heapq
import secrets
from collections import Counter

import numpy as np

from ticker.core.dimensions import BIG_BRAND_CENTS, curve_bucket_minutes
from ticker.core.partitions import Shard, check_partition, stream_name, stream_of
from ticker.core.sequence import Watermarks
from ticker.core.wire import MAX_TOTAL, BatchError, ChatbotCount, Limits, OrderBatch

RECENT_MINUTES = 1440      # the latest minutes' GMV and orders in every snapshot
MAX_BIG_BRAND_MINUTES = 1000  # crossing minutes of big brands reported: the first 1,000
TOP_BRANDS = 10
LANES = 8  # sub-totals of each id in `_lane_totals`: order i adds into lane i % LANES
_LANE = np.arange(1024, dtype=np.intp) % LANES  # one row of lanes, for any batch size


class LatencyHistogram:
    """Publish-to-apply latencies in log-spaced buckets (8 a doubling, 1 µs to ~70 min):
    fixed memory, percentiles within 9% of the true value. A percentile is its bucket's
    midpoint, clamped to the smallest and largest latency seen: never above the max (a
    bucket's midpoint can be), never below the min."""

    PER_DOUBLING, BUCKETS = 8, 8 * 32

    def __init__(self) -> None:
        self.counts = np.zeros(self.BUCKETS, np.int64)
        self.max_us = 0
        self.min_us = 0  # meaningful once a latency was added

    def add(self, latency_us: int) -> None:
        latency_us = max(latency_us, 1)
        bucket = min(int(np.log2(latency_us) * self.PER_DOUBLING), self.BUCKETS - 1)
        self.counts[bucket] += 1
        self.min_us = latency_us if self.max_us == 0 else min(self.min_us, latency_us)
        self.max_us = max(self.max_us, latency_us)

    def percentiles(self) -> dict[str, float] | None:
        total = int(self.counts.sum())
        if not total:
            return None
        cumulative = np.cumsum(self.counts)
        out: dict[str, float] = {"count": total}
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)):
            bucket = int(np.searchsorted(cumulative, q * total))
            midpoint_us = 2 ** ((bucket + 0.5) / self.PER_DOUBLING)
            out[name] = round(min(max(midpoint_us, self.min_us), self.max_us) / 1000, 3)  # ms
        out["max"] = self.max_us / 1000
        return out


class AggregateState:
    """Running totals of one aggregator shard. `apply` batches, read with `snapshot`."""

    def __init__(self, limits: Limits, first_time: np.ndarray | None = None, *,
                 big_brand_cents: int = BIG_BRAND_CENTS, shard: Shard = Shard()) -> None:
        """`first_time`: optional reference data, a bool per brand id marking overseas brands
        new to the festival, so their active count can be shown (a flagged brand counts once
        it sold from abroad in the stream; without reference data the count is None).
        `big_brand_cents`: the GMV line above which a brand counts as big (RMB 100M by
        default), and when each crossed it.
        `shard`: which brand partitions this state holds."""
        if first_time is not None and first_time.shape != (limits.n_brands,):
            raise ValueError(f"first_time has shape {first_time.shape}, "
                             f"expected ({limits.n_brands},)")
        if type(big_brand_cents) is not int or not 0 < big_brand_cents <= MAX_TOTAL:
            raise ValueError(f"big_brand_cents={big_brand_cents!r}: must be a positive "
                             "integer of cents")
        self.limits, self.shard = limits, shard
        # The ranges this shard accepts, in every snapshot, for a producer to check its
        # batches against before it sends them (a replay whose every batch is refused would
        # wait for acks for ever). The limits never change: built once, not 20 times a second.
        self._accepts = {"brands": limits.n_brands, "minutes": limits.n_minutes,
                         "countries": limits.n_countries, "platforms": limits.n_platforms,
                         "max_batch_orders": limits.max_batch_orders,
                         "max_order_cents": limits.max_order_cents}
        self.big_brand_cents = big_brand_cents
        self.curve_bucket_minutes = curve_bucket_minutes(limits.n_minutes)
        self.first_time = first_time
        self.watermarks = Watermarks(limits)
        self.resets = 0
        # Names this state across checkpoints and resets: a producer that sees a shard's
        # totals under another id knows the shard started again from nothing.
        self.state_id = secrets.token_hex(8)
        self._zero()

    def _zero(self) -> None:
        limits = self.limits
        # A brand's GMV and orders side by side (views of one (n, 2) array): the gather of
        # its GMV brings its orders into the cache, so each order misses the cache once, not
        # twice (the brand arrays are 4 MB and the batches' brands random).
        brand_cells = np.zeros((limits.n_brands, 2), np.int64)
        self.gmv_by_brand, self.orders_by_brand = brand_cells[:, 0], brand_cells[:, 1]
        self.gmv_by_minute = np.zeros(limits.n_minutes, np.int64)
        self.orders_by_minute = np.zeros(limits.n_minutes, np.int64)
        self.gmv_by_country = np.zeros(limits.n_countries, np.int64)
        self.orders_by_country = np.zeros(limits.n_countries, np.int64)
        self.gmv_by_platform = np.zeros(limits.n_platforms, np.int64)
        self.orders_by_platform = np.zeros(limits.n_platforms, np.int64)
        self.brand_overseas = np.zeros(limits.n_brands, np.uint8)  # 1: sold from abroad
        self.chatbot_queries = 0
        # The minute each big brand crossed the line, sorted; the first MAX_BIG_BRAND_MINUTES.
        self.big_brand_minutes: list[int] = []
        self._brand_cache: tuple[tuple, dict] = ((), {})
        self.latency = LatencyHistogram()
        self.newest_sent_at_us = 0
        self.gmv_cents = 0
        self.orders = 0
        self.batches = 0
        self.latest_minute = -1
        self.duplicates = 0
        self.rejected: Counter[str] = Counter()

    def reset(self) -> None:
        """Totals back to zero (an operator's reset, before a replay starts again). The
        sequence watermarks stay, so nothing applied before can be applied again; each
        producer's own totals restart from zero with the shard's."""
        self._zero()
        self.resets += 1
        for name, p in self.watermarks.producers.items():
            p.orders = p.gmv_cents = p.chatbot_queries = 0
            self.watermarks.changed.add(name)

    def apply(self, batch: OrderBatch, now_us: int | None = None, partition: int = 0) -> bool:
        """Add a validated batch of `partition`; False (and counted) if its (stream, seq) was
        applied. Raises BatchError, changing nothing, if a bound would be passed or the batch
        is not of this shard's partitions. `now_us`: the adapter's wall clock, to measure
        the latency of stamped batches."""
        check_partition(batch, self.shard, partition)
        stream = stream_name(batch.producer, partition)
        if self._duplicate(stream, batch.seq):
            return False
        amount, n = batch.amount_cents, len(batch)
        batch_gmv = int(amount.sum())
        # Each order is at least a cent, so bounding the GMV bounds every count as well.
        if self.gmv_cents + batch_gmv > MAX_TOTAL:
            raise BatchError("total_overflow", f"GMV would pass {MAX_TOTAL} cents")
        line = self.big_brand_cents
        # The brand ids as the platform's index type once: numpy casts uint32 indices to
        # intp inside every gather and np.add.at, which made those 2-3x slower.
        brand = batch.brand.astype(np.intp, copy=False)
        before = self.gmv_by_brand[brand]
        np.add.at(self.gmv_by_brand, brand, amount)
        # Only a brand below the line by less than the whole batch can cross it in this
        # batch: most batches of small orders need no second look.
        near = (before < line) & (before >= line - batch_gmv)
        if near.any():
            crossed = near & (self.gmv_by_brand[brand] >= line)
            if crossed.any():
                self._note_crossings(batch, before, np.unique(batch.brand[crossed]))
        np.add.at(self.orders_by_brand, brand, 1)
        self._add_countries_and_platforms(batch.country, batch.platform, amount)
        # The orders from abroad by index (nonzero of a mask: a boolean subscript or the
        # nonzero of the uint8 column costs 2-5x as much).
        self.brand_overseas[brand[np.flatnonzero(batch.country != 0)]] = 1
        if batch.minute_runs is None:
            self.gmv_by_minute[batch.minute] += batch_gmv
            self.orders_by_minute[batch.minute] += n
        else:  # runs of strictly increasing minutes (checked by wire.decode)
            minutes, counts = batch.run_minutes()
            starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
            np.add.at(self.gmv_by_minute, minutes, np.add.reduceat(amount, starts))
            np.add.at(self.orders_by_minute, minutes, counts)
        self.gmv_cents += batch_gmv
        self.orders += n
        self.batches += 1
        self.latest_minute = max(self.latest_minute, batch.minute)  # the batch's latest
        producer = self.watermarks.mark(stream, batch.seq)
        producer.orders += n
        producer.gmv_cents += batch_gmv
        if batch.sent_at_us and now_us is not None:
            self.latency.add(now_us - batch.sent_at_us)
            self.newest_sent_at_us = max(self.newest_sent_at_us, batch.sent_at_us)
        return True

    def _add_countries_and_platforms(self, country: np.ndarray, platform: np.ndarray,
                                     amount: np.ndarray) -> None:
        """GMV and orders by country and by platform (`country`, `platform`: the batch's
        checked id columns). A batch spans few of both (the festival's 12 x 3, whatever
        the limits allow): one scatter into its (country, platform) cells and their row
        and column sums, not two scatters each."""
        n_countries = int(country.max(initial=0)) + 1  # (an empty batch: one of each)
        n_platforms = int(platform.max(initial=0)) + 1
        n_cells = n_countries * n_platforms
        if n_cells > 4096:  # a batch of many countries and many platforms: each on its own
            for ids, size, gmv_by, orders_by in (
                    (country, n_countries, self.gmv_by_country, self.orders_by_country),
                    (platform, n_platforms, self.gmv_by_platform, self.orders_by_platform)):
                gmv, orders = _lane_totals(ids, size, amount)
                gmv_by[:size] += gmv
                orders_by[:size] += orders
            return
        # The cell in the narrowest type: passes over 10 KB, not 80.
        cell = np.multiply(country, n_platforms, dtype=np.uint8 if n_cells <= 256 else np.uint16,
                           casting="unsafe")  # ids are checked: every cell fits
        np.add(cell, platform, out=cell, casting="unsafe")
        gmv, orders = (a.reshape(n_countries, n_platforms)
                       for a in _lane_totals(cell, n_cells, amount))
        self.gmv_by_country[:n_countries] += gmv.sum(axis=1)
        self.gmv_by_platform[:n_platforms] += gmv.sum(axis=0)
        self.orders_by_country[:n_countries] += orders.sum(axis=1)
        self.orders_by_platform[:n_platforms] += orders.sum(axis=0)

    def _note_crossings(self, batch: OrderBatch, before: np.ndarray, brands: np.ndarray) -> None:
        """Record the minute at which each of `brands` (each below the line before `batch`,
        above it after) crossed the line: that of the order which took it there. `before`:
        each order's brand GMV before the batch. Costs O(orders of those brands)."""
        line = self.big_brand_cents
        rows = np.flatnonzero(np.isin(batch.brand, brands))
        rows = rows[np.argsort(batch.brand[rows], kind="stable")]  # by brand, in batch order
        brand, amount = batch.brand[rows], batch.amount_cents[rows]
        first = np.r_[True, brand[1:] != brand[:-1]]
        group = np.cumsum(first) - 1
        running = np.cumsum(amount)
        base = running[first] - amount[first]  # running sum before each brand's first order
        start = before[rows[first]]  # the brand's GMV before the batch
        running = running - base[group] + start[group]  # the brand's GMV after each order
        over = np.flatnonzero(running >= line)
        _, at = np.unique(group[over], return_index=True)  # each brand's first order over
        minutes = batch.order_minutes()[rows[over[at]]]
        merged = heapq.merge(self.big_brand_minutes, sorted(minutes.tolist()))
        self.big_brand_minutes = list(merged)[:MAX_BIG_BRAND_MINUTES]

    def top_brands(self, k: int = TOP_BRANDS) -> list[list[int]]:
        """[[brand id, GMV cents], ...] of the k brands with the most GMV (above zero), most
        first, ties by lower id."""
        gmv = self.gmv_by_brand
        if len(gmv) > k:
            ids = self._above_last_kth(gmv, k)
            if ids is None:  # a partition of every brand: 6 ms at 250,000
                kth = np.partition(gmv, len(gmv) - k)[len(gmv) - k]
                ids = np.flatnonzero(gmv >= max(int(kth), 1))
        else:
            ids = np.flatnonzero(gmv > 0)
        ids = ids[np.lexsort((ids, -gmv[ids]))][:k]
        if len(ids) == k:
            self._top_floor = (gmv, k, self.resets, self.gmv_cents, int(gmv[ids[-1]]))
        return [[int(i), int(gmv[i])] for i in ids]

    def _above_last_kth(self, gmv: np.ndarray, k: int) -> np.ndarray | None:
        """The brands at or above the k-th largest GMV of the last call, if that still
        bounds the top k: a brand's GMV only grows between resets (which make new arrays),
        so the k brands of the last call are all still there and the new k-th is at least
        the old one. None when it cannot be used (first call, a reset, too many ties)."""
        floor = getattr(self, "_top_floor", None)
        if floor is None or floor[0] is not gmv or floor[1] != k or floor[2] != self.resets \
                or floor[3] > self.gmv_cents:
            return None
        ids = np.flatnonzero(gmv >= max(floor[4], 1))
        return ids if k <= len(ids) <= 64 * k else None

    def curve_cents(self) -> list[int]:
        """GMV per curve bucket (`curve_bucket_minutes` wide) from the window's start up to
        the bucket of the latest minute; not cumulative."""
        if self.latest_minute < 0:
            return []
        width = self.curve_bucket_minutes
        n = self.latest_minute // width + 1
        return np.add.reduceat(self.gmv_by_minute[:n * width], np.arange(0, n * width, width)) \
            .tolist()

    def apply_chatbot(self, event: ChatbotCount, partition: int = 0) -> bool:
        """Add a chatbot query count of `partition`'s stream; False (and counted) if its
        (stream, seq) was applied."""
        if not self.shard.owns(partition):
            raise BatchError("wrong_partition", f"partition {partition} is not one of shard "
                                                f"{self.shard}'s {self.shard.owned}")
        stream = stream_name(event.producer, partition)
        if self._duplicate(stream, event.seq):
            return False
        if self.chatbot_queries + event.queries > MAX_TOTAL:
            raise BatchError("total_overflow", f"chatbot queries would pass {MAX_TOTAL}")
        self.chatbot_queries += event.queries
        self.latest_minute = max(self.latest_minute, event.minute)
        self.watermarks.mark(stream, event.seq).chatbot_queries += event.queries
        return True

    def _duplicate(self, stream: str, seq: int) -> bool:
        """True (and counted) if applied already; BatchError if `seq` passes a bound."""
        if self.watermarks.seen(stream, seq):
            self.duplicates += 1
            return True
        self.watermarks.admit(stream, seq)
        return False

    def reject(self, reason: str) -> None:
        """Count a message that was refused; the totals are untouched."""
        self.rejected[reason] += 1

    def take_acks(self) -> dict[str, dict[str, object] | None]:
        """What each stream changed since the last call needs to hear: how far its sequence
        is applied, and what its batches added (the producer compares it with what it sent);
        None for a retired stream, whose acknowledgement is cleared."""
        marks = self.watermarks
        acks: dict[str, dict[str, object] | None] = dict.fromkeys(marks.retired)
        for name in sorted(marks.changed):
            p = marks.producers[name]
            producer, partition = stream_of(name)
            acks[name] = {"producer": producer, "partition": partition,
                          "next_seq": p.next_seq, "max_seen": p.max_seen,
                          "gaps": p.missing, "orders": p.orders, "gmv_cents": p.gmv_cents,
                          "chatbot_queries": p.chatbot_queries, "resets": self.resets,
                          "state": self.state_id}
        marks.changed.clear()
        marks.retired.clear()
        return acks

    _SCALARS = ("gmv_cents", "orders", "batches", "latest_minute", "duplicates",
                "chatbot_queries", "resets")

    def scalars(self) -> dict[str, object]:
        """The non-array part of the state, for checkpoints."""
        return {**{name: getattr(self, name) for name in self._SCALARS},
                "state_id": self.state_id, "rejected": dict(self.rejected),
                "watermarks": self.watermarks.dump(), "big_brand_cents": self.big_brand_cents,
                "big_brand_minutes": list(self.big_brand_minutes), "shard": self._shard_key()}

    def _shard_key(self) -> list[int]:
        return [self.shard.index, self.shard.count, self.shard.partitions]

    def check_shard(self, scalars: dict) -> None:
        """Raise ValueError unless `scalars` were saved by this shard of these partitions:
        a shard keeps its brands for life."""
        saved = scalars.get("shard", [0, 1, 1])  # before partitions: the only shard
        if saved != self._shard_key():
            was = f"{saved[0]}/{saved[1]} of {saved[2]}" if isinstance(saved, list) \
                and len(saved) == 3 else repr(saved)
            raise ValueError(f"saved by shard {was} partitions, not {self.shard.index}/"
                             f"{self.shard.count} of {self.shard.partitions}: start each "
                             "--shard and --partitions with its own checkpoint")

    def restore_scalars(self, scalars: dict) -> None:
        """The inverse of `scalars` (whose shard `check_shard` checks); raises ValueError on
        anything it would not have written."""
        for name in self._SCALARS:
            value = scalars[name]
            if type(value) is not int or not -1 <= value <= MAX_TOTAL:
                raise ValueError(f"{name}={value!r}: not a count")
            setattr(self, name, value)
        state_id = scalars["state_id"]
        if not isinstance(state_id, str) or not 0 < len(state_id) <= 64:
            raise ValueError(f"state_id={state_id!r}: not a state id")
        self.state_id = state_id
        rejected = scalars["rejected"]
        if not isinstance(rejected, dict) or len(rejected) > 64 \
                or any(type(v) is not int or v < 0 for v in rejected.values()):
            raise ValueError("rejected: not an object of counts")
        self.rejected = Counter(rejected)
        self.watermarks = Watermarks.from_dump(scalars["watermarks"], self.limits)
        self.big_brand_minutes = self._restore_big_brands(scalars)

    def _restore_big_brands(self, scalars: dict) -> list[int]:
        """The crossing minutes saved, checked. A checkpoint from before they were kept (or
        for another line) has none: each brand above the line then counts as crossing at
        the latest minute, the earliest this state can vouch for (its arrays are restored
        by then)."""
        minutes = scalars.get("big_brand_minutes")
        if minutes is None or scalars.get("big_brand_cents") != self.big_brand_cents:
            above = int(np.count_nonzero(self.gmv_by_brand >= self.big_brand_cents))
            return [max(self.latest_minute, 0)] * min(above, MAX_BIG_BRAND_MINUTES)
        if not isinstance(minutes, list) or len(minutes) > MAX_BIG_BRAND_MINUTES \
                or any(type(m) is not int or not 0 <= m < self.limits.n_minutes
                       for m in minutes) or minutes != sorted(minutes):
            raise ValueError(f"big_brand_minutes: not a sorted list of at most "
                             f"{MAX_BIG_BRAND_MINUTES} minutes")
        return minutes

    def snapshot(self) -> dict[str, object]:
        """The shard's totals as plain JSON-able values (what goes on the totals topic). Its
        size does not depend on the number of producers: they hear from their acks."""
        minute = self.latest_minute
        recent = slice(max(0, minute + 1 - RECENT_MINUTES), minute + 1)
        return {
            "gmv_cents": self.gmv_cents,
            "orders": self.orders,
            "brands_active": int(np.count_nonzero(self.orders_by_brand)),
            "brands_overseas_active": int(np.count_nonzero(self.brand_overseas)),
            "brands_first_time_active": (
                int(np.count_nonzero(self.brand_overseas[self.first_time]))
                if self.first_time is not None else None),
            "chatbot_queries": self.chatbot_queries,
            "minute": minute if minute >= 0 else None,
            "gmv_minute_cents": int(self.gmv_by_minute[minute]) if minute >= 0 else 0,
            "country_gmv_cents": self.gmv_by_country.tolist(),
            "country_orders": self.orders_by_country.tolist(),
            "platform_gmv_cents": self.gmv_by_platform.tolist(),
            "platform_orders": self.orders_by_platform.tolist(),
            "batches": self.batches,
            "duplicates": self.duplicates,
            "gaps": min(self.watermarks.gaps, MAX_TOTAL),
            "rejected": dict(self.rejected),
            "producers": len(self.watermarks.producers),
            "partitions": self.shard.partitions,
            "owned": self.shard.owned,
            "accepts": self._accepts,
            "state": self.state_id,
            "latency_ms": self.latency.percentiles(),
            "newest_sent_at_us": self.newest_sent_at_us,
            # The last RECENT_MINUTES minutes' GMV, so a watcher can place an event (passing
            # last year's total) on the exact minute even when snapshots are minutes apart.
            "recent_gmv_cents": self.gmv_by_minute[recent].tolist() if minute >= 0 else [],
            "recent_orders": self.orders_by_minute[recent].tolist() if minute >= 0 else [],
            **self._brand_figures(),
            "curve_bucket_minutes": self.curve_bucket_minutes,
            "curve_cents": self.curve_cents(),
        }

    def _brand_figures(self) -> dict[str, object]:
        """The big-brand count, crossing minutes and the top brands: recomputed only when a
        batch or a reset changed them (a scan of every brand, ~1 ms at 250,000)."""
        key = (self.batches, self.resets, self.gmv_cents)
        if self._brand_cache[0] != key:
            self._brand_cache = (key, {
                "brands_big": int(np.count_nonzero(self.gmv_by_brand >= self.big_brand_cents)),
                "big_brand_cents": self.big_brand_cents,
                "big_brand_minutes": list(self.big_brand_minutes),
                "top_brands": self.top_brands()})
        return self._brand_cache[1]


def _lane_totals(ids: np.ndarray, size: int, amount: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The GMV and the orders of each id in range(size) over a batch's orders. Most orders
    share a few ids (China, Tmall), and a scatter into one cell waits for its previous add:
    order i adds into lane i % LANES of its id instead, and the lanes add up at the end."""
    index, lane = ids.astype(np.intp), _LANE * size  # index: lane * size + id
    whole = len(index) - len(index) % len(lane)
    index[:whole].reshape(-1, len(lane))[...] += lane
    index[whole:] += lane[:len(index) - whole]
    gmv = np.zeros(LANES * size, np.int64)
    np.add.at(gmv, index, amount)
    orders = np.bincount(index, minlength=LANES * size)
    return gmv.reshape(LANES, size).sum(axis=0), orders.reshape(LANES, size).sum(axis=0)
