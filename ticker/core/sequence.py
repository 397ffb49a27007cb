"""Sequence watermarks: which of each producer's batches are applied, so that at-least-once
delivery counts each (producer, seq) exactly once and a missing seq is a reported gap.

Part of the wire contract (docs/wire-format.md#acknowledgements): the aggregator keeps them
in its state and checkpoint, a recording's reader uses them to drop a capture's duplicates.
Memory is bounded by the number of holes per producer and `Limits.max_producers`. No I/O.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

from ticker.core.wire import MAX_SEQ, BatchError, Limits


@dataclass
class Producer:
    """One producer's sequence and what of it is applied. Memory is bounded by the number of
    holes (runs of missing seqs), not by how far the sequence has gone."""

    next_seq: int = 0  # every seq below this has been applied
    starts: list[int] = field(default_factory=list)  # applied runs above next_seq:
    ends: list[int] = field(default_factory=list)    # [starts[i], ends[i]), sorted, disjoint
    max_seen: int = -1  # the highest seq applied or announced
    ahead: int = 0  # how many seqs the runs hold
    # What this producer's batches added since the state began or was last reset.
    orders: int = 0
    gmv_cents: int = 0
    chatbot_queries: int = 0

    @property
    def missing(self) -> int:
        return self.max_seen + 1 - self.next_seq - self.ahead

    def has(self, seq: int) -> bool:
        if seq < self.next_seq:
            return True
        i = bisect_right(self.starts, seq) - 1
        return i >= 0 and seq < self.ends[i]

    def opens_hole(self, seq: int) -> bool:
        """Would marking `seq` start a new run (it touches neither next_seq nor a run)?"""
        if seq == self.next_seq:
            return False
        i = bisect_right(self.starts, seq)
        return not ((i > 0 and self.ends[i - 1] == seq)
                    or (i < len(self.starts) and self.starts[i] == seq + 1))

    def mark(self, seq: int) -> None:
        """Record `seq` (not yet applied) as applied."""
        self.max_seen = max(self.max_seen, seq)
        if seq == self.next_seq:
            self.next_seq += 1
            if self.starts and self.starts[0] == self.next_seq:
                self.next_seq = self.ends.pop(0)
                self.ahead -= self.next_seq - self.starts.pop(0)
            return
        self.ahead += 1
        i = bisect_right(self.starts, seq)
        joins_left = i > 0 and self.ends[i - 1] == seq
        joins_right = i < len(self.starts) and self.starts[i] == seq + 1
        if joins_left and joins_right:
            self.ends[i - 1] = self.ends.pop(i)
            del self.starts[i]
        elif joins_left:
            self.ends[i - 1] = seq + 1
        elif joins_right:
            self.starts[i] = seq
        else:
            self.starts.insert(i, seq)
            self.ends.insert(i, seq + 1)

    def dump(self) -> list[int]:
        return [self.next_seq, self.max_seen, self.orders, self.gmv_cents, self.chatbot_queries,
                *(x for run in zip(self.starts, self.ends) for x in run)]

    @classmethod
    def from_dump(cls, values: object) -> Producer:
        """The inverse of `dump`; raises ValueError on anything it would not have written."""
        if not isinstance(values, list) or len(values) < 5 or len(values) % 2 == 0 \
                or any(type(v) is not int for v in values):
            raise ValueError("a producer is a list of 5 + 2k integers")
        next_seq, max_seen, orders, gmv, queries, *runs = values
        p = cls(next_seq, runs[0::2], runs[1::2], max_seen, 0, orders, gmv, queries)
        bounds = [next_seq, *runs]
        if not 0 <= next_seq <= max_seen + 1 <= MAX_SEQ + 1 or min(orders, gmv, queries) < 0 \
                or any(a >= b for a, b in zip(bounds, bounds[1:])) \
                or (runs and runs[-1] > max_seen + 1):
            raise ValueError("producer sequence runs are out of order or out of range")
        p.ahead = sum(e - s for s, e in zip(p.starts, p.ends))
        return p


class Watermarks:
    """Per-producer record of applied sequence numbers: dedup, gap counting, and the bounds
    that keep it small whatever producers send (`Limits.max_producers`, `max_seq_jump`,
    `max_seq_holes`)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.producers: dict[str, Producer] = {}
        self.gaps = 0  # sum of every producer's `missing`, kept up to date
        self.changed: set[str] = set()  # producers whose acknowledgement is due
        self.retired: set[str] = set()  # producers whose acknowledgement is to be cleared

    def get(self, producer: str) -> Producer | None:
        return self.producers.get(producer)

    def seen(self, producer: str, seq: int) -> bool:
        p = self.producers.get(producer)
        return p is not None and p.has(seq)

    def admit(self, producer: str, seq: int) -> None:
        """Raise BatchError unless `seq` (not yet applied) may be applied within the bounds."""
        p = self.producers.get(producer)
        if p is None:
            if len(self.producers) >= self.limits.max_producers:
                raise BatchError("too_many_producers", f"{producer!r} would be producer "
                                 f"{len(self.producers) + 1}; max_producers="
                                 f"{self.limits.max_producers}")
            p = Producer()
        highest = max(p.max_seen, p.next_seq - 1)
        if seq > highest + self.limits.max_seq_jump:
            raise BatchError("seq_jump", f"seq={seq} is more than max_seq_jump="
                             f"{self.limits.max_seq_jump} past {producer!r}'s highest {highest}")
        if len(p.starts) >= self.limits.max_seq_holes and p.opens_hole(seq):
            raise BatchError("seq_holes", f"{producer!r} already has max_seq_holes="
                             f"{self.limits.max_seq_holes} runs of missing seqs")

    def mark(self, producer: str, seq: int) -> Producer:
        """Record an admitted `seq` as applied; the producer's record."""
        p = self.producers.setdefault(producer, Producer())
        before = p.missing
        p.mark(seq)
        self.gaps += p.missing - before
        self.changed.add(producer)
        return p

    def announce(self, producer: str, last_seq: int) -> bool:
        """A producer says it has published up to `last_seq`: anything missing below is a gap,
        including a lost tail that no later batch would reveal. False if not taken: a producer
        this state never heard from (an earlier run's retained word), or a jump past bounds."""
        p = self.producers.get(producer)
        if p is None or last_seq > max(p.max_seen, p.next_seq - 1) + self.limits.max_seq_jump:
            return False
        if last_seq > p.max_seen:
            self.gaps += last_seq - p.max_seen
            p.max_seen = last_seq
            self.changed.add(producer)
        return True

    def retire(self, producer: str) -> bool:
        """Forget a producer that said it is done (it cleared its announcement), if all of its
        sequence is applied: nothing of it can arrive any more, and its id may start again
        from 0. False (and kept) while anything of it is missing."""
        p = self.producers.get(producer)
        if p is None or p.missing or p.starts:
            return False
        del self.producers[producer]
        self.retired.add(producer)
        self.changed.discard(producer)
        return True

    def dump(self) -> dict[str, list[int]]:
        return {name: p.dump() for name, p in self.producers.items()}

    @classmethod
    def from_dump(cls, dump: object, limits: Limits) -> Watermarks:
        if not isinstance(dump, dict) or len(dump) > limits.max_producers:
            raise ValueError(f"watermarks: an object of at most {limits.max_producers} producers")
        marks = cls(limits)
        for name, values in dump.items():
            marks.producers[name] = p = Producer.from_dump(values)
            marks.gaps += p.missing
        return marks
