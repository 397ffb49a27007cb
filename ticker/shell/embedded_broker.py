"""A small in-process MQTT 3.1.1 broker (pure asyncio, stdlib only) for ``gmv demo``.

Why it exists: the demo must run on a fresh machine that has nothing but Python.
amqtt pins websockets==15.0.1 (we need >=16) and is slow; Mosquitto is a system install.

What it implements (protocol level 4 "MQTT"; level 3 "MQIsdp" is accepted too):
CONNECT/CONNACK (other protocol levels get return code 1; username/password ignored),
PUBLISH at QoS 0, 1 and 2 in both directions, SUBSCRIBE/UNSUBSCRIBE with ``+``/``#``,
retained messages, PINGREQ, DISCONNECT, keepalive (silence for 1.5x keepalive closes),
client-identifier takeover and persistent sessions (clean_session=0 keeps subscriptions,
queues QoS>=1 messages while offline, redelivers unacknowledged ones with DUP set).
Not implemented: MQTT 5, will messages (parsed, never published), authentication,
TLS/websockets, $SYS topics, state surviving a broker restart.

Strategy: each connection's reader routes its PUBLISHes inline, one at a time, so a
publisher's messages reach every subscriber in order. Every connection has its own sender
task that writes and ``drain()``s from its own queues, so a slow subscriber slows only
itself: its QoS 0 backlog is bounded (oldest dropped, counted) and a QoS>=1 backlog past
the bound pauses the publishers feeding it (backpressure) rather than dropping anything
(a session never waits on itself, or it could stop reading its own acknowledgements).
Routing a message costs one pass over the subscriptions; nothing is quadratic.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections import deque
from dataclasses import dataclass
from types import TracebackType

__all__ = ["EmbeddedBroker"]

log = logging.getLogger(__name__)

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = range(1, 8)
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = range(8, 15)

_PROTOCOL_LEVELS = {"MQTT": 4, "MQIsdp": 3}
_FLAGGED_TYPES = (PUBREL, SUBSCRIBE, UNSUBSCRIBE)  # fixed-header flags must be 0b0010
_MAX_REMAINING_LENGTH = 268_435_455  # largest length the 4-byte varint can encode
_CONNECT_TIMEOUT = 10.0  # seconds a new socket has to send CONNECT
_CONNECTION_QUEUE = 1_000  # per connection: QoS 0 backlog cap, QoS>=1 backpressure mark
_MAX_INFLIGHT = 10_000  # QoS>=1 deliveries per session awaiting acknowledgement


class _ProtocolError(Exception):
    """The client broke the protocol; only its connection is closed."""


@dataclass(slots=True, frozen=True)
class _Message:
    topic: str
    levels: tuple[str, ...]
    topic_field: bytes  # length-prefixed UTF-8, ready to write
    payload: bytes
    qos: int


@dataclass(slots=True)
class _Delivery:
    """One message on its way to one session."""

    message: _Message
    qos: int
    retain: bool
    seq: int = 0  # broker-wide enqueue order; merges a connection's QoS 0 and QoS>=1 queues
    released: bool = False  # QoS 2: PUBREC received and PUBREL sent


def _encode_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(ptype: int, body: bytes = b"", flags: int = 0) -> bytes:
    return bytes([ptype << 4 | flags]) + _encode_length(len(body)) + body


def _ack(ptype: int, packet_id: int) -> bytes:
    return _packet(ptype, packet_id.to_bytes(2, "big"), 0b0010 if ptype == PUBREL else 0)


def _publish_packet(d: _Delivery, packet_id: int, dup: bool) -> bytes:
    m = d.message
    pid = packet_id.to_bytes(2, "big") if d.qos else b""
    flags = dup << 3 | d.qos << 1 | d.retain
    length = len(m.topic_field) + len(pid) + len(m.payload)
    header = bytes([PUBLISH << 4 | flags]) + _encode_length(length)
    return b"".join((header, m.topic_field, pid, m.payload))


async def _read_packet(reader: asyncio.StreamReader, max_size: int) -> tuple[int, int, bytes]:
    first = (await reader.readexactly(1))[0]
    length = 0
    for shift in range(0, 28, 7):
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    else:
        raise _ProtocolError("malformed remaining length")
    if length > max_size:
        raise _ProtocolError(f"packet of {length} bytes exceeds max_packet_size={max_size}")
    return first >> 4, first & 0x0F, await reader.readexactly(length) if length else b""


class _Body:
    """Cursor over a packet body; running past its end is a protocol error."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    @property
    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _ProtocolError("packet body truncated")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self) -> str:
        try:
            value = self.binary().decode("utf-8")
        except UnicodeDecodeError:
            raise _ProtocolError("string is not valid UTF-8") from None
        if "\x00" in value:
            raise _ProtocolError("string contains NUL")
        return value

    def rest(self) -> bytes:
        data, self.pos = self.data[self.pos :], len(self.data)
        return data


