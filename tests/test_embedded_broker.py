"""Tests for ticker.shell.embedded_broker: real sockets, real aiomqtt (paho) clients, no mocks."""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import AsyncIterator

import aiomqtt
import pytest

from ticker.shell.embedded_broker import EmbeddedBroker

WAIT = 5.0  # upper bound for any single wait in these tests


@pytest.fixture
async def broker() -> AsyncIterator[EmbeddedBroker]:
    async with EmbeddedBroker() as running:
        yield running


@pytest.fixture
def topic() -> str:
    return f"test/{uuid.uuid4().hex}"


def client(broker: EmbeddedBroker, **kwargs: object) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", broker.port, **kwargs)  # type: ignore[arg-type]


async def receive(c: aiomqtt.Client, count: int) -> list[aiomqtt.Message]:
    received: list[aiomqtt.Message] = []
    async with asyncio.timeout(WAIT):
        async for message in c.messages:
            received.append(message)
            if len(received) == count:
                break
    return received


def connect_packet(
    client_id: bytes, *, level: int = 4, keepalive: int = 60, clean: bool = True
) -> bytes:
    body = b"\x00\x04MQTT" + bytes([level, 0x02 if clean else 0]) + keepalive.to_bytes(2, "big")
    body += len(client_id).to_bytes(2, "big") + client_id
    return bytes([0x10, len(body)]) + body


