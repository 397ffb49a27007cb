"""Websocket fan-out of the real `TickerServer`: server CPU, updates/s and staleness per viewer.

    .venv/bin/python benchmarks/fanout.py --variant task --viewers 100 1000 2000 5000 \
        --json benchmarks/results/fanout_task.json

Three processes, all on 127.0.0.1, every run bounded in time:

* server   (`--role server`, started by this script): the real `ticker.shell.server.TickerServer`
  (variant `task`), or a variant class defined below, serving on a free port. A driver
  calls `receive_totals` 10 times a second on an absolute schedule (half a period out of
  phase with the pusher's first tick) with a changing shard
  totals message whose `gmv_cents` is the wall-clock time of the call in microseconds, and
  runs the server's own `run_pusher()` (10 Hz). `feed.publish` is wrapped on the instance
  (no product file is touched) to log the wall-clock time at which each version was made.
* viewers  (`--role viewers`): N websocket clients split over `--viewer-procs` asyncio
  processes. `raw` clients are a minimal RFC 6455 client protocol (handshake, unmasked server
  frames, pong) so that the viewer side stays cheap; `websockets` uses the library's client.
  For each text frame a viewer notes the arrival time, `seq` and the top-level `gmv_cents`.
* this orchestrator: with `--pin` (default on 2+ CPUs) the server runs on CPU 0 and the
  viewers on CPU 1; it reads both sides' CPU time from /proc over a fixed window (and the
  whole machine's, to report what other processes used), then joins the viewers' frames with
  the server's version log.

Staleness, all on the same machine clock:
* version->viewer: per received frame, arrival - creation of that version (`feed.publish`
  returning True);
* catch-up to newest (the goal's metric): for every viewer and every version made in the
  window, the time until that viewer holds that version or a newer one; a viewer that skips a
  version is charged until the newer frame arrives;
* totals->viewer: arrival - the `receive_totals` call whose totals the frame shows (adds the
  pusher's wait of up to 1/push_hz).

Server variants (`--variant`):

* task       the product: one task per viewer, `await ws.send(frame)` per viewer per version.
* broadcast  subclass: after each version, one pass over the viewers; `websockets.broadcast`
             of the update frame to viewers one version behind and of the snapshot frame to
             the rest; a viewer whose transport write buffer holds more than 64 KiB is skipped
             (it gets a snapshot once it has drained), so slow viewers never grow memory.
* rawframe   subclass: as broadcast, but the websocket frame (header + payload) is built once
             per version and written with `transport.write` to each viewer, skipping the
             per-connection `Frame.serialize` that `broadcast` still does.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import orjson

from _common import (cpu_seconds, cpu_times, machine_info, percentiles, raise_nofile,
                     system_busy_seconds, write_json)

HERE = Path(__file__).resolve()
WRITE_BUFFER_LIMIT = 64 * 1024


# == server side ================================================================================

def _variant_class(name: str):
    from websockets.asyncio.server import broadcast
    from websockets.exceptions import ConnectionClosed
    from websockets.protocol import State

    from ticker.shell.server import TickerServer, _text_frame

    class _OnePassServer(TickerServer):
        """Fan-out in one pass per version from the pusher instead of one task per viewer."""

        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self._sent: dict = {}  # connection -> seq it has been sent
            self.skipped_full_buffer = 0

        async def run_pusher(self) -> None:
            # Absolute schedule: the fan-out's own time does not stretch the period.
            t0, k = time.monotonic(), 0
            while True:
                if self.feed.publish():
                    self._fan_out()
                # next tick on the grid; ticks missed while the loop was busy are skipped
                k = max(k + 1, math.ceil((time.monotonic() - t0) / self.push_interval))
                await asyncio.sleep(max(0.0, t0 + k * self.push_interval - time.monotonic()))

        def _fan_out(self) -> None:
            seq = self.feed.seq
            behind_one, others = [], []
            for ws, sent in self._sent.items():
                if ws.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
                    self.skipped_full_buffer += 1
                    continue
                (behind_one if sent == seq - 1 else others).append(ws)
            for ws in behind_one:
                self._sent[ws] = seq
            for ws in others:
                self._sent[ws] = seq
            self._write(behind_one, self.feed.update_frame)
            self._write(others, self.feed.snapshot_frame)

        def _write(self, connections: list, frame: bytes) -> None:
            broadcast(connections, frame, text=True)

        async def _viewer(self, ws) -> None:
            try:
                seq, frame = self.feed.seq, self.feed.snapshot_frame
                await ws.send(frame, text=True)
                self._sent[ws] = seq
                async for _ in ws:  # viewers cannot change anything: drain and ignore
                    pass
            except ConnectionClosed:
                pass
            finally:
                self._sent.pop(ws, None)

    class BroadcastTickerServer(_OnePassServer):
        pass

    class RawFrameTickerServer(_OnePassServer):
        def _write(self, connections: list, frame: bytes) -> None:
            if not connections:
                return
            wire = _text_frame(frame)  # one websocket frame for everyone
            for ws in connections:
                if ws.protocol.state is State.OPEN:
                    ws.transport.write(wire)

    return {"task": TickerServer, "broadcast": BroadcastTickerServer,
            "rawframe": RawFrameTickerServer}[name]


def _totals(i: int, now_us: int) -> dict:
    """A shard totals message like the aggregator's; gmv_cents carries the wall clock in µs."""
    from ticker.core.dimensions import FESTIVAL_2020

    orders = 10_000 * (i + 1)
    gmv = now_us
    country = [gmv * 88 // 100] + [gmv * 12 // 1100] * 11
    country_orders = [orders * 88 // 100] + [orders * 12 // 1100] * 11
    return {"v": 1, "shard": "0", "window": FESTIVAL_2020.as_dict(), "gmv_cents": gmv,
            "orders": orders, "brands_active": min(250_000, 50 * (i + 1)),
            "minute": 14400 + i // 10, "gmv_minute_cents": gmv // 1000,
            "country_gmv_cents": country, "country_orders": country_orders,
            "platform_gmv_cents": [gmv * 90 // 100, gmv * 6 // 100, gmv * 4 // 100],
            "platform_orders": [orders * 90 // 100, orders * 6 // 100, orders * 4 // 100],
            "batches": i + 1, "duplicates": 0, "gaps": 0, "rejected": {},
            "producers": {"sim-bench": i + 1}}


def _pin(cpu: int | None) -> None:
    if cpu is not None and cpu >= 0:
        os.sched_setaffinity(0, {cpu})


async def server_main(args: argparse.Namespace) -> None:
    raise_nofile(args.nofile)
    _pin(args.cpu)
    server = _variant_class(args.variant)(push_hz=args.hz)
    log: list[tuple[int, float]] = []
    publish = server.feed.publish

    def logged_publish() -> bool:
        changed = publish()
        if changed:
            log.append((server.feed.seq, time.time()))
        return changed

    server.feed.publish = logged_publish  # on the instance only
    injected = []

    async def inject() -> None:
        # Half a period out of phase with the pusher's ticks, so that timer jitter does not
        # make two injections fall between the same two ticks (one version lost).
        period, i = 1.0 / args.hz, 0
        t0 = time.monotonic() + period / 2
        await asyncio.sleep(period / 2)
        while True:
            now = time.time()
            server.receive_totals(_totals(i, int(now * 1e6)))
            injected.append(now)
            # next tick on the grid; ticks missed while the loop was busy are skipped
            i = max(i + 1, math.ceil((time.monotonic() - t0) / period))
            await asyncio.sleep(max(0.0, t0 + i * period - time.monotonic()))

    ws_server = await server.serve("127.0.0.1", 0)
    port = ws_server.sockets[0].getsockname()[1]
    tasks = [asyncio.create_task(server.run_pusher()), asyncio.create_task(inject())]
    print(f"PORT {port}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # The orchestrator closes our stdin to stop us (or we stop at the deadline).
    threading.Thread(target=lambda: (sys.stdin.buffer.read(), loop.call_soon_threadsafe(stop.set)),
                     daemon=True).start()
    try:
        await asyncio.wait_for(stop.wait(), args.deadline)
    except TimeoutError:
        pass
    for task in tasks:
        task.cancel()
    Path(args.out).write_bytes(orjson.dumps({
        "versions": log, "injected": len(injected), "viewers_at_end": server.viewers,
        "skipped_full_buffer": getattr(server, "skipped_full_buffer", None),
        "update_frame_bytes": len(server.feed.update_frame),
        "snapshot_frame_bytes": len(server.feed.snapshot_frame)}))
    ws_server.close()  # no wait: the viewers are gone or about to be


# == viewer side ================================================================================

class Recorder:
    def __init__(self, n: int) -> None:
        self.t0 = self.t1 = float("inf")  # record frames arriving in [t0, t1)
        self.frames = np.zeros(n, np.int64)  # text frames per viewer inside the window
        self.snapshots = 0
        self.arrival: list[float] = []
        self.viewer: list[int] = []
        self.seq: list[int] = []
        self.stamp_us: list[int] = []
        self.frame_bytes: list[int] = []
        self.closed = 0
        self.heartbeats = 0

    def on_text(self, viewer: int, payload: bytes, now: float) -> None:
        if not self.t0 <= now < self.t1:
            return
        if payload.startswith(b'{"type":"heartbeat"'):  # no new version: not an update
            self.heartbeats += 1
            return
        self.frames[viewer] += 1
        i = payload.find(b'"seq":') + 6
        seq = int(payload[i:payload.find(b",", i)])
        j = payload.find(b'"gmv_cents":')  # the first one is the top-level total
        stamp = -1
        if j >= 0:
            j += 12
            stamp = int(payload[j:payload.find(b",", j)])
        if payload.startswith(b'{"type":"snapshot"'):
            self.snapshots += 1
        self.arrival.append(now)
        self.viewer.append(viewer)
        self.seq.append(seq)
        self.stamp_us.append(stamp)
        self.frame_bytes.append(len(payload))


class RawViewer(asyncio.Protocol):
    """Minimal websocket client: handshake, then parse unmasked frames; answer pings."""

    def __init__(self, index: int, port: int, recorder: Recorder) -> None:
        self.index, self.port, self.recorder = index, port, recorder
        self.buf = bytearray()
        self.open = False
        self.ready = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                        f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                        .encode())

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buf = self.buf
        buf += data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                if not self.ready.done():
                    self.ready.set_exception(ConnectionError(bytes(buf[:40]).decode()))
                self.transport.close()
                return
            del buf[:end + 4]
            self.open = True
            if not self.ready.done():
                self.ready.set_result(None)
        while len(buf) >= 2:
            opcode, length, header = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if length == 126:
                if len(buf) < 4:
                    return
                length, header = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length, header = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < header + length:
                return
            payload = bytes(buf[header:header + length])
            del buf[:header + length]
            if opcode == 0x1:
                self.recorder.on_text(self.index, payload, now)
            elif opcode == 0x9:  # ping -> masked pong with the same payload
                mask = os.urandom(4)
                body = bytes(b ^ mask[k % 4] for k, b in enumerate(payload))
                self.transport.write(bytes((0x8A, 0x80 | len(payload))) + mask + body)
            elif opcode == 0x8:
                self.transport.close()

    def connection_lost(self, exc) -> None:
        if self.open:
            self.recorder.closed += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"lost before handshake: {exc}"))


async def _library_viewer(index: int, port: int, recorder: Recorder,
                          ready: asyncio.Future) -> None:
    from websockets.asyncio.client import connect

    try:
        async with connect(f"ws://127.0.0.1:{port}/ws", compression=None, max_size=None,
                           ping_interval=None, open_timeout=30) as ws:
            ready.set_result(None)
            while True:
                payload = await ws.recv(decode=False)
                recorder.on_text(index, payload, time.time())
    except Exception as exc:  # noqa: BLE001 - counted, the run goes on
        if not ready.done():
            ready.set_exception(exc)
        else:
            recorder.closed += 1


async def viewers_main(args: argparse.Namespace) -> None:
    raise_nofile(args.nofile)
    _pin(args.cpu)
    loop = asyncio.get_running_loop()
    recorder = Recorder(args.n)
    transports, tasks, failed = [], [], 0
    t_connect = time.monotonic()
    for start in range(0, args.n, args.wave):
        waits = []
        for i in range(start, min(args.n, start + args.wave)):
            if args.client == "raw":
                try:
                    transport, proto = await asyncio.wait_for(loop.create_connection(
                        lambda i=i: RawViewer(i, args.port, recorder), "127.0.0.1", args.port),
                        20)
                except (OSError, TimeoutError):
                    failed += 1
                    continue
                transports.append(transport)
                waits.append(proto.ready)
            else:
                ready = loop.create_future()
                tasks.append(asyncio.create_task(_library_viewer(i, args.port, recorder, ready)))
                waits.append(ready)
        # A connection that is not open within 20 s counts as failed (it is left to die).
        waits = [asyncio.wait_for(asyncio.shield(w), 20) for w in waits]
        for outcome in await asyncio.gather(*waits, return_exceptions=True):
            failed += isinstance(outcome, BaseException)
    connect_seconds = time.monotonic() - t_connect
    print(f"CONNECTED {args.n - failed} {connect_seconds:.2f}", flush=True)
    # The orchestrator answers "GO t0 t1" (wall clock) once every viewer process is connected.
    line = await loop.run_in_executor(None, sys.stdin.readline)
    recorder.t0, recorder.t1 = map(float, line.split()[1:3])
    await asyncio.sleep(max(0.0, recorder.t0 - time.time()))
    closed_before = recorder.closed
    await asyncio.sleep(max(0.0, recorder.t1 - time.time()) + 0.2)
    np.savez(args.out, frames=recorder.frames, arrival=np.array(recorder.arrival),
             viewer=np.array(recorder.viewer, np.int64),
             seq=np.array(recorder.seq, np.int64), stamp_us=np.array(recorder.stamp_us, np.int64),
             frame_bytes=np.array(recorder.frame_bytes, np.int64),
             meta=np.array([args.n - failed, failed, connect_seconds,
                            recorder.closed - closed_before, recorder.snapshots,
                            recorder.heartbeats]))
    for transport in transports:
        transport.abort()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# == orchestrator ===============================================================================

def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen backlog was full."""
    with open("/proc/net/netstat") as f:
        lines = [line.split() for line in f if line.startswith("TcpExt:")]
    return int(dict(zip(lines[0][1:], lines[1][1:])).get("ListenOverflows", 0))


def _spawn(role_args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE), *role_args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=HERE.parent)


def _expect(proc: subprocess.Popen, prefix: str, timeout: float) -> list[str]:
    result: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            if line.startswith(prefix):
                result.extend(line.split()[1:])
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not result:
        raise TimeoutError(f"no {prefix} line from pid {proc.pid} within {timeout} s")
    return result


def catch_up_delays(viewer: np.ndarray, seq: np.ndarray, arrival: np.ndarray,
                    versions: np.ndarray, t0: float, t1: float) -> tuple[np.ndarray, int]:
    """For every viewer and every version k made in [t0, t1 - 1 s]: how long until that viewer
    had version k or a newer one (ms). A viewer that skips k is charged until the newer frame
    arrives. Versions not caught up with by t1 count as t1 - made (a lower bound); their
    number is returned too."""
    made = versions[(versions[:, 1] >= t0) & (versions[:, 1] <= t1 - 1.0)]
    if not len(made) or not len(viewer):
        return np.zeros(0), 0
    ks, created = made[:, 0], made[:, 1]
    order = np.lexsort((arrival, viewer))
    viewer, seq, arrival = viewer[order], seq[order], arrival[order]
    bounds = np.flatnonzero(np.diff(viewer)) + 1
    out, censored = [], 0
    for s, a in zip(np.split(seq, bounds), np.split(arrival, bounds)):
        s = np.maximum.accumulate(s)
        pos = np.searchsorted(s, ks, side="left")
        ok = pos < len(s)
        delay = np.where(ok, a[np.minimum(pos, len(s) - 1)] - created, t1 - created)
        censored += int((~ok).sum())
        out.append(delay)
    return np.concatenate(out) * 1e3, censored


def run_one(variant: str, n: int, args: argparse.Namespace, tmp: Path) -> dict:
    server_log = tmp / f"server-{variant}-{n}.json"
    procs = max(1, min(args.viewer_procs, n))
    shares = [n // procs + (k < n % procs) for k in range(procs)]
    outs = [tmp / f"viewers-{variant}-{n}-{k}.npz" for k in range(procs)]
    budget = 30 + n / 100
    pin = args.pin and (os.cpu_count() or 1) >= 2
    server = _spawn(["--role", "server", "--variant", variant, "--hz", str(args.hz),
                     "--cpu", "0" if pin else "-1", "--out", str(server_log),
                     "--deadline", str(budget + args.settle + args.window + 30)])
    viewers: list[subprocess.Popen] = []
    try:
        port = int(_expect(server, "PORT", 20)[0])
        overflows0 = listen_overflows()
        for share, out in zip(shares, outs):
            viewers.append(_spawn(["--role", "viewers", "--port", str(port), "--n", str(share),
                                   "--client", args.client, "--cpu", "1" if pin else "-1",
                                   "--out", str(out)]))
        connected = [_expect(v, "CONNECTED", budget) for v in viewers]
        overflows = listen_overflows() - overflows0  # machine-wide: others may add some
        t0 = time.time() + args.settle
        t1 = t0 + args.window
        for v in viewers:
            v.stdin.write(f"GO {t0:.6f} {t1:.6f}\n")
            v.stdin.flush()
        time.sleep(max(0.0, t0 - time.time()))
        s0, v0 = cpu_times(server.pid), sum(cpu_seconds(v.pid) for v in viewers)
        w0, busy0 = time.time(), system_busy_seconds()
        time.sleep(max(0.0, t1 - time.time()))
        s1, v1 = cpu_times(server.pid), sum(cpu_seconds(v.pid) for v in viewers)
        w1, busy1 = time.time(), system_busy_seconds()
        for v in viewers:
            v.wait(30)
    finally:
        for v in viewers:
            if v.poll() is None:
                v.kill()
                v.wait()
        server.stdin.close()  # ask the server to write its version log and stop
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    log = orjson.loads(server_log.read_bytes())
    parts = [np.load(out) for out in outs if out.exists()]
    meta = np.sum([p["meta"] for p in parts], axis=0)
    n_ok, n_failed, closed, snapshots, heartbeats = meta[0], meta[1], meta[3], meta[4], meta[5]
    connect_s = max(float(c[1]) for c in connected)
    arrival = np.concatenate([p["arrival"] for p in parts])
    viewer = np.concatenate([p["viewer"] + 10_000_000 * k for k, p in enumerate(parts)])
    seq = np.concatenate([p["seq"] for p in parts])
    stamp = np.concatenate([p["stamp_us"] for p in parts])
    frame_bytes = np.concatenate([p["frame_bytes"] for p in parts])
    per_viewer = np.concatenate([p["frames"] for p in parts]) / (t1 - t0)
    versions = np.array(log["versions"], dtype=np.float64).reshape(-1, 2)
    made = np.full(int(versions[:, 0].max()) + 2 if len(versions) else 2, np.nan)
    made[versions[:, 0].astype(np.int64)] = versions[:, 1]
    in_window = versions[(versions[:, 1] >= t0) & (versions[:, 1] < t1)]
    version_delay = (arrival - made[np.clip(seq, 0, len(made) - 1)]) * 1e3
    version_delay = version_delay[np.isfinite(version_delay)]
    totals_delay = (arrival - stamp / 1e6)[stamp > 0] * 1e3
    server_user, server_sys = (s1[0] - s0[0]) / (w1 - w0), (s1[1] - s0[1]) / (w1 - w0)
    server_cores = server_user + server_sys
    delivered = float(per_viewer.sum())  # frames per second, all viewers
    p_version = percentiles(version_delay, (50, 99))
    # viewers that got nothing in the window never caught up with any version
    silent = int(n_ok) - len(np.unique(viewer))
    newest, censored = catch_up_delays(viewer, seq.astype(np.float64), arrival, versions, t0, t1)
    p_newest = percentiles(newest, (50, 99))
    result = {
        "variant": variant, "client": args.client, "viewer_processes": procs, "viewers": n,
        "connected": int(n_ok), "failed_to_connect": int(n_failed), "connect_seconds": connect_s,
        "listen_overflows_while_connecting": overflows,
        "closed_during_window": int(closed), "window_s": t1 - t0,
        "server_versions_per_s": len(in_window) / (t1 - t0),
        "server_cores": server_cores, "server_user_cores": server_user,
        "server_sys_cores": server_sys,
        "server_cpu_us_per_delivered_frame": (server_cores * 1e6 / delivered
                                              if delivered else None),
        "projected_server_cores_at_full_rate": (server_cores / delivered * n * args.hz
                                                if delivered else None),
        "pinned": pin, "viewer_processes_cores": (v1 - v0) / (w1 - w0),
        "others_cores": ((busy1 - busy0) - (v1 - v0) - server_cores * (w1 - w0)) / (w1 - w0),
        "updates_per_s_per_viewer": ({"median": float(np.median(per_viewer)),
                                      "p1": float(np.percentile(per_viewer, 1)),
                                      "min": float(per_viewer.min())} if n_ok else None),
        "frames_received": int(len(arrival)), "snapshot_frames": int(snapshots),
        "heartbeat_frames": int(heartbeats),
        "frame_bytes_median": float(np.median(frame_bytes)) if len(arrival) else None,
        "update_frame_bytes": log["update_frame_bytes"],
        "snapshot_frame_bytes": log["snapshot_frame_bytes"],
        "skipped_full_buffer": log["skipped_full_buffer"],
        "staleness_version_to_viewer_ms": p_version,
        "catch_up_to_newest_ms": p_newest,
        "catch_up_not_within_window": censored, "viewers_without_frames": silent,
        "staleness_totals_to_viewer_ms": percentiles(totals_delay, (50, 99)),
    }
    result["meets_goal"] = (bool(n_ok == n and server_cores < 0.5 and silent == 0
                                 and p_newest["p99"] <= 250.0) if n else None)
    return result


def print_row(r: dict) -> None:
    u = r["updates_per_s_per_viewer"] or {"median": float("nan"), "p1": float("nan")}
    v, t = r["staleness_version_to_viewer_ms"], r["catch_up_to_newest_ms"]
    print(f"{r['variant']:<10}{r['viewers']:>7}{r['connected']:>7}{r['server_cores']:>8.3f}"
          f"{r['viewer_processes_cores']:>8.3f}{r['server_versions_per_s']:>7.2f}"
          f"{u['median']:>7.2f}{u['p1']:>6.2f}"
          f"{v['p50']:>8.1f}{v['p99']:>8.1f}{v['max']:>8.1f}"
          f"{t['p50']:>8.1f}{t['p99']:>8.1f}{t['max']:>8.1f}"
          f"{r['server_cpu_us_per_delivered_frame'] or float('nan'):>8.1f}"
          f"{r['others_cores']:>7.2f}"
          f"{r['snapshot_frames']:>7}"
          f"{ {True: '  yes', False: '   no', None: '    -'}[r['meets_goal']]}", flush=True)


def summarize(runs: list[dict]) -> list[dict]:
    """Medians over repetitions per (variant, viewers)."""
    keys = sorted({(r["variant"], r["viewers"]) for r in runs}, key=lambda k: (k[1], k[0]))
    out = []
    for variant, n in keys:
        rs = [r for r in runs if r["variant"] == variant and r["viewers"] == n]

        def med(get):
            values = [get(r) for r in rs]
            values = [v for v in values if v is not None and np.isfinite(v)]
            return float(np.median(values)) if values else None

        out.append({"variant": variant, "viewers": n, "repetitions": len(rs),
                    "server_cores": med(lambda r: r["server_cores"]),
                    "server_cpu_us_per_delivered_frame":
                        med(lambda r: r["server_cpu_us_per_delivered_frame"]),
                    "server_versions_per_s": med(lambda r: r["server_versions_per_s"]),
                    "updates_per_s_per_viewer_median":
                        med(lambda r: (r["updates_per_s_per_viewer"] or {}).get("median")),
                    "catch_up_p50_ms": med(lambda r: r["catch_up_to_newest_ms"]["p50"]),
                    "catch_up_p99_ms": med(lambda r: r["catch_up_to_newest_ms"]["p99"]),
                    "catch_up_max_ms": med(lambda r: r["catch_up_to_newest_ms"]["max"]),
                    "others_cores": med(lambda r: r["others_cores"])})
    return out


def orchestrate(args: argparse.Namespace) -> int:
    import tempfile

    raise_nofile(args.nofile)
    started = time.monotonic()
    doc = {"benchmark": "fanout", "command": "benchmarks/fanout.py " + " ".join(sys.argv[1:]),
           "machine": machine_info(), "push_hz": args.hz, "window_s": args.window,
           "goal": "5,000 viewers, server < 0.5 core, p99 staleness <= 250 ms, 10 updates/s",
           "runs": []}
    print(f"{'variant':<10}{'N':>7}{'conn':>7}{'srv cpu':>8}{'cli cpu':>8}{'ver/s':>7}"
          f"{'upd/s':>7}{'p1':>6}{'v->v50':>8}{'v->v99':>8}{'v->vmax':>8}"
          f"{'new50':>8}{'new99':>8}{'newmax':>8}{'µs/frm':>8}{'others':>7}{'snaps':>7}"
          f"{' goal':>5}")
    print(f"{'':<10}{'':>7}{'':>7}{'(cores)':>8}{'(cores)':>8}{'':>7}{'median':>7}{'':>6}"
          f"{'(ms)':>8}{'(ms)':>8}{'(ms)':>8}{'(ms)':>8}{'(ms)':>8}{'(ms)':>8}")
    with tempfile.TemporaryDirectory(prefix="gmv-fanout-") as tmp:
        # Repetitions interleave the variants, so that they share the machine's noise.
        for rep in range(args.repeat):
            for n in args.viewers:
                for variant in args.variant:
                    if time.monotonic() - started > args.max_seconds:
                        print(f"skipping {variant} N={n}: over --max-seconds", flush=True)
                        continue
                    result = run_one(variant, n, args, Path(tmp))
                    result["repetition"] = rep
                    doc["runs"].append(result)
                    print_row(result)
    doc["summary"] = summarize(doc["runs"])
    if args.repeat > 1:
        print("medians over repetitions:")
        for row in doc["summary"]:
            print("  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in row.items()))
    doc["seconds"] = time.monotonic() - started
    if args.json:
        write_json(args.json, doc)
        print(f"wrote {args.json}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=("orchestrate", "server", "viewers"),
                        default="orchestrate", help=argparse.SUPPRESS)
    parser.add_argument("--variant", nargs="+", default=["task"],
                        choices=("task", "broadcast", "rawframe"))
    parser.add_argument("--viewers", type=int, nargs="+", default=[100, 1000, 2000, 5000])
    parser.add_argument("--client", choices=("raw", "websockets"), default="raw")
    parser.add_argument("--hz", type=float, default=10.0, help="totals injected per second")
    parser.add_argument("--repeat", type=int, default=1,
                        help="repetitions; each one runs every variant in turn")
    parser.add_argument("--viewer-procs", type=int, default=2,
                        help="processes the viewers are split across (default 2)")
    parser.add_argument("--window", type=float, default=8.0, help="measured seconds")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after connecting")
    parser.add_argument("--wave", type=int, default=100, help="concurrent connection attempts")
    parser.add_argument("--max-seconds", type=float, default=90.0,
                        help="start no new run after this many seconds")
    parser.add_argument("--nofile", type=int, default=16384)
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="do not pin the server to CPU 0 and the viewers to CPU 1")
    parser.add_argument("--cpu", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--json", metavar="PATH")
    # role-internal options
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=120.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "server":
        args.variant = args.variant[0]
        asyncio.run(server_main(args))
        return 0
    if args.role == "viewers":
        asyncio.run(viewers_main(args))
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