def _valid_filter(topic_filter: str) -> bool:
    levels = topic_filter.split("/")
    return bool(topic_filter) and all(
        lvl == "+" or (lvl == "#" and i == len(levels) - 1) or ("+" not in lvl and "#" not in lvl)
        for i, lvl in enumerate(levels)
    )


def _matches(filter_levels: tuple[str, ...], topic_levels: tuple[str, ...]) -> bool:
    if topic_levels[0].startswith("$") and filter_levels[0] in ("+", "#"):
        return False  # wildcards never match $-topics at the first level
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True
        if i >= len(topic_levels) or (level != "+" and level != topic_levels[i]):
            return False
    return len(filter_levels) == len(topic_levels)


class _Session:
    """Per-client-identifier state; outlives connections when clean_session=0."""

    def __init__(self, client_id: str, clean: bool) -> None:
        self.client_id = client_id
        self.clean = clean
        self.subscriptions: dict[str, tuple[tuple[str, ...], int]] = {}
        self.queued: deque[_Delivery] = deque()  # QoS>=1, not yet given a packet id
        self.inflight: dict[int, _Delivery] = {}  # sent, awaiting PUBACK / PUBREC / PUBCOMP
        self.incoming_qos2: set[int] = set()  # QoS 2 PUBLISHes routed, awaiting PUBREL
        self.connection: _Connection | None = None
        self.room = asyncio.Event()  # set whenever `queued` may have dropped below the mark
        self._last_id = 0

    def granted_qos(self, topic_levels: tuple[str, ...]) -> int:
        """Highest QoS among matching subscriptions, or -1 when none matches."""
        best = -1
        for levels, qos in self.subscriptions.values():
            if qos > best and _matches(levels, topic_levels):
                best = qos
        return best

    def allocate_id(self) -> int:
        while True:  # at most _MAX_INFLIGHT of the 65535 ids are taken
            self._last_id = self._last_id % 65535 + 1
            if self._last_id not in self.inflight:
                return self._last_id