async def raw_exchange(broker: EmbeddedBroker, data: bytes) -> bytes:
    """Send raw bytes, then return all the broker sends; times out unless the broker closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    try:
        writer.write(data)
        async with asyncio.timeout(WAIT):
            return await reader.read(-1)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_qos0_and_qos1_round_trip_exact_payload_bytes(
    broker: EmbeddedBroker, topic: str
) -> None:
    """QoS 0 and QoS 1 publishes arrive with byte-identical payloads and the right QoS."""
    payloads = [b"\x00\xffbinary\r\n", "ünïcode".encode(), b""]
    async with client(broker) as sub, client(broker) as pub:
        await sub.subscribe(topic, qos=1)
        for qos in (0, 1):
            for payload in payloads:
                await pub.publish(topic, payload, qos=qos)
        received = await receive(sub, 2 * len(payloads))
    assert [m.payload for m in received] == payloads * 2
    assert [m.qos for m in received] == [0] * 3 + [1] * 3
    assert all(m.topic.value == topic and not m.retain for m in received)


async def test_delivery_qos_is_min_of_publish_and_subscription(
    broker: EmbeddedBroker, topic: str
) -> None:
    """A QoS 2 publish to a QoS 1 subscription is delivered at QoS 1, and vice versa."""
    async with client(broker) as sub, client(broker) as pub:
        await sub.subscribe(f"{topic}/low", qos=1)
        await sub.subscribe(f"{topic}/high", qos=2)
        await pub.publish(f"{topic}/low", b"a", qos=2)
        await pub.publish(f"{topic}/high", b"b", qos=1)
        received = await receive(sub, 2)
    assert [(m.payload, m.qos) for m in received] == [(b"a", 1), (b"b", 1)]


async def test_qos2_round_trip_delivers_exactly_once(broker: EmbeddedBroker, topic: str) -> None:
    """QoS 2 both ways (PUBREC/PUBREL/PUBCOMP) delivers each message exactly once."""
    async with client(broker) as sub, client(broker) as pub:
        assert list(await sub.subscribe(topic, qos=2)) == [2]  # granted QoS 2
        for i in range(5):
            await pub.publish(topic, str(i).encode(), qos=2)
        await pub.publish(topic, b"end", qos=0)
        received = await receive(sub, 6)
    assert [m.payload for m in received] == [b"0", b"1", b"2", b"3", b"4", b"end"]
    assert [m.qos for m in received] == [2] * 5 + [0]


async def test_wildcards_match_only_the_right_topics(broker: EmbeddedBroker, topic: str) -> None:
    """`+` matches exactly one level, `#` matches the parent and everything below it."""
    async with client(broker) as sub, client(broker) as pub:
        await sub.subscribe(f"{topic}/+/temp", qos=1)
        await sub.subscribe(f"{topic}/deep/#", qos=1)
        await sub.subscribe(f"{topic}/done", qos=1)
        sent = {
            f"{topic}/a/temp": True,
            f"{topic}/b/temp": True,
            f"{topic}/a/b/temp": False,
            f"{topic}/temp": False,
            f"{topic}/a/temperature": False,
            f"{topic}/deep": True,
            f"{topic}/deep/x/y/z": True,
            f"{topic}/deeper/x": False,
            f"other/{topic}/a/temp": False,
        }
        for name in sent:
            await pub.publish(name, name.encode(), qos=1)
        await pub.publish(f"{topic}/done", b"done", qos=1)  # ordered: everything else came first
        received = await receive(sub, sum(sent.values()) + 1)
    expected = [t for t, hit in sent.items() if hit] + [f"{topic}/done"]
    assert [m.topic.value for m in received] == expected


async def test_unsubscribe_stops_delivery(broker: EmbeddedBroker, topic: str) -> None:
    """After UNSUBSCRIBE a filter no longer delivers; other subscriptions still do."""
    async with client(broker) as sub, client(broker) as pub:
        await sub.subscribe(f"{topic}/a", qos=1)
        await sub.subscribe(f"{topic}/b", qos=1)
        await sub.unsubscribe(f"{topic}/a")
        await pub.publish(f"{topic}/a", b"gone", qos=1)
        await pub.publish(f"{topic}/b", b"kept", qos=1)
        received = await receive(sub, 1)
    assert [m.payload for m in received] == [b"kept"]


async def test_retained_message_delivered_later_and_cleared_by_empty_payload(
    broker: EmbeddedBroker, topic: str
) -> None:
    """A retained message reaches a later subscriber; an empty retained publish clears it."""
    async with client(broker) as pub:
        await pub.publish(topic, b"last-known", qos=1, retain=True)
        async with client(broker) as late:
            await late.subscribe(topic, qos=1)
            [message] = await receive(late, 1)
        assert (message.payload, message.retain, message.qos) == (b"last-known", True, 1)

        await pub.publish(topic, b"", qos=1, retain=True)
        async with client(broker) as later:
            await later.subscribe(topic, qos=1)
            await pub.publish(topic, b"live", qos=1)
            [message] = await receive(later, 1)
        assert (message.payload, message.retain) == (b"live", False)


async def test_persistent_session_receives_offline_qos1_messages_in_order(
    broker: EmbeddedBroker, topic: str
) -> None:
    """clean_session=False keeps subscriptions and queues QoS 1 messages sent while offline."""
    identifier = f"persistent-{uuid.uuid4().hex}"
    async with client(broker, identifier=identifier, clean_session=False) as sub:
        await sub.subscribe(topic, qos=1)
    async with client(broker) as pub:
        for i in range(50):
            await pub.publish(topic, f"offline-{i}".encode(), qos=1)
    async with client(broker, identifier=identifier, clean_session=False) as sub:
        received = await receive(sub, 50)
    assert [m.payload for m in received] == [f"offline-{i}".encode() for i in range(50)]
    assert all(m.qos == 1 for m in received)


async def test_unacked_qos1_redelivered_with_dup_on_reconnect(
    broker: EmbeddedBroker, topic: str
) -> None:
    """A QoS 1 message delivered but never PUBACKed is resent with DUP after reconnecting."""
    client_id = f"raw-{uuid.uuid4().hex}".encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    session = connect_packet(client_id, clean=False)
    filt = topic.encode()
    subscribe = b"\x00\x01" + len(filt).to_bytes(2, "big") + filt + b"\x01"
    writer.write(session + bytes([0x82, len(subscribe)]) + subscribe)
    async with asyncio.timeout(WAIT):
        assert await reader.readexactly(4) == b"\x20\x02\x00\x00"  # CONNACK, no session
        assert await reader.readexactly(5) == b"\x90\x03\x00\x01\x01"  # SUBACK, QoS 1
        async with client(broker) as pub:
            await pub.publish(topic, b"unacked", qos=1)
        first = await reader.readexactly(2 + 2 + len(filt) + 2 + 7)
    writer.close()
    await writer.wait_closed()
    assert first[0] == 0x32  # PUBLISH, QoS 1, no DUP

    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    writer.write(session)
    async with asyncio.timeout(WAIT):
        assert await reader.readexactly(4) == b"\x20\x02\x01\x00"  # session present
        again = await reader.readexactly(len(first))
    writer.close()
    await writer.wait_closed()
    assert again == bytes([0x3A]) + first[1:]  # same packet, DUP set


async def test_ordering_of_1000_qos1_messages(broker: EmbeddedBroker, topic: str) -> None:
    """1,000 QoS 1 messages from one publisher arrive in publish order."""
    async with client(broker) as sub, client(broker, max_inflight_messages=100) as pub:
        await sub.subscribe(topic, qos=1)
        pub.pending_calls_threshold = 2_000  # silence aiomqtt's "pending calls" warning
        await asyncio.gather(*(pub.publish(topic, str(i).encode(), qos=1) for i in range(1000)))
        received = await receive(sub, 1000)
    assert [int(m.payload) for m in received] == list(range(1000))  # type: ignore[arg-type]


async def test_200kb_payload_through_paho(broker: EmbeddedBroker, topic: str) -> None:
    """A 200 KB payload passes through aiomqtt/paho and the broker byte for byte."""
    payload = os.urandom(200 * 1024)
    async with client(broker) as sub, client(broker) as pub:
        await sub.subscribe(topic, qos=1)
        await pub.publish(topic, payload, qos=1)
        await pub.publish(topic, payload[::-1], qos=0)
        received = await receive(sub, 2)
    assert [m.payload for m in received] == [payload, payload[::-1]]


async def test_slow_subscriber_does_not_block_others(
    broker: EmbeddedBroker, topic: str
) -> None:
    """A subscriber that never reads loses old QoS 0 messages; a fast one gets all of them."""
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    filt = topic.encode()
    subscribe = b"\x00\x01" + len(filt).to_bytes(2, "big") + filt + b"\x00"
    writer.write(connect_packet(b"stalled") + bytes([0x82, len(subscribe)]) + subscribe)
    async with asyncio.timeout(WAIT):
        await reader.readexactly(4 + 5)  # CONNACK, SUBACK; then never read again
    try:
        async with client(broker) as fast, client(broker) as pub:
            await fast.subscribe(topic, qos=0)
            for i in range(3000):
                await pub.publish(topic, i.to_bytes(4, "big") * 2500, qos=0)  # 10 KB each
            received = await receive(fast, 3000)
    finally:
        writer.close()
        await writer.wait_closed()
    assert [int.from_bytes(m.payload[:4], "big") for m in received] == list(range(3000))
    assert broker.dropped_qos0 > 0


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xff\xff\xff\xff\xff garbage",  # not CONNECT, endless remaining length
        b"\x10\x03\x00\x04M",  # CONNECT truncated inside the protocol name
        connect_packet(b"g") + b"\x82\x02\x00\x01",  # SUBSCRIBE with no topic filter
        connect_packet(b"h") + b"\x30\x05\x00\x03a/#",  # PUBLISH to a wildcard topic
        connect_packet(b"i") + b"\x20\x02\x00\x00",  # a client may not send CONNACK
    ],
)
async def test_malformed_packet_closes_only_that_connection(
    broker: EmbeddedBroker, topic: str, garbage: bytes
) -> None:
    """Garbage from one raw socket closes that socket; other clients keep being served."""
    async with client(broker) as sub, client(broker) as pub:
        await sub.subscribe(topic, qos=1)
        await raw_exchange(broker, garbage)  # returns once the broker closed it
        await pub.publish(topic, b"still here", qos=1)
        [message] = await receive(sub, 1)
    assert message.payload == b"still here"
    async with client(broker) as fresh:  # and it still accepts new connections
        await fresh.publish(topic, b"x", qos=1)


async def test_unsupported_protocol_level_gets_return_code_1(broker: EmbeddedBroker) -> None:
    """CONNECT with protocol level 5 is answered with CONNACK return code 1, then closed."""
    assert await raw_exchange(broker, connect_packet(b"v5", level=5)) == b"\x20\x02\x00\x01"


async def test_keepalive_timeout_closes_silent_connection(broker: EmbeddedBroker) -> None:
    """A client silent for 1.5x its 1 s keepalive is disconnected."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    connack = await raw_exchange(broker, connect_packet(b"quiet", keepalive=1))
    assert connack == b"\x20\x02\x00\x00"
    assert 1.3 < loop.time() - started < 3.0


