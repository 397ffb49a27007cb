"""Security: MQTT login and TLS, websocket origins, the bind address, what viewers can do.

Real Mosquitto processes with their own configs on free ports of 127.0.0.1, keys and
certificates made with openssl in the session's tmp dir (never committed), real sockets and
real `gmv` processes; nothing is mocked. See docs/security.md for the settings tested here.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from gmv.cli import main

from .conftest import MOSQUITTO, free_port, wait_for_port
from .test_feed import shard
from .test_server import serving

GMV = [sys.executable, "-m", "gmv.cli"]
TOTAL = 7_410_000_000_000  # the 2020 scenario's GMV in cents, at any order scale
SCALE = ["--order-scale", "0.0001"]
SCREENS = "https://screens.example"


def _tool(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if Path(p).exists()), None)
    if path is None:
        pytest.fail(f"{name} is not installed (Debian: apt-get install "
                    f"{'openssl' if name == 'openssl' else 'mosquitto'})")
    return path


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA and a server certificate for 127.0.0.1 (an IP SAN) signed by it."""
    openssl, d = _tool("openssl"), tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=gmv test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-set_serial", "1", "-days", "2", "-extfile", "server.ext", "-out", "server.crt")
    return Pki(d / "ca.crt", d / "server.crt", d / "server.key")


@contextlib.contextmanager
def mosquitto_with(conf_dir: Path, lines: list[str]) -> Iterator[int]:
    """A Mosquitto of our own on a free port of 127.0.0.1 with extra config lines."""
    port = free_port()
    conf = conf_dir / "mosquitto.conf"
    # Run as root, Mosquitto drops to user `mosquitto`, which cannot read our tmp dir: stay
    # the current user (the setting has no effect for other users).
    conf.write_text("\n".join([f"listener {port} 127.0.0.1", *lines, "persistence false",
                               "max_queued_messages 100000", "log_dest none",
                               f"user {getpass.getuser()}", ""]))
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)])
    try:
        wait_for_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@dataclass
class AuthBroker:
    url: str
    good: Path  # file holding the right password
    bad: Path  # file holding a wrong one


@pytest.fixture(scope="session")
def auth_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthBroker]:
    """Mosquitto with `allow_anonymous false` and one user `user` / `secret`."""
    d = tmp_path_factory.mktemp("mosquitto-auth")
    subprocess.run([_tool("mosquitto_passwd"), "-b", "-c", str(d / "passwd"), "user", "secret"],
                   check=True, capture_output=True, timeout=30)
    (d / "good").write_text("secret\n")
    (d / "bad").write_text("not-the-secret\n")
    with mosquitto_with(d, ["allow_anonymous false", f"password_file {d / 'passwd'}"]) as port:
        yield AuthBroker(f"mqtt://127.0.0.1:{port}", d / "good", d / "bad")