class _Connection:
    """One client socket: the reader (the server's handler task) and a sender task."""

    def __init__(self, broker: EmbeddedBroker, session: _Session, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, keepalive: int) -> None:
        self.broker, self.session = broker, session
        self.reader, self.writer = reader, writer
        self.keepalive = keepalive
        self.task = asyncio.current_task()
        self.control: deque[bytes] = deque()  # acks and resends; always written first
        self.qos0: deque[_Delivery] = deque()
        self.wake = asyncio.Event()
        self.sender: asyncio.Task[None] | None = None

    def send(self, packet: bytes) -> None:
        self.control.append(packet)
        self.wake.set()

    def push_qos0(self, d: _Delivery) -> None:
        if len(self.qos0) >= _CONNECTION_QUEUE:
            self.qos0.popleft()
            self.broker.dropped_qos0 += 1
        self.qos0.append(d)
        self.wake.set()

    async def close(self) -> None:
        """Close from outside (takeover) and wait until the handler has cleaned up."""
        self.writer.close()
        if self.task is not None:
            self.task.cancel()  # it may be parked in backpressure rather than reading
            await asyncio.wait([self.task])

    def _next_packet(self) -> bytes | None:
        if self.control:
            return self.control.popleft()
        s = self.session
        q0 = self.qos0[0] if self.qos0 else None
        q1 = s.queued[0] if s.queued else None
        if q1 is not None and (q0 is None or q1.seq < q0.seq):
            if len(s.inflight) >= _MAX_INFLIGHT:
                return None  # wait for acknowledgements; later QoS 0 waits too (ordering)
            s.queued.popleft()
            if len(s.queued) < _CONNECTION_QUEUE:
                s.room.set()
            packet_id = s.allocate_id()
            s.inflight[packet_id] = q1
            return _publish_packet(q1, packet_id, dup=False)
        if q0 is not None:
            self.qos0.popleft()
            return _publish_packet(q0, 0, dup=False)
        return None

    async def send_loop(self) -> None:
        try:
            while True:
                packet = self._next_packet()
                if packet is None:
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                self.writer.write(packet)
                await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            log.debug("mqtt %s: write failed: %r", self.session.client_id, exc)
        except Exception:
            log.exception("mqtt %s: sender crashed", self.session.client_id)
        finally:
            self.writer.close()  # the reader then sees EOF and cleans up

    async def serve(self) -> None:
        timeout = self.keepalive * 1.5 or None
        max_size = self.broker.max_packet_size
        while True:
            async with asyncio.timeout(timeout):
                ptype, flags, data = await _read_packet(self.reader, max_size)
            if ptype != PUBLISH and flags != (0b0010 if ptype in _FLAGGED_TYPES else 0):
                raise _ProtocolError(f"bad fixed-header flags {flags:#x} for type {ptype}")
            if ptype == DISCONNECT:
                return
            await self._dispatch(ptype, flags, _Body(data))

    async def _dispatch(self, ptype: int, flags: int, body: _Body) -> None:
        s = self.session
        if ptype == PUBLISH:
            await self._on_publish(flags, body)
        elif ptype in (PUBACK, PUBCOMP):
            d = s.inflight.get(packet_id := body.u16())
            if d is not None and (d.qos == 2) == (ptype == PUBCOMP):
                del s.inflight[packet_id]
                self.wake.set()
        elif ptype == PUBREC:
            packet_id = body.u16()
            if (d := s.inflight.get(packet_id)) is not None and d.qos == 2:
                d.released = True
            self.send(_ack(PUBREL, packet_id))
        elif ptype == PUBREL:
            packet_id = body.u16()
            s.incoming_qos2.discard(packet_id)
            self.send(_ack(PUBCOMP, packet_id))
        elif ptype == SUBSCRIBE:
            await self._on_subscribe(body)
        elif ptype == UNSUBSCRIBE:
            packet_id, filters = body.u16(), []
            while not body.at_end:
                filters.append(body.text())
            if not filters:
                raise _ProtocolError("UNSUBSCRIBE without topic filters")
            for topic_filter in filters:
                s.subscriptions.pop(topic_filter, None)
            self.send(_ack(UNSUBACK, packet_id))
        elif ptype == PINGREQ:
            self.send(_packet(PINGRESP))
        else:
            raise _ProtocolError(f"unexpected packet type {ptype} from a client")

    async def _on_publish(self, flags: int, body: _Body) -> None:
        qos, retain = flags >> 1 & 0b11, bool(flags & 1)
        if qos == 3:
            raise _ProtocolError("PUBLISH with QoS 3")
        topic = body.text()
        if not topic or "+" in topic or "#" in topic:
            raise _ProtocolError(f"invalid topic name {topic!r}")
        packet_id = body.u16() if qos else 0
        if qos and not packet_id:
            raise _ProtocolError("PUBLISH with packet id 0")
        raw = topic.encode()
        message = _Message(topic, tuple(topic.split("/")), len(raw).to_bytes(2, "big") + raw,
                           body.rest(), qos)
        if qos == 2 and packet_id in self.session.incoming_qos2:
            self.send(_ack(PUBREC, packet_id))  # duplicate before PUBREL: already routed
            return
        if qos == 2:
            self.session.incoming_qos2.add(packet_id)
        await self.broker._route(message, retain, self.session)
        if qos:
            self.send(_ack(PUBACK if qos == 1 else PUBREC, packet_id))

    async def _on_subscribe(self, body: _Body) -> None:
        packet_id, requests = body.u16(), []
        while not body.at_end:
            topic_filter, qos = body.text(), body.u8()
            if qos > 2:
                raise _ProtocolError(f"SUBSCRIBE requested QoS byte {qos:#x}")
            requests.append((topic_filter, qos))
        if not requests:
            raise _ProtocolError("SUBSCRIBE without topic filters")
        codes, granted = bytearray(), []
        for topic_filter, qos in requests:
            if not _valid_filter(topic_filter):
                codes.append(0x80)
                continue
            levels = tuple(topic_filter.split("/"))
            self.session.subscriptions[topic_filter] = (levels, qos)
            granted.append((levels, qos))
            codes.append(qos)
        self.send(_packet(SUBACK, packet_id.to_bytes(2, "big") + bytes(codes)))
        for levels, qos in granted:
            for message in list(self.broker._retained.values()):
                if _matches(levels, message.levels):
                    d = _Delivery(message, min(message.qos, qos), retain=True)
                    await self.broker._deliver(self.session, d, self.session)


