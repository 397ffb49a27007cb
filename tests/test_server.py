"""Ticker server over real sockets: static files, the JSON endpoint and the websocket feed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from ticker.core.control import Answer, Verifier, sign_answer
from ticker.core.feed import parse_totals
from ticker.shell.mqtt import ReliablePublisher
from ticker.shell.server import FD_MARGIN, TickerServer

from .conftest import free_port, wait_for_port
from .test_feed import full_totals, shard

ROOT = Path(__file__).resolve().parent.parent


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
                                  "/ticker/shell/server.py"])
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


async def test_a_push_that_fails_is_logged_and_the_next_one_still_reaches_the_screen(caplog):
    """A push that raises (a bug: here a fake, since no valid totals make `feed.publish` fail)
    is logged with its traceback and the pusher goes on; before, the exception ended the
    pusher task, and under `gmv serve` its task group and the whole server."""
    async with serving() as (server, port):
        server.receive_totals(shard("0", 100, 1, 0))
        await asyncio.sleep(0.05)
        async with ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
            assert orjson.loads(await ws.recv())["gmv_cents"] == 100
            publish, failures = server.feed.publish, []

            def failing_once() -> bool:
                if not failures:
                    failures.append(1)
                    raise RuntimeError("a bug in the feed")
                return publish()
            server.feed.publish = failing_once
            server.receive_totals(shard("0", 200, 1, 0))
            await asyncio.sleep(0.1)
            server.receive_totals(shard("0", 300, 1, 0))
            async with asyncio.timeout(5):  # frames until the newest total (or none: a hang)
                while orjson.loads(await ws.recv()).get("gmv_cents") != 300:
                    pass
    assert failures == [1]
    assert "the push failed (1 time(s) since the last report)" in caplog.text
    assert "RuntimeError: a bug in the feed" in caplog.text


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
            views = [f for f in frames if f["type"] != "heartbeat"]  # they come every second
            assert views[-1]["gmv_cents"] == 29


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


# --- what the broker delivers: anything ------------------------------------------------------

async def next_view(ws) -> dict:
    """The next snapshot or update, skipping heartbeats (5 s at most)."""
    async with asyncio.timeout(5):
        while (frame := orjson.loads(await ws.recv()))["type"] not in ("snapshot", "update"):
            pass
    return frame


async def test_malformed_totals_are_counted_and_the_feed_goes_on():
    """A retained totals message with gmv_cents "lots", or any other garbage, is counted and
    skipped: the screen keeps the last good totals and takes the next ones."""
    async with serving() as (server, port):
        server.receive_message("gmv/v1/totals/0", orjson.dumps(full_totals()), True)
        async with ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
            assert (await next_view(ws))["gmv_cents"] == 5000
            bad = [orjson.dumps(full_totals(gmv_cents="lots")), b"", b"\xff", b"[]", b"null",
                   b"{" * 10_000, orjson.dumps(full_totals(window=None))]
            for payload in bad:
                server.receive_message("gmv/v1/totals/0", payload, True)
            await asyncio.sleep(0.1)
            server.receive_message("gmv/v1/totals/0", orjson.dumps(full_totals(gmv_cents=6000)),
                                   False)
            async with asyncio.timeout(5):
                while (await next_view(ws)).get("gmv_cents") != 6000:
                    pass
    assert server.feed.view["stats"]["ignored_totals"] == len(bad)


def test_no_topic_or_payload_makes_receive_message_raise():
    """receive_message returns for any topic and bytes, and only well-formed totals of an
    expected shard reach the view."""
    server = TickerServer()
    for topic in ("", "/", "gmv/v1/totals/", "totals/0", "gmv/v1/replay", "gmv/v1/other",
                  "gmv/v1/totals/replay", "gmv/v1/totals/0/extra", "\x00" * 70_000):
        for payload in (b"", b"\x00" * 100_000, b'{"v": 1, "shard": "0"}', b"[" * 100_000,
                        orjson.dumps(full_totals())):
            server.receive_message(topic, payload, False)
    server.feed.publish()
    assert server.feed.view["gmv_cents"] == 5000  # from totals/0, the only good one


async def test_fake_shard_is_ignored_and_named_to_viewers():
    """Totals on totals/zz add nothing; the screen's stats name the shard, and the log names
    it once."""
    async with serving() as (server, port):
        server.receive_message("gmv/v1/totals/0", orjson.dumps(full_totals()), False)
        for _ in range(5):
            server.receive_message("gmv/v1/totals/zz", orjson.dumps(
                full_totals("zz", gmv_cents=10**14)), False)
        await asyncio.sleep(0.1)
        _, _, body = await asyncio.to_thread(http_get, port, "/api/totals")
    view = orjson.loads(body)
    assert view["gmv_cents"] == 5000 and view["stats"]["shards"] == 1
    assert view["stats"]["unknown_shards"] == ["zz"]
    assert view["stats"]["unknown_shard_messages"] == 5


def test_shards_up_to_expected_shards_merge():
    """With expected_shards=3, shards 0, 1 and 2 add up and shard 3 does not."""
    server = TickerServer(expected_shards=3)
    for name in "0123":
        server.receive_message(f"gmv/v1/totals/{name}", orjson.dumps(full_totals(name)), False)
    server.feed.publish()
    assert server.feed.view["gmv_cents"] == 15_000 and server.feed.unknown_shards == ["3"]


def test_expected_shards_and_max_viewers_must_be_positive():
    """expected_shards=0 and max_viewers=0 are refused, naming the parameter and the value."""
    with pytest.raises(ValueError, match="expected_shards=0: must be positive"):
        TickerServer(expected_shards=0)
    with pytest.raises(ValueError, match="max_viewers=0: must be positive"):
        TickerServer(max_viewers=0)


def test_refused_messages_are_logged_once_per_interval_with_a_count(caplog):
    """A thousand malformed messages make one warning line, not a thousand; each unknown shard
    is named once."""
    server = TickerServer()
    with caplog.at_level(logging.WARNING, logger="ticker.shell.server"):
        for i in range(1000):
            server.receive_message("gmv/v1/totals/0", b'{"gmv_cents": "lots"}', True)
            server.receive_message("gmv/v1/replay", b"nonsense", False)
            server.receive_message(f"gmv/v1/totals/{'zz' if i % 2 else 'yy'}", b"{}", True)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "ignored 1 malformed message(s)" in lines[0]
    assert all("Traceback" not in line for line in lines)
    assert sorted(line.split("'")[1] for line in lines[1:]) == ["gmv/v1/totals/yy",
                                                               "gmv/v1/totals/zz"]
    assert server.feed.ignored_totals == server.feed.ignored_replay == 1000


async def test_replay_status_is_shown_checked_and_cleared_by_an_empty_payload():
    """A valid replay status reaches the page, a malformed one is ignored, and the empty
    message that deletes it clears it (replays publish their status live, not retained)."""
    status = {"v": 1, "state": "paused", "speed": 60, "minute": 9, "scenario": "2020",
              "loop": True}
    async with serving() as (server, port):
        server.receive_message("gmv/v1/totals/0", orjson.dumps(full_totals()), True)
        server.receive_message("gmv/v1/replay", orjson.dumps(status), False)
        async with ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
            assert (await next_view(ws))["replay"]["state"] == "paused"
            server.receive_message("gmv/v1/replay", orjson.dumps({**status, "state": 7}),
                                   False)
            server.receive_message("gmv/v1/replay", b"", False)
            async with asyncio.timeout(5):
                while "replay" not in (update := await next_view(ws)):
                    pass
            assert update["replay"] is None
    assert server.feed.view["stats"]["ignored_replay"] == 1


# --- HTTP: methods and paths ------------------------------------------------------------------

def raw_answer(port: int, request: bytes) -> bytes:
    """Send bytes as they are; all the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def raw_http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are: the answer's status, headers and body."""
    head, _, body = raw_answer(port, request).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("method", ["PUT", "DELETE", "TRACE", "POST", "OPTIONS", "PATCH"])
