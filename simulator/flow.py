"""Flow control for a producer: never more than a window ahead of what the aggregators applied.

MQTT tells a publisher only that the broker took a message, not that anyone got it: a broker
drops what a subscriber's queue cannot hold (Mosquitto: 1,000 messages a client by default)
and says nothing. So a replay publishes a message only while the shard that takes it has
fewer than `window` of its messages unapplied, over all the brand partitions (streams) that
shard owns, as the shards' acknowledgements say (`{prefix}/acks/{shard}/{producer}[/{p}]`,
retained), and ends with a verdict: what it published against what the shards applied for
it, over every stream.

`AckWindow` is the pure part (messages and time in, answers out); `FlowControl` subscribes,
waits, and says in one line why whenever it has waited long.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson

from ticker.core.errors import ConfigError
from ticker.core.partitions import MAX_PARTITIONS, partition_level
from ticker.core.wire import MAX_TOTAL
from ticker.shell.mqtt import BrokerSettings, Topics, watch

ALIVE_FOR = 10.0  # a shard whose live totals we saw this recently is running


@dataclass(frozen=True)
class ShardAck:
    """One shard's word to this producer."""

    next_seq: int  # every seq below is applied
    max_seen: int
    orders: int  # what our messages added since the shard's last reset
    gmv_cents: int
    chatbot_queries: int
    resets: int
    state: str  # the shard's state id: another id in its totals means it started over

    @classmethod
    def parse(cls, payload: bytes) -> ShardAck | None:
        """None for anything that is not a well-formed ack."""
        try:
            doc = orjson.loads(payload)
            values = {name: doc[name] for name in cls.__dataclass_fields__}
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
        state = values.pop("state")
        if any(type(v) is not int or not -1 <= v <= MAX_TOTAL for v in values.values()) \
                or not isinstance(state, str) or len(state) > 64:
            return None
        return cls(**values, state=state)


@dataclass(frozen=True)
class Verdict:
    """Published against applied, for one pass of a replay."""

    producer: str
    published_orders: int
    published_cents: int
    applied_orders: int
    applied_cents: int
    unapplied: int  # messages some shard has not applied
    shards: int

    @property
    def exact(self) -> bool:
        return self.shards > 0 and self.unapplied == 0 and \
            (self.applied_orders, self.applied_cents) == \
            (self.published_orders, self.published_cents)

    def line(self) -> str:
        published = f"published {self.published_orders:,} orders, {usd(self.published_cents)}"
        applied = f"applied {self.applied_orders:,} orders, {usd(self.applied_cents)}"
        if self.exact:
            return f"verdict: exact: {published}; aggregators {applied}"
        why = "no aggregator acknowledged" if not self.shards else \
            f"{self.unapplied:,} messages not applied" if self.unapplied else "totals differ"
        return f"verdict: MISMATCH ({why}): {published}; aggregators {applied}"


class ShardForgot(Exception):
    """A shard that acknowledged us in this run now runs another state: it restarted without
    its checkpoint (`--no-checkpoint`), so what it had applied is gone and nothing it holds
    of ours will be redelivered: this pass cannot end exact."""


def usd(cents: int) -> str:
    sign, cents = ("-", -cents) if cents < 0 else ("", cents)
    return f"{sign}${cents // 100:,}.{cents % 100:02d}"


ACCEPTS = ("brands", "minutes", "countries", "platforms", "max_batch_orders", "max_order_cents")


def misfit(accepts: dict[str, int], needs: dict[str, int]) -> str | None:
    """Why a shard that accepts `accepts` would refuse messages that need `needs` (the keys
    of ACCEPTS, or some: ids below each count, the largest batch and order), or None."""
    why = {"brands": "brand ids below {:,}; the shard takes ids below {:,} (its --brands "
                     "or --reference)",
           "minutes": "a window of {:,} minutes; the shard's has {:,} (its --scenario)",
           "countries": "country ids below {}; the shard takes ids below {} (its --reference)",
           "platforms": "platform ids below {}; the shard takes ids below {} (its --reference)",
           "max_batch_orders": "batches of {:,} orders; the shard takes at most {:,}"}
    for key, need in needs.items():
        if need > accepts[key]:
            if key == "max_order_cents":
                return f"an order of {usd(need)}; the shard takes at most {usd(accepts[key])}"
            return why[key].format(need, accepts[key])
    return None


