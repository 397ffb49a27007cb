"""Publishing loop: the simulator's I/O shell around a pure source of minutes.

Minute m is published when the `PlaybackClock` reaches its end: an absolute schedule, so
time spent generating and publishing never accumulates as drift, and pause, speed and seek
only move the clock's anchor. Where a minute lasts long on the wall, it goes out in time
slices (`slicing.py`: about four a wall second; slice j of k when the clock reaches
m + (j + 1)/k), so the totals move several times a second; at clock position p they hold
every order before p. The minutes behind the clock after `--from`, a forward seek or a
restart are published at once, as a few bulk batches spanning many minutes (their minute
runs keep every per-minute figure exact), so the totals equal the festival's at the target
within about a second; then playing goes on from exactly the target minute. A backward
seek or a new loop (over `--from` .. the last minute) waits until the aggregators have
applied everything, asks them to reset, then catches up from the start with the sequence
continuing, so nothing is counted twice.

Publishing goes through a `ReliablePublisher`, which pipelines QoS 1 messages and re-sends
whatever a lost connection left unacknowledged, and, given a `FlowControl`, never runs more
than its window ahead of what the aggregators have applied; each pass ends with a verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import orjson

from ticker.core.control import Answer, Command, ControlError, FailureLimiter, Verifier, \
    minute_of, nonce_of, sign, sign_answer
from ticker.core.logthrottle import LogThrottle
from ticker.core.dimensions import Window
from ticker.core.errors import ConfigError
from ticker.shell.mqtt import ReliablePublisher, Topics
from ticker.core.partitions import split
from ticker.core.wire import ChatbotCount, OrderBatch, encode, encode_chatbot

from .flow import FlowControl, ShardForgot, Verdict, misfit
from .generator import PLATFORM_MIX, keep_freed_memory
from .playback import PlaybackClock
from .scenario import Scenario
from .slicing import BULK_ORDERS, Bulk, slice_bounds, slices_per_minute

log = logging.getLogger(__name__)
Message = OrderBatch | ChatbotCount
M = TypeVar("M", OrderBatch, ChatbotCount)


class Source(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def window(self) -> Window: ...

    def messages(self, minute: int) -> list[Message]:
        """The minute's batches and counts (producer and seq are filled in when published)."""

    def slices(self, minute: int, k: int) -> list[list[Message]]:
        """The same messages cut into `k` slices of the minute (slice j goes out when the
        clock reaches minute + (j + 1) / k); one slice is `messages(minute)`."""

    def misfit(self, accepts: dict[str, int]) -> str | None:
        """Why a shard that accepts `accepts` (`flow.ACCEPTS`) would refuse some of these
        messages, or None."""


@dataclass
class ScenarioSource:
    scenario: Scenario
    batch_orders: int = 10_000

    def __post_init__(self) -> None:
        keep_freed_memory()  # big minutes reuse the memory of the last (generator.py)

    @property
    def name(self) -> str:
        return self.scenario.name

    @property
    def window(self) -> Window:
        return self.scenario.window

    def messages(self, minute: int) -> list[Message]:
        return [message for part in self.slices(minute, 1) for message in part]

    def misfit(self, accepts: dict[str, int]) -> str | None:
        scenario = self.scenario
        why = misfit(accepts, {"brands": scenario.n_brands, "minutes": self.window.minutes,
                               "countries": int(scenario.catalog.country.max()) + 1,
                               "platforms": len(PLATFORM_MIX),
                               "max_batch_orders": self.batch_orders})
        limit = accepts["max_order_cents"]
        if why is None and (over := scenario.order_over(limit)):
            minute, cents = over
            why = (f"{misfit(accepts, {'max_order_cents': cents})}, and at order scale "
                   f"{scenario.order_scale:g} minute {_clock(self.window, minute)} has one: "
                   f"use --order-scale {scenario.order_scale_for(limit):g} or more")
        return why

    def slices(self, minute: int, k: int) -> list[list[Message]]:
        """The minute's orders cut into `k` slices of equal simulated time by its per-second
        shape (exact: consecutive ranges of the same orders), each in batches of at most
        `batch_orders`; the minute's chatbot count goes with the last slice."""
        orders = self.scenario.orders(minute)
        bounds = slice_bounds(self.scenario.second_orders(minute), k) if len(orders) and k > 1 \
            else [0] * k + [len(orders)]  # one slice: no need for the per-second shape
        assert bounds[-1] == len(orders), "the per-second shape must hold the minute's orders"
        out: list[list[Message]] = [[
            OrderBatch("", 0, minute, part.amount_cents, part.brand, part.country, part.platform)
            for part in (orders.slice(i, min(i + self.batch_orders, stop))
                         for i in range(start, stop, self.batch_orders))]
            for start, stop in zip(bounds[:-1], bounds[1:])]
        # Chatbot queries are their own stream, one count per 10 simulated minutes.
        last = self.window.minutes - 1
        if minute % 10 == 9 or minute == last:
            queries = int(self.scenario.minute_chatbot_queries[minute - minute % 10:minute + 1]
                          .sum())
            if queries:
                out[-1].append(ChatbotCount("", 0, minute, queries))
        return out


