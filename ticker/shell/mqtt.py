"""MQTT adapter: the only module that imports the MQTT client (aiomqtt).

Broker settings and topics, connecting (TLS, login, persistent sessions, manual acks),
reconnecting with backoff, a publisher that re-sends what the broker has not acknowledged,
and the totals watcher the ticker server uses. The aggregator's loop is in aggregator.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiomqtt
import aiomqtt.client

from ticker.core.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and how to log in. `mqtts://` means TLS (port 8883 by default)."""

    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    ca_file: str | None = None  # None: the system's trusted CAs
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> BrokerSettings:
        """Parse `mqtt://HOST:PORT` or `mqtts://HOST:PORT` (ports 1883 / 8883 by default)."""
        parts = urlsplit(url)
        if parts.username or parts.password:
            raise ConfigError("--broker: put no user or password in the URL (it shows in ps); "
                              "use --username and --password-file")
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname \
                or parts.path not in ("", "/"):
            raise ConfigError(f"--broker={url}: expected mqtt://HOST:PORT or mqtts://HOST:PORT")
        try:
            port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        except ValueError:
            raise ConfigError(f"--broker={url}: the port must be a number 1-65535") from None
        return cls(parts.hostname, port, tls=parts.scheme == "mqtts", **options)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class Topics:
    """Versioned topics under one prefix (see docs/wire-format.md). A producer's messages
    travel on topics that name it, so a broker ACL (`pattern write .../%u/#`) can tie the
    name to its login; the aggregator checks that the payload says the same."""

    prefix: str = "gmv/v1"

    def orders(self, producer: str, partition: int = 0) -> str:
        return f"{self.prefix}/orders/{producer}/{partition}"

    def chatbot(self, producer: str, partition: int = 0) -> str:
        return f"{self.prefix}/chatbot/{producer}/{partition}"

    def producer(self, producer: str, partition: int = 0) -> str:
        """The producer's retained announcement of how far its stream on `partition` got."""
        return f"{self.prefix}/producers/{producer}" + (f"/{partition}" if partition else "")

    def acks(self, shard: str, producer: str) -> str:
        """A shard's retained word to one producer: how far its sequence is applied."""
        return f"{self.prefix}/acks/{shard}/{producer}"

    def acks_for(self, producer: str) -> str:
        """Every shard's acks of every stream of the producer (`#` matches its parent level:
        partition 0's `acks/{shard}/{producer}` as well as `acks/{shard}/{producer}/{p}`)."""
        return f"{self.prefix}/acks/+/{producer}/#"

    def totals(self, shard: str) -> str:
        return f"{self.prefix}/totals/{shard}"

    @property
    def all_totals(self) -> str:
        return f"{self.prefix}/totals/+"

    def rejected(self, reason: str) -> str:
        return f"{self.prefix}/rejected/{reason}"

    @property
    def control(self) -> str:
        return f"{self.prefix}/control"

    @property
    def replay(self) -> str:
        return f"{self.prefix}/replay"

    @property
    def answers(self) -> str:
        """Replays' answers to control commands (see ticker/core/control.py)."""
        return f"{self.prefix}/answers"

    def kind(self, topic: str) -> tuple[str, list[str]]:
        """("orders" | "chatbot" | "producers" | "acks" | "totals" | "control" | "replay" |
        "answers" | "rejected" | "", the levels after it) for a topic under this prefix."""
        if not topic.startswith(self.prefix + "/"):
            return "", []
        kind, *rest = topic[len(self.prefix) + 1:].split("/")
        return kind, rest


READ_AHEAD_MESSAGES = 32  # received messages a client holds before it stops reading
READ_AHEAD_BYTES = 64 * 2**20  # or their payloads' bytes, whichever comes first


