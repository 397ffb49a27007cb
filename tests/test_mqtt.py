"""The MQTT adapter: what it promises beyond aiomqtt. (Its use against a real broker is
tested everywhere else: the pipeline, the faults, the flow control.)"""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest

from ticker.shell.mqtt import Topics, _Client


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