@dataclass
class PublishReport:
    producer: str
    gmv_cents: int = 0
    orders: int = 0
    batches: int = 0
    minutes: int = 0
    chatbot_queries: int = 0
    resets: int = 0
    seconds: float = 0.0
    verdict: Verdict | None = None  # with flow control: what the aggregators applied


class Replay:
    """Publishes a source on a playback clock and obeys control commands."""

    def __init__(self, publisher: ReliablePublisher, source: Source, topics: Topics, *,
                 producer: str, speed: float | None, from_minute: int = 0,
                 last_minute: int | None = None, loop: bool = False, binary: bool = True,
                 control_token: str | None = None, flow: FlowControl | None = None,
                 drain_timeout: float = 60.0, say: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.monotonic,
                 bulk_orders: int | None = None, partitions: int = 1) -> None:
        """`flow`: keep within its window of what the aggregators applied, and give each pass
        a verdict, waiting at most `drain_timeout` s of silence for the last acks.
        `loop`: play `from_minute` .. `last_minute` again and again. `bulk_orders`: orders in
        one bulk batch when catching up (default `slicing.BULK_ORDERS` of the encoding).
        `partitions`: brand partitions to split batches into, without `flow` (with it, as
        many as the flow control settles on)."""
        self.publisher, self.source, self.topics = publisher, source, topics
        self.producer, self.binary, self.loop = producer, binary, loop
        self.control_token, self.flow, self.drain_timeout = control_token, flow, drain_timeout
        self.say = say
        self.last = source.window.minutes - 1 if last_minute is None else last_minute
        self._now = clock
        self.clock = PlaybackClock(clock(), speed=speed, minute=from_minute)
        self.report = PublishReport(producer)
        self.next_minute = 0
        # Per brand partition, the next message's sequence number (chatbot counts go with 0).
        self.seqs = [0] * partitions
        self._restart_to: int | None = None  # a seek back, for the publishing loop to do
        self.first_minute = from_minute  # where a loop starts again
        self.bulk_orders = bulk_orders or BULK_ORDERS["binary" if binary else "json"]
        self._catch_up_to = from_minute  # minutes before this go out at once, in bulk
        self._plan: list[list[Message]] | None = None  # the slices of next_minute, if begun
        self._slice = 0  # the next slice of the plan to publish
        self._changed = asyncio.Event()
        self._state = "playing"
        # True while a seek, --from or a restart catches up: from the command (or the start)
        # until the last minute behind the clock is published. "seeking" on screens.
        self.catching_up = from_minute > 0
        self.run_id = secrets.token_hex(4)  # tells this run's status from an earlier one's
        self._status_sent: tuple[object, ...] = ()
        self._status_at = -1e9
        self._verifier = Verifier(control_token) if control_token else None
        self._refusals = FailureLimiter(burst=5, refill=1.0)  # answers to bad commands
        self._refusal_log = LogThrottle()

    async def run(self, progress: Callable[[PublishReport], None] | None = None) \
            -> PublishReport:
        if self.flow is not None:
            self.seqs = list(await self.flow.start())
            for shard, accepts in sorted(self.flow.accepts().items()):
                if why := self.source.misfit(accepts):
                    raise ConfigError(f"shard {shard} would refuse this replay's batches: "
                                      f"{why}")
        start = self._now()
        # Earlier versions retained their status, which then showed on later screens.
        await self.publisher.send(self.topics.replay, b"", retain=True)
        await self._status()
        try:
            await self._play(progress)
        except ShardForgot as exc:
            self.say(str(exc))
            assert self.flow is not None
            self.report.verdict = self.flow.verdict(self.seqs, self.report.orders,
                                                    self.report.gmv_cents)
        if self.report.verdict is not None and self.report.verdict.exact:
            # Done for good, and all applied: clearing the announcements lets the shards forget
            # this producer, so finished runs leave no state and no retained messages behind.
            for partition in range(len(self.seqs)):
                await self.publisher.send(self.topics.producer(self.producer, partition), b"",
                                          retain=True)
            await self.publisher.flush()
        self._state = "done"
        await self._status()
        await self.publisher.flush()  # the last status must go out before the process ends
        self.report.seconds = self._now() - start
        return self.report

    async def linger(self) -> None:
        """After `run`, for as long as the process holds the final total (the demo): keep
        saying "done", since screens drop a status that is not repeated."""
        while True:
            await self._status()
            await asyncio.sleep(STATUS_EVERY)

    async def _play(self, progress: Callable[[PublishReport], None] | None) -> None:
        self.clock.start(self._now())  # the schedule starts now, not while waiting to start
        while True:
            if self._restart_to is not None:
                target, self._restart_to = self._restart_to, None
                await self._restart(target)
            if self.next_minute > self.last:
                if not self.loop:
                    break
                await self._restart(self.first_minute)  # loop over the chosen range
                continue
            if self.next_minute < min(self._catch_up_to, self.last + 1):
                await self._catch_up(progress)
                continue
            if self.catching_up:  # a restart to where it already is: nothing to catch up
                self.catching_up = False
                await self._status()
            if self._plan is None:  # the minute's slices, at the speed it starts at
                self._plan = self.source.slices(self.next_minute,
                                                slices_per_minute(self.clock.speed))
                self._slice = 0
            # A slice goes out when the clock reaches its end: at position p the totals hold
            # every order before p, as after a catch-up to p.
            due = self.next_minute + (self._slice + 1) / len(self._plan)
            wait = self.clock.due(due, self._now())
            if wait > 0:
                await self._wait(wait)
                continue
            await self._send_all(self._plan[self._slice])
            self._slice += 1
            if self._slice == len(self._plan):
                self._plan = None
                self._minute_done(progress)
        await self._end_pass()

    def _minute_done(self, progress: Callable[[PublishReport], None] | None) -> None:
        self.next_minute += 1
        self.report.minutes += 1
        if progress is not None:
            progress(self.report)

    async def _catch_up(self, progress: Callable[[PublishReport], None] | None) -> None:
        """Publish the minutes before `_catch_up_to` (and the rest of a minute a seek cut
        short) at once, as bulk batches, generating the next minutes in a thread while the
        last go out; then anchor the clock at the target, so playing goes on from exactly
        there. A seek back stops it (the loop restarts); a seek forward moves its end."""
        self.catching_up = True
        await self._status()
        bulk = Bulk(self.bulk_orders)
        if self._plan is not None:
            rest = [message for part in self._plan[self._slice:] for message in part]
            self._plan = None
            await self._send_all(bulk.add(rest))
            self._minute_done(progress)

        def end() -> int:
            return min(self._catch_up_to, self.last + 1)

        def generate(first: int) -> asyncio.Future[list[list[Message]]] | None:
            if first >= end() or self._restart_to is not None:
                return None
            minutes = range(first, min(end(), first + CATCH_UP_CHUNK))
            return asyncio.ensure_future(asyncio.to_thread(
                lambda: [self.source.messages(m) for m in minutes]))

        ahead = generate(self.next_minute)
        try:
            while ahead is not None:
                minutes = await ahead
                ahead = generate(self.next_minute + len(minutes))
                for messages in minutes:
                    if self.next_minute >= end():  # a seek forward to an earlier target
                        break
                    await self._send_all(bulk.add(messages))
                    self._minute_done(progress)
        finally:
            if ahead is not None:
                ahead.cancel()
        await self._send_all(bulk.flush())
        self.catching_up = self._restart_to is not None  # a seek back goes on seeking
        if self._restart_to is None and self.clock.speed is not None:
            self.clock.seek(self.next_minute, self._now())
        await self._status()

    async def _end_pass(self) -> None:
        """Announce where the sequence ended; with flow control, wait for the aggregators to
        apply it all and judge the pass."""
        await self._announce()
        await self.publisher.flush()
        if self.flow is None:
            return
        await self.flow.drain(self.seqs, self.drain_timeout)
        self.report.verdict = self.flow.verdict(self.seqs, self.report.orders,
                                                self.report.gmv_cents)

    async def _wait(self, seconds: float) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(seconds, STATUS_EVERY)):  # not wait_for: flow.py
                await self._changed.wait()
        await self._status()

    async def _send_all(self, messages: list[Message]) -> None:
        for message in messages:
            if isinstance(message, ChatbotCount):
                count = await self._numbered(message, 0)
                await self.publisher.send(self.topics.chatbot(self.producer),
                                          encode_chatbot(count))
                self.report.chatbot_queries += count.queries
                continue
            for partition, part in split(message, len(self.seqs)):
                batch = await self._numbered(part, partition)
                await self.publisher.send(self.topics.orders(self.producer, partition),
                                          encode(batch, binary=self.binary))
                self.report.gmv_cents += batch.gmv_cents
                self.report.orders += len(batch)
                self.report.batches += 1

    async def _numbered(self, message: M, partition: int) -> M:
        """The message with our producer id and the next seq of its partition's stream, once
        the flow control has room for it."""
        seq = self.seqs[partition]
        if self.flow is not None:
            await self.flow.room(seq, partition)
        self.seqs[partition] = seq + 1
        return dataclasses.replace(message, producer=self.producer, seq=seq)

    async def _announce(self) -> None:
        """Say how far we got, so a consumer can tell a lost tail from the end of the stream.
        Retained: if the broker dropped the tail for a full queue, a later (re)subscription
        still gets this and reports the missing batches as gaps."""
        for partition, seq in enumerate(self.seqs):
            note = {"v": 1, "producer": self.producer, "partition": partition,
                    "last_seq": seq - 1, "batches": self.report.batches,
                    "orders": self.report.orders, "gmv_cents": self.report.gmv_cents}
            await self.publisher.send(self.topics.producer(self.producer, partition),
                                      orjson.dumps(note), retain=True)

    async def _restart(self, target: int) -> None:
        """Reset the aggregators, then catch up from the start to `target` in bulk."""
        self.catching_up = True
        await self._end_pass()
        if self.report.verdict is not None:
            self.say(f"pass {self.report.resets + 1} {self.report.verdict.line()}")

        async def send_reset() -> None:
            assert self.control_token is not None
            await self.publisher.send(self.topics.control,
                                      sign(Command("reset"), self.control_token, now=time.time()))
            await self.publisher.flush()

        if self.flow is not None:
            await self.flow.reset(send_reset)
        else:
            await send_reset()
        self.next_minute, self._plan, self._catch_up_to = 0, None, target
        self.report = PublishReport(self.producer, resets=self.report.resets + 1)
        self.clock.seek(target, self._now())

    def _seek_forward(self, target: int, now: float) -> None:
        """A seek to `target`, at or after the minute being published: the minutes before it
        (and the rest of the current one) go out at once, in bulk, then play goes on."""
        self.clock.seek(target, now)
        self._catch_up_to = target
        self.catching_up = target > self.next_minute

    async def obey(self, payload: bytes) -> Answer | None:
        """Check a message from the control topic, apply it if it is authentic, and answer
        it on the answers topic (refusals of commands that do not verify about once a second
        at most).
        Our own resets, meant for the aggregators, get no answer."""
        nonce = nonce_of(payload)
        if self._verifier is None or nonce is None:
            return None
        answered = self._verifier.obeyed(nonce)  # then verify refuses it, as replayed or bad
        signed = False
        try:
            command = self._verifier.verify(payload, time.time())
            signed = True
            if command.cmd == "reset":
                return None
            answer = Answer(nonce, command.cmd, True, await self.control(command), self.producer)
        except ControlError as exc:
            now = self._now()
            if count := self._refusal_log.due(now):
                self.say(f"control refused ({count} since the last report), the latest: {exc}")
            # A copy of a command obeyed, or junk under its nonce (anyone who reads the
            # control topic can send either): its answer went out; a signed refusal under
            # that nonce would contradict it.
            if answered:
                return None
            # A flood of bad commands: answer one a second. Not a signed command that cannot
            # be carried out (a seek outside the window): only token holders send those.
            if not signed:
                if self._refusals.retry_in(now):
                    return None
                self._refusals.failed(now)
            answer = Answer(nonce, _cmd_of(payload), False, str(exc), self.producer)
        await self.publisher.send(self.topics.answers, sign_answer(answer, self._verifier.key))
        return answer

    async def control(self, command: Command) -> str:
        """Apply an authorised command (the caller has checked the token); say what it did,
        or raise ControlError saying why not."""
        now = self._now()
        window = self.source.window
        if command.cmd == "pause":
            self.clock.pause(now)
            self._state = "paused"
            done = f"paused at {_clock(window, self.next_minute)}"
        elif command.cmd == "resume":
            done = "resumed" if self._state == "paused" else "already playing"
            self.clock.resume(now)
            self._state = "playing"
        elif command.cmd == "speed":
            if self.clock.speed is None:  # at max the clock runs ahead: continue from here
                self.clock.seek(self.next_minute, now)
            self.clock.set_speed(command.speed, now)
            done = "speed max" if command.speed is None else f"speed {command.speed:g}x"
        elif command.cmd == "seek":
            target = minute_of(command.to or "", window)
            if target < self.next_minute:
                if self.control_token is None:
                    raise ControlError("seeking back needs a control token to reset totals")
                self._restart_to = target  # done by the publishing loop, between minutes
            else:
                self._seek_forward(target, now)
            done = f"seeking {_clock(window, target)}"
        else:
            raise ControlError(f"{command.cmd} is not a replay command")
        self._changed.set()
        await self._status()
        return done

    async def _status(self) -> None:
        """The replay's status for the screens: on a change, else once every STATUS_EVERY
        seconds, in every state. Not retained: screens drop a status that stops coming, so
        a finished or killed run never shows on a later one."""
        now = self._now()
        state = "seeking" if self.catching_up and self._state == "playing" else self._state
        key = (state, self.clock.speed, self.loop, self.source.name)
        if key == self._status_sent and now - self._status_at < STATUS_EVERY:
            return
        self._status_sent, self._status_at = key, now
        await self.publisher.send(self.topics.replay, orjson.dumps(
            {"v": 1, "state": state, "speed": self.clock.speed, "minute": self.next_minute,
             "scenario": self.source.name, "loop": self.loop, "from": self.first_minute,
             "to": self.last, "run": self.run_id}))


