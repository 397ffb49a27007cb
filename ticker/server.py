"""Ticker server: serves web/ over HTTP and pushes the merged totals on the `/ws` websocket.

Fan-out is one pass per version, driven by the pusher (no task per viewer): each version's
snapshot and update are encoded once, framed once as websocket text frames, and written to
every viewer's transport -- the update to viewers holding the previous version, the snapshot
to the others. A viewer whose socket buffer is full is skipped: it gets the newest state as
a snapshot once it drains, so a slow viewer never grows a queue or slows the others. With
nothing new for a second, every viewer gets one shared `heartbeat` saying how long ago the
server last heard from an aggregator, so a page can tell "connected but stale" from "live".
(docs/performance.md: 5,000 viewers at 10 Hz; the per-viewer-task design took 3x the CPU.)
"""

from __future__ import annotations

import asyncio
import contextlib
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
from websockets.protocol import State

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
        self._received = asyncio.Event()
        self._sent: dict[ServerConnection, int] = {}  # viewer -> version it holds
        self._primed = asyncio.Event()  # set once the view holds real totals
        self.prime_timeout = 2.0
        self.viewers = 0
        self.heartbeat_interval = 1.0
        self._last_totals_at = -math.inf  # nothing heard yet: not fresh

    def receive_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """One message from the totals or replay topic (see `mqtt.watch_totals`)."""
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            log.warning("ignoring a malformed message on %s", topic)
            return
        if not isinstance(doc, dict) or doc.get("v") != 1:
            return
        if topic.rsplit("/", 1)[-1] == "replay":
            self.receive_replay(doc)
        elif "shard" in doc:
            self.receive_totals(doc, not retained)

    def receive_totals(self, totals: dict, fresh: bool = True) -> None:
        """A shard's totals; `fresh` False for the broker's retained copy, which shows the
        last totals but says nothing about whether their aggregator is still alive."""
        if fresh:
            self._last_totals_at = time.monotonic()
        self.feed.receive(totals)
        self._received.set()

    def receive_replay(self, status: dict) -> None:
        self.feed.receive_replay(status)
        self._received.set()

    def _heartbeat(self) -> bytes:
        age = time.monotonic() - self._last_totals_at
        age_ms = int(age * 1000) if math.isfinite(age) else None
        return orjson.dumps({"type": "heartbeat", "seq": self.feed.seq,
                             "upstream_age_ms": age_ms})

    async def run_pusher(self) -> None:
        """Fold received totals into a new version at once, then at most `push_hz` times a
        second on a fixed grid (the fan-out's own time does not stretch the period)."""
        loop = asyncio.get_running_loop()
        next_push = last_frame = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_interval):
                    await self._received.wait()
            await asyncio.sleep(next_push - loop.time())
            self._received.clear()
            now = loop.time()
            if self.feed.publish():
                self._fan_out()
                last_frame = now
            elif now - last_frame >= self.heartbeat_interval:
                self._write(list(self._sent), self._heartbeat())
                last_frame = now
            if self.feed.shards:
                self._primed.set()  # the view now holds real totals: new viewers may come
            next_push = max(next_push + self.push_interval, now)

    def _fan_out(self) -> None:
        seq, behind_one, others = self.feed.seq, [], []
        for ws, held in self._sent.items():
            if ws.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
                continue  # a slow viewer: skipped now, a snapshot once it has drained
            (behind_one if held == seq - 1 else others).append(ws)
            self._sent[ws] = seq
        self._write(behind_one, self.feed.update_frame)
        self._write(others, self.feed.snapshot_frame)

    @staticmethod
    def _write(viewers: list[ServerConnection], payload: bytes) -> None:
        """One text frame built once for everyone, written straight to each open transport
        (what websockets.broadcast does, minus serialising the frame per viewer)."""
        if not viewers:
            return
        frame = _text_frame(payload)
        for ws in viewers:
            if ws.protocol.state is State.OPEN:
                ws.transport.write(frame)

    async def serve(self, host: str, port: int) -> Server:
        # A large backlog: a wall of screens reconnecting at once after a restart.
        return await serve(self._viewer, host, port, process_request=self._http,
                           compression=None, max_size=self.max_message_bytes,
                           origins=self.allowed_origins, server_header="gmv-ticker",
                           backlog=2048)

    async def _viewer(self, ws: ServerConnection) -> None:
        self.viewers += 1
        try:
            # A server that just started has not had the retained totals yet: rather than
            # show $0.00 to a reconnecting screen, wait for them (at most prime_timeout).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.prime_timeout):
                    await self._primed.wait()
            seq = self.feed.seq
            await ws.send(self.feed.snapshot_frame, text=True)
            self._sent[ws] = seq
            async for message in ws:  # only an operator's control commands are read
                reply = await self._control(message)
                if reply is not None:
                    await ws.send(orjson.dumps(reply), text=True)
        except ConnectionClosed:
            pass
        finally:
            self._sent.pop(ws, None)
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


WRITE_BUFFER_LIMIT = 64 * 1024  # a viewer with more unsent than this is skipped


def _text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented RFC 6455 text frame, as a server sends it."""
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 65536:
        header = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return header + payload


def _response(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", f"{content_type}; charset=utf-8"),
                       ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-cache")])
    return Response(status.value, status.phrase, headers, body)
