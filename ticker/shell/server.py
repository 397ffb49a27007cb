"""Ticker server: serves web/ over HTTP and pushes the merged totals on the `/ws` websocket.

Fan-out is one pass per version, driven by the pusher (no task per viewer): each version's
snapshot and update are encoded once, framed once as websocket text frames, and written to
every viewer's transport -- the update to viewers holding the previous version, the snapshot
to the others. A viewer whose socket buffer is full is skipped: it gets the newest state as
a snapshot once it drains, so a slow viewer never grows a queue or slows the others. Every
second, whether or not the view changed, every viewer gets one shared `heartbeat` saying how
long ago the server last heard live totals from an expected shard, so a page can tell
"connected but stale" from "live": only those totals make it fresh, so a replay status that
still changes cannot keep a page "LIVE" while the aggregators are dead. A replay status
expires 5 s after the last one.
(docs/performance.md: 5,000 viewers at 10 Hz; the per-viewer-task design took 3x the CPU.)

Nothing a publisher or a client sends can raise out of here: MQTT messages are checked by the
feed's schema, HTTP requests only ever match a fixed list of paths, viewers are capped at
`max_viewers`, and an operator's command is checked, rate-limited on wrong tokens and sent on
signed (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import mimetypes
import resource
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Origin

from ticker.core.control import ControlError, FailureLimiter, parse_command, read_answer, sign
from ticker.core.dimensions import DEFAULT_DIMENSIONS, Dimensions
from ticker.core.logthrottle import LogThrottle
from ticker.core.feed import Comparison, Currency, Feed, MessageError, UnknownShard, default_name
from ticker.shell import metrics
from ticker.shell.mqtt import ConnectionStats

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parents[2] / "web"
PAGE_COMMANDS = ("pause", "resume", "speed", "seek")  # not reset: that one wipes the totals
FD_MARGIN = 64  # open files kept for the listening socket, the broker, logs, HTTP requests


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files to its hard limit, where the system
    allows it; the (soft, hard) limits then in force, for the caller to log."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):  # e.g. an unlimited hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class TickerServer:
    """The feed, the viewers and the HTTP/websocket endpoint around them."""

    def __init__(self, *, web_dir: Path = WEB_DIR, push_hz: float = 10.0,
                 max_message_bytes: int = 4096,
                 allowed_origins: list[str] | None = None,
                 comparison: Comparison | None = None, control_token: str | None = None,
                 send_control: Callable[[bytes], Awaitable[None]] | None = None,
                 expected_shards: int = 1, max_viewers: int = 10_000,
                 brand_name: Callable[[int], str] = default_name,
                 currency: Currency | None = None,
                 dimensions: Dimensions = DEFAULT_DIMENSIONS) -> None:
        """`control_token` and `send_control`: an operator on the page (?operator=1) who
        gives the token may pause, resume, seek or change the speed of the replay; the
        command goes out signed with the token (`control.sign`), never carrying it.
        `expected_shards`: the aggregator shards "0" .. "N-1" whose totals are merged.
        `max_viewers`: open websockets at most (lowered to what the open-files limit can
        hold); past it, a new one gets HTTP 503. `brand_name`, `currency` and `dimensions`:
        the names of brand ids, the festival's exchange rate and the names of country and
        platform ids, for the view (`Feed`)."""
        if push_hz <= 0:
            raise ValueError(f"push_hz={push_hz}: must be positive")
        if max_viewers <= 0:
            raise ValueError(f"max_viewers={max_viewers}: must be positive")
        self.feed = Feed(comparison, expected_shards=expected_shards, brand_name=brand_name,
                         currency=currency, dimensions=dimensions)
        self.control_token = control_token
        self.send_control = send_control
        self.web_dir = web_dir.resolve()
        self._files = _files_of(self.web_dir)
        self.push_interval = 1.0 / push_hz
        self.max_message_bytes = max_message_bytes
        self.max_viewers = _within_fd_limit(max_viewers)
        self.allowed_origins = allowed_origins  # None: any Origin (and none)
        self._received = asyncio.Event()
        self._sent: dict[ServerConnection, int] = {}  # viewer -> version it holds
        self._connections: set[ServerConnection] = set()  # admitted to /ws, until closed
        self._primed = asyncio.Event()  # set once the view holds real totals
        self.prime_timeout = 2.0
        self.heartbeat_interval = 1.0
        self._wrong_tokens = FailureLimiter(burst=5, refill=1.0)  # shared by all viewers
        self._ignored_log, self._refused_log = LogThrottle(), LogThrottle()
        self._failed_log = LogThrottle()
        self._answers: dict[str, asyncio.Future] = {}  # nonce -> the replay's answer
        self.answer_timeout = 3.0
        self.frames_sent: Counter[str] = Counter()  # frames written to viewers, by kind
        self.frames_skipped = 0  # frames not written: the viewer's socket buffer was full
        self.broker_stats = ConnectionStats()  # of the totals watcher (mqtt.watch_totals)
        self.metrics = metrics.registry(metrics.ServerCollector(self))  # GET /metrics

    @property
    def viewers(self) -> int:
        """Websockets open or opening, idle or not."""
        return len(self._connections)

    def receive_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """One message from the totals or replay topic (see `mqtt.watch_totals`). Never
        raises: a message that does not fit is counted in the view's stats, logged now and
        then, and dropped."""
        parent, _, level = topic.rpartition("/")
        try:
            if parent.rpartition("/")[2] == "totals":
                # Only a live message from an expected shard says an aggregator is alive.
                self.feed.accept_totals(level, payload, None if retained else time.monotonic())
            elif level == "replay":
                self.feed.accept_replay(payload, retained=retained, now=time.monotonic())
            elif level == "answers":
                self._answered(payload)
                return
            else:
                return
        except UnknownShard as exc:
            if exc.new:
                log.warning("ignoring the totals on %.200r: %s (merging shards 0 to %d only)",
                            topic, exc, self.feed.expected_shards - 1)
        except MessageError as exc:
            if count := self._ignored_log.due(time.monotonic()):
                log.warning("ignored %d malformed message(s) on the totals and replay topics "
                            "since the last report; the latest, on %.200r: %s",
                            count, topic, exc)
        self._received.set()

    def receive_totals(self, totals: dict, fresh: bool = True) -> None:
        """A shard's checked totals (`feed.parse_totals`); `fresh` False for the broker's
        retained copy, which shows the last totals but says nothing about whether their
        aggregator is still alive."""
        self.feed.receive(totals, time.monotonic() if fresh else None)
        self._received.set()

    def _heartbeat(self) -> bytes:
        heard = self.feed.last_heard
        age_ms = None if heard is None else int((time.monotonic() - heard) * 1000)
        return orjson.dumps({"type": "heartbeat", "seq": self.feed.seq,
                             "upstream_age_ms": age_ms})

    async def run_pusher(self) -> None:
        """Fold received totals into a new version at once, then at most `push_hz` times a
        second on a fixed grid (the fan-out's own time does not stretch the period)."""
        loop = asyncio.get_running_loop()
        next_push = last_beat = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(last_beat + self.heartbeat_interval
                                               - loop.time(), 0)):
                    await self._received.wait()
            await asyncio.sleep(next_push - loop.time())
            self._received.clear()
            now = loop.time()
            try:
                self.feed.tick(time.monotonic())  # the replay status expires, quiet shards show
                if self.feed.publish():
                    self._fan_out()
                # Every second whatever else is sent: the page's only proof that totals are
                # fresh (a replay status or a quiet-shard change must not keep it "LIVE").
                if now - last_beat >= self.heartbeat_interval:
                    ready = [ws for ws in self._sent
                             if ws.transport.get_write_buffer_size() <= WRITE_BUFFER_LIMIT]
                    self.frames_skipped += len(self._sent) - len(ready)
                    self.frames_sent["heartbeat"] += self._write(ready, self._heartbeat())
                    last_beat = now
                if self.feed.shards:
                    self._primed.set()  # the view now holds real totals: new viewers may come
            except Exception:  # a bug must not stop every screen: log it, try again next push
                if count := self._failed_log.due(time.monotonic()):
                    log.exception("the push failed (%d time(s) since the last report)", count)
            next_push = max(next_push + self.push_interval, now)

    def _fan_out(self) -> None:
        seq = self.feed.seq
        behind_one: list[ServerConnection] = []
        others: list[ServerConnection] = []
        for ws, held in self._sent.items():
            if ws.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
                self.frames_skipped += 1
                continue  # a slow viewer: skipped now, a snapshot once it has drained
            (behind_one if held == seq - 1 else others).append(ws)
            self._sent[ws] = seq
        self.frames_sent["update"] += self._write(behind_one, self.feed.update_frame)
        self.frames_sent["snapshot"] += self._write(others, self.feed.snapshot_frame)

    @staticmethod
    def _write(viewers: list[ServerConnection], payload: bytes) -> int:
        """One text frame built once for everyone, written straight to each open transport
        (what websockets.broadcast does, minus serialising the frame per viewer); how many
        were written."""
        if not viewers:
            return 0
        frame, written = _text_frame(payload), 0
        for ws in viewers:
            if ws.protocol.state is State.OPEN:
                ws.transport.write(frame)
                written += 1
        return written

    async def serve(self, host: str, port: int) -> Server:
        # A large backlog: a wall of screens reconnecting at once after a restart.
        origins = None if self.allowed_origins is None \
            else [Origin(origin) for origin in self.allowed_origins]
        return await serve(self._viewer, host, port, process_request=self._http,
                           compression=None, max_size=self.max_message_bytes,
                           origins=origins, server_header="gmv-ticker",
                           backlog=2048)

    async def _viewer(self, ws: ServerConnection) -> None:
        try:
            # A server that just started has not had the retained totals yet: rather than
            # show $0.00 to a reconnecting screen, wait for them (at most prime_timeout).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.prime_timeout):
                    await self._primed.wait()
            seq = self.feed.seq
            await ws.send(self.feed.snapshot_frame, text=True)
            self.frames_sent["snapshot"] += 1
            self._sent[ws] = seq
            async for message in ws:  # only an operator's control commands are read
                reply = await self._control(message)
                if reply is not None:
                    await ws.send(orjson.dumps(reply), text=True)
        except ConnectionClosed:
            pass
        finally:
            self._sent.pop(ws, None)

    async def _control(self, message: str | bytes) -> dict | None:
        """Answer an operator's command; anything that is not one is ignored."""
        try:
            doc = orjson.loads(message)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(doc, dict) or doc.get("type") != "control":
            return None
        cmd = doc.get("cmd")
        try:
            detail = await self._forward(doc)
        except ControlError as exc:
            if count := self._refused_log.due(time.monotonic()):
                log.warning("refused %d control command(s) from viewers since the last "
                            "report; the latest: %s", count, exc)
            return {"type": "control_result", "ok": False, "cmd": cmd, "error": str(exc)}
        return {"type": "control_result", "ok": True, "cmd": cmd, "detail": detail}

    async def _forward(self, doc: dict) -> str:
        """Send the command on, signed, if the token is right and the command one the page
        may give, and wait for the replay's answer: what it did, or ControlError with why
        not (or that none answered). Wrong tokens drain a bucket shared by all viewers;
        while it is empty the token is not even checked, so guessing is held to about one
        try a second."""
        if self.send_control is None:
            raise ControlError("this server has no replay control")
        if self.control_token is None:
            raise ControlError("control is disabled here (no control token configured)")
        now = time.monotonic()
        if wait := self._wrong_tokens.retry_in(now):
            raise ControlError(f"too many wrong tokens; retry in {math.ceil(wait)} s")
        token = doc.get("token")
        if not isinstance(token, str) or \
                not hmac.compare_digest(token.encode(), self.control_token.encode()):
            self._wrong_tokens.failed(now)
            raise ControlError("bad token")
        command = parse_command(doc)
        if command.cmd not in PAGE_COMMANDS:
            raise ControlError(f"{command.cmd} is not accepted from the page: only "
                               f"{', '.join(PAGE_COMMANDS)}")
        nonce = secrets.token_hex(16)
        answer = self._answers[nonce] = asyncio.get_running_loop().create_future()
        try:
            await self.send_control(sign(command, self.control_token, now=time.time(),
                                         nonce=nonce))
            log.info("forwarded an operator's %s from the page", command)
            async with asyncio.timeout(self.answer_timeout):
                ok, detail = await answer
        except TimeoutError:
            raise ControlError(f"no replay answered {command.cmd} within "
                               f"{self.answer_timeout:g} s") from None
        finally:
            del self._answers[nonce]
        if not ok:
            raise ControlError(f"refused by the replay: {detail}")
        return detail

    def _answered(self, payload: bytes) -> None:
        """A replay's answer: settles the command of ours it names, if it is authentic."""
        if self.control_token is None:
            return
        with contextlib.suppress(ControlError):
            answer = read_answer(payload, self.control_token)
            waiting = self._answers.get(answer.nonce)
            if answer.verified and waiting is not None and not waiting.done():
                waiting.set_result((answer.ok, answer.detail))

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        """Static files, /api/totals and /metrics for GET and HEAD; /ws goes on to the
        handshake if there is room. Nothing in a request reaches the file system: only the
        files listed at start are served."""
        path = request.path.partition("?")[0]
        if path == "/ws":
            if request.method != "GET":
                return _response(HTTPStatus.METHOD_NOT_ALLOWED, b"GET only\n", "text/plain",
                                 [("Allow", "GET")])
            if self.viewers >= self.max_viewers:
                return _response(HTTPStatus.SERVICE_UNAVAILABLE,
                                 b"too many viewers; try again later\n", "text/plain",
                                 [("Retry-After", "10")])
            self._admit(connection)
            return None  # go on with the websocket handshake
        if request.method not in ("GET", "HEAD"):
            return _response(HTTPStatus.METHOD_NOT_ALLOWED, b"GET or HEAD only\n",
                             "text/plain", [("Allow", "GET, HEAD")])
        if path == "/api/totals":
            response = _response(HTTPStatus.OK, self.feed.snapshot_frame, "application/json")
        elif path == "/metrics":  # Prometheus (docs/metrics.md)
            response = metrics.exposition(self.metrics)
        else:
            response = _file_response(self._files.get(path))
        if request.method == "HEAD":
            response.body = b""  # Content-Length stays that of the body
        return response

    def _admit(self, connection: ServerConnection) -> None:
        """Count a viewer from its accepted handshake request until its socket closes,
        however that ends (a refused handshake, a close, a dead peer)."""
        self._connections.add(connection)
        connection.connection_lost_waiter.add_done_callback(
            lambda _: self._connections.discard(connection))


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


