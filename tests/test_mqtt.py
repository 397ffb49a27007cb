"""The MQTT adapter: what it promises beyond aiomqtt. (Its use against a real broker is
tested everywhere else: the pipeline, the faults, the flow control.)"""

from __future__ import annotations

import asyncio
import os

import aiomqtt
import pytest

from ticker.shell.mqtt import ReliablePublisher, Topics, _Client, ack, connect, \
    unique_client_id


async def test_a_cancellation_that_lands_as_the_reply_does_is_not_swallowed():
    """cpython#86296: asyncio.wait_for on 3.11 returns the result of a future completed in the
    same tick as its caller's cancellation. aiomqtt waits for every PUBACK that way, so a
    stopped aggregator's publishing loop went on for ever (seen: 2 stops of 6 after a replay).
    Our client's waits raise the cancellation. (With aiomqtt.Client, this test fails on 3.11.)"""
    client = _Client("127.0.0.1", 1)  # never connected: only its wait is used
    reply = asyncio.get_running_loop().create_future()
    went_on = asyncio.Event()

    async def publishing_loop() -> None:
        await client._wait_for(reply, timeout=10)
        went_on.set()

    task = asyncio.create_task(publishing_loop())
    await asyncio.sleep(0)
    reply.set_result(None)  # the PUBACK arrives...
    task.cancel()  # ...as the stop does
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not went_on.is_set()


async def test_a_wait_that_times_out_is_an_mqtt_error():
    """A reply that never comes ends the wait with MqttError, as aiomqtt's own does."""
    client = _Client("127.0.0.1", 1)
    with pytest.raises(aiomqtt.MqttError, match="timed out"):
        await client._wait_for(asyncio.get_running_loop().create_future(), timeout=0.05)


def test_topics_name_their_producer_and_parse_back():
    """A producer's topics carry its id as one level; kind() splits any topic of the prefix."""
    t = Topics("acme/v1")
    assert t.orders("shop-7") == "acme/v1/orders/shop-7/0"
    assert t.chatbot("shop-7", 2) == "acme/v1/chatbot/shop-7/2"
    assert t.acks("0", "shop-7") == "acme/v1/acks/0/shop-7"
    assert t.kind("acme/v1/orders/shop-7/0") == ("orders", ["shop-7", "0"])
    assert t.kind("acme/v1/control") == ("control", [])
    assert t.kind("gmv/v1/orders/x/0") == ("", [])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_a_slow_consumer_holds_a_bounded_read_ahead_and_the_broker_the_backlog(
        mosquitto, topics):
    """150 batches of 256 KB (38 MB) published at once to a consumer that takes 5 ms each and
    acknowledges by hand: its client stops reading at 8 queued messages, so the queue never
    holds more than 8, the process grows by far less than the backlog, the broker still
    holds most of it when the publisher is done, and every message arrives once, in order."""
    count, size, read_ahead = 150, 256 * 1024, 8
    payloads = [i.to_bytes(4, "big") + bytes(size - 4) for i in range(count)]
    topic = topics.orders("slow")
    got: list[int] = []
    most_queued, rss0, rss_peak = 0, _rss_bytes(), 0
    async with connect(mosquitto, unique_client_id("test-slow"), manual_ack=True,
                       read_ahead=read_ahead) as client:
        await client.subscribe(topic, qos=1)

        async def consume() -> None:
            nonlocal most_queued, rss_peak
            async for message in client.messages:
                most_queued = max(most_queued, len(client.messages) + 1)
                rss_peak = max(rss_peak, _rss_bytes())
                assert isinstance(message.payload, bytes)
                got.append(int.from_bytes(message.payload[:4], "big"))
                await asyncio.sleep(0.005)  # the slow part of a slow consumer
                ack(client, message)
                if len(got) == count:
                    return

        consumer = asyncio.create_task(consume())
        async with ReliablePublisher(mosquitto, max_inflight=8) as publisher:
            for payload in payloads:
                await publisher.send(topic, payload)
            await publisher.flush()
        received_when_published = len(got)
        await asyncio.wait_for(consumer, 10)
        assert isinstance(client, _Client) and client.read_pauses > 0
        assert client.max_queued <= read_ahead
    assert got == list(range(count))  # none lost, none twice, in order
    assert most_queued <= read_ahead
    assert received_when_published < count // 2  # the broker held the rest meanwhile
    assert rss_peak - rss0 < count * size // 3, f"grew {(rss_peak - rss0) / 2**20:.0f} MB"


def test_read_ahead_limits_are_checked_up_front():
    """A read-ahead of no messages or no bytes is an operator's error, named."""
    with pytest.raises(ValueError, match="read_ahead=0"):
        _Client("127.0.0.1", 1, read_ahead=0)
    with pytest.raises(ValueError, match="read_ahead_bytes=-1"):
        _Client("127.0.0.1", 1, read_ahead_bytes=-1)