class _Client(aiomqtt.Client):
    """aiomqtt's client with three changes, all below its public API:

    * Bounded read-ahead. aiomqtt reads its socket whenever it is readable and queues every
      message without limit, so under a backlog a slow consumer's queue (and RSS) grows as
      long as the broker sends, and Mosquitto 2.0 sends a client that acknowledges slowly
      past its in-flight limit. Here the client stops reading its socket (the loop's reader
      is removed) while its queue holds `read_ahead` messages or `read_ahead_bytes` of
      payload, and reads again once the consumer has taken half of them: the kernel's socket
      buffer fills, TCP stops the broker, and the backlog stays in the broker's queue.
      Nothing is dropped and acknowledgements are untouched (writing goes on while reading
      is paused).
    * A cheaper receive path: `messages` takes a queued message without a task and an
      `asyncio.wait` each, and a PUBACK queued on the loop's thread is written at the end of
      the loop iteration, once for all the acks queued in it, instead of waking the loop
      through its self-pipe and registering a writer for each.
    * Timeouts made with `asyncio.timeout` instead of `asyncio.wait_for`: on Python 3.11
      wait_for can swallow a cancellation that lands as the awaited PUBACK does
      (cpython#86296), and a stopped aggregator's task then went on publishing for ever.
    """

    def __init__(self, *args: Any, read_ahead: int = READ_AHEAD_MESSAGES,
                 read_ahead_bytes: int = READ_AHEAD_BYTES, **kwargs: Any) -> None:
        if type(read_ahead) is not int or read_ahead <= 0:
            raise ValueError(f"read_ahead={read_ahead!r}: must be a positive integer")
        if type(read_ahead_bytes) is not int or read_ahead_bytes <= 0:
            raise ValueError(f"read_ahead_bytes={read_ahead_bytes!r}: must be a positive "
                             "integer")
        super().__init__(*args, **kwargs)
        self.read_ahead, self.read_ahead_bytes = read_ahead, read_ahead_bytes
        self._queue = self._read_queue = _ReadAheadQueue(self)
        self._fd = -1  # the socket's, while connected
        self._reading = False  # our reader is registered with the loop
        self._flush_due = False
        self.read_pauses = 0  # times reading stopped because the queue was full (metrics)
        self.max_queued = 0  # the most messages the queue ever held

    async def _wait_for(self, fut: Awaitable[T], timeout: float | None) -> T:
        timeout = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(None if timeout == math.inf else timeout):
                return await fut
        except TimeoutError:
            raise aiomqtt.MqttError("Operation timed out") from None

    @property
    def messages(self) -> _Messages:  # type: ignore[override]
        return _Messages(self)

    @property
    def reading_paused(self) -> bool:
        """True while the queue is full and the socket is left unread."""
        return self._fd >= 0 and not self._reading

    # -- reading: paho's packet parser, driven by the loop, paused while the queue is full --

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        # paho calls this from the executor thread that runs connect().
        def start() -> None:
            self._fd = sock.fileno()
            self._resume_reading()
            self._misc_task = self._loop.create_task(self._misc_loop())

        self._loop.call_soon_threadsafe(start)

    def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        self._fd, self._reading = -1, False
        super()._on_socket_close(client, userdata, sock)

    def _queue_full(self) -> bool:
        queue = self._read_queue
        return queue.qsize() >= self.read_ahead or queue.nbytes >= self.read_ahead_bytes

    def _pause_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
            self.read_pauses += 1

    def _resume_reading(self) -> None:
        if self._reading or self._fd < 0 or self._queue_full():
            return
        self._loop.add_reader(self._fd, self._read_ready)
        self._reading = True
        sock = self._client._sock
        if sock is not None and getattr(sock, "pending", lambda: 0)() > 0:
            self._loop.call_soon(self._read_ready)  # TLS bytes already decrypted: no wake-up

    def _read_ready(self) -> None:
        """Handle what has arrived, as aiomqtt does: one packet per wake-up (TLS: until no
        decrypted bytes remain), unless the queue fills."""
        paho = self._client
        try:
            while self._reading and paho._sock is not None:
                paho.loop_read()
                pending = getattr(paho._sock, "pending", None)
                if pending is None or pending() <= 0:
                    return
        except Exception as exc:  # a broken connection: report it as aiomqtt does
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)

    # -- writing: once per loop iteration for whatever was queued in it ---------------------

    def _on_socket_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        if asyncio._get_running_loop() is not self._loop:  # connect() in its executor thread
            super()._on_socket_register_write(client, userdata, sock)
        elif not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        paho = self._client
        if paho._sock is None:
            self._flush_due = False
            return
        paho._registered_write = False  # so that a short write registers a writer again
        try:
            paho.loop_write()  # (a registration it makes is answered below, not scheduled)
        except Exception as exc:
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)
            return
        finally:
            self._flush_due = False
        # The socket took only part: wait until it is writable (unless the write found the
        # connection gone: paho has closed the socket, and the session ends by its reader).
        if paho._sock is not None and paho.want_write():
            super()._on_socket_register_write(paho, None, paho._sock)