async def test_methods_other_than_get_and_head_get_405(method):
    """Every other method gets 405 with Allow: GET, HEAD, on the page and /api/totals alike."""
    async with serving() as (_, port):
        for path in ("/", "/app.js", "/api/totals", "/nope"):
            status, headers, _ = await asyncio.to_thread(
                raw_http, port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert (status, headers["Allow"]) == (405, "GET, HEAD"), path


async def test_head_answers_the_headers_of_get_without_a_body():
    """HEAD gives the status and the Content-Length of the GET body, and no body."""
    async with serving() as (_, port):
        for path in ("/", "/style.css", "/api/totals", "/nope"):
            get = await asyncio.to_thread(raw_http, port, f"GET {path} HTTP/1.1\r\n\r\n".encode())
            head = await asyncio.to_thread(raw_http, port,
                                           f"HEAD {path} HTTP/1.1\r\n\r\n".encode())
            assert head[0] == get[0] and head[2] == b""
            assert int(head[1]["Content-Length"]) == len(get[2]) > 0


async def test_ws_with_another_method_never_reaches_the_handshake():
    """POST or HEAD on /ws with the upgrade headers gets 405 (Allow: GET), not a websocket."""
    upgrade = ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    async with serving() as (server, port):
        for method in ("POST", "HEAD", "PUT"):
            status, headers, _ = await asyncio.to_thread(
                raw_http, port, f"{method} /ws HTTP/1.1\r\n{upgrade}".encode())
            assert (status, headers["Allow"]) == (405, "GET")
        assert server.viewers == 0


@pytest.mark.parametrize("path", [b"/a\x00b", b"/%00", b"/index.html%00.js", b"/" + b"a" * 5000,
                                  b"/" + b"a/" * 3000, b"/..", b"/../README.md", b"/web/app.js",
                                  b"/%2e%2e%2fREADME.md", b"/app.js/", b"/a\\b", b"/\x01\x7f",
                                  b"/%C3%A9", b"//etc/passwd", b"/.", b"/.git", b"*",
                                  b"http://x/app.js", b"/" + b"x" * 9000])
async def test_odd_paths_get_404_or_414_never_500_nor_a_traceback(path, caplog):
    """NUL and control bytes, encoded NUL, long names, .., backslashes, directories: 404 (414
    past websockets' 8 KiB line), and nothing logged as an error."""
    async with serving() as (_, port):
        with caplog.at_level(logging.INFO):
            status, _, _ = await asyncio.to_thread(raw_http, port,
                                                   b"GET " + path + b" HTTP/1.1\r\n\r\n")
    assert status in (404, 414)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_a_non_ascii_request_line_is_closed_without_a_traceback(caplog):
    """A raw non-ASCII path (browsers percent-encode) is dropped by websockets' parser: no
    answer, no error logged, and the server still serves."""
    async with serving() as (_, port):
        with caplog.at_level(logging.INFO):
            answer = await asyncio.to_thread(raw_answer, port, "GET /é HTTP/1.1\r\n\r\n".encode())
            status, _, _ = await asyncio.to_thread(http_get, port, "/")
    assert answer == b""
    assert status == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


# --- viewers: how many ------------------------------------------------------------------------

async def test_past_max_viewers_a_websocket_gets_503_and_the_page_still_answers():
    """With max_viewers=2 and two idle websockets open, a third gets 503 with Retry-After, the
    page and /api/totals still answer, and a place frees when a viewer leaves."""
    async with serving(max_viewers=2) as (server, port):
        url = f"ws://127.0.0.1:{port}/ws"
        async with ws_connect(url), ws_connect(url) as second:  # idle: never read
            with pytest.raises(InvalidStatus) as refused:
                async with ws_connect(url):
                    pass
            assert refused.value.response.status_code == 503
            assert refused.value.response.headers["Retry-After"] == "10"
            for path in ("/", "/api/totals"):
                assert (await asyncio.to_thread(http_get, port, path))[0] == 200
            await second.close()
            async with asyncio.timeout(5):
                while server.viewers > 1:
                    await asyncio.sleep(0.01)
            async with ws_connect(url) as third:
                assert orjson.loads(await third.recv())["type"] == "snapshot"


def test_max_viewers_above_the_open_files_limit_is_lowered_with_a_warning(caplog):
    """max_viewers is cut to the open-files limit less a margin, and the log says so."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    with caplog.at_level(logging.WARNING, logger="ticker.shell.server"):
        server = TickerServer(max_viewers=soft + 1)
    assert server.max_viewers == soft - FD_MARGIN
    assert f"max_viewers={soft + 1}" in caplog.text and "ulimit -n" in caplog.text


def test_raise_fd_limit_lifts_the_soft_limit_to_the_hard_one():
    """In a process started with `ulimit -Sn 256`, raise_fd_limit sets the soft limit to the
    hard one and returns both."""
    child = ("import resource; from ticker.shell.server import raise_fd_limit; "
             "before = resource.getrlimit(resource.RLIMIT_NOFILE)[0]; "
             "print(before, *raise_fd_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[1])")
    out = subprocess.run(["bash", "-c", f'ulimit -Sn 256 && exec "$0" -c "{child}"',
                          sys.executable], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    before, soft, hard, real_hard = map(int, out)
    assert before == 256 and soft == hard == real_hard


# --- operator commands from the page ----------------------------------------------------------

TOKEN = "operator-token-for-tests"


@contextlib.asynccontextmanager
async def controlled(refuse: str | None = None):
    """A server with control: what it forwards to the broker lands in `sent`, and a stand-in
    for the replay (whose real answers tests/test_replay.py and the browser tests check)
    answers each command on the answers topic: obeyed, or refused with `refuse`."""
    sent: list[bytes] = []

    async def send_control(payload: bytes) -> None:
        sent.append(payload)
        doc = orjson.loads(payload)
        answer = Answer(doc["nonce"], doc["cmd"], refuse is None, refuse or f"did {doc['cmd']}",
                        "sim-test")
        asyncio.get_running_loop().call_soon(
            server.receive_message, "gmv/v1/answers", sign_answer(answer, TOKEN), False)

    async with serving(control_token=TOKEN, send_control=send_control) as (server, port):
        server.receive_totals(shard("0", 100, 1, 0))
        async with ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await next_view(ws)
            yield ws, sent


async def command(ws, **fields) -> dict:
    """Send a control frame and return its control_result."""
    await ws.send(orjson.dumps({"type": "control", **fields}).decode())
    async with asyncio.timeout(5):
        while (frame := orjson.loads(await ws.recv()))["type"] != "control_result":
            pass
    return frame


async def test_an_operator_command_goes_on_signed_and_without_the_token():
    """pause, speed and seek with the right token are forwarded as signed commands that
    verify with the token and do not contain it."""
    async with controlled() as (ws, sent):
        assert await command(ws, token=TOKEN, cmd="pause") == {
            "type": "control_result", "ok": True, "cmd": "pause", "detail": "did pause"}
        assert (await command(ws, token=TOKEN, cmd="speed", speed=120))["ok"]
        assert (await command(ws, token=TOKEN, cmd="seek", to="11-11 00:30"))["ok"]
    verifier = Verifier(TOKEN)
    assert [verifier.verify(p, time.time()).cmd for p in sent] == ["pause", "speed", "seek"]
    assert not any(TOKEN.encode() in p or b"token" in p for p in sent)


async def test_the_page_gets_the_replays_refusal_or_word_that_none_answered():
    """An operator's command ends with the replay's answer: its refusal and reason, or, when
    no replay answers, that none did (before, every forwarded command said ok)."""
    async with controlled(refuse="'11-40 00:00': expected MM-DD HH:MM") as (ws, sent):
        reply = await command(ws, token=TOKEN, cmd="seek", to="11-40 00:00")
    assert reply == {"type": "control_result", "ok": False, "cmd": "seek",
                     "error": "refused by the replay: '11-40 00:00': expected MM-DD HH:MM"}

    async def nobody(payload: bytes) -> None:
        pass

    async with serving(control_token=TOKEN, send_control=nobody) as (server, port):
        server.answer_timeout = 0.3
        async with ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await next_view(ws)
            reply = await command(ws, token=TOKEN, cmd="pause")
    assert reply == {"type": "control_result", "ok": False, "cmd": "pause",
                     "error": "no replay answered pause within 0.3 s"}


async def test_reset_is_refused_from_the_page():
    """reset, even with the right token, is refused with a clear error and nothing is sent."""
    async with controlled() as (ws, sent):
        reply = await command(ws, token=TOKEN, cmd="reset")
    assert reply == {"type": "control_result", "ok": False, "cmd": "reset",
                     "error": "reset is not accepted from the page: only pause, resume, "
                              "speed, seek"}
    assert sent == []


async def test_wrong_tokens_are_checked_about_once_a_second(caplog):
    """Of 100 wrong tokens sent at once only the first few are checked, the rest (and the
    right token meanwhile) refused unchecked; after a second the right token works again, and
    the refusals made one log line."""
    async with controlled() as (ws, sent):
        with caplog.at_level(logging.WARNING, logger="ticker.shell.server"):
            for i in range(100):
                await ws.send(orjson.dumps({"type": "control", "token": f"guess-{i}",
                                            "cmd": "pause"}).decode())
            errors: list[str] = []
            async with asyncio.timeout(5):
                while len(errors) < 100:
                    frame = orjson.loads(await ws.recv())
                    if frame["type"] == "control_result":
                        errors.append(frame["error"])
            locked = await command(ws, token=TOKEN, cmd="pause")
        assert 5 <= errors.count("bad token") <= 6
        assert sum(e.startswith("too many wrong tokens; retry in") for e in errors) >= 94
        assert not locked["ok"] and locked["error"].startswith("too many wrong tokens")
        await asyncio.sleep(1.1)
        assert (await command(ws, token=TOKEN, cmd="pause"))["ok"]
    assert len(sent) == 1
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1


# --- `gmv serve` as users run it ---------------------------------------------------------------

async def test_gmv_serve_survives_malformed_and_fake_retained_totals(mosquitto, topics,
                                                                      tmp_path):
    """The field report: a retained `"gmv_cents":"lots"` killed `gmv serve` and every restart,
    and a fake shard on totals/zz added $1T to every screen. Now both are counted and shown as
    such, the process stays up, and the real shard's total is what the screen says."""
    async with ReliablePublisher(mosquitto) as publisher:
        for topic, doc in ((topics.totals("0"), {**shard("0", 5, 1, 0), "gmv_cents": "lots"}),
                           (topics.totals("zz"), shard("zz", 10**14, 1, 0))):
            await publisher.send(topic, orjson.dumps(doc), retain=True)
        await publisher.flush()
        port, log = free_port(), tmp_path / "serve.log"
        with open(log, "wb") as out:
            serve = subprocess.Popen([sys.executable, "-m", "gmv.cli", "serve", "--broker",
                                      mosquitto.url, "--prefix", topics.prefix, "--port",
                                      str(port)], stderr=out)
            try:
                await asyncio.to_thread(wait_for_port, port)
                await asyncio.sleep(1.0)
                await publisher.send(topics.totals("0"), orjson.dumps(shard("0", 4200, 2, 9)),
                                     retain=True)
                await publisher.flush()
                for _ in range(50):
                    status, _, body = await asyncio.to_thread(http_get, port, "/api/totals")
                    if orjson.loads(body)["gmv_cents"] == 4200:
                        break
                    await asyncio.sleep(0.1)
                alive = serve.poll() is None
            finally:
                serve.terminate()
                serve.wait(10)
    view = orjson.loads(body)
    assert alive and view["gmv_cents"] == 4200
    assert view["stats"]["ignored_totals"] == 1 and view["stats"]["unknown_shards"] == ["zz"]
    assert b"Traceback" not in log.read_bytes()


async def test_gmv_serve_answers_past_1100_idle_websockets_under_a_1024_soft_limit(
        mosquitto, topics):
    """The field report: 1,100 idle websockets used up the default 1,024 file descriptors and
    every new request timed out. `gmv serve` raises its soft limit to the hard one at start."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard limit on open files is {hard}: too low to show the fix")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))  # for our clients
    port = free_port()

    def at_1024() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    serve = subprocess.Popen([sys.executable, "-m", "gmv.cli", "serve", "--broker",
                              mosquitto.url, "--prefix", topics.prefix, "--port", str(port)],
                             preexec_fn=at_1024, stderr=subprocess.PIPE, text=True)
    viewers = []
    try:
        await asyncio.to_thread(wait_for_port, port)
        for _ in range(1100):
            viewers.append(await ws_connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10))
        status, _, _ = await asyncio.to_thread(http_get, port, "/api/totals")
        late = await ws_connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10)
        viewers.append(late)
    finally:
        await asyncio.gather(*(v.close() for v in viewers), return_exceptions=True)
        serve.terminate()
        _, err = serve.communicate(timeout=10)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert status == 200 and len(viewers) == 1101
    assert f"open files: up to {hard:,}" in err


# --- any sequence of messages on the topics the server subscribes to ----------------------------

_totals_docs = st.builds(
    lambda name, gmv, orders, field, value: {**full_totals(name, gmv_cents=gmv, orders=orders),
                                             **({field: value} if field else {})},
    st.sampled_from(["0", "1", "zz", ""]), st.integers(-1, 2**64 - 1), st.integers(0, 10),
    st.sampled_from([None, "minute", "window", "country_gmv_cents", "rejected", "shard", "v",
                     "recent_gmv_cents", "latency_ms", "gaps", "brands_big", "big_brand_cents",
                     "big_brand_minutes", "top_brands", "recent_orders", "curve_cents",
                     "curve_bucket_minutes"]),
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
              st.text(max_size=5), st.lists(st.integers(0, 3), max_size=300),
              st.dictionaries(st.text(max_size=3), st.integers(0, 2**60), max_size=3),
              st.lists(st.lists(st.integers(-1, 2**33), max_size=3), max_size=12),
              st.lists(st.integers(-2, 16_000), max_size=12),
              st.builds(lambda n, v: [v] * n, st.integers(995, 1005), st.integers(0, 15_839)),
              st.builds(lambda n, v: [v] * n, st.integers(1, 3), st.integers(2**53 - 2,
                                                                              2**53))))
_server_payloads = st.one_of(
    _totals_docs.map(lambda d: orjson.dumps(d, option=orjson.OPT_NON_STR_KEYS)),
    st.binary(max_size=40),
    st.builds(lambda state, speed, extra: orjson.dumps({"v": 1, "state": state, "speed": speed,
                                                        "minute": 3, "scenario": "2020",
                                                        "loop": False, **extra}),
              st.sampled_from(["playing", "done", "bogus"]),
              st.one_of(st.none(), st.floats(), st.integers(-5, 5)),
              st.dictionaries(st.sampled_from(["from", "to", "run"]),
                              st.one_of(st.integers(-1, 20_000), st.text(max_size=70)),
                              max_size=3)))
_server_topics = st.sampled_from(["gmv/v1/totals/0", "gmv/v1/totals/1", "gmv/v1/totals/zz",
                                  "gmv/v1/totals/", "gmv/v1/replay", "gmv/v1/orders/a/0", ""])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_server_topics, _server_payloads, st.booleans()), max_size=25))
def test_any_messages_on_its_topics_never_raise_and_only_valid_totals_move_the_view(stream):
    """Whatever arrives on any topic the server subscribes to, receive_message returns, the
    view always encodes, and its GMV is the sum of the last valid totals of each expected
    shard (here 0 and 1), nothing else; the screen's figures stay in their bounds."""
    server, last = TickerServer(expected_shards=2), {}
    for i, (topic, payload, retained) in enumerate(stream):
        server.receive_message(topic, payload, retained)
        server.feed.tick(time.monotonic() + i)
        kind, _, shard_id = topic.rpartition("/")
        if kind == "gmv/v1/totals" and shard_id in ("0", "1"):
            with contextlib.suppress(ValueError):
                last[shard_id] = parse_totals(shard_id, orjson.loads(payload))["gmv_cents"]
        server.feed.publish()
        orjson.loads(server.feed.snapshot_frame)
        view = server.feed.view
        assert view["gmv_cents"] == sum(last.values())
        assert len(view["top_brands"]) <= 10 and len(view["milestones"]) <= 11
        assert [m["minute"] for m in view["milestones"]] == \
            sorted(m["minute"] for m in view["milestones"])


# --- liveness: a heartbeat every second, the replay status expires ---------------------------

async def test_a_heartbeat_comes_every_second_while_the_view_changes():
    """Totals changing 20 times a second still leave a heartbeat every second (before, it came
    only after a quiet second, so a page fed by anything at all stayed "LIVE")."""
    async with serving() as (server, port):
        server.receive_totals(shard("0", 1, 1, 0))
        async with ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
            beats, views = [], 0

            async def feed() -> None:
                for gmv in range(2, 80):
                    server.receive_totals(shard("0", gmv, 1, 0))
                    await asyncio.sleep(0.05)
            feeding = asyncio.create_task(feed())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3.6):
                    while True:
                        frame = orjson.loads(await ws.recv())
                        if frame["type"] == "heartbeat":
                            beats.append((time.monotonic(), frame["upstream_age_ms"]))
                        else:
                            views += 1
            await feeding
    assert views > 30 and len(beats) >= 3
    assert all(0.8 < b[0] - a[0] < 1.3 for a, b in zip(beats, beats[1:]))
    assert all(age < 500 for _, age in beats)


