"""Flow control for a producer: never more than a window ahead of what the aggregators applied.

MQTT tells a publisher only that the broker took a message, not that anyone got it: a broker
drops what a subscriber's queue cannot hold (Mosquitto: 1,000 messages a client by default)
and says nothing. So a replay publishes sequence number `seq` only while fewer than `window`
of its messages are unapplied by some aggregator shard, as the shards' acknowledgements say
(`{prefix}/acks/{shard}/{producer}`, retained), and ends with a verdict: what it published
against what the shards applied for it.

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

from ticker.shell.mqtt import BrokerSettings, Topics, watch
from ticker.core.wire import MAX_TOTAL

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


def _state_in(totals: bytes) -> str | None:
    try:
        state = orjson.loads(totals).get("state")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return state if isinstance(state, str) else None


class AckWindow:
    """What the shards have applied of one producer's sequence, from their messages."""

    def __init__(self, topics: Topics, producer: str, window: int) -> None:
        if window <= 0:
            raise ValueError(f"window={window}: must be positive")
        self.topics, self.producer, self.window = topics, producer, window
        self.acks: dict[str, ShardAck] = {}
        self.alive_at: dict[str, float] = {}
        self.state_of: dict[str, str] = {}  # each running shard's state id, from its totals
        self.heard: set[str] = set()  # shards that acknowledged us since `begin`
        self.forgot: set[str] = set()  # of those, shards now running another state
        self.start_seq = 0
        self.baseline = (0, 0)  # (orders, cents) the shards held for us before this pass

    def receive(self, topic: str, payload: bytes, retained: bool, now: float) -> None:
        kind, rest = self.topics.kind(topic)
        if len(rest) == 1 and kind == "totals" and not retained:
            shard = rest[0]
            self.alive_at[shard] = now
            state = _state_in(payload)
            if state is not None:
                self.state_of[shard] = state
                self._compare(shard)
        elif kind == "acks" and rest[1:] == [self.producer]:
            ack = ShardAck.parse(payload)
            if ack is not None:
                self.acks[rest[0]] = ack
                if not retained:
                    self.alive_at[rest[0]] = now
                    self.heard.add(rest[0])
                self._compare(rest[0])

    def _compare(self, shard: str) -> None:
        """A shard's ack from another state than the one it runs: from this run, it forgot us;
        from before (a retained copy), it simply does not know us."""
        ack, state = self.acks.get(shard), self.state_of.get(shard)
        if ack is None or state is None or ack.state == state:
            return
        if shard in self.heard:
            self.forgot.add(shard)
        else:
            del self.acks[shard]

    def shards(self, now: float) -> set[str]:
        """The shards to wait for: every one running, and every one that ever acknowledged us
        (its session may hold our messages while it is away)."""
        return {s for s, at in self.alive_at.items() if now - at <= ALIVE_FOR} | set(self.acks)

    def begin(self) -> None:
        """Start a pass where the shards' record of us ends, so a producer id used before
        continues its sequence instead of having its messages dropped as duplicates."""
        self.start_seq = max((a.max_seen + 1 for a in self.acks.values()), default=0)
        self.baseline = self.applied_totals()

    def applied(self, now: float) -> int | None:
        """The lowest next_seq among the shards to wait for; None if there is none."""
        shards = self.shards(now)
        if not shards:
            return None
        return min(self.acks[s].next_seq if s in self.acks else self.start_seq for s in shards)

    def room(self, seq: int, now: float) -> bool:
        applied = self.applied(now)
        return applied is not None and seq - applied < self.window

    def applied_totals(self) -> tuple[int, int]:
        return (sum(a.orders for a in self.acks.values()),
                sum(a.gmv_cents for a in self.acks.values()))

    def resets(self) -> dict[str, int]:
        return {s: a.resets for s, a in self.acks.items()}

    def verdict(self, end_seq: int, orders: int, cents: int, now: float) -> Verdict:
        """`end_seq`: one past the last seq published; `orders`, `cents`: this pass's."""
        applied = self.applied(now)
        totals = self.applied_totals()
        return Verdict(self.producer, orders, cents, totals[0] - self.baseline[0],
                       totals[1] - self.baseline[1],
                       max(end_seq - (self.start_seq if applied is None else applied), 0),
                       len(self.shards(now)))


class FlowControl:
    """`AckWindow` fed from the broker, with waits that explain themselves."""

    def __init__(self, broker: BrokerSettings, topics: Topics, producer: str, *,
                 window: int = 200, say: Callable[[str], None] = print,
                 patience: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.broker, self.topics, self.say, self.patience = broker, topics, say, patience
        self.acks = AckWindow(topics, producer, window)
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

    async def start(self) -> int:
        """Wait for a running aggregator; the first seq of this pass."""
        await self._until(lambda: bool(self.acks.shards(self._now())), lambda: (
            f"waiting for an aggregator on {self.topics.prefix} (start `gmv aggregate --broker "
            f"{self.broker.url}`): nothing is published until one runs"))
        self.acks.begin()
        return self.acks.start_seq

    async def room(self, seq: int) -> None:
        """Wait until message `seq` may be published."""
        if not self.acks.room(seq, self._now()):
            await self._until(lambda: self.acks.room(seq, self._now()), lambda: self._stalled(seq))

    async def drain(self, end_seq: int, timeout: float) -> bool:
        """Wait until every shard has applied everything below `end_seq`; False if the shards
        went `timeout` seconds without a word."""
        return await self._until(
            lambda: (self.acks.applied(self._now()) or 0) >= end_seq,
            lambda: self._stalled(end_seq), timeout)

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

    def verdict(self, end_seq: int, orders: int, cents: int) -> Verdict:
        return self.acks.verdict(end_seq, orders, cents, self._now())

    def _stalled(self, seq: int) -> str:
        now = self._now()
        behind = {s: self.acks.acks[s].next_seq if s in self.acks.acks else self.acks.start_seq
                  for s in sorted(self.acks.shards(now))}
        if not behind:
            return (f"no aggregator on {self.topics.prefix} is running: waiting for one to "
                    "come back before publishing more")
        waiting = ", ".join(f"shard {s} has applied up to seq {n:,}" for s, n in behind.items())
        hint = "" if self.acks.acks else (
            f" (none has acknowledged producer {self.acks.producer!r}: with a broker ACL the "
            "producer id must be your MQTT user name)")
        return f"waiting to publish seq {seq:,}: {waiting}{hint}"
