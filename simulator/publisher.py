"""Publishing loop: the simulator's I/O shell around the pure scenario.

Minute m of the replay is due at `t0 + (m - first) * 60 / speed` on the monotonic clock:
an absolute schedule, so time spent generating and publishing never accumulates as drift.
At `speed=None` ("max") nothing waits. Publishing goes through a `ReliablePublisher`, which
pipelines QoS 1 messages and re-sends whatever a lost connection left unacknowledged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from ticker.mqtt import ReliablePublisher, Topics
from ticker.wire import ChatbotCount, OrderBatch, encode, encode_chatbot

from .scenario import Scenario


@dataclass
class PublishReport:
    producer: str
    gmv_cents: int = 0
    orders: int = 0
    batches: int = 0
    minutes: int = 0
    chatbot_queries: int = 0
    seconds: float = 0.0


async def publish_scenario(publisher: ReliablePublisher, scenario: Scenario, topics: Topics,
                           *, producer: str, speed: float | None, batch_orders: int = 10_000,
                           binary: bool = True, first_minute: int = 0,
                           last_minute: int | None = None,
                           progress: Callable[[PublishReport], None] | None = None,
                           clock: Callable[[], float] = time.monotonic) -> PublishReport:
    """Publish minutes `first_minute..last_minute` of `scenario`; return what was sent."""
    last = scenario.window.minutes - 1 if last_minute is None else last_minute
    report = PublishReport(producer)
    t0 = clock()
    seq = chat_seq = chat_pending = 0
    for minute in range(first_minute, last + 1):
        if speed is not None:
            delay = t0 + (minute - first_minute) * 60.0 / speed - clock()
            if delay > 0:
                await asyncio.sleep(delay)
        orders = scenario.orders(minute)
        for start in range(0, len(orders), batch_orders):
            part = orders.slice(start, start + batch_orders)
            batch = OrderBatch(producer, seq, minute, part.amount_cents, part.brand,
                               part.country, part.platform)
            seq += 1
            await publisher.send(topics.orders(0), encode(batch, binary=binary))
            report.gmv_cents += batch.gmv_cents
            report.orders += len(batch)
            report.batches += 1
        # Chatbot queries are their own stream, one count per 10 simulated minutes.
        chat_pending += int(scenario.minute_chatbot_queries[minute])
        if chat_pending and (minute % 10 == 9 or minute == last):
            await publisher.send(topics.chatbot(0), encode_chatbot(
                ChatbotCount(producer, chat_seq, minute, chat_pending)))
            report.chatbot_queries += chat_pending
            chat_seq, chat_pending = chat_seq + 1, 0
        report.minutes += 1
        if progress is not None:
            progress(report)
    await publisher.flush()
    # Say how far we got, so a consumer can tell a lost tail from the end of the stream.
    await publisher.send(topics.producer(producer), orjson.dumps(
        {"v": 1, "producer": producer, "last_seq": seq - 1, "batches": report.batches,
         "orders": report.orders, "gmv_cents": report.gmv_cents}))
    await publisher.flush()
    report.seconds = clock() - t0
    return report