async def test_the_replay_status_goes_null_5_s_after_the_last_one():
    """The page's replay status is dropped 5 s after the last status message, and a status
    does not make the totals fresh."""
    async with serving() as (server, port):
        server.receive_totals(shard("0", 1, 1, 0), False)
        async with ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.recv()
            server.receive_message("gmv/v1/replay", orjson.dumps(
                {"v": 1, "state": "playing", "speed": 60, "minute": 9}), False)
            sent = time.monotonic()
            replay, ages = "unset", []
            async with asyncio.timeout(8):
                while replay is not None:
                    frame = orjson.loads(await ws.recv())
                    if frame["type"] == "heartbeat":
                        ages.append(frame["upstream_age_ms"])
                    elif "replay" in frame:
                        replay = frame["replay"]
            gone = time.monotonic() - sent
    assert 5.0 <= gone < 6.3 and set(ages) == {None}


async def test_a_real_gmv_serve_beats_every_second_and_drops_a_stale_replay_status(
        mosquitto, topics, tmp_path):
    """A real `gmv serve` with a real broker: while an aggregator's totals change ten times a
    second, a heartbeat comes every second with a small upstream age; when they stop and only
    replay statuses come, the age grows (so the page turns STALE); 5 s after the last status
    the view's `replay` is null."""
    port, log = free_port(), tmp_path / "serve.log"
    frames: list[tuple[float, dict]] = []
    async with ReliablePublisher(mosquitto) as publisher:
        with open(log, "wb") as out:
            serve = subprocess.Popen([sys.executable, "-m", "gmv.cli", "serve", "--broker",
                                      mosquitto.url, "--prefix", topics.prefix, "--port",
                                      str(port)], stderr=out)
            try:
                await asyncio.to_thread(wait_for_port, port)
                async with ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
                    async def read() -> None:
                        while True:
                            frames.append((time.monotonic(), orjson.loads(await ws.recv())))
                    reader = asyncio.create_task(read())
                    for gmv in range(1, 41):  # 4 s of an aggregator publishing
                        await publisher.send(topics.totals("0"),
                                             orjson.dumps(shard("0", gmv, gmv, 0)))
                        await asyncio.sleep(0.1)
                    totals_end = time.monotonic()
                    for minute in range(6):  # 3 s of replay statuses only
                        last_status = time.monotonic()  # the server hears it after this
                        await publisher.send(topics.replay, orjson.dumps(
                            {"v": 1, "state": "playing", "speed": 60, "minute": minute}))
                        await asyncio.sleep(0.5)
                    await asyncio.sleep(6.5)
                    reader.cancel()
            finally:
                serve.terminate()
                serve.wait(10)
    beats = [(t, f["upstream_age_ms"]) for t, f in frames if f["type"] == "heartbeat"]
    live = [b for b in beats if b[0] < totals_end]
    # Read times jitter with this test's own loop: count beats, and allow a late one.
    assert len(live) >= 3 and all(age is not None and age < 1000 for _, age in live[1:])
    assert len(beats) >= 11 and all(b[0] - a[0] < 2.2 for a, b in zip(beats, beats[1:]))
    late = [age for t, age in beats if t > totals_end + 3]
    assert late and min(late) > 2500
    replays = [(t, f["replay"]) for t, f in frames if "replay" in f]
    shown = [t for t, r in replays if r is not None and r["minute"] == 5]  # the last status
    cleared = [t for t, r in replays if r is None and t > last_status]
    assert shown and cleared and 4.5 < cleared[0] - shown[0] < 6.5
    assert b"Traceback" not in log.read_bytes()


async def test_only_valid_live_totals_of_an_expected_shard_make_the_heartbeat_fresh():
    """A live message on the totals topics that does not fit its schema, or comes from a
    shard that is not expected, says nothing about the aggregators: upstream_age_ms stays
    null until real totals come."""
    async with serving() as (server, port):
        server.receive_message("gmv/v1/totals/0", b'{"gmv_cents": "lots"}', False)
        server.receive_message("gmv/v1/totals/7", orjson.dumps(full_totals("7")), False)
        async with ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.recv()
            async with asyncio.timeout(3):
                while (beat := orjson.loads(await ws.recv()))["type"] != "heartbeat":
                    pass
            assert beat["upstream_age_ms"] is None
            server.receive_message("gmv/v1/totals/0", orjson.dumps(full_totals()), False)
            async with asyncio.timeout(3):
                while (beat := orjson.loads(await ws.recv()))["type"] != "heartbeat":
                    pass
    assert beat["upstream_age_ms"] is not None and beat["upstream_age_ms"] < 1100
