"""MQTT adapter: the only module that imports the MQTT client (aiomqtt).

Each order message goes decode -> apply; a bad payload is counted, dead-lettered with its
reason and skipped, never raised out of the loop. Both loops reconnect with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiomqtt
import orjson

from .dimensions import Window
from .errors import ConfigError
from .state import AggregateState
from .wire import BatchError, decode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerSettings:
    host: str = "127.0.0.1"
    port: int = 1883

    @classmethod
    def from_url(cls, url: str) -> BrokerSettings:
        """Parse `mqtt://HOST:PORT` (port 1883 when omitted)."""
        parts = urlsplit(url)
        try:
            port = parts.port or 1883
        except ValueError:
            raise ConfigError(f"--broker={url}: the port must be a number 1-65535") from None
        if parts.scheme != "mqtt" or not parts.hostname or parts.path not in ("", "/"):
            raise ConfigError(f"--broker={url}: expected mqtt://HOST:PORT")
        return cls(parts.hostname, port)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


@dataclass(frozen=True)
class Topics:
    """Versioned topics under one prefix (see docs/wire-format.md)."""

    prefix: str = "gmv/v1"

    def orders(self, partition: int = 0) -> str:
        return f"{self.prefix}/orders/{partition}"

    @property
    def all_orders(self) -> str:
        return f"{self.prefix}/orders/+"

    def totals(self, shard: str) -> str:
        return f"{self.prefix}/totals/{shard}"

    @property
    def all_totals(self) -> str:
        return f"{self.prefix}/totals/+"

    def rejected(self, reason: str) -> str:
        return f"{self.prefix}/rejected/{reason}"


@asynccontextmanager
async def connect(broker: BrokerSettings, identifier: str | None = None,
                  max_inflight: int = 64) -> AsyncIterator[aiomqtt.Client]:
    """A connected client; raises ConnectionError with the broker's URL if unreachable."""
    client = aiomqtt.Client(broker.host, broker.port, identifier=identifier,
                            max_inflight_messages=max_inflight, timeout=10)
    client.pending_calls_threshold = max_inflight * 2  # pipelining is deliberate, not a leak
    try:
        await client.__aenter__()
    except aiomqtt.MqttError as exc:
        raise ConnectionError(f"cannot connect to the MQTT broker at {broker.url}: {exc}") from None
    try:
        yield client
    finally:
        await client.__aexit__(None, None, None)


def _client_id(role: str) -> str:
    # Unique per run: clean sessions, so two processes never take over each other's session.
    return f"{role}-{uuid.uuid4().hex[:8]}"


async def _reconnecting(broker: BrokerSettings, identifier: str,
                        session: Callable[[aiomqtt.Client], object]) -> None:
    """Run `session(client)` forever, reconnecting with exponential backoff (0.2 s to 5 s)."""
    delay = 0.2
    while True:
        try:
            async with connect(broker, identifier) as client:
                delay = 0.2
                await session(client)  # type: ignore[misc]
        except (ConnectionError, aiomqtt.MqttError) as exc:
            log.warning("%s: broker connection lost (%s); retrying in %.1f s",
                        identifier, exc, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


async def run_aggregator(broker: BrokerSettings, topics: Topics, state: AggregateState,
                         window: Window, *, shard: str = "0", interval: float = 0.2,
                         ready: asyncio.Event | None = None) -> None:
    """Consume order batches into `state` and publish its snapshot every `interval` s."""

    async def session(client: aiomqtt.Client) -> None:
        await client.subscribe(topics.all_orders, qos=1)
        if ready is not None:
            ready.set()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(_consume(client), name=f"aggregator-{shard}-consume")
            tg.create_task(_publish_totals(client), name=f"aggregator-{shard}-totals")

    async def _consume(client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes):
                payload = b""
            try:
                batch = decode(payload, state.limits)
            except BatchError as exc:
                state.reject(exc.reason)
                log.info("rejected batch on %s: %s", message.topic, exc)
                await client.publish(topics.rejected(exc.reason), payload, qos=0)
                continue
            state.apply(batch)

    async def _publish_totals(client: aiomqtt.Client) -> None:
        last_sent: bytes | None = None
        last_time = 0.0
        while True:
            snapshot = state.snapshot()
            body = orjson.dumps(snapshot)
            now = time.monotonic()
            # Publish on change, and every 2 s regardless so watchers know we are alive.
            if body != last_sent or now - last_time > 2.0:
                message = {"v": 1, "shard": shard, "window": window.as_dict(), **snapshot}
                await client.publish(topics.totals(shard), orjson.dumps(message),
                                     qos=1, retain=True)
                last_sent, last_time = body, now
            await asyncio.sleep(interval)

    await _reconnecting(broker, _client_id(f"gmv-aggregator-{shard}"), session)


async def watch_totals(broker: BrokerSettings, topics: Topics,
                       on_totals: Callable[[dict], None], *,
                       ready: asyncio.Event | None = None) -> None:
    """Call `on_totals(snapshot)` for every shard snapshot published on the totals topics."""

    async def session(client: aiomqtt.Client) -> None:
        await client.subscribe(topics.all_totals, qos=1)
        if ready is not None:
            ready.set()
        async for message in client.messages:
            try:
                totals = orjson.loads(message.payload)  # type: ignore[arg-type]
            except orjson.JSONDecodeError:
                log.warning("ignoring a malformed totals message on %s", message.topic)
                continue
            if isinstance(totals, dict) and totals.get("v") == 1 and "shard" in totals:
                on_totals(totals)

    await _reconnecting(broker, _client_id("gmv-server"), session)