@dataclass(frozen=True)
class ShardLayout:
    """What a shard's live totals say of it: its state id, which partitions it owns and the
    ranges it accepts (`ACCEPTS`: ids below each count, at most so many orders a batch and
    cents an order)."""

    state: str | None
    partitions: int | None  # None: a shard from before partitions, which takes every batch
    owned: frozenset[int] | None
    accepts: dict[str, int] | None = None  # None: a shard that does not say

    @classmethod
    def parse(cls, totals: bytes) -> ShardLayout:
        try:
            doc = orjson.loads(totals)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict):
            return cls(None, None, None)
        state, partitions, owned = doc.get("state"), doc.get("partitions"), doc.get("owned")
        if type(partitions) is not int or not 0 < partitions <= MAX_PARTITIONS \
                or not isinstance(owned, list) or len(owned) > partitions \
                or any(type(q) is not int or not 0 <= q < partitions for q in owned):
            partitions, owned = None, None
        accepts = doc.get("accepts")
        if not isinstance(accepts, dict) or any(
                type(accepts.get(k)) is not int or not 0 < accepts[k] <= MAX_TOTAL
                for k in ACCEPTS):
            accepts = None
        return cls(state if isinstance(state, str) else None, partitions,
                   None if owned is None else frozenset(owned),
                   None if accepts is None else {k: accepts[k] for k in ACCEPTS})

    def owns(self, partition: int) -> bool:
        return self.owned is None or partition in self.owned


class AckWindow:
    """What the shards have applied of one producer's streams (one per brand partition: the
    producer's sequence on that partition), from their messages. Each shard's session queues
    the streams of the partitions it owns, so the window bounds, per shard, the messages it
    has not applied over all of them."""

    def __init__(self, topics: Topics, producer: str, window: int) -> None:
        if window <= 0:
            raise ValueError(f"window={window}: must be positive")
        self.topics, self.producer, self.window = topics, producer, window
        self.acks: dict[tuple[str, int], ShardAck] = {}  # (shard, partition) -> its ack
        self.alive_at: dict[str, float] = {}
        self.layout: dict[str, ShardLayout] = {}  # each running shard's, from its totals
        self.heard: set[tuple[str, int]] = set()  # streams acknowledged since `begin`
        self.forgot: set[str] = set()  # shards that acked us in this run, now another state
        self.start_seqs = [0]  # per partition: where this pass begins
        self.next_seqs = [0]  # per partition: the next seq the producer will publish
        self.baseline = (0, 0)  # (orders, cents) the shards held for us before this pass

    @property
    def partitions(self) -> int:
        return len(self.start_seqs)

    def receive(self, topic: str, payload: bytes, retained: bool, now: float) -> None:
        kind, rest = self.topics.kind(topic)
        if len(rest) == 1 and kind == "totals" and not retained:
            shard = rest[0]
            self.alive_at[shard] = now
            self.layout[shard] = ShardLayout.parse(payload)
            for stream in [key for key in self.acks if key[0] == shard]:
                self._compare(stream)
        elif kind == "acks" and len(rest) in (2, 3) and rest[1] == self.producer:
            partition = 0 if len(rest) == 2 else partition_level(rest[2])
            ack = ShardAck.parse(payload)
            if ack is not None and partition is not None:
                stream = (rest[0], partition)
                self.acks[stream] = ack
                if not retained:
                    self.alive_at[rest[0]] = now
                    self.heard.add(stream)
                self._compare(stream)

    def _compare(self, stream: tuple[str, int]) -> None:
        """A shard's ack from another state than the one it runs: from this run, it forgot us;
        from before (a retained copy), it simply does not know us."""
        ack, layout = self.acks.get(stream), self.layout.get(stream[0])
        if ack is None or layout is None or layout.state is None or ack.state == layout.state:
            return
        if stream in self.heard:
            self.forgot.add(stream[0])
        else:
            del self.acks[stream]

    def running(self, now: float) -> set[str]:
        return {s for s, at in self.alive_at.items() if now - at <= ALIVE_FOR}

    def shards(self, now: float, partition: int | None = None) -> set[str]:
        """The shards to wait for on `partition`: the running ones that own it; while none
        does, every one that ever acknowledged us on it (its session may hold our messages
        while it is away). A shard retired by a resharding, whose partition another shard
        now owns, is not waited for. Without `partition`: every shard running or acked."""
        running = self.running(now)
        if partition is None:
            return running | {s for s, _ in self.acks}
        owners = {s for s in running if self._owns(s, partition)}
        return owners or {s for s, q in self.acks if q == partition}

    def _owns(self, shard: str, partition: int) -> bool:
        layout = self.layout.get(shard)
        return layout is None or layout.owns(partition)

    def accepts(self, now: float) -> dict[str, dict[str, int]]:
        """Each running shard's accepted ranges, for those that say them."""
        return {s: a for s in self.running(now)
                if (a := self.layout[s].accepts if s in self.layout else None) is not None}

    def layouts(self, now: float) -> dict[str, int]:
        """Each running shard's partition count, for those that say it."""
        return {s: n for s in self.running(now)
                if (n := self.layout[s].partitions if s in self.layout else None) is not None}

    def unowned(self, now: float) -> list[int]:
        """The partitions no running shard owns."""
        running = self.running(now)
        return [p for p in range(self.partitions)
                if not any(self._owns(s, p) for s in running)]

    def begin(self, partitions: int | None = None) -> None:
        """Start a pass where the shards' record of us ends, so a producer id used before
        continues its sequences instead of having its messages dropped as duplicates."""
        n = self.partitions if partitions is None else partitions
        self.start_seqs = [max((a.max_seen + 1 for (_, q), a in self.acks.items() if q == p),
                               default=0) for p in range(n)]
        self.next_seqs = list(self.start_seqs)
        self.baseline = self.applied_totals()

    def applied_by(self, shard: str, partition: int) -> int:
        ack = self.acks.get((shard, partition))
        return ack.next_seq if ack is not None else self.start_seqs[partition]

    def applied(self, now: float, partition: int = 0) -> int | None:
        """The lowest next_seq on `partition` among the shards to wait for; None if none."""
        shards = self.shards(now, partition)
        if not shards:
            return None
        return min(self.applied_by(s, partition) for s in shards)

    def room(self, seq: int, now: float, partition: int = 0) -> bool:
        """May `seq` of `partition` be published: is every shard that takes it fewer than
        `window` messages behind, over all the partitions it owns?"""
        self.next_seqs[partition] = max(self.next_seqs[partition], seq)
        shards = self.shards(now, partition)
        return bool(shards) and all(self._behind(s, now) < self.window for s in shards)

    def _behind(self, shard: str, now: float) -> int:
        return sum(self.next_seqs[p] - self.applied_by(shard, p)
                   for p in range(self.partitions) if shard in self.shards(now, p))

    def applied_totals(self) -> tuple[int, int]:
        return (sum(a.orders for a in self.acks.values()),
                sum(a.gmv_cents for a in self.acks.values()))

    def resets(self) -> dict[str, int]:
        resets: dict[str, int] = {}
        for (shard, _), a in self.acks.items():
            resets[shard] = max(resets.get(shard, 0), a.resets)
        return resets

    def verdict(self, end_seqs: list[int], orders: int, cents: int, now: float) -> Verdict:
        """`end_seqs`: per partition, one past the last seq published; `orders`, `cents`:
        this pass's."""
        unapplied = 0
        for p, end in enumerate(end_seqs):
            applied = self.applied(now, p)
            unapplied += max(end - (self.start_seqs[p] if applied is None else applied), 0)
        totals = self.applied_totals()
        return Verdict(self.producer, orders, cents, totals[0] - self.baseline[0],
                       totals[1] - self.baseline[1], unapplied, len(self.shards(now)))