def _check_int(name: str, value: object, low: int, high: int | None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: must be an int")
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name}={value!r}: must be {bounds}")


class EmbeddedBroker:
    """In-process MQTT 3.1.1 broker; ``async with EmbeddedBroker() as broker: broker.url``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 max_packet_size: int = 16 * 1024 * 1024,
                 max_queued_messages: int = 100_000) -> None:
        if not isinstance(host, str) or not host:
            raise ValueError(f"host={host!r}: must be a non-empty string")
        _check_int("port", port, 0, 65535)
        _check_int("max_packet_size", max_packet_size, 1, _MAX_REMAINING_LENGTH)
        _check_int("max_queued_messages", max_queued_messages, 0, None)
        self.host = host
        self.max_packet_size = max_packet_size
        self.max_queued_messages = max_queued_messages
        self.dropped_qos0 = 0  # QoS 0 messages dropped from a connection's full backlog
        self.dropped_offline = 0  # QoS>=1 messages dropped from a full offline-session queue
        self._requested_port = port
        self._bound_port: int | None = None
        self._server: asyncio.Server | None = None
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, _Message] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._seq = itertools.count()

    @property
    def port(self) -> int:
        """The bound TCP port (a free one if constructed with port=0); needs start()."""
        if self._bound_port is None:
            raise RuntimeError("EmbeddedBroker.port is only known after start()")
        return self._bound_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("EmbeddedBroker is already started")
        self._server = await asyncio.start_server(
            self._handle, self.host, self._requested_port, limit=1024 * 1024)
        self._bound_port = self._server.sockets[0].getsockname()[1]
        log.info("embedded MQTT broker listening on %s", self.url)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
        self._sessions.clear()
        self._retained.clear()

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._track(task)
        connection = None
        try:
            connection = await self._open(reader, writer)
            if connection is not None:
                await connection.serve()
        except (_ProtocolError, asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
            log.debug("mqtt connection from %s closed: %r", writer.get_extra_info("peername"), exc)
        except asyncio.CancelledError:
            pass  # stop() or a takeover; asyncio 3.11 logs handler tasks that end cancelled
        except Exception:
            log.exception("mqtt connection from %s failed", writer.get_extra_info("peername"))
        finally:
            writer.close()
            if connection is not None:
                self._detach(connection)

    async def _open(self, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> _Connection | None:
        """Handle CONNECT; returns the attached connection, or None if refused."""
        async with asyncio.timeout(_CONNECT_TIMEOUT):
            ptype, flags, data = await _read_packet(reader, self.max_packet_size)
        if ptype != CONNECT or flags:
            raise _ProtocolError("the first packet must be CONNECT")
        body = _Body(data)
        name, level, connect_flags, keepalive = body.text(), body.u8(), body.u8(), body.u16()
        if name not in _PROTOCOL_LEVELS or connect_flags & 0x01:
            raise _ProtocolError(f"bad CONNECT (protocol {name!r}, flags {connect_flags:#x})")
        if level != _PROTOCOL_LEVELS[name]:
            await self._refuse(writer, 1)  # unacceptable protocol version
            return None
        clean = bool(connect_flags & 0x02)
        client_id = body.text()
        if connect_flags & 0x04:  # will topic and message: parsed, not supported
            body.text(), body.binary()
        if connect_flags & 0x80:
            body.text()
        if connect_flags & 0x40:
            body.binary()
        if not client_id:
            if not clean:
                await self._refuse(writer, 2)  # identifier rejected
                return None
            client_id = f"auto-{uuid.uuid4().hex}"
        while (old := self._sessions.get(client_id)) is not None and old.connection is not None:
            await old.connection.close()  # takeover: the older connection goes
        session = self._sessions.get(client_id)
        present = session is not None and not session.clean and not clean
        if session is None or not present:
            session = self._sessions[client_id] = _Session(client_id, clean)
        connection = _Connection(self, session, reader, writer, keepalive)
        session.connection = connection
        connection.send(_packet(CONNACK, bytes([int(present), 0])))
        for packet_id, d in session.inflight.items():
            connection.send(_ack(PUBREL, packet_id) if d.released
                            else _publish_packet(d, packet_id, dup=True))
        connection.sender = asyncio.create_task(connection.send_loop())
        self._track(connection.sender)
        return connection

    @staticmethod
    async def _refuse(writer: asyncio.StreamWriter, return_code: int) -> None:
        writer.write(_packet(CONNACK, bytes([0, return_code])))
        await writer.drain()

    def _detach(self, connection: _Connection) -> None:
        if connection.sender is not None:
            connection.sender.cancel()
        session = connection.session
        if session.connection is connection:
            session.connection = None
            session.room.set()  # publishers waiting on this connection re-check
            if session.clean and self._sessions.get(session.client_id) is session:
                del self._sessions[session.client_id]

    async def _route(self, message: _Message, retain: bool, publisher: _Session) -> None:
        if retain:
            if message.payload:
                self._retained[message.topic] = message
            else:
                self._retained.pop(message.topic, None)
        targets = [(s, q) for s in self._sessions.values()
                   if (q := s.granted_qos(message.levels)) >= 0]
        for session, granted in targets:
            d = _Delivery(message, min(message.qos, granted), retain=False)
            await self._deliver(session, d, publisher)

    async def _deliver(self, session: _Session, d: _Delivery, publisher: _Session) -> None:
        if d.qos == 0:
            if session.connection is not None:
                d.seq = next(self._seq)
                session.connection.push_qos0(d)
            return
        # Backpressure: never drop QoS>=1 for a connected client; wait for its sender
        # instead. A session never waits on itself (it would stop reading its own acks).
        while (session.connection is not None and session is not publisher
               and len(session.queued) >= _CONNECTION_QUEUE):
            session.room.clear()
            await session.room.wait()
        if session.connection is None:
            if session.clean:
                return  # the session ended while we waited
            if len(session.queued) >= self.max_queued_messages:
                self.dropped_offline += 1
                return
        d.seq = next(self._seq)
        session.queued.append(d)
        if session.connection is not None:
            session.connection.wake.set()
