"""Shared fixtures: a real Mosquitto of our own on a free port, unique topics, a running pipeline.

No broker or socket is mocked. The session's Mosquitto is started from the `mosquitto`
binary (scripts/test installs it where missing) with its own config, so port 1883 and the
machine's broker are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ticker.core.dimensions import FESTIVAL_2020
from ticker.shell.aggregator import Aggregator
from ticker.shell.mqtt import BrokerSettings, Topics, watch_totals
from ticker.shell.server import TickerServer
from ticker.core.state import AggregateState
from ticker.core.wire import Limits

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

# Tests stop `gmv demo` and friends with SIGINT, as Ctrl-C would. A test run started in the
# background of a non-interactive shell (`scripts/test &`) inherits SIGINT ignored, and so
# would every process it starts (Python leaves an ignored SIGINT ignored): they then never
# stop. A handler here is reset to the default in each child, so Ctrl-C reaches them.
signal.signal(signal.SIGINT, signal.default_int_handler)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerSettings]:
    """A Mosquitto broker of the test session's own, on a free port of 127.0.0.1."""
    if not Path(MOSQUITTO).exists():
        pytest.fail("mosquitto is not installed: run scripts/test, which installs it")
    port = free_port()
    conf = tmp_path_factory.mktemp("mosquitto") / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 100000\nlog_dest none\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)])
    try:
        wait_for_port(port)
        yield BrokerSettings("127.0.0.1", port)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(autouse=True)
def state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Aggregators started by a test (in process or as `gmv aggregate`) keep their default
    checkpoints here, never in the real ~/.local/state."""
    directory = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("GMV_STATE_DIR", str(directory))
    return directory


@pytest.fixture
def topics() -> Topics:
    """A topic prefix no other test uses, so tests never see each other's messages."""
    return Topics(f"test/{uuid.uuid4().hex[:12]}")


def festival_limits() -> Limits:
    return Limits(n_brands=250_000, n_minutes=FESTIVAL_2020.minutes, n_countries=12,
                  n_platforms=3, max_order_cents=10**10)


@dataclass
class Pipeline:
    aggregator: Aggregator
    server: TickerServer
    port: int

    @property
    def state(self) -> AggregateState:
        return self.aggregator.state

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


@contextlib.asynccontextmanager
async def running_pipeline(broker: BrokerSettings, topics: Topics, *,
                           control_token: str | None = None,
                           server_options: dict | None = None) -> AsyncIterator[Pipeline]:
    """Aggregator and ticker server (port 0) running in this event loop against `broker`;
    `server_options` go to the TickerServer (comparison, brand names, currency)."""
    aggregator = Aggregator(broker, topics, festival_limits(), FESTIVAL_2020,
                            totals_interval=0.05, control_token=control_token)
    server = TickerServer(push_hz=20, **(server_options or {}))
    watch_ready = asyncio.Event()
    tasks = [
        asyncio.create_task(aggregator.run()),
        asyncio.create_task(watch_totals(broker, topics, server.receive_message,
                                         ready=watch_ready)),
        asyncio.create_task(server.run_pusher()),
    ]
    ws_server = await server.serve("127.0.0.1", 0)
    try:
        async with asyncio.timeout(10):
            await aggregator.ready.wait()
            await watch_ready.wait()
        yield Pipeline(aggregator, server, ws_server.sockets[0].getsockname()[1])
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ws_server.close()
        await ws_server.wait_closed()
