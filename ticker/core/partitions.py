"""Brand partitions: how orders are split among aggregator shards so every figure merges exactly.

A producer splits each batch by `brand % P` into P partitions and numbers each part in a
sequence of its own: a *stream* is one (producer, partition). Shard K of N owns the fixed set
of partitions p with `p % N == K`, so every brand lives in exactly one shard. Then sums add up,
and so do the counts of distinct brands (active, overseas, first-time, above the big-brand
line), and the top brands of all are the top of the shards' top lists. Partition 0's stream
is named like its producer, so a producer that knows nothing of partitions is stream 0.
Part of the wire contract (docs/wire-format.md#partitions). No I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ticker.core.wire import BatchError, OrderBatch, minute_runs

MAX_PARTITIONS = 1024  # subscriptions of one shard, partitions in a stream's name


def stream_name(producer: str, partition: int) -> str:
    """The name of one (producer, partition) sequence, as in acks and announcement topics."""
    return producer if partition == 0 else f"{producer}/{partition}"


def partition_level(level: str) -> int | None:
    """The partition a topic level names (ASCII decimal, as in `orders/{producer}/{p}`), or
    None for anything else."""
    return int(level) if level.isdecimal() and level.isascii() and len(level) <= 4 else None


def stream_of(name: str) -> tuple[str, int]:
    """(producer, partition) of a stream name (producer names hold no '/')."""
    producer, _, partition = name.partition("/")
    return producer, int(partition or 0)


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`, among `partitions` partitions of the brands."""

    index: int = 0
    count: int = 1
    partitions: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: K must be 0 .. N-1")
        if not self.count <= self.partitions <= MAX_PARTITIONS:
            raise ValueError(f"partitions={self.partitions}: must be {self.count} (the shards) "
                             f"to {MAX_PARTITIONS}")

    @classmethod
    def parse(cls, text: str, partitions: int | None = None) -> Shard:
        """`K/N` (or `K` for K/1 when K is 0); `partitions` defaults to N."""
        match = re.fullmatch(r"(\d{1,4})(?:/(\d{1,4}))?", text)
        if match is None or (match[2] is None and match[1] != "0"):
            raise ValueError(f"{text!r}: expected K/N, shard K of N (e.g. 0/3)")
        index, count = int(match[1]), int(match[2] or 1)
        return cls(index, count, count if partitions is None else partitions)

    @property
    def name(self) -> str:
        """The shard's topic level: its index."""
        return str(self.index)

    @property
    def key(self) -> str:
        """Names the shard's persistent session and checkpoint file: another partitioning is
        another name. The lone shard of one partition keeps the name it had before
        partitions, its index."""
        return self.name if (self.count, self.partitions) == (1, 1) else \
            f"{self.index}of{self.count}p{self.partitions}"

    @property
    def owned(self) -> list[int]:
        return list(range(self.index, self.partitions, self.count))

    def owns(self, partition: int) -> bool:
        return 0 <= partition < self.partitions and partition % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}" + \
            (f" of {self.partitions} partitions" if self.partitions != self.count else "")


def split(batch: OrderBatch, partitions: int) -> list[tuple[int, OrderBatch]]:
    """The batch's orders by partition (`brand % partitions`), each part in the batch's order
    and with its own minute runs; empty parts left out. One partition: the batch itself."""
    if partitions == 1:
        return [(0, batch)]
    part = batch.brand % partitions
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    minutes = batch.order_minutes() if batch.minute_runs is not None else None
    parts = []
    for p in range(partitions):
        rows = order[bounds[p]:bounds[p + 1]]
        if len(rows) == 0:
            continue
        runs = None if minutes is None else minute_runs(minutes[rows])
        parts.append((p, OrderBatch(
            batch.producer, batch.seq, int(minutes[rows[-1]]) if minutes is not None
            else batch.minute, batch.amount_cents[rows], batch.brand[rows],
            batch.country[rows], batch.platform[rows], batch.sent_at_us, runs)))
    return parts


def check_partition(batch: OrderBatch, shard: Shard, partition: int) -> None:
    """Raise BatchError unless the batch belongs on `partition` of this shard: a brand in two
    shards would be counted twice in the merged distinct-brand figures."""
    if not shard.owns(partition):
        raise BatchError("wrong_partition", f"partition {partition} is not one of shard "
                                            f"{shard}'s {shard.owned}")
    if shard.partitions > 1 and np.any(batch.brand % shard.partitions != partition):
        stray = int(batch.brand[batch.brand % shard.partitions != partition][0])
        raise BatchError("wrong_partition", f"brand {stray} is in partition "
                                            f"{stray % shard.partitions}, not {partition} "
                                            f"(brand % {shard.partitions})")