async def test_same_identifier_takes_over_the_old_connection(
    broker: EmbeddedBroker, topic: str
) -> None:
    """Connecting with an identifier already in use closes the older connection."""
    identifier = f"dup-{uuid.uuid4().hex}"
    async with client(broker, identifier=identifier) as old:
        async with client(broker, identifier=identifier) as new:
            with pytest.raises(aiomqtt.MqttError):
                await receive(old, 1)
            await new.subscribe(topic, qos=1)
            await new.publish(topic, b"new one works", qos=1)
            [message] = await receive(new, 1)
    assert message.payload == b"new one works"


async def test_port_and_url_are_known_after_start() -> None:
    """port=0 binds a free port, exposed through .port and .url; .port needs start()."""
    broker = EmbeddedBroker()
    with pytest.raises(RuntimeError):
        _ = broker.port
    async with broker:
        assert 0 < broker.port < 65536
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": -1}, "port=-1: must be between 0 and 65535"),
        ({"port": 65536}, "port=65536: must be between 0 and 65535"),
        ({"port": "1883"}, "port='1883': must be an int"),
        ({"host": ""}, "host='': must be a non-empty string"),
        ({"max_packet_size": 0}, "max_packet_size=0: must be between 1 and 268435455"),
        ({"max_queued_messages": -5}, "max_queued_messages=-5: must be >= 0"),
    ],
)
def test_constructor_validation_names_parameter_and_value(
    kwargs: dict[str, object], message: str
) -> None:
    """Bad constructor arguments raise ValueError naming the parameter and its value."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        EmbeddedBroker(**kwargs)  # type: ignore[arg-type]
