"""Aggregator shell: MQTT messages in, `AggregateState` updated, totals, acks and checkpoints out.

Every message goes through `handle` (no I/O, never raises): topic and payload are checked,
the batch is applied or counted as rejected, and what to publish comes back. The rest of
this module moves bytes between the broker, `handle` and the disk.

Exactly-once totals over at-least-once delivery:
* Durable (a checkpoint file, the default of `gmv aggregate`): the session is persistent (a
  stable client id per prefix and shard), so the broker keeps QoS 1 batches for us while we
  are away, and a batch is acknowledged to the broker only after a checkpoint holding it is
  on disk. A crash loses nothing (unacknowledged batches are redelivered) and counts nothing
  twice (the checkpoint's watermarks drop the redeliveries). The broker sends at most its
  in-flight limit of unacknowledged messages, so a checkpoint is taken whenever
  `max_unacked` wait, and at least every `interval`.
* In memory (the demo, the bench, `--no-checkpoint`): a clean session with a unique client
  id; batches are acknowledged once applied, and a restart begins from zero.

Flow control: after applying (durably, when durable) a producer's batches, the shard tells
that producer on `{prefix}/acks/{shard}/{producer}` how far its sequence is applied, so a
replay keeps a bounded window ahead of what is applied and never overruns a broker queue.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from ticker.shell import checkpoint
from ticker.core.control import ControlError, Verifier
from ticker.core.dimensions import BIG_BRAND_CENTS, Window
from ticker.core.logthrottle import LogThrottle
from ticker.shell.mqtt import BrokerSettings, ConnectionStats, Topics, ack, connect, \
    reconnecting, unique_client_id
from ticker.core.partitions import Shard, partition_level, stream_name
from ticker.core.state import AggregateState
from ticker.core.wire import BatchError, Limits, OrderBatch, dead_letter, decode, \
    decode_announcement, decode_chatbot

log = logging.getLogger(__name__)

ACK_EVERY = 32  # in memory, acks go out after this many messages, and every totals interval
# The broker's replies to our publishes and subscribes (PUBACK, SUBACK) come on the connection
# the batches come on, behind whatever it has sent ahead of them: under a backlog (Mosquitto
# 2.0 sends a slow client past its in-flight limit) that is many seconds, and the client reads
# no faster than the shard applies. A timeout there ended the session, and an in-memory
# shard's backlog in the broker with it (10,000s of batches lost at 25M orders/s), so these
# waits have none; a connection that dies ends the session through the consumer instead.
REPLY_TIMEOUT = math.inf


@dataclass(frozen=True)
class Handled:
    """What `handle` made of one message."""

    outcome: str  # applied, duplicate, rejected, announcement, retired, reset, refused, ignored
    dead_letter: tuple[str, bytes] | None = None  # (topic, payload) to publish


class Aggregator:
    def __init__(self, broker: BrokerSettings, topics: Topics, limits: Limits, window: Window,
                 *, shard: Shard = Shard(), checkpoint_path: Path | None = None,
                 checkpoint_interval: float = 1.0, max_unacked: int = 16,
                 totals_interval: float = 0.05, first_time: np.ndarray | None = None,
                 control_token: str | None = None,
                 big_brand_cents: int = BIG_BRAND_CENTS) -> None:
        if checkpoint_interval <= 0:
            raise ValueError(f"checkpoint_interval={checkpoint_interval}: must be positive")
        if max_unacked <= 0:
            raise ValueError(f"max_unacked={max_unacked}: must be positive")
        self.broker, self.topics, self.window, self.shard = broker, topics, window, shard
        self.checkpoint_path = checkpoint_path
        self.checkpoint_interval = checkpoint_interval
        self.max_unacked = max_unacked
        self.totals_interval = totals_interval
        restored = checkpoint.load(checkpoint_path, limits, first_time, shard=shard,
                                   big_brand_cents=big_brand_cents) if checkpoint_path else None
        self.restored = restored is not None
        self.state = restored or AggregateState(limits, first_time, shard=shard,
                                                big_brand_cents=big_brand_cents)
        self.checkpoints = 0
        self.checkpoint_seconds = 0.0  # spent writing them, all told (metrics)
        self.last_checkpoint_duration = 0.0
        self.broker_stats = ConnectionStats()
        # An operator's `reset` (a replay starting again) must be signed with this token.
        self.verifier = Verifier(control_token) if control_token else None
        self.ready = asyncio.Event()
        self._unacked: list = []
        self._since_acks = 0  # messages applied since the last acks went out (in memory)
        self._acks_due = asyncio.Event()
        self._due_acks: dict[str, dict | None] = {}  # producer -> newest ack (None: clear it)
        self._last_checkpoint = time.monotonic()
        self._checkpoint_lock = asyncio.Lock()
        self.client_id = f"gmv-aggregator/{topics.prefix}/{shard.key}" if checkpoint_path \
            else unique_client_id("gmv-aggregator")
        self._refused = LogThrottle()

    # --- the pure part ---------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, now: float) -> Handled:
        """Check and apply one message from any topic we subscribe to. `now`: wall clock, s."""
        kind, rest = self.topics.kind(topic)
        try:
            if kind in ("orders", "chatbot"):
                return self._apply(kind, rest, payload, now)
            if kind == "producers":
                return self._note_announcement(rest, payload)
            if kind == "control" and self.verifier is not None:
                command = self.verifier.verify(payload, now)
                return Handled("reset" if command.cmd == "reset" else "ignored")
        except BatchError as exc:
            self.state.reject(exc.reason)
            log.info("rejected a message on %s: %s", topic, exc)
            return Handled("rejected", (self.topics.rejected(exc.reason),
                                        dead_letter(exc.reason, str(exc), topic, payload)))
        except ControlError as exc:
            if count := self._refused.due(now):
                log.warning("refused %d control message(s), the last: %s", count, exc)
            return Handled("refused")
        except Exception:  # a bug must not stop the shard; the message is counted and logged
            log.exception("failed to handle a message on %s", topic)
            self.state.reject("internal_error")
            return Handled("rejected")
        return Handled("ignored")

    def _apply(self, kind: str, rest: list[str], payload: bytes, now: float) -> Handled:
        partition = partition_level(rest[1]) if len(rest) == 2 else None
        if partition is None:
            raise BatchError("bad_topic", f"publish on {self.topics.prefix}/{kind}/"
                                          "{producer}/{partition}")
        limits = self.state.limits
        message = decode(payload, limits) if kind == "orders" else decode_chatbot(payload, limits)
        if message.producer != rest[0]:
            raise BatchError("producer_mismatch", f"payload producer {message.producer!r} on "
                                                  f"the topic of {rest[0]!r}")
        if isinstance(message, OrderBatch):
            applied = self.state.apply(message, now_us=int(now * 1e6), partition=partition)
        else:
            applied = self.state.apply_chatbot(message, partition)
        return Handled("applied" if applied else "duplicate")

    def _note_announcement(self, rest: list[str], payload: bytes) -> Handled:
        """A producer's `{"producer": ..., "last_seq": N}` on `producers/{producer}` (its
        partition 0) or `producers/{producer}/{partition}`: lets a lost tail show as a gap."""
        partition = 0 if len(rest) == 1 else partition_level(rest[1]) if len(rest) == 2 else None
        if partition is None or not self.state.shard.owns(partition):
            return Handled("ignored")  # another shard's stream (or no stream at all)
        stream = stream_name(rest[0], partition)
        if not payload:  # a producer cleared its announcement: it is done for good
            retired = self.state.watermarks.retire(stream)
            return Handled("retired" if retired else "ignored")
        note = decode_announcement(payload)
        if rest[0] != note.producer:
            raise BatchError("producer_mismatch", f"announcement of {note.producer!r} on "
                                                  f"{'/'.join(rest)!r}")
        # Retained: an earlier run's announcement is ignored by a state that never heard of
        # its producer, so a fresh aggregator does not report its batches as gaps.
        taken = self.state.watermarks.announce(stream, note.last_seq)
        return Handled("announcement" if taken else "ignored")

    # --- the shell -------------------------------------------------------------------------

    @property
    def durable(self) -> bool:
        return self.checkpoint_path is not None

    @property
    def last_checkpoint_at(self) -> float:
        """When (time.monotonic) the latest checkpoint was written, or this object made."""
        return self._last_checkpoint

    async def run(self) -> None:
        """Consume forever, reconnecting after any broker outage."""
        if self.durable and not self.restored:
            # Nothing to resume: end any session a previous run left, so its queued batches
            # are not mixed into a fresh total; from the empty checkpoint on, the broker
            # keeps our session, and a crash before the first real checkpoint resumes it.
            async with connect(self.broker, self.client_id, clean_session=True):
                pass
            await self._save()
            self.restored = True
        try:
            await reconnecting(self.broker, self.client_id, self._session,
                               clean_session=not self.durable, manual_ack=True,
                               stats=self.broker_stats)
        except asyncio.CancelledError:
            # A clean stop keeps everything applied so far; what was not acknowledged will be
            # redelivered and dropped as a duplicate. (After a failure nothing is written: the
            # last checkpoint stands and the broker redelivers the rest.)
            if self.checkpoint_path is not None:  # synchronously: nothing may cancel it
                checkpoint.save(self.checkpoint_path, checkpoint.export(self.state))
            raise

    async def _session(self, client) -> None:
        self._unacked = []  # the broker redelivers whatever we had not acknowledged
        # Every producer hears again where it stands: a reconnect may have lost an ack.
        self.state.watermarks.changed.update(self.state.watermarks.producers)
        name = f"aggregator-{self.shard.name}"
        # Totals and acks go out on a connection of their own: on the batches' connection
        # the broker's PUBACK waits behind the backlog it sent ahead (seconds under
        # overload), and the screen and the producers' windows would wait with it.
        async with connect(self.broker, unique_client_id("gmv-aggregator-out"),
                           max_inflight=16) as out, asyncio.TaskGroup() as tg:
            # The consumer before subscribing: a persistent session's backlog arrives ahead
            # of the SUBACKs, in a read-ahead that only the consumer drains. The first totals
            # still say where the session started (a restart's checkpoint), once subscribed.
            first = self.state.snapshot()
            tg.create_task(self._consume(client), name=f"{name}-consume")
            await self._subscribe_partitions(client)
            if self.verifier is not None:
                await client.subscribe(self.topics.control, qos=1, timeout=REPLY_TIMEOUT)
            self.ready.set()
            tg.create_task(self._publish_totals(out, first), name=f"{name}-totals")
            tg.create_task(self._send_acks(out), name=f"{name}-acks")
            tg.create_task(self._reread_announcements(client), name=f"{name}-announcements")
            if self.durable:
                tg.create_task(self._checkpoint_timer(client), name=f"{name}-checkpoints")

    async def _consume(self, client) -> None:
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            handled = self.handle(message.topic.value, payload, time.time())
            if handled.dead_letter is not None:
                await client.publish(*handled.dead_letter, qos=0)
            if handled.outcome == "reset":
                await self._reset(client)
            if not self.durable:
                ack(client, message)
                self._since_acks += 1
                if self._since_acks >= ACK_EVERY:  # a producer waiting on its window goes on
                    self._acks_due.set()
                continue
            self._unacked.append(message)
            if len(self._unacked) >= self.max_unacked or handled.outcome == "reset":
                await self.checkpoint(client)

    async def _subscribe_partitions(self, client) -> None:
        """A lone shard takes every batch, and rejects one on a partition it does not have
        (loudly, not lost). One of several takes only its partitions' batches. (Its session
        is named after its partitioning, `Shard.key`: it never holds a lone shard's `#`.)"""
        shard = self.state.shard
        levels = ["#"] if shard.count == 1 else [f"+/{p}" for p in shard.owned]
        await client.subscribe([(f"{self.topics.prefix}/{kind}/{level}", 1)
                                for kind in ("orders", "chatbot") for level in levels],
                               timeout=REPLY_TIMEOUT)
        await client.subscribe(self._announcements(), timeout=REPLY_TIMEOUT)

    def _announcements(self) -> list[tuple[str, int]]:
        return [(self.topics.producer("+"), 1), (self.topics.producer("+") + "/+", 1)]

    async def _reset(self, client) -> None:
        """An operator's signed `reset`: the totals start again from zero. Everything before
        it is checkpointed and kept as PATH.before-reset, so a reset can be undone by hand
        (stop the aggregator, move that file back)."""
        if self.checkpoint_path is not None:
            await self.checkpoint(client)
            await asyncio.to_thread(checkpoint.backup, self.checkpoint_path)
        self.state.reset()
        log.warning("shard %s: totals reset to zero by an operator's command", self.shard.name)

    async def _reread_announcements(self, client, every: float = 5.0) -> None:
        """Subscribing again makes the broker resend the retained announcements: one whose
        live copy a full queue dropped (with the tail it announces) still arrives."""
        while True:
            await asyncio.sleep(every)
            await client.subscribe(self._announcements(), timeout=REPLY_TIMEOUT)

    async def _checkpoint_timer(self, client) -> None:
        while True:
            await asyncio.sleep(self.checkpoint_interval / 4)
            due = self._unacked or self.state.watermarks.changed
            if due and time.monotonic() - self._last_checkpoint >= self.checkpoint_interval:
                await self.checkpoint(client)

    async def checkpoint(self, client) -> None:
        """Write the state to disk, then acknowledge the batches it holds to the broker and
        tell their producers how far they are applied."""
        async with self._checkpoint_lock:
            done, self._unacked = self._unacked, []
            acks = await self._save()
            for message in done:
                ack(client, message)
            self._due_acks.update(acks)
            self._acks_due.set()

    async def _save(self) -> dict[str, dict | None]:
        """Checkpoint now; the acks that this checkpoint makes true."""
        start, path = time.monotonic(), self.checkpoint_path
        assert path is not None, "only a durable aggregator checkpoints"
        data, acks = checkpoint.export(self.state), self.state.take_acks()
        await asyncio.to_thread(checkpoint.save, path, data)
        self._last_checkpoint = time.monotonic()
        self.last_checkpoint_duration = self._last_checkpoint - start
        self.checkpoint_seconds += self.last_checkpoint_duration
        self.checkpoints += 1
        return acks

    async def _send_acks(self, client) -> None:
        """Publish the acks that are due, in a task of their own: waiting for the broker's
        PUBACKs must not hold up consuming."""
        while True:
            await self._acks_due.wait()
            self._acks_due.clear()
            if not self.durable:  # in memory, applied is as good as it gets
                self._due_acks.update(self.state.take_acks())
            self._since_acks = 0
            due, self._due_acks = self._due_acks, {}
            for producer, doc in due.items():
                payload = b"" if doc is None else orjson.dumps({"v": 1, "shard": self.shard.name,
                                                                  **doc})
                await client.publish(self.topics.acks(self.shard.name, producer), payload, qos=1,
                                     retain=True, timeout=REPLY_TIMEOUT)

    async def _publish_totals(self, client, first: dict | None = None) -> None:
        """Totals every `totals_interval` on change, and every second; `first`: the snapshot
        to send first (taken when the session started)."""
        last_body, last_time, last_gaps = b"", 0.0, 0
        while True:
            if not self.durable:
                self._acks_due.set()
            snapshot, gaps = first or self.state.snapshot(), self.state.watermarks.gaps
            first = None
            if gaps > last_gaps:
                log.warning("%d batches missing from producers' sequences: the broker may have "
                            "dropped them (see max_queued_messages in docs/reliability.md)", gaps)
            last_gaps = gaps
            body = orjson.dumps(snapshot)
            now = time.monotonic()
            # On change, and every second regardless, so watchers can tell we are alive.
            if body != last_body or now - last_time > 1.0:
                totals = {"v": 1, "shard": self.shard.name, "window": self.window.as_dict(),
                          **snapshot}
                await client.publish(self.topics.totals(self.shard.name), orjson.dumps(totals),
                                     qos=1, retain=True, timeout=REPLY_TIMEOUT)
                last_body, last_time = body, now
            await asyncio.sleep(self.totals_interval)