def _response(status: HTTPStatus, body: bytes, content_type: str,
              headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status.value, status.phrase, Headers([
        ("Content-Type", f"{content_type}; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-cache"), *(headers or [])]), body)


def _file_response(file: Path | None) -> Response:
    if file is not None:
        with contextlib.suppress(OSError):  # gone since start: as if it never was
            return _response(HTTPStatus.OK, file.read_bytes(), _content_type(file))
    return _response(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")


def _files_of(web_dir: Path) -> dict[str, Path]:
    """The URL path of every file directly in `web_dir` (no hidden ones); / is index.html."""
    files = {f"/{file.name}": file for file in web_dir.iterdir()
             if file.is_file() and not file.name.startswith(".")}
    if "/index.html" in files:
        files["/"] = files["/index.html"]
    return files


def _content_type(file: Path) -> str:
    return mimetypes.guess_type(file.name)[0] or "application/octet-stream"


def _within_fd_limit(max_viewers: int) -> int:
    """`max_viewers`, or fewer if this process may not open that many files (one a viewer)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    room = max(soft - FD_MARGIN, 1)
    if soft == resource.RLIM_INFINITY or max_viewers <= room:
        return max_viewers
    log.warning("max_viewers=%d: the open-files limit (ulimit -n) is %d, so at most %d "
                "viewers; raise the limit to allow more", max_viewers, soft, room)
    return room