class _ReadAheadQueue(asyncio.Queue[aiomqtt.Message]):
    """The client's queue of received messages: counts their payload bytes and tells the
    client when to stop and start reading (at `read_ahead`, and at half of it)."""

    def __init__(self, client: _Client) -> None:
        super().__init__()
        self._client = client
        self.nbytes = 0

    def put_nowait(self, item: aiomqtt.Message) -> None:
        super().put_nowait(item)
        self.nbytes += _size(item)
        client = self._client
        client.max_queued = max(client.max_queued, self.qsize())
        if client._queue_full():
            client._pause_reading()

    def get_nowait(self) -> aiomqtt.Message:
        item = super().get_nowait()
        self.nbytes -= _size(item)
        client = self._client
        if not client._reading and self.qsize() <= client.read_ahead // 2 \
                and self.nbytes <= client.read_ahead_bytes // 2:
            client._resume_reading()
        return item


def _size(message: aiomqtt.Message) -> int:
    payload = message.payload
    return len(payload) if isinstance(payload, (bytes, bytearray)) else 0


class _Messages:
    """`client.messages`: as aiomqtt's, without a task and an `asyncio.wait` per message
    when one is queued already. The first message of an iteration is awaited as aiomqtt
    does, so that the tasks started beside the consumer have their first turn before it
    (the aggregator's first totals are its checkpoint's, as before)."""

    def __init__(self, client: _Client) -> None:
        self._client = client
        self._started = False

    def __aiter__(self) -> _Messages:
        return self

    async def __anext__(self) -> aiomqtt.Message:
        client = self._client
        if client._flush_due:  # the acks of the messages taken so far go out now, not once
            client._flush()  # the queue is empty: the broker's window moves on meanwhile
        queue = client._read_queue
        if self._started and not queue.empty():
            return queue.get_nowait()
        self._started = True
        return await aiomqtt.client.MessagesIterator(self._client).__anext__()

    def __len__(self) -> int:
        return self._client._queue.qsize()


@asynccontextmanager
async def connect(broker: BrokerSettings, identifier: str | None = None, *,
                  clean_session: bool = True, manual_ack: bool = False,
                  max_inflight: int = 64, read_ahead: int = READ_AHEAD_MESSAGES,
                  read_ahead_bytes: int = READ_AHEAD_BYTES) -> AsyncIterator[aiomqtt.Client]:
    """A connected client; raises ConnectionError naming the broker if it cannot connect.
    It holds at most `read_ahead` received messages (or `read_ahead_bytes` of payload) that
    the consumer has not taken; past that the broker keeps them (see `_Client`)."""
    tls = aiomqtt.TLSParameters(ca_certs=broker.ca_file) if broker.tls else None
    client = _Client(broker.host, broker.port, identifier=identifier,
                     clean_session=clean_session, username=broker.username,
                     password=broker.password, tls_params=tls,
                     max_inflight_messages=max_inflight, timeout=10,
                     read_ahead=read_ahead, read_ahead_bytes=read_ahead_bytes)
    client.pending_calls_threshold = max_inflight * 2  # pipelining is deliberate, not a leak
    if manual_ack:
        # aiomqtt does not expose paho's manual acknowledgement; its paho client does.
        client._client.manual_ack_set(True)
    _fail_fast_before_connack(client)
    try:
        await client.__aenter__()
    except aiomqtt.MqttError as exc:
        raise ConnectionError(f"cannot connect to the MQTT broker at {broker.url}: {exc}") from None
    try:
        yield client
    finally:
        await client.__aexit__(None, None, None)