STATUS_EVERY = 1.0  # seconds between repeats of an unchanged status
CATCH_UP_CHUNK = 360  # minutes generated at a time while catching up (~60 ms at 2020's)


def _clock(window: Window, minute: int) -> str:
    return window.time_of(min(minute, window.minutes - 1)).strftime("%m-%d %H:%M")


def _cmd_of(payload: bytes) -> str:
    """The `cmd` a refused command asked for, for its answer ("?" if it has none)."""
    with contextlib.suppress(orjson.JSONDecodeError):
        doc = orjson.loads(payload)
        if isinstance(doc, dict) and isinstance(doc.get("cmd"), str):
            return doc["cmd"][:16]
    return "?"


async def publish_scenario(publisher: ReliablePublisher, scenario: Scenario, topics: Topics,
                           *, producer: str, speed: float | None, batch_orders: int = 10_000,
                           binary: bool = True, from_minute: int = 0,
                           last_minute: int | None = None, flow: FlowControl | None = None,
                           progress: Callable[[PublishReport], None] | None = None,
                           ) -> PublishReport:
    """Publish `scenario` once, from its start, at `speed` (None: as fast as possible)."""
    replay = Replay(publisher, ScenarioSource(scenario, batch_orders), topics,
                    producer=producer, speed=speed, from_minute=from_minute,
                    last_minute=last_minute, binary=binary, flow=flow)
    return await replay.run(progress)
