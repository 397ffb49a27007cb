"""Aggregator shell: MQTT messages in, `AggregateState` updated, totals and checkpoints out.

Exactly-once totals over at-least-once delivery:
* The session is persistent (clean session off, a stable client id per prefix and shard), so
  the broker keeps QoS 1 batches for us while we are disconnected or down.
* With a checkpoint file, a batch is acknowledged to the broker only after a checkpoint that
  contains it is on disk. A crash therefore loses nothing (unacknowledged batches are
  redelivered) and counts nothing twice (the checkpoint's watermarks drop redeliveries).
  The broker holds at most its in-flight limit of unacknowledged messages per client, so a
  checkpoint is taken whenever `max_unacked` are waiting, and at least every `interval`.
* Without a checkpoint file the state lives in memory only: batches are acknowledged as soon
  as they are applied, and a restart begins from zero with a fresh session.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import numpy as np
import orjson

from . import checkpoint
from .control import ControlError, decode_command
from .dimensions import Window
from .mqtt import BrokerSettings, Topics, ack, connect, reconnecting
from .state import AggregateState
from .wire import BatchError, Limits, decode, decode_chatbot

log = logging.getLogger(__name__)


class Aggregator:
    def __init__(self, broker: BrokerSettings, topics: Topics, limits: Limits, window: Window,
                 *, shard: str = "0", checkpoint_path: Path | None = None,
                 checkpoint_interval: float = 1.0, max_unacked: int = 16,
                 totals_interval: float = 0.05, first_time: np.ndarray | None = None,
                 control_token: str | None = None) -> None:
        if checkpoint_interval <= 0:
            raise ValueError(f"checkpoint_interval={checkpoint_interval}: must be positive")
        if max_unacked <= 0:
            raise ValueError(f"max_unacked={max_unacked}: must be positive")
        self.broker, self.topics, self.window, self.shard = broker, topics, window, shard
        self.checkpoint_path = checkpoint_path
        self.checkpoint_interval = checkpoint_interval
        self.max_unacked = max_unacked
        self.totals_interval = totals_interval
        restored = checkpoint.load(checkpoint_path, limits, first_time) \
            if checkpoint_path else None
        self.restored = restored is not None
        self.state = restored or AggregateState(limits, first_time)
        self.checkpoints = 0
        self.control_token = control_token  # a replay may reset the totals with this token
        self.resets = 0
        self.ready = asyncio.Event()
        self._unacked: list = []
        self._last_checkpoint = time.monotonic()
        self._checkpoint_lock = asyncio.Lock()
        self.client_id = f"gmv-aggregator/{topics.prefix}/{shard}"

    async def run(self) -> None:
        """Consume forever, reconnecting after any broker outage."""
        if not self.restored:
            # Nothing to resume: end any session a previous run left, so its queued batches
            # are not mixed into a fresh total.
            async with connect(self.broker, self.client_id, clean_session=True):
                pass
            if self.checkpoint_path is not None:
                # From here on the broker keeps our session: a crash before the first real
                # checkpoint must resume it, not end it again and drop what it holds.
                checkpoint.save(self.checkpoint_path, checkpoint.export(self.state))
                self.restored = True
        try:
            await reconnecting(self.broker, self.client_id, self._session,
                               clean_session=False, manual_ack=True)
        finally:
            # A clean stop keeps everything applied so far; what was not acknowledged will be
            # redelivered and then dropped as a duplicate.
            if self.checkpoint_path is not None:
                checkpoint.save(self.checkpoint_path, checkpoint.export(self.state))

    async def _session(self, client) -> None:
        self._unacked = []  # the broker redelivers whatever we had not acknowledged
        await client.subscribe(self.topics.all_orders, qos=1)
        await client.subscribe(self.topics.all_producers, qos=1)
        await client.subscribe(self.topics.all_chatbot, qos=1)
        if self.control_token is not None:
            await client.subscribe(self.topics.control, qos=1)
        self.ready.set()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._consume(client), name=f"aggregator-{self.shard}-consume")
            tg.create_task(self._publish_totals(client), name=f"aggregator-{self.shard}-totals")
            tg.create_task(self._reread_announcements(client),
                           name=f"aggregator-{self.shard}-announcements")
            if self.checkpoint_path is not None:
                tg.create_task(self._checkpoint_timer(client),
                               name=f"aggregator-{self.shard}-checkpoints")

    async def _consume(self, client) -> None:
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            if message.topic.matches(self.topics.all_producers):
                self._note_announcement(payload)
                ack(client, message)
                continue
            if message.topic.matches(self.topics.control):
                await self._obey(payload, client)
                ack(client, message)
                continue
            try:
                if message.topic.matches(self.topics.all_chatbot):
                    self.state.apply_chatbot(decode_chatbot(payload, self.state.limits))
                else:
                    self.state.apply(decode(payload, self.state.limits),
                                     now_us=time.time_ns() // 1000)
            except BatchError as exc:
                self.state.reject(exc.reason)
                log.info("rejected batch on %s: %s", message.topic, exc)
                await client.publish(self.topics.rejected(exc.reason), payload, qos=0)
            if self.checkpoint_path is None:
                ack(client, message)
                continue
            self._unacked.append(message)
            if len(self._unacked) >= self.max_unacked:
                await self.checkpoint(client)

    async def _obey(self, payload: bytes, client) -> None:
        """A replay going back to its start asks for `reset`: totals start again from zero."""
        try:
            command = decode_command(payload, self.control_token)
        except ControlError as exc:
            log.warning("ignoring a control message: %s", exc)
            return
        if command.cmd == "reset":
            self.state = AggregateState(self.state.limits, self.state.first_time)
            self.resets += 1
            await self.checkpoint(client)

    async def _reread_announcements(self, client, every: float = 5.0) -> None:
        """Subscribing again makes the broker resend the retained announcements: one whose
        live copy a full queue dropped (with the tail it announces) still arrives."""
        while True:
            await asyncio.sleep(every)
            await client.subscribe(self.topics.all_producers, qos=1)

    def _note_announcement(self, payload: bytes) -> None:
        """A producer's `{"producer": ..., "last_seq": N}`: lets a lost tail show as a gap."""
        try:
            note = orjson.loads(payload)
            producer, last_seq = note["producer"], note["last_seq"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("ignoring a malformed producer announcement: %r", payload[:200])
            return
        # Announcements are retained: ignore those of producers this state never heard from
        # (an earlier run's), so a fresh aggregator does not report their batches as gaps.
        marks = self.state.watermarks
        if isinstance(producer, str) and type(last_seq) is int and last_seq >= 0 \
                and marks.knows(producer):
            marks.announce(producer, last_seq)
        chatbot_last = note.get("chatbot_last_seq")
        if isinstance(producer, str) and type(chatbot_last) is int and chatbot_last >= 0 \
                and marks.knows(f"{producer}#chatbot"):
            marks.announce(f"{producer}#chatbot", chatbot_last)

    async def _checkpoint_timer(self, client) -> None:
        while True:
            await asyncio.sleep(self.checkpoint_interval / 4)
            if self._unacked and \
                    time.monotonic() - self._last_checkpoint >= self.checkpoint_interval:
                await self.checkpoint(client)

    async def checkpoint(self, client=None) -> None:
        """Write the state to disk, then acknowledge the batches it contains."""
        if self.checkpoint_path is None:
            return
        async with self._checkpoint_lock:
            data, done = checkpoint.export(self.state), self._unacked
            self._unacked = []
            await asyncio.to_thread(checkpoint.save, self.checkpoint_path, data)
            self._last_checkpoint = time.monotonic()
            self.checkpoints += 1
            if client is not None:
                for message in done:
                    ack(client, message)

    async def _publish_totals(self, client) -> None:
        last_body, last_time, last_gaps = b"", 0.0, 0
        while True:
            snapshot = self.state.snapshot()
            if snapshot["gaps"] > last_gaps:
                log.warning("%d batches missing from producers' sequences: the broker may have "
                            "dropped them (see max_queued_messages in docs/reliability.md)",
                            snapshot["gaps"])
            last_gaps = snapshot["gaps"]
            body = orjson.dumps(snapshot)
            now = time.monotonic()
            # On change, and every 2 s regardless, so watchers can tell we are alive.
            if body != last_body or now - last_time > 2.0:
                totals = {"v": 1, "shard": self.shard, "window": self.window.as_dict(),
                          **snapshot}
                await client.publish(self.topics.totals(self.shard), orjson.dumps(totals),
                                     qos=1, retain=True)
                last_body, last_time = body, now
            await asyncio.sleep(self.totals_interval)