def _fail_fast_before_connack(client: aiomqtt.Client) -> None:
    """aiomqtt ignores a disconnect before CONNACK and waits out its timeout (10 s, e.g. on
    mqtt:// to a TLS port); fail the connection attempt at once instead."""
    paho, original = client._client, client._client.on_disconnect

    def on_disconnect(*args: Any) -> None:  # paho's callback, of any of its signatures
        if not client._connected.done():
            client._connected.set_exception(aiomqtt.MqttError(
                "the broker closed the connection before accepting it "
                "(a TLS port needs mqtts://)"))
        if original is not None:
            original(*args)
    paho.on_disconnect = on_disconnect


def ack(client: aiomqtt.Client, message: aiomqtt.Message) -> None:
    """Acknowledge a message received with `manual_ack=True` (PUBACK for QoS 1)."""
    if message.qos > 0:
        client._client.ack(message.mid, message.qos)


def unique_client_id(role: str) -> str:
    """For clean sessions: unique per run, so two processes never take over each other."""
    return f"{role}-{uuid.uuid4().hex[:8]}"


@dataclass
class ConnectionStats:
    """How the connection of one `reconnecting` loop fares, for metrics."""

    connects: int = 0  # connections made: the first, then one after each loss
    failures: int = 0  # connections lost, or attempts that failed
    connected: bool = False


