"""Ticker server over real sockets: static files, the JSON endpoint and the websocket feed."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.error
import urllib.request

import orjson
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from ticker.server import TickerServer

from .test_feed import shard


@contextlib.asynccontextmanager
async def serving(**options):
    server = TickerServer(push_hz=50, **options)
    ws_server = await server.serve("127.0.0.1", 0)
    pusher = asyncio.create_task(server.run_pusher())
    try:
        yield server, ws_server.sockets[0].getsockname()[1]
    finally:
        pusher.cancel()
        ws_server.close()
        await ws_server.wait_closed()


def http_get(port: int, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


async def test_serves_the_page_and_its_assets():
    """/ is index.html and the page's CSS and JS come with their content types."""
    async with serving() as (_, port):
        status, kind, body = await asyncio.to_thread(http_get, port, "/")
        assert status == 200 and kind.startswith("text/html") and b"app.js" in body
        status, kind, _ = await asyncio.to_thread(http_get, port, "/app.js")
        assert status == 200 and "javascript" in kind
        status, kind, _ = await asyncio.to_thread(http_get, port, "/style.css")
        assert status == 200 and kind.startswith("text/css")


@pytest.mark.parametrize("path", ["/nope.js", "/../pyproject.toml", "/%2e%2e/pyproject.toml",
                                  "/ticker/server.py"])
async def test_only_files_of_web_dir_are_served(path):
    """Unknown files and paths outside web/ get 404, never a file from elsewhere."""
    async with serving() as (_, port):
        status, _, body = await asyncio.to_thread(http_get, port, path)
    assert status == 404 and b"not found" in body


async def test_totals_endpoint_returns_the_current_snapshot():
    """GET /api/totals answers the same snapshot a websocket viewer would get."""
    async with serving() as (server, port):
        server.receive_totals(shard("0", 4200, 2, 9))
        await asyncio.sleep(0.1)
        status, kind, body = await asyncio.to_thread(http_get, port, "/api/totals")
    snapshot = orjson.loads(body)
    assert status == 200 and kind.startswith("application/json")
    assert snapshot["type"] == "snapshot" and snapshot["gmv_cents"] == 4200


async def test_viewer_gets_snapshot_on_connect_then_consecutive_updates():
    """A new viewer first gets the full state, then updates numbered seq+1, seq+2, ..."""
    async with serving() as (server, port):
        server.receive_totals(shard("0", 100, 1, 0))
        await asyncio.sleep(0.05)
        async with ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
            first = orjson.loads(await ws.recv())
            assert first["type"] == "snapshot" and first["gmv_cents"] == 100
            for gmv in (200, 300):
                server.receive_totals(shard("0", gmv, 1, 0))
                update = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
                assert update["type"] == "update" and update["gmv_cents"] == gmv
                assert update["seq"] == first["seq"] + (gmv // 100 - 1)
                assert "window" not in update  # unchanged fields are not resent


async def test_late_reader_ends_on_the_newest_state():
    """A viewer that starts reading late still ends on the newest state."""
    async with serving() as (server, port):
        async with ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.recv()
            for gmv in range(1, 30):
                server.receive_totals(shard("0", gmv, 1, 0))
                await asyncio.sleep(0.025)
            await asyncio.sleep(0.1)
            frames = []
            with contextlib.suppress(TimeoutError):
                while True:
                    frames.append(orjson.loads(await asyncio.wait_for(ws.recv(), 0.3)))
            assert frames[-1]["gmv_cents"] == 29


async def test_viewer_messages_change_nothing_and_oversized_ones_close():
    """Whatever a viewer sends is ignored; a frame above the size limit closes its socket."""
    async with serving(max_message_bytes=1024) as (server, port):
        server.receive_totals(shard("0", 500, 1, 0))
        await asyncio.sleep(0.05)
        async with ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.recv()
            await ws.send('{"type":"snapshot","gmv_cents":1}')
            await ws.send("x" * 2048)
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(5):
                    while True:
                        await ws.recv()
        assert server.feed.view["gmv_cents"] == 500


async def test_quiet_feed_sends_one_heartbeat_a_second_with_the_upstream_age():
    """With nothing new, viewers get a heartbeat each second saying how old the totals are."""
    async with serving() as (server, port):
        server.receive_totals(shard("0", 100, 1, 0))
        async with ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
            assert orjson.loads(await ws.recv())["type"] == "snapshot"
            beats = [orjson.loads(await asyncio.wait_for(ws.recv(), 3)) for _ in range(2)]
    assert [b["type"] for b in beats] == ["heartbeat", "heartbeat"]
    assert 500 < beats[1]["upstream_age_ms"] < 4000


async def test_retained_totals_show_but_do_not_count_as_fresh():
    """Totals the broker kept (retained) are displayed, with no claim that they are live."""
    async with serving() as (server, port):
        server.receive_totals(shard("0", 100, 1, 0), False)
        async with ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
            assert orjson.loads(await ws.recv())["gmv_cents"] == 100
            beat = orjson.loads(await asyncio.wait_for(ws.recv(), 3))
    assert beat["type"] == "heartbeat" and beat["upstream_age_ms"] is None