class FlowControl:
    """`AckWindow` fed from the broker, with waits that explain themselves. `partitions`: how
    many brand partitions the producer splits into; None: as many as the running shards
    have (one if none says)."""

    def __init__(self, broker: BrokerSettings, topics: Topics, producer: str, *,
                 window: int = 200, partitions: int | None = None,
                 say: Callable[[str], None] = print, patience: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.broker, self.topics, self.say, self.patience = broker, topics, say, patience
        self.acks = AckWindow(topics, producer, window)
        self.partitions = partitions
        self._now = clock
        self._news = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> FlowControl:
        ready = asyncio.Event()
        self._task = asyncio.create_task(watch(
            self.broker, [self.topics.acks_for(self.acks.producer), self.topics.all_totals],
            self._receive, ready=ready, role="gmv-flow"))
        await ready.wait()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _receive(self, topic: str, payload: bytes, retained: bool) -> None:
        self.acks.receive(topic, payload, retained, self._now())
        self._news.set()

    async def _until(self, done: Callable[[], bool], why: Callable[[], str],
                     timeout: float | None = None) -> bool:
        """Wait until `done()`; say `why()` once each time a wait passes `patience` seconds.
        False if `timeout` seconds pass without any news from the shards."""
        said, start = False, self._now()
        last_news = start
        while not done():
            if self.acks.forgot:
                raise ShardForgot(
                    f"shard {', '.join(sorted(self.acks.forgot))} restarted without its "
                    f"checkpoint and lost what it had applied of {self.acks.producer!r}: "
                    "stopping this replay (run gmv aggregate with its checkpoint)")
            self._news.clear()
            with contextlib.suppress(TimeoutError):
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a stop.
                async with asyncio.timeout(self.patience / 5):
                    await self._news.wait()
                last_news = self._now()
            if not said and self._now() - start >= self.patience:
                self.say(why())
                said = True
            if timeout is not None and self._now() - last_news >= timeout:
                return False
        return True

    async def start(self) -> list[int]:
        """Wait for running aggregators that own every partition; the first seq of this pass
        on each partition."""
        await self._until(lambda: bool(self.acks.running(self._now())), lambda: (
            f"waiting for an aggregator on {self.topics.prefix} (start `gmv aggregate --broker "
            f"{self.broker.url}`): nothing is published until one runs"))
        self.acks.begin(self._partitions())
        await self._until(lambda: not self.acks.unowned(self._now()), lambda: (
            f"waiting for the shards that own partitions "
            f"{', '.join(map(str, self.acks.unowned(self._now())))} of "
            f"{self.acks.partitions} (start `gmv aggregate --shard K/N`)"))
        self.acks.begin()
        return self.acks.start_seqs

    def accepts(self) -> dict[str, dict[str, int]]:
        """What each running shard accepts, for those that say (`AckWindow.accepts`)."""
        return self.acks.accepts(self._now())

    def _partitions(self) -> int:
        """The partition count to split into: ours, which every running shard must share,
        else theirs. A mismatch would put brands where no shard takes them."""
        layouts = self.acks.layouts(self._now())
        theirs = set(layouts.values())
        if len(theirs) > 1:
            raise ConfigError("the running shards disagree on the partitions: " + ", ".join(
                f"shard {s} has {n}" for s, n in sorted(layouts.items())))
        if self.partitions is not None and theirs and theirs != {self.partitions}:
            raise ConfigError(f"--partitions={self.partitions}: the running shards split the "
                              f"brands into {theirs.pop()} partitions")
        return self.partitions or (theirs.pop() if theirs else 1)

    async def room(self, seq: int, partition: int = 0) -> None:
        """Wait until message `seq` of `partition` may be published."""
        if not self.acks.room(seq, self._now(), partition):
            await self._until(lambda: self.acks.room(seq, self._now(), partition),
                              lambda: self._stalled(seq, partition))

    def applied(self, end_seqs: list[int]) -> bool:
        now = self._now()
        return all((self.acks.applied(now, p) or 0) >= end for p, end in enumerate(end_seqs))

    async def drain(self, end_seqs: list[int], timeout: float) -> bool:
        """Wait until every shard has applied everything below `end_seqs` (per partition);
        False if the shards went `timeout` seconds without a word."""
        return await self._until(lambda: self.applied(end_seqs),
                                 lambda: self._stalled_at_end(end_seqs), timeout)

    async def reset(self, send: Callable[[], Awaitable[None]], timeout: float = 10.0) -> None:
        """Send an operator's reset and wait until every shard that knows us has obeyed."""
        before = self.acks.resets()
        await send()
        obeyed = await self._until(
            lambda: all(self.acks.resets().get(s, 0) > r for s, r in before.items()),
            lambda: "waiting for the aggregators to reset their totals", timeout)
        if not obeyed:
            stuck = sorted(s for s, r in before.items() if self.acks.resets().get(s, 0) <= r)
            self.say(f"shard {', '.join(stuck)} did not reset its totals (does it have the "
                     "control token?): this pass will not match")
        self.acks.begin()

    def verdict(self, end_seqs: list[int], orders: int, cents: int) -> Verdict:
        return self.acks.verdict(end_seqs, orders, cents, self._now())

    def _stalled_at_end(self, end_seqs: list[int]) -> str:
        now = self._now()
        short = [p for p, end in enumerate(end_seqs) if (self.acks.applied(now, p) or 0) < end]
        return self._stalled(end_seqs[short[0]], short[0]) if short else "waiting for acks"

    def _stalled(self, seq: int, partition: int = 0) -> str:
        now = self._now()
        acks = self.acks
        behind = {s: acks.applied_by(s, partition) for s in sorted(acks.shards(now, partition))}
        if not behind:
            return (f"no aggregator on {self.topics.prefix} is running: waiting for one to "
                    "come back before publishing more")
        waiting = ", ".join(f"shard {s} has applied up to seq {n:,}" for s, n in behind.items())
        where = f" of partition {partition}" if acks.partitions > 1 else ""
        hint = "" if acks.acks else (
            f" (none has acknowledged producer {acks.producer!r}: with a broker ACL the "
            "producer id must be your MQTT user name)")
        return f"waiting to publish seq {seq:,}{where}: {waiting}{hint}"