async def reconnecting(broker: BrokerSettings, identifier: str,
                       session: Callable[[aiomqtt.Client], Coroutine[Any, Any, None]], *,
                       clean_session: bool = True, manual_ack: bool = False,
                       stats: ConnectionStats | None = None) -> None:
    """Run `session(client)` forever, reconnecting with exponential backoff (0.2 s to 5 s);
    counted in `stats`, if given."""
    delay, this = 0.2, asyncio.current_task()
    stats = ConnectionStats() if stats is None else stats
    while True:
        try:
            async with connect(broker, identifier, clean_session=clean_session,
                               manual_ack=manual_ack) as client:
                delay = 0.2
                stats.connects += 1
                stats.connected = True
                # In a task of its own: when a stop (Ctrl-C, SIGTERM) closes the connection on
                # its way, the session's task group reports the lost connection instead of the
                # cancellation; this task's count of cancellations still says it was a stop.
                await asyncio.create_task(session(client), name=f"{identifier}-session")
        # except*: a session's task group wraps the lost connection in an ExceptionGroup.
        except* (ConnectionError, aiomqtt.MqttError) as group:
            stats.connected = False
            if this is not None and this.cancelling():
                raise asyncio.CancelledError from None
            stats.failures += 1
            log.warning("%s: broker connection lost (%s); retrying in %.1f s",
                        identifier, group.exceptions[0], delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


class ReliablePublisher:
    """QoS 1 publishing that survives a lost connection or a broker restart.

    Every message stays in `unacked` until the broker acknowledges it. When the connection
    fails, the publisher reconnects with backoff and sends every unacknowledged message
    again, in order; consumers drop the duplicates this may create by (producer, seq).
    """

    def __init__(self, broker: BrokerSettings, *, max_inflight: int = 32,
                 ack_timeout: float = 5.0) -> None:
        self.broker = broker
        self.max_inflight = max_inflight
        self.ack_timeout = ack_timeout
        self.reconnects = 0
        self._unacked: dict[int, tuple[str, bytes, bool]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_key = 0
        self._client: aiomqtt.Client | None = None
        self._stack: AsyncExitStack | None = None
        self._room = asyncio.Condition()
        self._broken: BaseException | None = None

    async def __aenter__(self) -> ReliablePublisher:
        await self._connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in self._tasks:
            task.cancel()
        if self._stack is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._stack.aclose()

    async def send(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Queue one QoS 1 message; waits while `max_inflight` messages are unacknowledged."""
        async with self._room:
            await self._room.wait_for(
                lambda: len(self._unacked) < self.max_inflight or self._broken is not None)
        await self._recover_if_broken()
        key, self._next_key = self._next_key, self._next_key + 1
        self._unacked[key] = (topic, payload, retain)
        self._start(key)

    async def send_qos0(self, topic: str, payload: bytes) -> None:
        """Fire and forget (QoS 0): nothing is kept or re-sent; load tests measure its losses."""
        await self._recover_if_broken()
        assert self._client is not None
        try:
            await self._client.publish(topic, payload, qos=0)
        except aiomqtt.MqttError as exc:
            self._broken = exc

    async def flush(self) -> None:
        """Wait until the broker has acknowledged every message sent so far."""
        while self._unacked:
            async with self._room:
                await self._room.wait_for(lambda: not self._unacked or self._broken is not None)
            await self._recover_if_broken()

    def _start(self, key: int) -> None:
        task = asyncio.create_task(self._publish(key, self._client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, key: int, client: aiomqtt.Client | None) -> None:
        entry = self._unacked.get(key)
        if entry is None:  # acknowledged through the old connection meanwhile
            return
        topic, payload, retain = entry
        try:
            assert client is not None
            await client.publish(topic, payload, qos=1, retain=retain, timeout=self.ack_timeout)
        except aiomqtt.MqttError as exc:
            if client is self._client and self._broken is None:
                self._broken = exc
        else:
            self._unacked.pop(key, None)
        async with self._room:
            self._room.notify_all()

    async def _recover_if_broken(self) -> None:
        if self._broken is None:
            return
        log.warning("publisher: connection to %s lost (%s); reconnecting",
                    self.broker.url, self._broken)
        for task in list(self._tasks):
            task.cancel()
        if self._stack is not None:
            with contextlib.suppress(Exception):
                await self._stack.aclose()
        delay = 0.2
        while True:
            try:
                await self._connect()
                break
            except ConnectionError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.reconnects += 1
        self._broken = None
        for key in sorted(self._unacked):
            self._start(key)

    async def _connect(self) -> None:
        self._stack = AsyncExitStack()
        self._client = await self._stack.enter_async_context(
            connect(self.broker, unique_client_id("gmv-producer"),
                    max_inflight=self.max_inflight))


async def watch(broker: BrokerSettings, filters: list[str],
                on_message: Callable[[str, bytes, bool], None], *,
                ready: asyncio.Event | None = None, role: str = "gmv-watch",
                stats: ConnectionStats | None = None) -> None:
    """Call `on_message(topic, payload, retained)` for every message on `filters`, forever,
    reconnecting as needed (counted in `stats`). The callee validates: anything can arrive."""

    async def session(client: aiomqtt.Client) -> None:
        for topic_filter in filters:
            await client.subscribe(topic_filter, qos=1)
        if ready is not None:
            ready.set()
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            on_message(message.topic.value, payload, bool(message.retain))

    await reconnecting(broker, unique_client_id(role), session, stats=stats)


async def watch_totals(broker: BrokerSettings, topics: Topics,
                       on_message: Callable[[str, bytes, bool], None], *,
                       ready: asyncio.Event | None = None,
                       stats: ConnectionStats | None = None) -> None:
    """The totals topics and the replay status, for the ticker server
    (`TickerServer.receive_message`). A retained copy may come from a dead aggregator."""
    await watch(broker, [topics.all_totals, topics.replay, topics.answers], on_message,
                ready=ready, role="gmv-server", stats=stats)


async def ask(broker: BrokerSettings, topic: str, payload: bytes, answers: str,
              is_answer: Callable[[bytes], bool], *, timeout: float,
              linger: float = 0.5) -> list[bytes]:
    """Publish `payload` on `topic` and collect the messages on `answers` for which
    `is_answer` holds: for up to `timeout` s until the first, then `linger` s more for others
    (several replays may answer one command)."""
    found: list[bytes] = []
    async with connect(broker, unique_client_id("gmv-ask")) as client:
        await client.subscribe(answers, qos=1)
        await client.publish(topic, payload, qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout) as deadline:
                async for message in client.messages:
                    body = message.payload if isinstance(message.payload, bytes) else b""
                    if is_answer(body):
                        if not found:
                            deadline.reschedule(asyncio.get_running_loop().time() + linger)
                        found.append(body)
    return found


async def watch_control(broker: BrokerSettings, topics: Topics,
                        on_command: Callable[[bytes], Awaitable[None]]) -> None:
    """Call `on_command(payload)` for every message on the control topic (the callee checks
    the token)."""

    async def session(client: aiomqtt.Client) -> None:
        await client.subscribe(topics.control, qos=1)
        async for message in client.messages:
            if isinstance(message.payload, bytes):
                await on_command(message.payload)

    await reconnecting(broker, unique_client_id("gmv-control"), session)
