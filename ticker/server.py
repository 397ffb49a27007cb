"""Ticker server: serves web/ over HTTP and pushes the merged totals on the `/ws` websocket.

A viewer with nothing new for a second gets a `heartbeat` saying how long ago the server last
heard from an aggregator, so a page can tell "connected but stale" from "live".

Fan-out keeps only the latest state per viewer: each viewer's task sleeps until the feed
has a newer version than the one it last sent, then sends one frame that brings it up to
date (an update if it is one version behind, a full snapshot otherwise). A slow viewer
therefore skips versions instead of growing a queue, and never slows the others.
"""

from __future__ import annotations

import asyncio
import logging
import math
import mimetypes
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .control import ControlError, parse_command
from .feed import Comparison, Feed

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


class TickerServer:
    """The feed, the viewers and the HTTP/websocket endpoint around them."""

    def __init__(self, *, web_dir: Path = WEB_DIR, push_hz: float = 10.0,
                 max_message_bytes: int = 4096,
                 allowed_origins: list[str] | None = None,
                 comparison: Comparison | None = None, control_token: str | None = None,
                 send_control: Callable[[bytes], Awaitable[None]] | None = None) -> None:
        """`control_token` and `send_control`: an operator on the page (?operator=1) who
        gives the token may pause, resume, seek or change the speed of the replay."""
        if push_hz <= 0:
            raise ValueError(f"push_hz={push_hz}: must be positive")
        self.feed = Feed(comparison)
        self.control_token = control_token
        self.send_control = send_control
        self.web_dir = web_dir.resolve()
        self.push_interval = 1.0 / push_hz
        self.max_message_bytes = max_message_bytes
        self.allowed_origins = allowed_origins  # None: any Origin (and none)
        self._changed = asyncio.Event()
        self._received = asyncio.Event()
        self._primed = asyncio.Event()  # set by the first totals, or after prime_timeout
        self.prime_timeout = 2.0
        self.viewers = 0
        self.heartbeat_interval = 1.0
        self._last_totals_at = -math.inf  # nothing heard yet: not fresh

    def receive_totals(self, totals: dict, fresh: bool = True) -> None:
        """A shard's totals; `fresh` False for the broker's retained copy, which shows the
        last totals but says nothing about whether their aggregator is still alive."""
        if fresh:
            self._last_totals_at = time.monotonic()
        self.feed.receive(totals)
        self._received.set()
        self._primed.set()

    def receive_replay(self, status: dict) -> None:
        self.feed.receive_replay(status)
        self._received.set()

    def _heartbeat(self, seq: int) -> bytes:
        age = time.monotonic() - self._last_totals_at
        age_ms = int(age * 1000) if math.isfinite(age) else None
        return orjson.dumps({"type": "heartbeat", "seq": seq, "upstream_age_ms": age_ms})

    async def run_pusher(self) -> None:
        """Fold received totals into a new version at once, then at most `push_hz` times a
        second: no added delay after a quiet spell, no more frames than viewers want."""
        asyncio.get_running_loop().call_later(self.prime_timeout, self._primed.set)
        while True:
            await self._received.wait()
            self._received.clear()
            if self.feed.publish():
                changed, self._changed = self._changed, asyncio.Event()
                changed.set()
            await asyncio.sleep(self.push_interval)

    async def serve(self, host: str, port: int) -> Server:
        return await serve(self._viewer, host, port, process_request=self._http,
                           compression=None, max_size=self.max_message_bytes,
                           origins=self.allowed_origins, server_header="gmv-ticker")

    async def _viewer(self, ws: ServerConnection) -> None:
        self.viewers += 1
        sender = asyncio.create_task(self._send_latest(ws), name="viewer-send")
        try:
            async for message in ws:  # only an operator's control commands are read
                reply = await self._control(message)
                if reply is not None:
                    await ws.send(orjson.dumps(reply), text=True)
        except ConnectionClosed:
            pass
        finally:
            sender.cancel()
            self.viewers -= 1

    async def _control(self, message: str | bytes) -> dict | None:
        """Forward an operator's command if its token is right; anything else is ignored."""
        try:
            doc = orjson.loads(message)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(doc, dict) or doc.get("type") != "control":
            return None
        cmd = doc.get("cmd")
        try:
            if self.send_control is None:
                raise ControlError("this server has no replay control")
            command = parse_command(doc, self.control_token)
            await self.send_control(command.encode(self.control_token or ""))
        except ControlError as exc:
            log.warning("refused a control command: %s", exc)
            return {"type": "control_result", "ok": False, "cmd": cmd, "error": str(exc)}
        return {"type": "control_result", "ok": True, "cmd": cmd}

    async def _send_latest(self, ws: ServerConnection) -> None:
        sent = 0
        # A server that just started has not had the retained totals yet: rather than show
        # $0.00 to a reconnecting screen, wait for them (or for prime_timeout, if none come).
        await self._primed.wait()
        try:
            while True:
                if self.feed.seq == sent:
                    try:
                        await asyncio.wait_for(self._changed.wait(), self.heartbeat_interval)
                    except TimeoutError:
                        await ws.send(self._heartbeat(sent), text=True)
                    continue
                seq, frame = self.feed.seq, self.feed.frame_for(sent)
                await ws.send(frame, text=True)
                sent = seq
        except ConnectionClosed:
            pass

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/ws":
            return None  # go on with the websocket handshake
        if path == "/api/totals":
            return _response(HTTPStatus.OK, self.feed.snapshot_frame, "application/json")
        name = "index.html" if path == "/" else path.lstrip("/")
        file = (self.web_dir / name).resolve()
        if file.parent != self.web_dir or not file.is_file():
            return _response(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
        kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        return _response(HTTPStatus.OK, file.read_bytes(), kind)


def _response(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", f"{content_type}; charset=utf-8"),
                       ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-cache")])
    return Response(status.value, status.phrase, headers, body)