@pytest.fixture(scope="session")
def tls_port(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[int]:
    """Mosquitto with only a TLS listener (certificate for 127.0.0.1 from the test CA)."""
    with mosquitto_with(tmp_path_factory.mktemp("mosquitto-tls"), [
            f"cafile {pki.ca}", f"certfile {pki.server_cert}", f"keyfile {pki.server_key}",
            "allow_anonymous true"]) as port:
        yield port


def get_totals(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/totals", timeout=5) as r:
        return orjson.loads(r.read())


def wait_until(check, what: str, procs: list[subprocess.Popen] = (), timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            assert proc.poll() is None, f"{proc.args[3]} exited with {proc.returncode}"
        with contextlib.suppress(OSError):
            if result := check():
                return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def ticker_services(options: list[str], env: dict[str, str] | None = None) -> Iterator[int]:
    """`gmv aggregate` and `gmv serve` as processes; yields the HTTP port once the ticker
    has the aggregator's first totals (so the aggregator has subscribed)."""
    port = free_port()
    procs = [subprocess.Popen(GMV + ["aggregate", *options], env=env),
             subprocess.Popen(GMV + ["serve", *options, "--port", str(port)], env=env)]
    try:
        wait_until(lambda: get_totals(port)["stats"]["shards"] == 1, "the first totals", procs)
        yield port
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            assert proc.wait(10) in (0, -signal.SIGTERM)


def replay_conserves_the_total(options: list[str], capsys, env=None) -> None:
    """The whole festival through the secured broker: Nov 1-11 22:59 in bulk batches, then
    the last hour minute by minute; all of it must arrive, to the cent."""
    with ticker_services(options, env) as port:
        assert main(["simulate", *options, *SCALE, "--from", "11-11 23:00", "--json"]) == 0
        report = orjson.loads(capsys.readouterr().out)
        totals = wait_until(lambda: (t := get_totals(port))["gmv_cents"] == TOTAL
                            and t["minute"] == 15839 and t, "the final total")
    assert report["gmv_cents"] == TOTAL and totals["orders"] == report["orders"]
    assert totals["stats"]["rejected"] == 0 and totals["stats"]["gaps"] == 0


def gmv_fails(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str], float]:
    """Run `gmv ARGS` as a process: exit code, stderr lines, seconds taken."""
    start = time.monotonic()
    done = subprocess.run(GMV + list(args), capture_output=True, text=True, timeout=30, env=env)
    return done.returncode, done.stderr.splitlines(), time.monotonic() - start


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gmv: error: "), err
    return err


# --- 1. user name and password ------------------------------------------------------------

@pytest.mark.parametrize("password_from", ["file", "env"])
def test_login_with_password_conserves_the_total(auth_broker, topics, capsys, monkeypatch,
                                                 password_from):
    """With a user and password (file or GMV_MQTT_PASSWORD) the processes agree to the cent."""
    options = ["--broker", auth_broker.url, "--prefix", topics.prefix, "--username", "user"]
    monkeypatch.delenv("GMV_MQTT_PASSWORD", raising=False)
    if password_from == "file":
        options += ["--password-file", str(auth_broker.good)]
    else:
        monkeypatch.setenv("GMV_MQTT_PASSWORD", "secret")
    replay_conserves_the_total(options, capsys, env=dict(os.environ))


def test_wrong_password_exits_1_with_one_line_naming_the_broker(auth_broker):
    """`gmv simulate` with a wrong password exits 1 with one line naming the broker URL."""
    code, lines, _ = gmv_fails("simulate", "--broker", auth_broker.url, "--username", "user",
                               "--password-file", str(auth_broker.bad))
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("gmv: error: ") and auth_broker.url in lines[0]
    assert "not authorized" in lines[0].lower()


def test_missing_password_file_exits_2_naming_the_option(auth_broker, tmp_path, capsys):
    """A password file that is not there exits 2 naming --password-file."""
    missing = tmp_path / "nope"
    assert main(["simulate", "--broker", auth_broker.url, "--username", "user",
                 "--password-file", str(missing)]) == 2
    assert f"--password-file={missing}" in one_error_line(capsys)


def test_password_without_username_exits_2(monkeypatch, capsys):
    """A password (GMV_MQTT_PASSWORD) without --username is refused, not silently dropped."""
    monkeypatch.setenv("GMV_MQTT_PASSWORD", "secret")
    assert main(["simulate", "--broker", f"mqtt://127.0.0.1:{free_port()}"]) == 2
    assert "--username" in one_error_line(capsys)


def test_credentials_in_the_broker_url_are_refused(monkeypatch, capsys):
    """`mqtt://user:secret@host` exits 2: the URL's password would be dropped and shown by ps."""
    monkeypatch.delenv("GMV_MQTT_PASSWORD", raising=False)
    url = f"mqtt://user:secret@127.0.0.1:{free_port()}"
    assert main(["simulate", "--broker", url]) == 2
    err = one_error_line(capsys)
    assert "--broker" in err and "secret" not in err


# --- 2. TLS ---------------------------------------------------------------------------------

def test_tls_with_ca_file_conserves_the_total(tls_port, pki, topics, capsys):
    """Over mqtts:// with --ca-file a whole replay arrives, exact to the cent."""
    replay_conserves_the_total(["--broker", f"mqtts://127.0.0.1:{tls_port}", "--ca-file",
                                str(pki.ca), "--prefix", topics.prefix], capsys)


def test_tls_without_ca_file_rejects_the_unknown_certificate(tls_port):
    """Without --ca-file the system CAs do not trust the broker: exit 1, one clear line."""
    url = f"mqtts://127.0.0.1:{tls_port}"
    code, lines, _ = gmv_fails("simulate", "--broker", url)
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("gmv: error: ") and url in lines[0]
    assert "certificate verify failed" in lines[0]


def test_missing_ca_file_exits_2_naming_the_option(tls_port, capsys):
    """--ca-file /nonexistent exits 2 naming --ca-file."""
    assert main(["simulate", "--broker", f"mqtts://127.0.0.1:{tls_port}",
                 "--ca-file", "/nonexistent"]) == 2
    assert "--ca-file=/nonexistent" in one_error_line(capsys)


def test_ca_file_that_is_not_a_certificate_exits_2(tls_port, tmp_path, capsys):
    """A --ca-file holding no PEM certificate is a bad setting: exit 2 naming --ca-file."""
    not_a_ca = tmp_path / "ca.crt"
    not_a_ca.write_text("this is not a certificate\n")
    assert main(["simulate", "--broker", f"mqtts://127.0.0.1:{tls_port}",
                 "--ca-file", str(not_a_ca)]) == 2
    assert "--ca-file" in one_error_line(capsys)


def test_ca_file_with_plain_mqtt_exits_2(capsys):
    """--ca-file with an mqtt:// (plain) broker is refused rather than silently not used."""
    ca = Path(__file__)  # exists; the option must be refused before it is even read
    assert main(["simulate", "--broker", f"mqtt://127.0.0.1:{free_port()}",
                 "--ca-file", str(ca)]) == 2
    assert "--ca-file" in one_error_line(capsys)


def test_plain_mqtt_to_the_tls_port_fails_cleanly(tls_port):
    """mqtt:// (plain) to a TLS listener exits 1 promptly with one line naming the URL."""
    url = f"mqtt://127.0.0.1:{tls_port}"
    code, lines, seconds = gmv_fails("simulate", "--broker", url)
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("gmv: error: ") and url in lines[0], lines
    assert seconds < 5, f"took {seconds:.1f} s to report a connection the broker closed"


# --- 3. websocket origins -------------------------------------------------------------------

def http_status(port: int, path: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        r.read()
        return r.status


async def ws_status(port: int, origin: str | None) -> int:
    """101 if the websocket opens with this Origin header (None: none sent), else the HTTP code."""
    try:
        async with ws_connect(f"ws://127.0.0.1:{port}/ws", origin=origin, open_timeout=5) as ws:
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "snapshot"
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def test_allowed_origins_accept_only_the_listed_origin():
    """With allowed_origins, only that Origin opens /ws (others and none get 403); HTTP works."""
    async with serving(allowed_origins=[SCREENS]) as (_, port):
        assert await ws_status(port, SCREENS) == 101
        assert await ws_status(port, "https://evil.example") == 403
        assert await ws_status(port, SCREENS + ":8443") == 403  # exact match, port included
        assert await ws_status(port, None) == 403
        assert await asyncio.to_thread(http_status, port, "/") == 200
        assert await asyncio.to_thread(http_status, port, "/api/totals") == 200


async def test_none_in_allowed_origins_admits_clients_without_origin():
    """websockets: None among the origins admits clients that send no Origin (scripts)."""
    async with serving(allowed_origins=[SCREENS, None]) as (_, port):
        assert await ws_status(port, None) == 101
        assert await ws_status(port, SCREENS) == 101
        assert await ws_status(port, "https://evil.example") == 403


async def test_no_allowed_origins_admits_any_origin():
    """Without allowed_origins (the CLI default) any Origin, and none, opens /ws."""
    async with serving() as (_, port):
        assert await ws_status(port, "https://evil.example") == 101
        assert await ws_status(port, None) == 101


def test_allowed_origin_that_cannot_match_exits_2(capsys):
    """An --allowed-origin with a path or trailing slash never matches a browser: exit 2."""
    assert main(["serve", "--broker", f"mqtt://127.0.0.1:{free_port()}",
                 "--allowed-origin", SCREENS + "/"]) == 2
    assert "--allowed-origin" in one_error_line(capsys)


# --- 4. binding -----------------------------------------------------------------------------

def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(address, port) of each TCP socket process `pid` listens on, read from /proc (Linux)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if (target := os.readlink(fd)).startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with contextlib.suppress(FileNotFoundError):
            for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    address, port = fields[1].split(":")
                    raw = bytes.fromhex(address)
                    if sys.byteorder == "little":  # stored as host-order 32-bit words
                        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                    found.add((socket.inet_ntop(family, raw), int(port, 16)))
    return found


def other_addresses() -> list[str]:
    """This machine's non-loopback addresses (`hostname -I`), link-local ones left out."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True,
                             timeout=5).stdout
        return [a for a in out.split() if not ipaddress.ip_address(a).is_loopback
                and not ipaddress.ip_address(a).is_link_local]
    return []


def reachable(address: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=2):
        return True
    return False


@contextlib.contextmanager
def control_listener() -> Iterator[int]:
    """A listening socket on every address of the machine; yields its port."""
    if socket.has_dualstack_ipv6():
        server = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    else:
        server = socket.create_server(("0.0.0.0", 0))
    with server:
        yield server.getsockname()[1]


def test_serve_listens_on_loopback_only_by_default(mosquitto, topics):
    """`gmv serve` without --host listens on 127.0.0.1 only, unreachable from other addresses."""
    port = free_port()
    proc = subprocess.Popen(GMV + ["serve", "--broker", mosquitto.url, "--prefix",
                                   topics.prefix, "--port", str(port)])
    try:
        wait_until(lambda: reachable("127.0.0.1", port), "the ticker's port", [proc])
        assert listening_addresses(proc.pid) == {("127.0.0.1", port)}
        with control_listener() as control:  # tells which other addresses we can reach
            others = [a for a in other_addresses() if reachable(a, control)]
        for address in others:
            assert not reachable(address, port), f"the ticker answers on {address}"
    finally:
        proc.terminate()
        assert proc.wait(10) in (0, -signal.SIGTERM)


# --- 5. viewers -----------------------------------------------------------------------------

async def next_totals(ws) -> dict:
    """The next snapshot or update frame, skipping heartbeats and the refusals of fake
    control commands (5 s at most)."""
    async with asyncio.timeout(5):
        while (frame := orjson.loads(await ws.recv()))["type"] not in ("snapshot", "update"):
            assert frame["type"] == "heartbeat" or frame == {
                "type": "control_result", "ok": False, "cmd": None,
                "error": "this server has no replay control"}, frame
    return frame


async def test_nothing_a_viewer_sends_changes_the_totals():
    """Whatever a viewer sends (commands, fake totals, binary, 4 KiB) leaves the totals as is."""
    async with serving() as (server, port):
        server.receive_totals(shard("0", 4200, 3, 9))
        await asyncio.sleep(0.1)
        before = await asyncio.to_thread(get_totals, port)
        async with ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.recv()
            for message in [
                    orjson.dumps({"type": "snapshot", "seq": 999, "gmv_cents": 1}).decode(),
                    orjson.dumps({"v": 1, "shard": "evil", "gmv_cents": 10**12}).decode(),
                    orjson.dumps({"type": "control", "action": "reset"}).decode(),
                    orjson.dumps({"cmd": "replay", "speed": "max", "token": "x"}).decode(),
                    b"\x00\xff" * 100, "not json", "", "y" * 4096]:
                await ws.send(message)
            pong = await ws.ping()
            await asyncio.wait_for(pong, 5)  # the server has read everything sent before
            server.receive_totals(shard("0", 4300, 4, 10))  # and still pushes to this viewer
            assert (await next_totals(ws))["gmv_cents"] == 4300
        after = await asyncio.to_thread(get_totals, port)
    assert before["gmv_cents"] == 4200 and after["gmv_cents"] == 4300
    assert after["stats"]["shards"] == 1 and server.feed.shards.keys() == {"0"}


async def test_a_message_over_4_kib_closes_that_viewer_with_1009():
    """A message above 4 KiB closes the sender's websocket with 1009; other viewers stay."""
    async with serving() as (server, port):
        url = f"ws://127.0.0.1:{port}/ws"
        async with ws_connect(url) as bystander, ws_connect(url) as sender:
            await bystander.recv()
            await sender.recv()
            await sender.send("z" * 4097)
            with pytest.raises(ConnectionClosedError) as closed:
                async with asyncio.timeout(5):
                    while True:
                        await sender.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
            server.receive_totals(shard("0", 777, 1, 0))
            assert (await next_totals(bystander))["gmv_cents"] == 777


# --- 6. producer identity: the ACL in docs/security.md, run as written ---------------------

DOCS = Path(__file__).resolve().parent.parent / "docs"


def documented_acl() -> str:
    """The `/etc/mosquitto/gmv.acl` block of docs/security.md, exactly as a user copies it."""
    text = (DOCS / "security.md").read_text()
    start = text.index("```conf\n# /etc/mosquitto/gmv.acl\n") + len("```conf\n")
    return text[start:text.index("```", start)]


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[tuple[str, dict[str, Path]]]:
    """Mosquitto with logins and the documented ACL; users sim-1, aggregator-0, ticker and
    mallory (a producer like any other), each with a password file."""
    passwd, files = tmp_path / "passwd", {}
    for user in ("sim-1", "aggregator-0", "ticker", "mallory"):
        subprocess.run([_tool("mosquitto_passwd"), "-b", *(["-c"] if not files else []),
                        str(passwd), user, f"pw-{user}"], check=True, capture_output=True)
        files[user] = tmp_path / f"{user}.pw"
        files[user].write_text(f"pw-{user}\n")
    (tmp_path / "gmv.acl").write_text(documented_acl())
    with mosquitto_with(tmp_path, ["allow_anonymous false", f"password_file {passwd}",
                                   f"acl_file {tmp_path / 'gmv.acl'}"]) as port:
        yield f"mqtt://127.0.0.1:{port}", files


async def test_with_the_documented_acl_no_producer_can_touch_another_ones_batches(acl_broker):
    """The field report: a producer publishing under another's id and its next seqs made the
    victim's $74.1B count as duplicates ($0.0002 on screen). With the documented ACL, mallory,
    who may publish orders, forges sim-1's batches, announcement and acks, writes totals for
    shard 0 and a shard zz, and sends a reset: sim-1's replay still lands exact, to the cent."""
    from ticker.shell.mqtt import BrokerSettings, Topics, connect
    from ticker.core.wire import OrderBatch, encode
    url, pw = acl_broker
    login = {user: ["--broker", url, "--username", user, "--password-file", str(path)]
             for user, path in pw.items()}
    port = free_port()
    procs = [subprocess.Popen(GMV + ["aggregate", *login["aggregator-0"]]),
             subprocess.Popen(GMV + ["serve", *login["ticker"], "--port", str(port)])]
    try:
        await asyncio.to_thread(wait_until, lambda: get_totals(port)["stats"]["shards"] == 1,
                                "the first totals", procs)
        topics = Topics()
        mallory = BrokerSettings("127.0.0.1", int(url.rsplit(":", 1)[1]), username="mallory",
                                 password="pw-mallory")

        def forged(seq: int, producer: str = "sim-1") -> bytes:
            return encode(OrderBatch(producer, seq, 14400, np.array([1]),
                                     np.zeros(1, np.uint32), np.zeros(1, np.uint8),
                                     np.zeros(1, np.uint8)))
        async with connect(mallory) as client:
            for seq in range(30):  # sim-1's first 30 seqs, on sim-1's topic: denied
                await client.publish(topics.orders("sim-1"), forged(seq), qos=1)
            for seq in range(30, 35):  # sim-1's id in the payload, on mallory's own topic
                await client.publish(topics.orders("mallory"), forged(seq), qos=1)
            fakes = {topics.producer("sim-1"): {"v": 1, "producer": "sim-1", "last_seq": 10**6},
                     topics.acks("0", "sim-1"): {"v": 1, "next_seq": 10**6},
                     topics.totals("0"): {**shard("0", 10**14, 1, 0)},
                     topics.totals("zz"): {**shard("zz", 10**14, 1, 0)},
                     topics.control: {"v": 1, "cmd": "reset"},
                     topics.replay: {"v": 1, "state": "done", "speed": None, "minute": 0,
                                     "scenario": "fake", "loop": False}}
            for topic, doc in fakes.items():
                await client.publish(topic, orjson.dumps(doc), qos=1, retain=True)
        await asyncio.sleep(0.5)
        before = await asyncio.to_thread(get_totals, port)
        assert before["replay"] is None and before["gmv_cents"] == 0, before
        sim = await asyncio.create_subprocess_exec(
            *GMV, "simulate", *login["sim-1"], *SCALE, "--json", stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(sim.communicate(), 120)
        assert sim.returncode == 0, err.decode()[-2000:]
        report = orjson.loads(out)
        shown = await asyncio.to_thread(
            wait_until, lambda: (t := get_totals(port))["gmv_cents"] == TOTAL and t,
            "the final total", procs)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    assert report["producer"] == "sim-1" and report["verdict"]["exact"], report["verdict"]
    assert shown["orders"] == report["orders"] and shown["stats"]["duplicates"] == 0
    assert shown["stats"]["gaps"] == 0 and shown["stats"]["unknown_shards"] == []
    assert shown["stats"]["rejected"] == 5  # the payloads on mallory's topic: producer_mismatch
