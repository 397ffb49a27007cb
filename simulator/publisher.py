"""Publishing loop: the simulator's I/O shell around the pure scenario.

Minute m of the replay is due at `t0 + (m - first) * 60 / speed` on the monotonic clock:
an absolute schedule, so time spent generating and publishing never accumulates as drift.
At `speed=None` ("max") nothing waits. QoS 1 publishes are pipelined up to `max_inflight`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from ticker.mqtt import Topics
from ticker.wire import OrderBatch, encode

from .scenario import Scenario


@dataclass
class PublishReport:
    producer: str
    gmv_cents: int = 0
    orders: int = 0
    batches: int = 0
    minutes: int = 0
    seconds: float = 0.0


async def publish_scenario(client, scenario: Scenario, topics: Topics, *, producer: str,
                           speed: float | None, batch_orders: int = 10_000,
                           binary: bool = True, first_minute: int = 0,
                           last_minute: int | None = None, max_inflight: int = 32,
                           progress: Callable[[PublishReport], None] | None = None,
                           clock: Callable[[], float] = time.monotonic) -> PublishReport:
    """Publish minutes `first_minute..last_minute` of `scenario`; return what was sent."""
    last = scenario.window.minutes - 1 if last_minute is None else last_minute
    report = PublishReport(producer)
    pending: set[asyncio.Task] = set()
    t0 = clock()
    seq = 0
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
            if len(pending) >= max_inflight:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # a failed publish ends the run loudly
            pending.add(asyncio.ensure_future(
                client.publish(topics.orders(0), encode(batch, binary=binary), qos=1)))
            report.gmv_cents += batch.gmv_cents
            report.orders += len(batch)
            report.batches += 1
        report.minutes += 1
        if progress is not None:
            progress(report)
    if pending:
        await asyncio.gather(*pending)
    report.seconds = clock() - t0
    return report
